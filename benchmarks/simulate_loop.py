"""The closed loop, simulated: CTR per round of retraining, the broken candidate the gate refuses, an A/B verdict.

    python -m benchmarks.simulate_loop                       # SQLite store, seed 0
    python -m benchmarks.simulate_loop --seed 1 --rounds 4
    python -m benchmarks.simulate_loop --feedback-url postgresql://USER:PASS@HOST/DB   # an empty database

Simulated users with hidden preferences (tests/harness/loop.py: latent clusters, a click probability per user and
item) ask a real server (`python -m app` on a loopback port) for 10 items each round and click according to those
preferences; the clicks go back through /feedback. Between rounds `training.retrain.Retrainer` trains on the
stored events and publishes through its gate; the server follows the rollout. Then a candidate with shuffled
weights goes through the same gate, and an A/B test (the server's experiment: two arms, users assigned by a hash
of their id) compares two strategies, CMN over the catalogue (`full`, the control) and an ItemKNN retrieval stage
added to the final model (`retrieval`), judged by `python -m training online-report`'s numbers. Deterministic for
a seed. Training runs on one thread in this process; the server uses the rest.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tests.harness.loop import World, experiment, first_model, run_loop, table
from tests.harness.servers import running_server


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3, help="retraining rounds after the first model's (default 3)")
    ap.add_argument("--ab-rounds", type=int, default=4, help="lists per user in the A/B test (default 4)")
    ap.add_argument("--users", type=int, default=240)
    ap.add_argument("--items", type=int, default=360)
    ap.add_argument("--feedback-url", help="the store the server and retraining share (default: a new SQLite file)")
    args = ap.parse_args(argv)
    world = World(n_users=args.users, n_items=args.items, seed=args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        checkpoint = first_model(world, tmp)
        env = {"feedback_url": args.feedback_url} if args.feedback_url else {}
        with running_server(checkpoint, tmp, experiment_file=experiment(tmp, stopped=True), **env) as (url, _):
            result = run_loop(url, world, tmp, args.rounds, args.ab_rounds, feedback_url=args.feedback_url,
                              log=lambda line: print(line, flush=True) if line.startswith(("gate:", "retrain:"))
                              else None)
    print(f"\n{world.n_users} users, {world.n_items} items, seed {args.seed}; 10 items shown per list; "
          f"{time.perf_counter() - start:.0f} s in all\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
