"""CMN training step cost per neighbourhood cap, same run: what `--max-neighbours` buys where a full run cannot go.

    python -m benchmarks.cap_cost --data synthetic:movielens --caps none,400,200,100,50 --batches 20 --rounds 1
    python -m benchmarks.cap_cost --data synthetic --caps none,200,100,50

`training.train.fit_epoch` over the same first --batches batches of epoch 0 (paper settings, batch 128, a fresh
model per cap), on each cap's neighbourhood CSR (`model.neighbours.neighbour_csr` of the pairs oldest first, as
training builds it); one thread, timed in process CPU time so that other jobs on the machine do not count; caps
alternate for --rounds rounds, best of each; ratios against the first cap.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.threads import Slice
from model.cmn import CMN, CMNConfig
from model.neighbours import neighbour_csr
from training import data as data_mod
from training.optim import make_optimizer
from training.sampler import TripleSampler
from training.train import TrainConfig, cmn_pair_scores, fit_epoch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="synthetic:movielens")
    ap.add_argument("--caps", default="none,400,200,100,50")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    caps = [None if c == "none" else int(c) for c in args.caps.split(",")]
    data = data_mod.load(args.data)
    pop = torch.bincount(torch.from_numpy(data.train[:, 1]), minlength=data.n_items).double()
    print(f"{data.summary()}; a positive's neighbourhood averages {float((pop ** 2).sum() / pop.sum()):,.0f} users; "
          f"load average {os.getloadavg()}", flush=True)
    cfg = TrainConfig(progress=False)
    n = args.batches * cfg.batch_size
    triples = Slice(*(torch.from_numpy(a[:n]) for a in TripleSampler(data.train, data.n_items, cfg.neg, 0).epoch(0)))
    ordered = data_mod.by_recency(data, data.train, cfg.seed)
    csrs = {cap: [torch.from_numpy(a) for a in neighbour_csr(ordered, data.n_items, cap)[:2]] for cap in caps}
    best: dict = {cap: float("inf") for cap in caps}
    for _ in range(args.rounds):
        for cap in caps:
            torch.manual_seed(0)
            model = CMN(CMNConfig(data.n_users, data.n_items, cfg.embed_size, cfg.hops, cfg.l2))
            optimizer = make_optimizer(cfg.optimizer, model.parameters(), 1e-3)
            start = time.process_time()
            fit_epoch(model, cmn_pair_scores(model, *csrs[cap], False), optimizer, triples, 0, cfg,
                      torch.device("cpu"), "cap")
            best[cap] = min(best[cap], time.process_time() - start)
            print(f"  cap {cap}: {n / (time.process_time() - start):,.0f} triples per CPU-second", flush=True)
    print(f"\nbest of {args.rounds} round(s), {args.batches} batches of {cfg.batch_size}; load average {os.getloadavg()}")
    for cap in caps:
        print(f"| {cap or 'none'} | {n / best[cap]:,.0f} triples per CPU-second | {best[caps[0]] / best[cap]:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
