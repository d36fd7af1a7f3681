"""Scale-out figures of docs/scaling.md, each measured in one run on this machine:

    python -m benchmarks.scale_out workers            # 1 vs 2 worker processes (CMN_WORKERS), wrk, same run
    python -m benchmarks.scale_out lag [--store-url postgresql://...]   # cross-process feedback lag p50/p99
    python -m benchmarks.scale_out catchup --events 1000000 [--store-url ...]   # late start: time, peak RSS

`workers`: the same checkpoint served by `python -m app` with CMN_WORKERS=1 and =2, in alternating rounds,
loaded by wrk with 100-candidate requests; reports req/s and p99 of each and their ratio.
`lag`: two server processes A and B share one store; each event is posted to A, then B is asked, every few
milliseconds, to rank the fed-back item until B excludes it (seen): the time from A's 2xx to B's change.
`catchup`: a store holding N events (pairs the model already knows, so the model's state does not grow and
what remains is the cost of reading and applying them) and an empty one; a server started on each reports how
long it took to apply everything and its peak RSS (VmHWM): paged reads keep the difference small.
Needs wrk for `workers` (`apt-get install -y wrk`).
"""
from __future__ import annotations

from model.threads import configure

configure()

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np

from benchmarks.http_load import DEFAULT_DATA, make_checkpoint, run_wrk, write_bodies
from tests.harness.servers import running_server
from model.store.checkpoint import load_checkpoint
from model.store.events import Event, open_store


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------- 1 vs 2 workers

