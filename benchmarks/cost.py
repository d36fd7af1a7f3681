"""What a fold-in costs, and issue 23's fold-in flood replayed: normal requests' latency with and without it.

    python -m benchmarks.cost                              # a random CMN on the synthetic default, 10 s per phase
    python -m benchmarks.cost --data ../shared/data/citeulike-a.npz --duration 20
    python -m benchmarks.cost --checkpoint artifacts/model.ckpt --measure-only

1. **The cost of a fold-in** (`--measure-only` stops here), in the unit every limit counts, scored pairs: the time of
   fold-ins of 1, 64 and 500-item histories (median of --repeats; fold-in runs on one thread) over the time per
   pair of a whole-catalogue call for CMN_MAX_BATCH users. The 500-item figure is what CMN_FOLDIN_PAIRS (the cost
   assumed until the server has measured a fold-in itself) should be for this model on this machine.
2. **The flood**, through real HTTP (`python -m app` on loopback, auth on, the default quotas): a `normal` key
   sends /recommend for known users, one at a time, at most 20 a second, for --duration seconds; meanwhile a
   `flooder` key sends, each phase on a fresh server:
   - `alone`: nothing (the baseline);
   - `256x500 batches`: the issue's /recommend/batch of 256 × 500-item histories, on one connection;
   - `10x500 batches`: batches within every request limit (10 × 500-item histories), on 8 connections;
   - `10x500, limits lifted`: the same with the cost limits lifted (no work rate, no backlog bound, a model call
     may hold 64 fold-ins, no bound on a batch's history): as before issue 23 but for the per-key round-robin.
   A refused flooder does not wait for Retry-After. Printed per phase: the normal key's p50/p99 and errors, what
   the flooder got (status counts), and each flood phase's normal p99 over the baseline's (target: ≤ 2, or the
   flooder refused with 429/503).

Figures move with the machine's load: the script prints the load average before each phase.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import statistics
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from benchmarks.http_load import make_checkpoint
from tests.harness.servers import running_server

KEYS = {"normal": "recommend", "flooder": "recommend"}
LIFTED = {"pairs_per_s": 0, "max_call_ms": 10 ** 9, "max_key_backlog_s": 10 ** 9, "max_batch_history": 10 ** 9,
          "max_body_bytes": 10 ** 8}
PACE_S = 0.05       # the normal key sends a request every 50 ms at most (20/s, within the default 50/s per key)


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


# --------------------------------------------------------------------------- 1. the cost of a fold-in

def measure(checkpoint: str, repeats: int, max_batch: int) -> dict:
    import torch

    from app.engine import Engine
    torch.set_num_threads(int(os.environ.get("CMN_THREADS", "0")) or torch.get_num_threads())   # as the server
    engine = Engine(checkpoint, device="cpu")
    rec = engine.recommender
    rec.warmup(2)

    def median_s(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    users = list(range(min(max_batch, engine.n_users)))
    pair_s = median_s(lambda: rec.recommend(users, k=10, strategy="full")) / (len(users) * engine.n_items)
    popular = rec.popularity.argsort(descending=True).tolist()
    out = {"n_items": engine.n_items, "call_users": len(users), "pairs_per_s": 1 / pair_s}
    for n in (1, 64, 500):
        history = popular[:min(n, engine.n_items - 1)]
        seconds = median_s(lambda: rec.fold_in(history))
        out[f"foldin_{n}"] = (seconds * 1000, seconds / pair_s)
    return out


# --------------------------------------------------------------------------- 2. the flood

def key_file(path: Path) -> dict[str, str]:
    keys = {name: "cmn-" + secrets.token_urlsafe(24) for name in KEYS}
    path.write_text("".join(f"{hashlib.sha256(keys[n].encode()).hexdigest()} {KEYS[n]} {n}\n" for n in KEYS))
    return keys


def phase(checkpoint: str, tmp: Path, duration: float, flood: str | None, limits: dict) -> dict:
    keys = key_file(tmp / "keys")
    with running_server(checkpoint, tmp, auth_file=tmp / "keys", log_level="warning", **limits) as (url, _):
        with httpx.Client(base_url=url, timeout=120) as http:
            users = [str(u) for u in range(50)]
            items = [x["item_id"] for x in http.post("/recommend", json={"user_id": users[0], "k": 1000},
                                                     headers={"Authorization": f"Bearer {keys['normal']}"}
                                                     ).json()["items"]]
        flooder = {"Authorization": f"Bearer {keys['flooder']}"}
        huge = {"requests": [{"history": items[n % 400:n % 400 + 500]} for n in range(256)]}
        within = {"requests": [{"history": items[n * 40:n * 40 + 500]} for n in range(10)]}
        stop, flooded = threading.Event(), Counter()

        def flood_with(body: dict) -> None:
            with httpx.Client(base_url=url, timeout=120) as http:
                while not stop.is_set():
                    try:
                        r = http.post("/recommend/batch", json=body, headers=flooder)
                    except httpx.HTTPError as e:
                        flooded[type(e).__name__] += 1
                        continue
                    flooded[f"{len(body['requests'])}x500 → {r.status_code}"] += 1
                    if r.status_code in (429, 503):   # a polite client would wait Retry-After; this one does not
                        time.sleep(0.01)
        latencies, errors = [], Counter()
        with ThreadPoolExecutor(9) as pool:
            if flood == "huge":
                pool.submit(flood_with, huge)
            elif flood == "within":
                for _ in range(8):
                    pool.submit(flood_with, within)
            time.sleep(1.0)   # the flood is under way before the first normal request
            normal = {"Authorization": f"Bearer {keys['normal']}"}
            with httpx.Client(base_url=url, timeout=120) as http:
                end = time.monotonic() + duration
                n = 0
                while time.monotonic() < end:
                    start = time.perf_counter()
                    r = http.post("/recommend", json={"user_id": users[n % len(users)]}, headers=normal)
                    latencies.append((time.perf_counter() - start) * 1000)
                    time.sleep(max(0.0, PACE_S - (time.perf_counter() - start)))
                    if r.status_code != 200:
                        errors[r.status_code] += 1
                    n += 1
            stop.set()
    return {"n": len(latencies), "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
            "errors": dict(errors), "flooder": dict(flooded)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cost", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a checkpoint to serve (default: a random CMN on --data)")
    parser.add_argument("--data", default="synthetic", help="data for the random CMN (default: synthetic)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "cmn-bench-cost"))
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of normal requests per phase")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--measure-only", action="store_true", help="only the cost of a fold-in")
    args = parser.parse_args()
    from app.settings import Settings
    defaults = Settings()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or str(make_checkpoint(work / f"{Path(args.data).stem}.ckpt", args.data))

    m = measure(checkpoint, args.repeats, defaults.max_batch)
    print(f"\n1. cost of a fold-in ({m['n_items']} items; a whole-catalogue call of {m['call_users']} users scores "
          f"{m['pairs_per_s']:,.0f} pairs/s)")
    for n in (1, 64, 500):
        ms, pairs = m[f"foldin_{n}"]
        print(f"   fold-in of {n:>3} items: {ms:7.2f} ms = {pairs:>10,.0f} pairs")
    print(f"   → CMN_FOLDIN_PAIRS={m['foldin_500'][1]:.0f} for this model on this machine "
          f"(default {defaults.foldin_pairs:,})")
    if args.measure_only:
        return

    print(f"\n2. fold-in flood, {args.duration:g} s of normal /recommend per phase")
    results = {}
    phases = [("alone", None, {}), ("256x500 batches", "huge", {}), ("10x500 batches", "within", {}),
              ("10x500, limits lifted", "within", LIFTED)]
    for name, flood, limits in tqdm(phases, desc="phases"):
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            results[name] = r = phase(checkpoint, Path(tmp), args.duration, flood, limits)
        tqdm.write(f"   {name:<24} load {load:4.1f}  normal: {r['n']:>5} requests, p50 {r['p50']:8.1f} ms, "
                   f"p99 {r['p99']:8.1f} ms, errors {r['errors'] or 0}; flooder: {r['flooder'] or '-'}")
    base = results["alone"]["p99"]
    print("\nsummary: normal p99 under the flood / alone: " + ", ".join(
        f"{name} {results[name]['p99'] / base:.2f}x" for name, *_ in phases[1:]) +
        " (target ≤ 2x, or the flooder refused with 429/503)")


if __name__ == "__main__":
    main()
