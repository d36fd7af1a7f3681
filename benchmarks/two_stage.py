"""Latency of full-catalogue CMN against two-stage (retrieval → CMN re-ranking of R items), same run, same process:
`Recommender.recommend` for 1 user and for 64 users, k 10, seen items excluded, strategies interleaved round by
round and the best round of each kept (the machine is shared and noisy; the ratio is the figure).

    python benchmarks/two_stage.py --checkpoint /tmp/cmn_reproduce/two_stage.ckpt   # one with a retrieval stage
    python benchmarks/two_stage.py --scale 10                           # + a synthetic catalogue 10x citeulike-a

Without a retrieval stage in the checkpoint, RP3beta is fitted here (the method validation chose on citeulike-a).
The synthetic catalogue (`--scale`) has citeulike-a's users and interactions per item, `scale` times the items, a
random CMN and a random retrieval matrix with RP3beta's entries per row: the cost of each stage depends on those
sizes, not on the weights.
"""
from __future__ import annotations

import argparse
import json
import time

from model.threads import configure

configure()   # before torch loads: a passive OpenMP wait policy and threads sized to this process's CPUs

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model.store.checkpoint import csr, load_checkpoint  # noqa: E402
from model.cmn import CMN, CMNConfig  # noqa: E402
from model.recommender import Recommender  # noqa: E402
from model.retrieval import ItemRetrieval, TwoStage  # noqa: E402
from model.scoring import Scorer  # noqa: E402


def compare(name: str, rec: Recommender, rounds: int) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for n_users in (1, 64):
        users = rng.choice(rec.n_users, n_users, replace=False).tolist()
        for strategy in rec.strategies:   # warm every route's caches before timing
            rec.recommend(users, k=10, strategy=strategy)
        best = {s: float("inf") for s in ("full", "two_stage")}
        for _ in range(rounds):          # interleaved: a load spike hits both
            for strategy in best:
                start = time.perf_counter()
                rec.recommend(users, k=10, strategy=strategy)
                best[strategy] = min(best[strategy], time.perf_counter() - start)
        row = {"catalogue": name, "items": rec.n_items, "users": n_users, "R": rec.two_stage.candidates,
               "full_ms": best["full"] * 1e3, "two_stage_ms": best["two_stage"] * 1e3,
               "speedup": best["full"] / best["two_stage"]}
        print(f"{name:24s} {rec.n_items:>8,} items  {n_users:3d} users: full {row['full_ms']:9.2f} ms   two-stage "
              f"(R {row['R']}) {row['two_stage_ms']:8.2f} ms   {row['speedup']:6.1f}x", flush=True)
        rows.append(row)
    return rows


def citeulike(path: str) -> Recommender:
    ckpt = load_checkpoint(path)
    if ckpt.retrieval is not None:
        return Recommender.from_checkpoint(ckpt)
    from training.two_stage import fit_retrieval
    retrieval, params = fit_retrieval("rp3beta", ckpt.train, ckpt.config.n_users, ckpt.config.n_items)
    return Recommender(Recommender.from_checkpoint(ckpt).scorer, ckpt.train, ckpt.seen, retrieval,
                       TwoStage("rp3beta", 50, 0.0, params))


def synthetic(base: Recommender, scale: int, per_row: int, seed: int = 0) -> Recommender:
    """`scale` × the items of `base`, the same users, each item with as many users as a random item of `base`."""
    rng = np.random.default_rng(seed)
    n_users, n_items = base.n_users, base.n_items * scale
    torch.manual_seed(seed)
    model = CMN(CMNConfig(n_users, n_items, base.scorer.model.cfg.embed_size, base.scorer.model.cfg.hops))
    lengths = np.diff(base.scorer.indptr.cpu().numpy())[rng.integers(0, base.n_items, n_items)]
    items = np.repeat(np.arange(n_items), lengths)
    train = np.unique(np.stack([rng.integers(0, n_users, len(items)), items], 1), axis=0)
    indptr = torch.arange(0, n_items * per_row + 1, per_row)
    indices = torch.from_numpy(rng.integers(0, n_items, n_items * per_row))
    retrieval = ItemRetrieval(indptr, indices, torch.rand(n_items * per_row), n_items)
    scorer = Scorer(model, *csr(train[:, 1], train[:, 0], n_items))
    return Recommender(scorer, train, retrieval=retrieval, two_stage=TwoStage("random", base.two_stage.candidates,
                                                                              0.0, {}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a citeulike-a checkpoint (with or without retrieval)")
    ap.add_argument("--scale", type=int, default=10, help="the synthetic catalogue's size in citeulike-a's (0: skip)")
    ap.add_argument("--per-row", type=int, default=200,
                    help="the synthetic item-item stage's entries per item, where the checkpoint's stage is not "
                         "item-item (exact EASE); otherwise its own count is used")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    base = citeulike(args.checkpoint)
    rows = compare("citeulike-a", base, args.rounds)
    if args.scale:
        per_row = (int(round(len(base.retrieval.values) / base.n_items)) if isinstance(base.retrieval, ItemRetrieval)
                   else args.per_row)
        rows += compare(f"synthetic {args.scale}x", synthetic(base, args.scale, per_row), args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
