"""Fold-in (cold start): quality against steps and milliseconds, latency by history length, the cost of a live user.

    python -m benchmarks.foldin --checkpoint /tmp/cold/citeulike.ckpt --data ../shared/data/citeulike-a.npz
    python -m benchmarks.foldin --checkpoint /tmp/cold/syn.ckpt --data synthetic --skip-curve

The checkpoint is a `python -m training coldstart` model (trained without the cold users of --data, --cold-users,
--seed). Three parts, one process, with the server's thread setting (its model thread runs fold-in):

1. **Curve** (validation, never the cold users' held-out test item): each cold user's history less one more item
   (its latest by timestamp, else a seeded random one) is folded in, and that item is ranked against 100 sampled
   items the user never touched (sampled HR@10 / NDCG@10, ties against it) after each number of steps, for each
   learning rate, negatives per positive and initialisation of the grid. One fit per user and setting records every
   step count (`fold_in_user`'s `on_step`), with the milliseconds the fit took to get there.
2. **Latency** of `Recommender.fold_in` with the default `FoldInConfig` for histories of 10, 50 and 500 items
   (drawn by popularity, as users' items are), p50 and p99.
3. **add_user** (model/online.py): a live user (fold-in, the user tables' amortised growth, joining N(i) of its items), one after
   another on one Recommender, p50 and p99, and the part that is not the fold-in.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace

from model.threads import configure

configure()   # before torch loads: the server's setting (every available CPU, passive wait)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model.store.checkpoint import load_checkpoint  # noqa: E402
from model.foldin import FoldedUser, FoldInConfig, fold_in_user  # noqa: E402
from model.online import Online  # noqa: E402
from model.recommender import Recommender  # noqa: E402
from training.coldstart import ColdUsers, cold_users_in, hold_out_users  # noqa: E402
from training.data import Split, load, pair_keys, sample_test_negatives  # noqa: E402
from training.metrics import rank_metrics  # noqa: E402


def validation_users(data, cold: ColdUsers, seed: int) -> ColdUsers:
    """Each cold user's history less its latest item (by timestamp, else a seeded random one), that item held out
    with 100 negatives the user never touched (test item included): tuning never sees the test item."""
    rng = np.random.default_rng([seed, 12])
    index = {u: n for n, u in enumerate(data.user_ids)}
    users, histories, targets = [], [], []
    for b, (uid, history) in enumerate(zip(cold.ids, cold.histories)):
        if len(history) < 2:
            continue
        u = index[uid]
        if data.timeline is not None:
            known, times = data.timeline
            at = np.searchsorted(known, pair_keys(np.full(len(history), u), np.asarray(history), data.n_items))
            last = int(np.argmax(times[at]))
        else:
            last = int(rng.integers(len(history)))
        users.append(u)
        targets.append(history[last])
        histories.append(history[:last] + history[last + 1:])
    touched = np.array([(u, i) for u, h, t in zip(users, histories, targets) for i in h + [t]] +
                       [(index[uid], int(p)) for uid, p in zip(cold.ids, cold.split.positives)])
    negatives = sample_test_negatives(touched, np.array(users), data.n_items, rng)
    return ColdUsers([data.user_ids[u] for u in users], histories,
                     Split(np.arange(len(users)), np.array(targets), negatives), cold.last)


def curve(rec: Recommender, val: ColdUsers, configs: list[FoldInConfig], seed: int) -> list[dict]:
    candidates = torch.as_tensor(np.concatenate([val.split.positives[:, None], val.split.negatives], 1))
    rows = []
    for cfg in configs:
        at: dict[int, list] = {}
        for b, history in enumerate(val.histories):
            def record(step, fitted, seconds, b=b):
                at.setdefault(step, []).append((fitted.clone(), seconds * 1e3))
            fold_in_user(rec.scorer, history, cfg, seed, on_step=record)
        for step, fits in sorted(at.items()):
            folded = [FoldedUser(f[0], f[1], h, float("nan")) for (f, _), h in zip(fits, val.histories)]
            scores = rec.score(items=candidates, strategy="full", histories=folded).double()   # CMN's own ranking, not a blend
            ranks = (scores[:, 1:] >= scores[:, :1]).sum(1)
            m = rank_metrics(ranks, ks=(10,))
            ms = np.array([t for _, t in fits])
            rows.append({"lr": cfg.lr, "neg": cfg.neg, "init": cfg.init, "steps": step, "hr@10": m["hr@10"],
                         "ndcg@10": m["ndcg@10"], "ms_p50": float(np.percentile(ms, 50))})
            print(f"lr {cfg.lr:<5g} neg {cfg.neg}  init {cfg.init:10s} steps {step:3d}: HR@10 {m['hr@10']:.4f}  "
                  f"NDCG@10 {m['ndcg@10']:.4f}  {rows[-1]['ms_p50']:7.2f} ms (p50)", flush=True)
    return rows


def popular_histories(rec: Recommender, length: int, n: int, seed: int) -> list[list[int]]:
    """`n` histories of `length` distinct items drawn by popularity (as users' items are)."""
    weight = rec.scorer.indptr[1:rec.n_items + 1] - rec.scorer.indptr[:rec.n_items]
    g = torch.Generator().manual_seed(seed)
    return [torch.multinomial(weight.double(), length, generator=g).tolist() for _ in range(n)]


def percentiles(ms: list[float]) -> dict:
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "n": len(ms)}


