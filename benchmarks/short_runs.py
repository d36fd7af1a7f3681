"""Short CMN runs after one shared GMF pretraining, varying one setting: quality, training speed, scoring time.

    python -m benchmarks.short_runs --data ../shared/data/citeulike-a.npz --vary max_neighbours=none,200,100,50
    python -m benchmarks.short_runs --data synthetic:movielens,n_users=5000,n_items=2000,per_user=20 \\
        --vary max_neighbours=none,400,200,100,50 --pretrain-epochs 10 --epochs 1
    python -m benchmarks.short_runs --data ../shared/data/citeulike-a.npz --vary batch_size=128,1024,8192

Every run is `training.train.train` with the paper's settings except the varied one, the same seed and the same
GMF pretraining (computed once and cached under --ckpt-dir through reproduce_citeulike's GMFCache; with
batch_size varied, --gmf-batch-size 128 shares the batch-128 one), and --epochs CMN epochs: short runs, to
compare the settings with each other, not the paper's 50-epoch figures. Per run: sampled and full-catalogue NDCG@10 (and HR@10) at the last epoch, CMN
training triples/s (mean over epochs), and the time to score the whole catalogue for 1 user (packed route) and
for 64 users (bucketed route) with the served scorer (best of --repeats).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.reproduce_citeulike import PAPER, GMFCache

VARIABLES = {"max_neighbours": lambda v: None if v == "none" else int(v), "batch_size": int}


def scoring_seconds(path: str, users: int, repeats: int) -> float:
    import torch

    from model.recommender import Recommender
    rec = Recommender.from_checkpoint(path, "cpu")
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.choice(rec.n_users, size=min(users, rec.n_users), replace=False))
    rec.score(batch)  # builds the route's caches: a server pays that once, at load
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        rec.score(batch)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--vary", required=True, help="NAME=v1,v2,... with NAME one of " + ", ".join(VARIABLES))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--pretrain-epochs", type=int, default=20)
    ap.add_argument("--gmf-batch-size", type=int, help="GMF pretraining's batch for every run (default: the run's)")
    ap.add_argument("--lr", type=float, help="CMN learning rate for every run (default: the batch-size rule)")
    ap.add_argument("--no-full-eval", dest="full_eval", action="store_false")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ckpt-dir", default=os.path.join(tempfile.gettempdir(), "cmn_short_runs"))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    name, _, values = args.vary.partition("=")
    if name not in VARIABLES or not values:
        ap.error(f"--vary NAME=v1,v2,...; NAME one of {', '.join(VARIABLES)}")
    values = [VARIABLES[name](v) for v in values.split(",")]

    from model import threads
    from training.train import TrainConfig, TrainHooks, TrainingCollapsed, train
    os.makedirs(args.ckpt_dir, exist_ok=True)
    cache = GMFCache(args.ckpt_dir)

    print(f"data {args.data}; {threads.describe()}; load average {os.getloadavg()}", flush=True)
    rows = []
    base = {k: v for k, v in PAPER.items() if k not in ("pretrain_epochs", "lr", name)}
    for value in values:
        out = os.path.join(args.ckpt_dir, f"{Path(args.data).name}.{name}-{value}.ckpt")
        cfg = TrainConfig(data=args.data, out=out, epochs=args.epochs, pretrain_epochs=args.pretrain_epochs,
                          device="cpu", progress=False, lr=args.lr, gmf_batch_size=args.gmf_batch_size,
                          **{**base, "full_eval": args.full_eval, name: value})
        start = time.perf_counter()
        try:
            metrics = train(cfg, log=lambda line: print(f"  [{name}={value}] {line}", flush=True),
                            hooks=TrainHooks(pretrain=cache))
        except TrainingCollapsed as e:
            print(f"  [{name}={value}] collapsed: {e}", flush=True)
            rows.append({name: value, "collapsed": str(e), "load_average": os.getloadavg()})
            continue
        wall = time.perf_counter() - start
        final = metrics["final"]
        row = {name: value, "sampled_hr@10": final["sampled"]["hr@10"], "sampled_ndcg@10": final["sampled"]["ndcg@10"],
               "full_ndcg@10": final.get("full", {}).get("ndcg@10"), "full_hr@10": final.get("full", {}).get("hr@10"),
               "train_triples_per_s": float(np.mean([r["triples_per_s"] for r in metrics["epochs"]])),
               "score_1_user_s": scoring_seconds(out, 1, args.repeats),
               "score_64_users_s": scoring_seconds(out, 64, args.repeats), "wall_s": wall,
               "memory_init": metrics["memory_init"], "load_average": os.getloadavg()}
        rows.append(row)
        print(f"  [{name}={value}] " + json.dumps(row), flush=True)

    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "command": " ".join([sys.executable] + sys.argv),
                                               "epochs": args.epochs, "pretrain_epochs": args.pretrain_epochs},
                                              indent=2))
    for r in rows:
        if "collapsed" in r:
            print(f"{name}={r[name]}: collapsed in training (no model)")
    trained = [r for r in rows if "collapsed" not in r]
    if not trained:
        return 1
    first = next((r for r in trained if r[name] is None), trained[0])  # ratios against the uncapped run if any
    print(f"\n{args.data}: {args.epochs} CMN epoch(s) after {args.pretrain_epochs} shared GMF epochs; "
          f"{threads.describe()}; load average at the end {os.getloadavg()}")
    print(f"| {name} | sampled HR@10 | sampled NDCG@10 | full NDCG@10 | train triples/s | ×{first[name]} | "
          "score catalogue, 1 user | 64 users | ×" + str(first[name]) + " (64) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in trained:
        full = "—" if r["full_ndcg@10"] is None else f"{r['full_ndcg@10']:.4f}"
        print(f"| {r[name]} | {r['sampled_hr@10']:.4f} | {r['sampled_ndcg@10']:.4f} | {full} | "
              f"{r['train_triples_per_s']:,.0f} | {r['train_triples_per_s'] / first['train_triples_per_s']:.2f} | "
              f"{r['score_1_user_s'] * 1000:.1f} ms | {r['score_64_users_s'] * 1000:.0f} ms | "
              f"{first['score_64_users_s'] / r['score_64_users_s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