def workers(args) -> dict:
    ckpt = load_checkpoint(str(args.checkpoint))
    bodies = write_bodies(args.workdir / "bodies.jsonl", ckpt.user_ids, ckpt.item_ids, 100,
                          min(512, len(ckpt.user_ids)), seed=0)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for round_ in range(args.rounds):
        for n in (1, 2) if round_ % 2 == 0 else (2, 1):
            work = Path(tempfile.mkdtemp(dir=args.workdir))
            with running_server(args.checkpoint, work, timeout=180, workers=n, max_wait_ms=0) as (url, proc):
                for _ in range(n * 4):  # each worker warms its own model: reach them all before measuring
                    httpx.get(f"{url}/health", timeout=10)
                run_wrk(url, bodies, args.concurrency, args.warmup)
                result = run_wrk(url, bodies, args.concurrency, args.duration)
            runs[n].append(result)
            print(f"round {round_ + 1}: {n} worker(s): {result['req_per_s']:.0f} req/s, p99 "
                  f"{result['p99_ms']:.1f} ms", flush=True)
    summary = {n: {"req_per_s": statistics.median(r["req_per_s"] for r in rs),
                   "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                   "p99_ms": statistics.median(r["p99_ms"] for r in rs)} for n, rs in runs.items()}
    summary["ratio_req_per_s"] = summary[2]["req_per_s"] / summary[1]["req_per_s"]
    print(f"2 workers ÷ 1 worker: {summary['ratio_req_per_s']:.2f}× req/s (medians of {args.rounds} rounds, "
          f"concurrency {args.concurrency}, 100 candidates); p99 {summary[1]['p99_ms']:.1f} → "
          f"{summary[2]['p99_ms']:.1f} ms")
    return {"rounds": runs, "summary": summary}


# --------------------------------------------------------------------------- cross-process lag

def unseen_pairs(ckpt, n: int, seed: int) -> list[tuple[str, str]]:
    """(user, item) pairs the checkpoint has not seen, each user once."""
    rng = np.random.default_rng(seed)
    seen = {(int(u), int(i)) for u, i in ckpt.seen}
    pairs = []
    for u in rng.permutation(len(ckpt.user_ids))[:n].tolist():
        i = int(rng.integers(len(ckpt.item_ids)))
        while (u, i) in seen:
            i = int(rng.integers(len(ckpt.item_ids)))
        pairs.append((ckpt.user_ids[u], ckpt.item_ids[i]))
    return pairs


def lag(args) -> dict:
    ckpt = load_checkpoint(str(args.checkpoint))
    pairs = unseen_pairs(ckpt, args.events, seed=1)
    store_url = args.store_url or f"sqlite:///{args.workdir / f'lag-{uuid.uuid4().hex}.sqlite3'}"
    lags, polls = [], []
    with ExitStack() as stack:
        a, _ = stack.enter_context(running_server(args.checkpoint, Path(tempfile.mkdtemp(dir=args.workdir)),
                                                  feedback_url=store_url))
        b, _ = stack.enter_context(running_server(args.checkpoint, Path(tempfile.mkdtemp(dir=args.workdir)),
                                                  feedback_url=store_url))
        client = stack.enter_context(httpx.Client(timeout=10))
        other = ckpt.item_ids[0]
        rng = np.random.default_rng(2)
        for user, item in pairs:
            # at a random moment of B's poll cycle: posting right after B's last change would phase-lock to it
            time.sleep(float(rng.uniform(0, 2 * float(os.environ.get("CMN_FEEDBACK_POLL_S", 0.1)))))
            candidates = [item] if item == other else [item, other]
            r = client.post(f"{a}/feedback", json={"events": [{"user_id": user, "item_id": item,
                                                               "event_id": uuid.uuid4().hex}]})
            r.raise_for_status()
            acked, n = time.perf_counter(), 0
            while True:
                n += 1
                listed = client.post(f"{b}/recommend", json={"user_id": user, "k": 2, "candidates": candidates})
                if item not in [x["item_id"] for x in listed.json()["items"]]:
                    break
                if time.perf_counter() - acked > 30:
                    raise TimeoutError(f"B never applied {user} → {item}")
            lags.append((time.perf_counter() - acked) * 1000)
            polls.append(n)
    summary = {"events": len(lags), "store": store_url.split(":", 1)[0], "p50_ms": percentile(lags, 50),
               "p99_ms": percentile(lags, 99), "max_ms": max(lags), "poll_s": float(os.environ.get(
                   "CMN_FEEDBACK_POLL_S", 0.1))}
    print(f"feedback on A → change in B's answers ({summary['store']}, {len(lags)} events): p50 "
          f"{summary['p50_ms']:.0f} ms, p99 {summary['p99_ms']:.0f} ms, max {summary['max_ms']:.0f} ms "
          f"(B polls the store every {summary['poll_s']:g} s)")
    return summary


# --------------------------------------------------------------------------- catch-up from a large store

def fill_known(store_url: str, ckpt, n: int) -> None:
    """N events that repeat pairs the model already has (with distinct event ids): applying them changes no
    state, so the server's memory after catch-up shows what reading them cost."""
    pairs = np.asarray(ckpt.seen)[:, :2]
    users, items = ckpt.user_ids, ckpt.item_ids
    store = open_store(store_url)
    store.bulk_append(Event(users[u], items[i], 0.0, f"fill-{k}")
                      for k, (u, i) in enumerate(pairs[np.arange(n) % len(pairs)].tolist()))
    store.close()


def catchup(args) -> dict:
    ckpt = load_checkpoint(str(args.checkpoint))
    results = {}
    for label, n in (("empty", 0), ("full", args.events)):
        work = Path(tempfile.mkdtemp(dir=args.workdir))
        url = (args.store_url if n and args.store_url else f"sqlite:///{work / 'store.sqlite3'}")
        if n:
            start = time.perf_counter()
            fill_known(url, ckpt, n)
            print(f"filled {n:,} events in {time.perf_counter() - start:.0f} s", flush=True)
        start = time.perf_counter()
        with running_server(args.checkpoint, work, timeout=1800, feedback_url=url) as (base, proc):
            health = httpx.get(f"{base}/health", timeout=10).json()
            results[label] = {"events": n, "ready_s": time.perf_counter() - start,
                              "applied_seq": health["applied_seq"], "peak_rss_mb": peak_rss_mb(proc.pid)}
        print(f"{label}: {n:,} events, healthy after {results[label]['ready_s']:.1f} s, applied_seq "
              f"{results[label]['applied_seq']:,}, peak RSS {results[label]['peak_rss_mb']:.0f} MB", flush=True)
    results["rss_increase_mb"] = results["full"]["peak_rss_mb"] - results["empty"]["peak_rss_mb"]
    print(f"catch-up of {args.events:,} events: +{results['rss_increase_mb']:.0f} MB peak RSS over an empty store")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("workers", "lag", "catchup"))
    ap.add_argument("--checkpoint", help="serve this checkpoint (default: a random citeulike-a-sized one)")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--workdir", default="/tmp/cmn_scale")
    ap.add_argument("--store-url", help="lag/catchup: a postgresql:// store (default: SQLite files in --workdir)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--events", type=int, default=None, help="lag: events posted (200); catchup: store size (1M)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.what == "workers" and not shutil.which("wrk"):
        print("error: wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    args.workdir = Path(args.workdir)
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.events = args.events or {"lag": 200, "catchup": 1_000_000}.get(args.what)
    args.checkpoint = Path(args.checkpoint) if args.checkpoint else make_checkpoint(
        args.workdir / "model.ckpt", args.data)
    result = {"workers": workers, "lag": lag, "catchup": catchup}[args.what](args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
