"""`python -m training online-report --feedback URL`: what the served lists earned, from the feedback store's
impressions joined with the feedback events that name them (model/store/impressions.py).

Per (arm, strategy, model version), and per arm:
- CTR: the share of impressions with at least one joined click (each impression a Bernoulli trial), with a Wilson
  score interval;
- hit rate@k: the share of impressions with a joined click within their first k positions;
- clicks: joined click events (an impression may collect several).
Each arm is compared with the control arm (`--control`, default the first by name): the difference of CTRs with
its (unpooled, Wald) interval, and a two-proportion z-test (pooled standard error) with its two-sided p-value;
significant when p < alpha. A PNG plots CTR over time per arm (per strategy and model version without arms).
"""
from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from statistics import NormalDist

from model.store.events import StoreUnavailable, open_store
from model.store.impressions import Click, Impression, joined_position

KS = (1, 5, 10)
BUCKETS_S = (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)
MAX_BUCKETS = 48
OUTSIDE = "none"     # the arm of impressions outside any experiment


def z_of(alpha: float) -> float:
    return NormalDist().inv_cdf(1 - alpha / 2)


def wilson(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """The Wilson score interval of a proportion; (0, 1) without trials."""
    if n == 0:
        return 0.0, 1.0
    z, p = z_of(alpha), successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Comparison:
    arm: str
    control: str
    diff: float          # CTR(arm) - CTR(control)
    low: float           # the difference's interval
    high: float
    z: float             # the two-proportion z statistic (pooled standard error)
    p_value: float       # two-sided
    significant: bool


def two_proportions(arm: str, k1: int, n1: int, control: str, k0: int, n0: int, alpha: float = 0.05) -> Comparison:
    """Arm (k1 successes of n1) against control (k0 of n0)."""
    p1, p0 = k1 / n1, k0 / n0
    diff = p1 - p0
    half = z_of(alpha) * math.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
    pooled = (k1 + k0) / (n1 + n0)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n0))
    z = diff / se if se > 0 else 0.0
    p_value = math.erfc(abs(z) / math.sqrt(2))
    return Comparison(arm, control, diff, diff - half, diff + half, z, p_value, p_value < alpha)


@dataclass
class Row:
    """The online metrics of one group of impressions."""
    arm: str
    strategy: str | None
    model_version: str | None
    impressions: int
    clicked: int
    clicks: int
    ctr: float
    ctr_low: float
    ctr_high: float
    hit_rate: dict[str, float]      # "hr@k" → share


def clicked_positions(impressions: list[Impression], clicks: list[Click]) -> dict[str, list[int]]:
    """impression id → the positions of its joined clicks (one per click event)."""
    by_id = {i.impression_id: i for i in impressions}
    out: dict[str, list[int]] = defaultdict(list)
    for c in clicks:
        impression = by_id.get(c.impression_id)
        if impression is not None and (position := joined_position(impression, c.user_id, c.item_id)) is not None:
            out[c.impression_id].append(position)
    return out


def row(key: tuple, group: list[Impression], positions: dict[str, list[int]], alpha: float) -> Row:
    n = len(group)
    clicked = sum(bool(positions.get(i.impression_id)) for i in group)
    hits = {f"hr@{k}": sum(any(p <= k for p in positions.get(i.impression_id, ())) for i in group) / n for k in KS}
    low, high = wilson(clicked, n, alpha)
    return Row(*key, impressions=n, clicked=clicked, clicks=sum(len(positions.get(i.impression_id, ())) for i in group),
               ctr=clicked / n, ctr_low=low, ctr_high=high, hit_rate=hits)


def bucket_size(span: float) -> int:
    return next((b for b in BUCKETS_S if span / b <= MAX_BUCKETS), BUCKETS_S[-1])


