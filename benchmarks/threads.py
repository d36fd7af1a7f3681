"""Training throughput under CPU contention: torch's default threading against `model.threads.configure()`.

    python -m benchmarks.threads                                   # citeulike-a (synthetic if absent)
    python -m benchmarks.threads --seconds 3 --rounds 3 --json /tmp/threads.json

Every cell is a fresh child process (libgomp reads its environment once, when torch loads it), timing GMF
pretraining steps and CMN steps (paper settings, batch 128) for --seconds of wall time each, alone and next to one
busy process (`python -c 'while True: pass'`, what another job on a laptop or shared host looks like); batch 128
unless --batch-size. Policies:
  default     torch as it comes: one thread per core, GNU OpenMP's default spin-then-sleep wait
  configure   what `python -m training` now does (model/threads.py: one thread, PASSIVE)
  one-thread  OMP_NUM_THREADS=1 alone
  passive     OMP_WAIT_POLICY=PASSIVE with one thread per core (what `python -m app` does)
  spin-10k    GOMP_SPINCOUNT=10000: a short spin, then sleep
Cells alternate across --rounds; the best round of each is reported, and the ratios are same-run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITEULIKE = (ROOT / ".." / "shared" / "data" / "citeulike-a.npz").resolve()
POLICIES = {"default": {}, "configure": {}, "one-thread": {"OMP_NUM_THREADS": "1"},
            "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin-10k": {"GOMP_SPINCOUNT": "10000"}}
THREAD_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")


def child(args) -> None:
    """One cell: triples/s of GMF steps and of CMN steps, printed as one JSON line."""
    if args.policy == "configure":
        from model.threads import TRAINING_THREADS, configure
        configure(threads=TRAINING_THREADS)
    import torch

    from model.store.checkpoint import csr
    from model.cmn import CMN, CMNConfig
    from model.gmf import GMF
    from training import data as data_mod
    from model.optim import Adam
    from training.optim import make_optimizer
    from training.sampler import TripleSampler
    from training.train import TrainConfig, cmn_pair_scores, fit_epoch, gmf_pair_scores

    data = data_mod.load(args.data)
    torch.manual_seed(0)
    sampler = TripleSampler(data.train, data.n_items, 4, seed=0)
    users, pos, neg = (torch.from_numpy(a) for a in sampler.epoch(0))
    cfg = TrainConfig(batch_size=args.batch_size, progress=False)
    gmf = GMF(data.n_users, data.n_items, 50, 1e-4)
    cmn = CMN(CMNConfig(data.n_users, data.n_items, 50, 3))
    indptr, indices = (torch.from_numpy(a) for a in csr(data.train[:, 1], data.train[:, 0], data.n_items))
    out = {"threads": torch.get_num_threads(), "wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)")}
    for name, model, scores, optimizer in (
            ("gmf", gmf, gmf_pair_scores(gmf), Adam(gmf.parameters(), lr=1e-3)),
            ("cmn", cmn, cmn_pair_scores(cmn, indptr, indices, False), make_optimizer("rmsprop", cmn.parameters(), 1e-3))):
        # fit_epoch on 8-batch slices until the time is up: the training loop itself, not a copy of it
        done, start, s, size = 0, time.perf_counter(), 0, 8 * cfg.batch_size
        while time.perf_counter() - start < args.seconds or done == 0:
            piece = slice(s, s + size)
            fit_epoch(model, scores, optimizer, Slice(users[piece], pos[piece], neg[piece]), 0, cfg,
                      torch.device("cpu"), name)
            done += piece.stop - piece.start
            s = (s + size) % (len(users) - size)
        out[name] = done / (time.perf_counter() - start)
    print(json.dumps(out), flush=True)


class Slice:
    """A sampler whose every epoch is the given triples (numpy, as TripleSampler returns them)."""

    def __init__(self, *arrays):
        self.arrays = tuple(a.numpy() for a in arrays)

    def epoch(self, epoch: int):
        return self.arrays

    def __len__(self) -> int:
        return len(self.arrays[0])


def cell(policy: str, contended: bool, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(POLICIES[policy])
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if contended else None
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.threads", "--child", "--policy", policy,
                               "--data", args.data, "--seconds", str(args.seconds),
                               "--batch-size", str(args.batch_size)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(CITEULIKE) if CITEULIKE.exists() else "synthetic")
    ap.add_argument("--seconds", type=float, default=3.0, help="wall time per phase (GMF, CMN) per cell")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--policy", default="default", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    from model.threads import available_cpus
    policies = args.policies.split(",")
    print(f"data {args.data}; {os.cpu_count()} cores, {available_cpus()} available to this process; "
          f"load average {os.getloadavg()}; {args.seconds} s per phase, {args.rounds} rounds", flush=True)
    results: dict[tuple[str, bool], list[dict]] = {}
    for r in range(args.rounds):
        for contended in (False, True):
            for policy in policies:
                got = cell(policy, contended, args)
                results.setdefault((policy, contended), []).append(got)
                print(f"  round {r + 1} {'contended' if contended else 'alone':9s} {policy:10s} "
                      f"threads {got['threads']} wait {got['wait_policy']:8s} GMF {got['gmf']:9,.0f}  "
                      f"CMN {got['cmn']:8,.0f} triples/s", flush=True)
    best = {k: {p: max(c[p] for c in v) for p in ("gmf", "cmn")} for k, v in results.items()}
    print(f"\nbest round, triples/s (load average at the end {os.getloadavg()}):")
    print("| policy | threads | GMF alone | GMF contended | CMN alone | CMN contended |")
    print("|---|---|---|---|---|---|")
    for policy in policies:
        a, c = best[(policy, False)], best[(policy, True)]
        print(f"| {policy} | {results[(policy, False)][0]['threads']} | {a['gmf']:,.0f} | {c['gmf']:,.0f} | "
              f"{a['cmn']:,.0f} | {c['cmn']:,.0f} |")
    base = policies[0]
    for policy in policies[1:]:
        print(f"{policy} / {base}: " + ", ".join(
            f"{phase} {'contended' if cont else 'alone'} {best[(policy, cont)][phase] / best[(base, cont)][phase]:.2f}x"
            for cont in (False, True) for phase in ("gmf", "cmn")))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [{"policy": p, "contended": c, "runs": v}
                                                        for (p, c), v in results.items()],
                                               "command": " ".join([sys.executable] + sys.argv)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