def latency(rec: Recommender, lengths: list[int], n: int, seed: int) -> list[dict]:
    rows = []
    for length in lengths:
        histories = popular_histories(rec, length, n + 5, seed)
        for h in histories[:5]:      # warm-up: first calls allocate
            rec.fold_in(h, seed)
        ms = []
        for h in histories[5:]:
            start = time.perf_counter()
            rec.fold_in(h, seed)
            ms.append((time.perf_counter() - start) * 1e3)
        rows.append({"history": length, **percentiles(ms)})
        print(f"fold-in, history {length:4d}: p50 {rows[-1]['p50']:6.2f} ms  p99 {rows[-1]['p99']:6.2f} ms "
              f"({n} histories)", flush=True)
    return rows


def add_users(checkpoint: str, length: int, n: int, seed: int) -> dict:
    rec = Recommender.from_checkpoint(checkpoint)
    rec.warmup()
    online = Online(rec)
    total, fold = [], []
    for h in popular_histories(rec, length, n, seed + 1):
        start = time.perf_counter()
        rec.fold_in(h, seed)
        fold.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        online.add_user(h, seed)
        total.append((time.perf_counter() - start) * 1e3)
    rest = [t - f for t, f in zip(total, fold)]
    row = {"history": length, "add_user": percentiles(total), "besides_fold_in": percentiles(rest),
           "capacity": rec.scorer.capacity, "users": rec.n_users}
    print(f"add_user, history {length}: p50 {row['add_user']['p50']:.2f} ms  p99 {row['add_user']['p99']:.2f} ms; "
          f"besides the fold-in p50 {row['besides_fold_in']['p50']:.2f} ms  p99 {row['besides_fold_in']['p99']:.2f} "
          f"ms ({n} users added; user tables {rec.scorer.capacity:,} rows for {rec.n_users:,} users)", flush=True)
    return row


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a `python -m training coldstart` model")
    p.add_argument("--data", required=True, help="the data it was trained on, cold users included")
    p.add_argument("--cold-users", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--users", type=int, default=300, help="cold users in the curve (a seeded sample)")
    p.add_argument("--steps", type=int, default=40, help="the curve's longest fit")
    p.add_argument("--lrs", type=floats, default=[0.03, 0.1, 0.3])
    p.add_argument("--negs", type=floats, default=[1, 4])
    p.add_argument("--inits", default="neighbours,zero")
    p.add_argument("--latency-runs", type=int, default=200)
    p.add_argument("--skip-curve", action="store_true")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()

    data = load(args.data, seed=args.seed)
    _, cold = hold_out_users(data, args.cold_users, args.seed)
    ckpt = load_checkpoint(args.checkpoint)
    rec = Recommender.from_checkpoint(ckpt, seen=ckpt.train)
    print(f"{args.checkpoint}: {rec.n_users:,} users, {rec.n_items:,} items; default {rec.foldin}; "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    out = {"checkpoint": args.checkpoint, "default": asdict(rec.foldin)}
    if not args.skip_curve:
        val, left_out = cold_users_in(validation_users(data, cold, args.seed), [str(i) for i in range(data.n_items)],
                                      ckpt.item_ids)
        keep = np.random.default_rng(args.seed).permutation(len(val.histories))[:args.users]
        keep.sort()
        val = ColdUsers([val.ids[b] for b in keep], [val.histories[b] for b in keep],
                        Split(np.arange(len(keep)), val.split.positives[keep], val.split.negatives[keep]), val.last)
        print(f"curve: {len(keep)} cold users, validation item {val.last}", flush=True)
        configs = [replace(rec.foldin, steps=args.steps, lr=lr, neg=int(neg), init=init)
                   for init in args.inits.split(",") for neg in args.negs for lr in args.lrs]
        out["curve"] = curve(rec, val, configs, args.seed)
    out["latency"] = latency(rec, [10, 50, 500], args.latency_runs, args.seed)
    out["add_user"] = add_users(args.checkpoint, 50, args.latency_runs, args.seed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
