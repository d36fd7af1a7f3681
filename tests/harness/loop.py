"""A simulation of the closed loop: simulated users with hidden preferences ask a real server for lists, click
according to those preferences, and send their clicks back as feedback; between rounds `python -m training
retrain`'s Retrainer trains on the stored events and publishes through its gate, and the server follows the
rollout. Used by tests/training/test_loop_simulation.py and benchmarks/simulate_loop.py.

The world: users and items belong to latent clusters; a user's hidden preference for an item is the dot product of
their latent factors, and an item shown is clicked with probability sigmoid(sharpness · preference + offset). The
base data the first model is trained on is sparse and half noise (what a service knows on its first day), so the
first model is weak and the clicks carry what it lacks. Everything is drawn from one seed.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from model.retrieval import TwoStage
from model.store.checkpoint import load_checkpoint, save_checkpoint
from model.store.events import open_store
from training.two_stage import fit_retrieval
from training.online import online_metrics, read_store
from training.retrain import RetrainConfig, Retrainer, Round
from training.train import TrainConfig, train

Z95 = 1.959964


@dataclass
class World:
    n_users: int = 240
    n_items: int = 360
    n_clusters: int = 8
    dim: int = 8
    base_per_user: int = 3          # the first model's data: this many interactions per user …
    base_noise: float = 0.5         # … this fraction of them uniformly random
    sharpness: float = 4.0
    offset: float = -3.5
    seed: int = 0

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        centres = rng.normal(size=(self.n_clusters, self.dim))
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        self.user_cluster = rng.integers(0, self.n_clusters, self.n_users)
        self.item_cluster = rng.integers(0, self.n_clusters, self.n_items)
        self.users = centres[self.user_cluster] + 0.3 * rng.normal(size=(self.n_users, self.dim)) / math.sqrt(self.dim)
        self.items = centres[self.item_cluster] + 0.3 * rng.normal(size=(self.n_items, self.dim)) / math.sqrt(self.dim)
        self.click = 1 / (1 + np.exp(-(self.sharpness * self.users @ self.items.T + self.offset)))   # (U, I)
        self.rng = np.random.default_rng(self.seed + 1)

    def user_id(self, u: int) -> str:
        return f"u{u}"

    def item_id(self, i: int) -> str:
        return f"i{i}"

    def base_data(self, path: Path) -> Path:
        """The first model's interactions as a CSV (user, item, timestamp): every item appears at least once."""
        rng = np.random.default_rng(self.seed + 2)
        pairs = set()
        for u in range(self.n_users):
            liked = rng.choice(self.n_items, self.base_per_user, replace=False, p=self.click[u] / self.click[u].sum())
            noise = rng.choice(self.n_items, self.base_per_user, replace=False)
            keep = rng.random(self.base_per_user) < self.base_noise
            pairs.update((u, int(i)) for i in np.where(keep, noise, liked))
        pairs.update((int(rng.integers(self.n_users)), i) for i in range(self.n_items))
        pairs.update((u, int(rng.integers(self.n_items))) for u in range(self.n_users))
        lines = ["user,item,timestamp"] + [f"{self.user_id(u)},{self.item_id(i)},{n}"
                                           for n, (u, i) in enumerate(sorted(pairs))]
        path.write_text("\n".join(lines) + "\n")
        return path

    def clicks(self, users: list[int], lists: list[list[int]]) -> list[list[bool]]:
        return [list(self.rng.random(len(items)) < self.click[u, items]) for u, items in zip(users, lists)]

    def preference(self, users: list[int], lists: list[list[int]]) -> float:
        """The true expected CTR of these lists (the mean click probability of the items shown)."""
        return float(np.mean(np.concatenate([self.click[u, items] for u, items in zip(users, lists)])))


@dataclass
class Rate:
    """Clicks over items shown, with a 95% Wilson interval."""
    clicks: int
    shown: int

    @property
    def ctr(self) -> float:
        return self.clicks / self.shown if self.shown else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        n, p = self.shown, self.ctr
        centre = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
        half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / (1 + Z95 ** 2 / n)
        return centre - half, centre + half


