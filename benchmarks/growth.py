"""A feedback store grown to a million events of repeated pairs, served next to an empty-ish one, same run.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.growth                        # citeulike-a-sized random model
    python -m benchmarks.growth --events 1000000 --pairs 20000 --requests 200 --json /tmp/growth.json

Issue 23, finding 5: the same (user, item) was stored again under each new event id and nothing was compacted; a
700k-event store started in 17.6 s, RSS 350 → 672 MB, /recommend p50 9 → 52 ms, a 500-item fold-in 35 → ~250 ms.
Stores, each a fresh SQLite file under --workdir (the model: citeulike-a's training pairs, random weights, no
neighbourhood cap, as `python -m training train` chooses for citeulike-a):
  empty-ish   --small events, all distinct known pairs
  appended    --events events drawn from --pairs distinct known pairs (distinct event ids), written through
              `append` in requests of 1000 as /feedback writes them: each pair is stored once, repeats keep only
              their ids
  legacy      the same events written by `bulk_append`, every repeat in the log (as stores written before the pair
              rule are)
  compacted   `legacy` after `python -m training compact` (timed)
For each, a real `python -m app` is started on it (one after the other, the same machine) and measured: start-up
(spawn to /health 200: load, warm-up and the store's replay), RSS after start-up and after the requests, /recommend
p50 and p99 (known users, k 10, sequential), and a 500-item fold-in's p50 (an anonymous history of popular items).
Ratios are each store over empty-ish (1.00: as if the store were empty).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from benchmarks.http_load import DEFAULT_DATA, make_checkpoint, start_server
from benchmarks.memory import status_mb
from benchmarks.store import FILL_CHUNK
from model.store.checkpoint import load_checkpoint
from model.store.events import Event, open_store
from tests.harness.servers import stop
from training.feedback import compact_store

APPEND_BATCH = 1000     # events per append: /feedback's largest request


def known_pairs(ckpt, n: int, seed: int) -> list[tuple[str, str]]:
    """`n` distinct (user, item) external ids of the checkpoint, not among its seen pairs."""
    rng = np.random.default_rng(seed)
    seen = set(map(tuple, np.asarray(ckpt.seen).tolist()))
    pairs: dict[tuple[int, int], None] = {}
    while len(pairs) < n:
        for u, i in zip(rng.integers(0, len(ckpt.user_ids), n), rng.integers(0, len(ckpt.item_ids), n)):
            if (u, i) not in seen and len(pairs) < n:
                pairs[(int(u), int(i))] = None
    return [(ckpt.user_ids[u], ckpt.item_ids[i]) for u, i in pairs]


def repeated_events(pairs: list[tuple[str, str]], n: int, seed: int, tag: str):
    """`n` events, each a random one of `pairs` (every pair once first), with distinct event ids."""
    rng = random.Random(seed)
    for k in range(n):
        user, item = pairs[k] if k < len(pairs) else rng.choice(pairs)
        yield Event(user, item, 1.6e9 + k, f"{tag}-{k}")


def fill_appended(url: str, events, n: int) -> float:
    store = open_store(url)
    start = time.perf_counter()
    try:
        batch = []
        with tqdm(total=n, desc="append", unit="event", mininterval=1.0) as bar:
            for e in events:
                batch.append(e)
                if len(batch) == APPEND_BATCH:
                    store.append(batch)
                    bar.update(len(batch))
                    batch = []
            if batch:
                store.append(batch)
                bar.update(len(batch))
    finally:
        store.close()
    return time.perf_counter() - start


def fill_bulk(url: str, events, n: int) -> float:
    store = open_store(url)
    start = time.perf_counter()
    try:
        with tqdm(total=n, desc="bulk", unit="event", mininterval=1.0) as bar:
            chunk = []
            for e in events:
                chunk.append(e)
                if len(chunk) == FILL_CHUNK:
                    bar.update(store.bulk_append(chunk))
                    chunk = []
            if chunk:
                bar.update(store.bulk_append(chunk))
    finally:
        store.close()
    return time.perf_counter() - start


def percentile(ms: list[float], q: float) -> float:
    return float(np.percentile(ms, q)) if ms else float("nan")


def timed_post(client: httpx.Client, body: dict) -> float:
    t = time.perf_counter()
    client.post("/recommend", json=body).raise_for_status()
    return (time.perf_counter() - t) * 1e3


def start(checkpoint: Path, url: str, workdir: Path, cwd: Path | None) -> tuple[float, str, object]:
    """A server on the store at `url` (from the checkout `cwd`, else this one): seconds to healthy, base URL,
    process."""
    t = time.perf_counter()
    base, proc = start_server("real", checkpoint, workdir, {"CMN_FEEDBACK_URL": url},
                              **({} if cwd is None else {"cwd": cwd}))
    return time.perf_counter() - t, base, proc


def measure(servers: dict[str, tuple[Path | None, str]], checkpoint: Path, workdir: Path, users: list[str],
            history: list[str], rounds: int, requests: int, foldins: int) -> dict[str, dict]:
    """Start-up: each server started and stopped in turn, `rounds` times (the fastest kept); the last round's stay
    up, and their requests go round-robin, one to each in turn, so that every server sees the same machine."""
    out = {name: {"startup_s": float("inf")} for name in servers}
    running = {}
    try:
        for r in range(rounds):
            for name, (cwd, url) in servers.items():
                seconds, base, proc = start(checkpoint, url, workdir, cwd)
                out[name]["startup_s"] = min(out[name]["startup_s"], seconds)
                out[name]["rss_start_mb"] = status_mb(proc.pid)["VmRSS"]
                if r < rounds - 1:
                    stop(proc)
                else:
                    running[name] = (httpx.Client(base_url=base, timeout=120), proc)
        for name, (client, _) in running.items():
            health = client.get("/health").json()
            out[name]["store_events"], out[name]["applied_seq"] = health["feedback_events"], health["applied_seq"]
        times: dict[str, dict[str, list[float]]] = {name: {"recommend": [], "foldin": []} for name in running}
        for n in tqdm(range(requests), desc="recommend", mininterval=1.0):
            for name, (client, _) in running.items():
                times[name]["recommend"].append(timed_post(client, {"user_id": users[n % len(users)], "k": 10}))
        for _ in tqdm(range(foldins), desc="fold-in", mininterval=1.0):
            for name, (client, _) in running.items():
                times[name]["foldin"].append(timed_post(client, {"history": history, "k": 10}))
        for name, (_, proc) in running.items():
            out[name].update(rss_end_mb=status_mb(proc.pid)["VmRSS"],
                             recommend_p50_ms=percentile(times[name]["recommend"], 50),
                             recommend_p99_ms=percentile(times[name]["recommend"], 99),
                             foldin_500_p50_ms=percentile(times[name]["foldin"], 50))
    finally:
        for client, proc in running.values():
            client.close()
            stop(proc)
    return out


ROWS = (("startup_s", "start-up (s)"), ("rss_start_mb", "RSS after start-up (MB)"),
        ("rss_end_mb", "RSS after requests (MB)"), ("recommend_p50_ms", "/recommend p50 (ms)"),
        ("recommend_p99_ms", "/recommend p99 (ms)"), ("foldin_500_p50_ms", "500-item fold-in p50 (ms)"),
        ("store_events", "events in the log"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="serve this checkpoint (default: citeulike-a, random weights, in --workdir)")
    ap.add_argument("--events", type=int, default=1_000_000, help="events in the grown stores")
    ap.add_argument("--pairs", type=int, default=20_000, help="distinct (user, item) pairs they repeat")
    ap.add_argument("--small", type=int, default=1_000, help="events in the empty-ish store")
    ap.add_argument("--rounds", type=int, default=2, help="start-ups per server (the fastest is reported)")
    ap.add_argument("--requests", type=int, default=200, help="/recommend requests per server")
    ap.add_argument("--foldins", type=int, default=20, help="500-item fold-in requests per server")
    ap.add_argument("--baseline", metavar="CHECKOUT", help="also serve empty-ish and legacy from this checkout "
                                                           "(e.g. a worktree of the commit before the change)")
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="growth-", dir=args.workdir))
    checkpoint = Path(args.checkpoint) if args.checkpoint else make_checkpoint(
        Path(args.workdir) / "growth-citeulike.ckpt", str(DEFAULT_DATA))
    ckpt = load_checkpoint(str(checkpoint))
    pairs = known_pairs(ckpt, args.pairs + args.small, args.seed)
    small, grown = pairs[:args.small], pairs[args.small:]
    rng = np.random.default_rng(args.seed)
    users = [ckpt.user_ids[u] for u in rng.integers(0, len(ckpt.user_ids), 256)]
    popularity = np.bincount(np.asarray(ckpt.train)[:, 1], minlength=len(ckpt.item_ids))
    history = [ckpt.item_ids[i] for i in np.argsort(-popularity, kind="stable")[:500]]
    urls = {name: f"sqlite:///{workdir / name}.sqlite3" for name in ("empty-ish", "appended", "legacy", "compacted")}
    seconds = {"fill empty-ish": fill_appended(urls["empty-ish"], repeated_events(small, args.small, args.seed, "s"),
                                               args.small),
               "fill appended": fill_appended(urls["appended"], repeated_events(grown, args.events, args.seed, "g"),
                                              args.events),
               "fill legacy": fill_bulk(urls["legacy"], repeated_events(grown, args.events, args.seed, "g"),
                                        args.events)}
    shutil.copyfile(workdir / "legacy.sqlite3", workdir / "compacted.sqlite3")   # closed: its WAL checkpointed
    t = time.perf_counter()
    compaction = compact_store(urls["compacted"])
    seconds["compact"] = time.perf_counter() - t
    print(f"compaction: {compaction.events_before:,} → {compaction.events_after:,} events in {seconds['compact']:.1f} s")
    servers = {name: (None, url) for name, url in urls.items()}
    if args.baseline:
        servers |= {f"{name} (base)": (Path(args.baseline).resolve(), urls[name]) for name in ("empty-ish", "legacy")}
    results = measure(servers, checkpoint, workdir, users, history, args.rounds, args.requests, args.foldins)
    names = list(results)
    width = max(map(len, names)) + 2
    print(f"\n{'':26s}" + "".join(f"{n:>{width}s}" for n in names))
    for key, label in ROWS:
        print(f"{label:26s}" + "".join(f"{results[n][key]:>{width},.1f}" for n in names))
    for baseline in [n for n in names if n.startswith("empty-ish")]:
        print(f"\nratios to {baseline}:")
        for key, label in ROWS[:-1]:
            print(f"{label:26s}" + "".join(f"{results[n][key] / results[baseline][key]:>{width}.2f}" for n in names
                                           if (n.endswith("(base)")) == baseline.endswith("(base)")))
    print(f"({', '.join(f'{n} {s:.1f} s' for n, s in seconds.items())}; {args.events:,} events over "
          f"{args.pairs:,} pairs, empty-ish {args.small:,}; start-ups: the fastest of {args.rounds}; "
          f"{args.requests} /recommend and {args.foldins} fold-ins per server, round-robin; {checkpoint}; "
          f"load average {os.getloadavg()[0]:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "seconds": seconds, "results": results},
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