def online_metrics(impressions: list[Impression], clicks: list[Click], control: str | None = None,
                   alpha: float = 0.05) -> dict:
    """The report's numbers (see the module's docstring) as plain data."""
    positions = clicked_positions(impressions, clicks)
    groups: dict[tuple, list[Impression]] = defaultdict(list)
    arms: dict[str, list[Impression]] = defaultdict(list)
    for i in impressions:
        arm = i.arm or OUTSIDE
        groups[(arm, i.strategy, i.model_version)].append(i)
        arms[arm].append(i)
    arm_rows = {a: row((a, None, None), arms[a], positions, alpha) for a in sorted(arms)}
    named = [a for a in arm_rows if a != OUTSIDE]
    if control is not None and control not in named:
        raise ValueError(f"--control {control!r}: no impressions of that arm (arms: {', '.join(named) or 'none'})")
    control = control or (named[0] if named else None)
    comparisons = [two_proportions(a, arm_rows[a].clicked, arm_rows[a].impressions, control,
                                   arm_rows[control].clicked, arm_rows[control].impressions, alpha)
                   for a in named if a != control]
    # over time: per arm, or per strategy and model version when no impression has an arm
    series_of = (lambda i: i.arm or OUTSIDE) if named else (lambda i: f"{i.strategy} {i.model_version}")
    span = (impressions[-1].shown - impressions[0].shown) if impressions else 0.0
    size = bucket_size(span)
    series: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for i in impressions:
        cell = series[series_of(i)][int(i.shown // size) * size]
        cell[0] += 1
        cell[1] += bool(positions.get(i.impression_id))
    joined = sum(len(p) for p in positions.values())
    return {"impressions": len(impressions), "clicks": len(clicks), "joined_clicks": joined,
            "unjoined_clicks": len(clicks) - joined, "alpha": alpha, "control": control,
            "groups": [asdict(row(key, g, positions, alpha)) for key, g in sorted(groups.items(), key=str)],
            "arms": [asdict(r) for r in arm_rows.values()],
            "comparisons": [asdict(c) for c in comparisons],
            "over_time": {"bucket_s": size, "series": {name: [[t, n, k] for t, (n, k) in sorted(cells.items())]
                                                       for name, cells in sorted(series.items())}}}


DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """unix seconds from a duration back from now (90m, 24h, 7d, 2w), unix seconds, or an ISO 8601 time (UTC
    unless it says otherwise)."""
    now = time.time() if now is None else now
    if m := DURATION.match(text.strip()):
        return now - float(m.group(1)) * UNITS[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since {text!r}: give a duration back from now (90m, 24h, 7d), unix seconds, or an "
                         "ISO 8601 time (2026-12-07T06:00)") from None
    return (at if at.tzinfo else at.replace(tzinfo=timezone.utc)).timestamp()


def read_store(url: str, since: float) -> tuple[list[Impression], list[Click]]:
    try:
        store = open_store(url, readonly=True)
    except (FileNotFoundError, StoreUnavailable) as e:
        raise ValueError(f"cannot open the feedback store {url}: {e}") from None
    try:
        return store.impressions(since), store.clicks(since)
    except StoreUnavailable as e:
        raise ValueError(f"cannot read impressions from {store.url}: {e} (a store no server of this version has "
                         "written to has none)") from None
    finally:
        store.close()


def table(report: dict) -> str:
    head = f"{'arm':14s}{'strategy':11s}{'model_version':26s}{'impressions':>12s}{'clicked':>9s}{'CTR':>8s}" \
           f"{'95% CI':>18s}" + "".join(f"{'HR@' + str(k):>8s}" for k in KS)
    lines = [f"{report['impressions']:,} impressions, {report['clicks']:,} clicks on them "
             f"({report['unjoined_clicks']:,} do not join: another user's or item)", "", head]

    def line(r: dict) -> str:
        return (f"{r['arm']:14s}{r['strategy'] or 'all':11s}{r['model_version'] or 'all':26s}{r['impressions']:12,d}"
                f"{r['clicked']:9,d}{r['ctr']:8.4f}  [{r['ctr_low']:.4f}, {r['ctr_high']:.4f}]"
                + "".join(f"{r['hit_rate'][f'hr@{k}']:8.4f}" for k in KS))
    lines += [line(r) for r in report["groups"]]
    if any(r["arm"] != OUTSIDE for r in report["arms"]):
        lines += ["", "per arm:"] + [line(r) for r in report["arms"]]
    confidence = round(100 * (1 - report["alpha"]))
    for c in report["comparisons"]:
        lines.append(f"{c['arm']} - {c['control']}: CTR difference {c['diff']:+.4f}, {confidence}% CI "
                     f"[{c['low']:+.4f}, {c['high']:+.4f}], z {c['z']:.2f}, p {c['p_value']:.4g}: "
                     + ("significant" if c["significant"] else "not significant") + f" at alpha {report['alpha']:g}")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """CTR over time per series with its Wilson band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    size, alpha = report["over_time"]["bucket_s"], report["alpha"]
    for name, cells in report["over_time"]["series"].items():
        at = [datetime.fromtimestamp(t + size / 2, timezone.utc) for t, _, _ in cells]
        bands = [wilson(k, n, alpha) for _, n, k in cells]
        line, = ax.plot(at, [k / n for _, n, k in cells], "o-", label=name)
        ax.fill_between(at, [b[0] for b in bands], [b[1] for b in bands], color=line.get_color(), alpha=0.2)
    ax.set(xlabel="time shown (UTC)", ylabel="CTR (impressions clicked)",
           title=f"online CTR per {size // 60 if size >= 60 else size} {'min' if size >= 60 else 's'}, "
                 f"{round(100 * (1 - alpha))}% Wilson band")
    if ax.lines:
        ax.legend(fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