def difference(a: Rate, b: Rate) -> tuple[float, float, float]:
    """CTR(a) − CTR(b) and its 95% (Wald) interval."""
    d = a.ctr - b.ctr
    se = math.sqrt(a.ctr * (1 - a.ctr) / a.shown + b.ctr * (1 - b.ctr) / b.shown)
    return d, d - Z95 * se, d + Z95 * se


@dataclass
class Served:
    rate: Rate
    preference: float         # true expected CTR of what was shown
    version: str
    arms: dict[str, "Served"] = field(default_factory=dict)   # the lists each experiment arm served


class Client:
    """The simulated users' side of the HTTP contract: lists from /recommend/batch, clicks to /feedback."""

    def __init__(self, url: str, world: World, k: int = 10):
        self.http, self.world, self.k = httpx.Client(base_url=url, timeout=120), world, k
        self.events = 0

    def close(self) -> None:
        self.http.close()

    def serve(self, users: list[int] | None = None) -> Served:
        """Each user (default: all), in a random order, gets one list and clicks on it; the clicks are sent as
        feedback naming the list's impression_id and the item's position, in that order (so the newest events,
        which retraining holds out, are a random set of users')."""
        w, lists, answers, version = self.world, [], [], None
        users = [int(u) for u in w.rng.permutation(w.n_users if users is None else users)]
        for start in range(0, len(users), 200):
            body = {"requests": [{"user_id": w.user_id(u), "k": self.k} for u in users[start:start + 200]]}
            r = self.http.post("/recommend/batch", json=body)
            r.raise_for_status()
            version = r.json()["model_version"]
            answers += r.json()["results"]
        lists = [[int(it["item_id"][1:]) for it in a["items"]] for a in answers]
        clicked = w.clicks(users, lists)
        events = [{"user_id": w.user_id(u), "item_id": w.item_id(i), "impression_id": a["impression_id"],
                   "position": p + 1}
                  for u, items, a, cs in zip(users, lists, answers, clicked) for p, (i, c) in enumerate(zip(items, cs))
                  if c]
        for n, e in enumerate(events):
            e["event_id"] = f"e{self.events + n}"
        for start in range(0, len(events), 1000):
            self.http.post("/feedback", json={"events": events[start:start + 1000]}).raise_for_status()
        self.events += len(events)
        arms = {}
        for arm in sorted({a.get("arm") for a in answers} - {None}):
            rows = [n for n, a in enumerate(answers) if a.get("arm") == arm]
            arms[arm] = Served(Rate(sum(sum(clicked[n]) for n in rows), sum(len(lists[n]) for n in rows)),
                               w.preference([users[n] for n in rows], [lists[n] for n in rows]), version)
        return Served(Rate(len(events), sum(len(items) for items in lists)), w.preference(users, lists), version, arms)

    def wait_for_arms(self, timeout: float = 60) -> None:
        """Until the server assigns users to the experiment's arms (it re-reads the file at its poll)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = {"requests": [{"user_id": self.world.user_id(u), "k": 1} for u in range(20)]}
            if any(r.get("arm") for r in self.http.post("/recommend/batch", json=body).json()["results"]):
                return
            time.sleep(0.2)
        raise TimeoutError(f"the server did not start the experiment within {timeout} s")

    def wait_for(self, version: str, timeout: float = 120) -> None:
        """Until the server serves `version` (it follows the store's rollouts at its poll)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.http.get("/health").json().get("model_version") == version:
                return
            time.sleep(0.1)
        raise TimeoutError(f"the server did not roll out {version} within {timeout} s")


def shuffle_weights(path: str, seed: int = 0) -> None:
    """Overwrite a checkpoint with its weights shuffled (each tensor's entries permuted): a deliberately broken
    model with the same shapes and statistics, under a new version."""
    ckpt = load_checkpoint(path)
    g = np.random.default_rng(seed)
    ckpt.state = {k: ckpt.state[k].flatten()[g.permutation(ckpt.state[k].numel())].reshape(ckpt.state[k].shape)
                  for k in sorted(ckpt.state)}   # in a fixed order: the same seed, the same permutations
    ckpt.model_version = ""
    save_checkpoint(ckpt, path)


def train_config(data: Path, **kw) -> TrainConfig:
    """Small and quick: the simulation's models train in seconds on one CPU thread, without a validation split
    (the served strategy is `full`)."""
    return TrainConfig(**{**dict(data=str(data), epochs=5, pretrain_epochs=10, embed_size=16, hops=2, neg=2,
                                 batch_size=128, lr=0.01, gmf_lr=0.02, validation=False, progress=False,
                                 device="cpu", full_eval=False), **kw})


@contextmanager
def one_thread():
    """Training's small ops run best on one intra-op thread (model/threads.py); the caller's count is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def with_retrieval(store_url: str, path: str, out_dir: Path) -> str:
    """What an operator adding a retrieval stage does: the checkpoint `path` with an ItemKNN stage fitted on its
    pairs (so that it serves `full`, `two_stage` and `retrieval`), written under a new version and published.
    Returns that version."""
    ckpt = load_checkpoint(path)
    ckpt.retrieval, params = fit_retrieval("itemknn", ckpt.seen, ckpt.config.n_users, ckpt.config.n_items)
    ckpt.two_stage = TwoStage("itemknn", candidates=100, weight=0.5, params=params)
    # the weights are the same, so the version derived from them would be too: name the addition
    ckpt.model_version = f"{ckpt.model_version}+itemknn"
    out = str(out_dir / "model-with-retrieval.ckpt")
    version = save_checkpoint(ckpt, out)
    store = open_store(store_url)
    try:
        store.publish_checkpoint(os.path.abspath(out), version)
    finally:
        store.close()
    return version


@dataclass
class LoopResult:
    rounds: list[Served] = field(default_factory=list)         # round 0 = the first model
    retrains: list[Round] = field(default_factory=list)
    broken: Round | None = None
    serving_after_broken: str | None = None
    ab: dict | None = None


def first_model(world: World, tmp: Path, log=lambda line: None) -> Path:
    out = tmp / "model.ckpt"
    with one_thread():
        train(train_config(world.base_data(tmp / "base.csv"), out=str(out), holdout="none"), log)
    return out


AB_ARMS = {"full": "full", "retrieval": "retrieval"}   # arm name → strategy; the first is the control


def experiment(tmp: Path, stopped: bool) -> Path:
    """The A/B test's experiment file (app/experiments.py): half the users in each arm; written stopped before
    the server starts (the rounds before the A/B are served outside it), and started for the A/B."""
    path = tmp / "experiment.json"
    arms = [{"name": name, "strategy": strategy, "share": 0.5, "stopped": stopped}
            for name, strategy in AB_ARMS.items()]
    path.write_text(json.dumps({"name": "strategies", "arms": arms}))
    return path


def run_loop(url: str, world: World, tmp: Path, rounds: int = 3, ab_rounds: int = 4,
             log: Callable[[str], None] = lambda line: None, feedback_url: str | None = None) -> LoopResult:
    """Round 0 serves the first model; after each round a retrain (published through the gate) and the next round
    on what the server rolled out. Then a deliberately broken candidate through the same gate, and an A/B of two
    strategies (the server's experiment, `experiment(tmp, ...)`: users assigned by a hash of their id) over
    `ab_rounds` more rounds of the final model with a retrieval stage added (`with_retrieval`), judged by
    `python -m training online-report`'s numbers from the store's impressions and clicks. `tmp` holds the first
    model (`first_model`) and is the server's checkpoint directory, the server runs with `experiment(tmp,
    stopped=True)`; `feedback_url` is the server's store (default: the harness's SQLite file)."""
    feedback_url = feedback_url or str(tmp / "feedback.sqlite3")
    cfg = RetrainConfig(feedback_url, out_dir=str(tmp / "models"), checkpoint=str(tmp / "model.ckpt"), min_events=20,
                        train=train_config(tmp / "base.csv"))
    result = LoopResult()
    client, retrainer = Client(url, world), Retrainer(cfg, log)
    try:
        with one_thread():
            result.rounds.append(client.serve())
            for _ in range(rounds):
                r = retrainer.run_once()
                result.retrains.append(r)
                if r.status == "published":
                    client.wait_for(r.version)
                result.rounds.append(client.serve())
            result.broken = retrainer.run_once(corrupt=shuffle_weights)
            time.sleep(1)   # longer than the server's poll: had anything been published, it would be rolling out
            result.serving_after_broken = client.http.get("/health").json()["model_version"]
            serving = retrainer.store.active_checkpoint()
            client.wait_for(with_retrieval(feedback_url, serving.path, tmp / "models"))
        experiment(tmp, stopped=False)
        client.wait_for_arms()
        began = time.time()
        served = [client.serve() for _ in range(ab_rounds)]
        time.sleep(2)   # the server writes impressions every CMN_IMPRESSION_FLUSH_S (0.5 s)
        report = online_metrics(*read_store(feedback_url, began), control=next(iter(AB_ARMS)))
        result.ab = ab_verdict(served, report)
    finally:
        client.close()
        retrainer.close()
    return result


def ab_verdict(served: list[Served], report: dict) -> dict:
    """The report's verdict (`training.online`: per-arm CTR = impressions clicked, the difference to the control
    with its interval and z-test) next to what the simulation knows: each arm's true preference."""
    arms = {arm for s in served for arm in s.arms}
    truth = {arm: float(np.average([s.arms[arm].preference for s in served if arm in s.arms],
                                   weights=[s.arms[arm].rate.shown for s in served if arm in s.arms]))
             for arm in arms}
    c = report["comparisons"][0]
    winner = None if not c["significant"] else c["arm"] if c["diff"] > 0 else c["control"]
    return {"arms": {r["arm"]: r for r in report["arms"]}, "comparison": c, "truth": truth, "winner": winner,
            "true_winner": max(truth, key=truth.get)}


def table(result: LoopResult) -> str:
    lines = [f"{'round':>5s}  {'model':8s}{'CTR':>8s}  {'95% interval':17s}{'true pref':>10s}  "
             "retrain (before the round)"]
    for n, s in enumerate(result.rounds):
        lo, hi = s.rate.interval
        how = "" if n == 0 else f"{result.retrains[n - 1].status} ({result.retrains[n - 1].seconds:.1f} s)"
        lines.append(f"{n:5d}  {s.version.rsplit('-', 1)[-1]:8s}{s.rate.ctr:8.4f}  [{lo:.4f}, {hi:.4f}]  "
                     f"{s.preference:9.4f}  {how}")
    if result.broken is not None:
        lines.append(f"broken candidate (shuffled weights) {result.broken.version}: {result.broken.status}; "
                     f"serving afterwards: {result.serving_after_broken}")
        lines.append(f"  {result.broken.message}")
    if result.ab is not None:
        ab, c = result.ab, result.ab["comparison"]
        for arm, r in ab["arms"].items():
            lines.append(f"A/B {arm:10s} CTR {r['ctr']:.4f} [{r['ctr_low']:.4f}, {r['ctr_high']:.4f}] "
                         f"({r['clicked']:,} of {r['impressions']:,} lists clicked, {r['clicks']:,} clicks); "
                         f"true preference {ab['truth'].get(arm, float('nan')):.4f}")
        verdict = f"winner {ab['winner']}" if ab["winner"] else "no significant difference"
        lines.append(f"A/B {c['arm']} − {c['control']}: {c['diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}], "
                     f"p {c['p_value']:.2g} → {verdict}; true winner {ab['true_winner']}")
    return "\n".join(lines)
