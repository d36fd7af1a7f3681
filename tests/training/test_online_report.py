"""`python -m training online-report`: its statistics held to independent computations (the Wilson interval as the
roots of its defining quadratic, the z-test by hand and through scipy), its join and rates on a small case counted
by hand, and the CLI on a store filled through the store's own interface."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from scipy.stats import norm

from conftest import run_cli
from model.store.events import Event, open_store
from model.store.impressions import Click, Impression
from training.cli import main
from training.online import online_metrics, parse_since, two_proportions, wilson


@pytest.mark.parametrize("k, n", [(0, 10), (1, 10), (37, 200), (200, 200), (5, 7)])
def test_wilson_is_the_set_of_proportions_the_score_test_does_not_reject(k, n):
    """p is in the interval iff (k/n - p)² <= z² p (1 - p) / n: its ends are that quadratic's roots."""
    z, phat = norm.ppf(0.975), k / n
    # (1 + z²/n) p² - (2 phat + z²/n) p + phat² = 0
    roots = np.sort(np.roots([1 + z * z / n, -(2 * phat + z * z / n), phat * phat]).real)
    assert wilson(k, n) == pytest.approx(tuple(roots), abs=1e-9)


def test_two_proportions_against_a_hand_computation():
    # control 20 of 100 clicked, arm 35 of 100: pooled p = 55/200 = 0.275
    c = two_proportions("b", 35, 100, "a", 20, 100)
    se_pooled = math.sqrt(0.275 * 0.725 * (1 / 100 + 1 / 100))             # 0.063147...
    assert c.diff == pytest.approx(0.15)
    assert c.z == pytest.approx(0.15 / se_pooled) and c.z == pytest.approx(2.3754, abs=1e-4)
    assert c.p_value == pytest.approx(2 * norm.sf(0.15 / se_pooled)) and c.p_value == pytest.approx(0.01753, abs=1e-5)
    half = 1.959964 * math.sqrt(0.20 * 0.80 / 100 + 0.35 * 0.65 / 100)     # 0.12283...
    assert (c.low, c.high) == pytest.approx((0.15 - half, 0.15 + half), abs=1e-6)
    assert c.significant
    assert not two_proportions("b", 25, 100, "a", 20, 100).significant    # z 0.85, p 0.39


def test_the_join_and_the_rates_on_a_case_counted_by_hand():
    items = ("i1", "i2", "i3", "i4", "i5", "i6")
    shown = [Impression("x1", "u1", items, "full", "v1", "a", 0.0),
             Impression("x2", "u2", items, "full", "v1", "a", 1.0),
             Impression("x3", "u3", items, "two_stage", "v1", "b", 2.0),
             Impression("x4", "u4", items, "two_stage", "v1", "b", 3.0),
             Impression("x5", "u5", items, "two_stage", "v1", "b", 4.0)]
    clicks = [Click("x1", "u1", "i1", 1, 10.0),      # a: x1 clicked at position 1 ...
              Click("x1", "u1", "i6", None, 11.0),   # ... and at 6 (two clicks, one clicked impression)
              Click("x2", "u9", "i2", 2, 12.0),      # another user's event: does not join
              Click("x3", "u3", "i5", 1, 13.0),      # b: x3 at position 5 (the client's 1 is not trusted)
              Click("x4", "u4", "zz", 1, 14.0)]      # an item x4 did not show: does not join
    r = online_metrics(shown, clicks)
    arms = {row["arm"]: row for row in r["arms"]}
    assert (arms["a"]["impressions"], arms["a"]["clicked"], arms["a"]["clicks"]) == (2, 1, 2)
    assert (arms["b"]["impressions"], arms["b"]["clicked"], arms["b"]["clicks"]) == (3, 1, 1)
    assert arms["a"]["ctr"] == 1 / 2 and arms["b"]["ctr"] == 1 / 3
    assert arms["a"]["hit_rate"] == {"hr@1": 1 / 2, "hr@5": 1 / 2, "hr@10": 1 / 2}
    assert arms["b"]["hit_rate"] == {"hr@1": 0.0, "hr@5": 1 / 3, "hr@10": 1 / 3}
    assert (r["joined_clicks"], r["unjoined_clicks"], r["control"]) == (3, 2, "a")
    (c,) = r["comparisons"]
    assert (c["arm"], c["control"]) == ("b", "a") and c["diff"] == pytest.approx(1 / 3 - 1 / 2)
    assert [(g["arm"], g["strategy"], g["impressions"]) for g in r["groups"]] == [("a", "full", 2),
                                                                                 ("b", "two_stage", 3)]
    with pytest.raises(ValueError, match="no impressions of that arm"):
        online_metrics(shown, clicks, control="c")


def test_since_reads_durations_times_and_refuses_words():
    now = 1_800_000_000.0
    assert parse_since("90m", now) == now - 5400 and parse_since("7d", now) == now - 7 * 86400
    assert parse_since("1700000000", now) == 1_700_000_000.0
    assert parse_since("2026-12-07T06:00:00", now) == parse_since("2026-12-07T06:00:00+00:00", now)
    with pytest.raises(ValueError, match="duration"):
        parse_since("yesterday", now)


def test_the_cli_reports_a_store_filled_by_hand(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/feedback.sqlite3"
    store = open_store(url)
    now = time.time()
    shown = [Impression(f"x{n}", f"u{n}", ("i1", "i2", "i3"), "full", "v1", "ab"[n % 2], now - 3600 + n)
             for n in range(40)]
    store.record_impressions(shown)
    # arm a (even n): 12 of 20 clicked; arm b (odd n): 4 of 20
    clicked = [n for n in range(40) if (n % 2 == 0 and n < 24) or (n % 2 == 1 and n < 8)]
    store.append([Event(f"u{n}", "i2", None) for n in clicked], clicks=[(f"x{n}", 2) for n in clicked])
    store.close()
    png = tmp_path / "online.png"
    proc = run_cli("online-report", "--feedback", url, "--json", "--plot", str(png))    # the real command, once
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    arms = {row["arm"]: row for row in report["arms"]}
    assert (arms["a"]["clicked"], arms["a"]["impressions"], arms["b"]["clicked"]) == (12, 20, 4)
    (c,) = report["comparisons"]
    hand = two_proportions("b", 4, 20, "a", 12, 20)
    assert c["diff"] == pytest.approx(-0.4) and c["p_value"] == pytest.approx(hand.p_value) and c["significant"]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["online-report", "--feedback", url, "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "b - a: CTR difference -0.4000" in out and "significant at alpha 0.05" in out
    assert main(["online-report", "--feedback", url, "--plot", str(png), "--since", "30m"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("0 impressions") and "no plot" in out


@pytest.mark.parametrize("args, message", [
    (["--since", "yesterday"], "--since 'yesterday'"),
    (["--alpha", "2"], "--alpha 2"),
    (["--control", "z"], "--control 'z'"),
    (["--feedback", "none.sqlite3"], "not found"),
])
def test_the_cli_explains_bad_arguments(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    store = open_store("feedback.sqlite3")
    store.record_impressions([Impression("x", "u", ("i",), "full", "v", "a", time.time())])
    store.close()
    rc = main(["online-report", "--feedback", "feedback.sqlite3", "--plot", "p.png", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and "Traceback" not in err
