"""What recording impressions costs: /recommend throughput and latency with impressions off and on, same run, and
the store's size per million recorded requests.

    python -m benchmarks.impressions                        # citeulike-a-sized random model, SQLite store
    python -m benchmarks.impressions --quick                # 3 s per point, concurrency 1 and 32
    python -m benchmarks.impressions --store-url postgresql://user:pw@host/db    # both servers on PostgreSQL

Two real servers (`python -m app`, benchmarks/http_load.py's start_server) on the same checkpoint, each with its
own SQLite store (or both on the --store-url one): `off` (CMN_IMPRESSION_SAMPLE=0: every answer still carries an impression_id, nothing is recorded) and
`on` (CMN_IMPRESSION_SAMPLE=1: every answer is buffered and written by the flusher every CMN_IMPRESSION_FLUSH_S).
For each concurrency, wrk hits both, alternately, --repeat times (the order flips each time), with 100-candidate
k=10 requests for random known users. Reported: the median run's req/s, p50, p99, errors, on/off throughput
(each run's req/s listed: on a shared machine they spread); then the impressions the `on` store
holds and the bytes they take there (SQLite: the file after a WAL checkpoint, less the `off` store's; PostgreSQL:
pg_total_relation_size of the tables), per million requests. On a shared machine req/s spreads with what else
runs; the server's CPU time per request (from /proc) does not, and an in-process measurement gives what one
`Impressions.record` costs the request and what one impression costs the flusher.
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from pathlib import Path

from benchmarks.http_load import DEFAULT_DATA, make_checkpoint, run_wrk, start_server, write_bodies
from tests.harness.servers import stop


def store_bytes(workdir: Path, pid_port: str, url: str | None) -> int:
    """Bytes the `on` store's impressions take."""
    if url:
        import psycopg
        with psycopg.connect(url) as conn:
            return conn.execute("SELECT pg_total_relation_size('impressions') + "
                                "pg_total_relation_size('impression_clicks')").fetchone()[0]
    path = workdir / f"feedback-{pid_port}.sqlite3"
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return path.stat().st_size


def cpu(runs: list[dict], key: str) -> float:
    """Server CPU per request over all runs (from /proc: what other jobs on the machine do not change)."""
    return sum(r[key] * r["requests"] for r in runs) / sum(r["requests"] for r in runs)


def in_process(n: int = 100_000, rows: int = 10_000) -> dict:
    """What recording costs by itself: one `Impressions.record` on the event loop, and one impression's share of
    a flush (one transaction of `rows` impressions into a fresh SQLite store)."""
    import tempfile
    import time
    from concurrent.futures import ThreadPoolExecutor

    from app.impressions import Impressions
    from app.settings import Settings
    from model.store.events import open_store
    items = tuple(str(i) for i in range(1000, 1010))
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"{tmp}/feedback.sqlite3")
        recorder = Impressions(Settings(), store, ThreadPoolExecutor(1))
        batch, spent = [], 0.0
        for chunk in range(n // 1000):    # the buffer as the server keeps it: emptied by every flush
            start = time.perf_counter()
            for u in range(1000):
                recorder.record(str(u), items, "two_stage", "20261207T0600Z-abcdef", "treatment")
            spent += time.perf_counter() - start
            if len(batch) < rows:
                batch += recorder.pending
            recorder.pending.clear()
        record_us = spent / (n // 1000 * 1000) * 1e6
        batch = batch[:rows]
        start = time.perf_counter()
        store.record_impressions(batch)
        flush_us = (time.perf_counter() - start) / rows * 1e6
        store.close()
    return {"record_us": record_us, "flush_us_per_impression": flush_us}


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (its latencies with it); errors summed over all runs."""
    middle = sorted(runs, key=lambda r: r["req_per_s"])[len(runs) // 2]
    return {**middle, "requests": sum(r["requests"] for r in runs),
            "non_2xx": sum(r["non_2xx"] for r in runs), "socket_errors": sum(r["socket_errors"] for r in runs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="serve this checkpoint (default: a random citeulike-a-sized one)")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--workdir", default="/tmp/cmn_bench_impressions")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured point")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--store-url", help="both servers' store (default: a SQLite file each); must be empty")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs per point; the median is reported")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.concurrency = 3.0, 1.0, "1,32"
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("feedback-*.sqlite3*"):
        old.unlink()
    checkpoint = Path(args.checkpoint) if args.checkpoint else make_checkpoint(workdir / "citeulike-random.ckpt",
                                                                                args.data)
    from model.store.checkpoint import load_checkpoint
    from model.store.events import masked, open_store
    ckpt = load_checkpoint(str(checkpoint))
    bodies = write_bodies(workdir / "bodies.jsonl", ckpt.user_ids, ckpt.item_ids, 100, min(512, len(ckpt.user_ids)),
                          1)
    print(f"checkpoint {checkpoint} ({len(ckpt.user_ids)} users, {len(ckpt.item_ids)} items); nproc "
          f"{os.cpu_count()}; load average {os.getloadavg()}; store: "
          f"{masked(args.store_url) if args.store_url else 'SQLite'}")
    del ckpt
    env = {"off": {"CMN_IMPRESSION_SAMPLE": "0"}, "on": {"CMN_IMPRESSION_SAMPLE": "1"}}
    if args.store_url:   # both on it (the off server records nothing there): the same store to follow
        for name in env:
            env[name]["CMN_FEEDBACK_URL"] = args.store_url
    servers, rows = {}, []
    try:
        for name in ("off", "on"):
            servers[name] = start_server("real", checkpoint, workdir, env[name])
        print(f"{'conc':>4} {'server':>6} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'on/off':>7} "
              f"{'CPU ms/req':>10} {'main thr':>8}  (median of {args.repeat} alternating runs)")
        for n, c in enumerate(int(x) for x in args.concurrency.split(",")):
            runs = {"off": [], "on": []}
            for k in range(args.repeat):
                for name in (("off", "on") if (n + k) % 2 == 0 else ("on", "off")):
                    url, proc = servers[name]
                    if args.warmup:
                        run_wrk(url, bodies, c, args.warmup)
                    runs[name].append(run_wrk(url, bodies, c, args.duration, proc.pid))
            pair = {name: median_run(r) for name, r in runs.items()}
            for name in ("off", "on"):
                r = pair[name]
                ratio = r["req_per_s"] / pair["off"]["req_per_s"]
                rows.append({"concurrency": c, "server": name, **r, "on_over_off": ratio,
                             "runs_req_per_s": [x["req_per_s"] for x in runs[name]]})
                print(f"{c:>4} {name:>6} {r['req_per_s']:>9.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                      f"{r['non_2xx'] + r['socket_errors']:>6} {(f'{ratio:.0%}' if name == 'on' else ''):>7} "
                      f"{cpu(runs[name], 'cpu_ms_per_request'):>10.3f} "
                      f"{cpu(runs[name], 'main_thread_cpu_ms_per_request'):>8.3f}  runs: "
                      f"{', '.join(f'{x:.0f}' for x in rows[-1]['runs_req_per_s'])} req/s", flush=True)
    finally:
        for _, proc in servers.values():
            stop(proc)   # graceful: the `on` server flushes what it buffered
    requests = sum(r["requests"] for r in rows if r["server"] == "on")   # measured; warm-ups are recorded too
    on_port, off_port = (servers[name][0].rsplit(":", 1)[1] for name in ("on", "off"))
    store = open_store(args.store_url or str(workdir / f"feedback-{on_port}.sqlite3"), readonly=True)
    recorded = store.impression_count()
    store.close()
    size = store_bytes(workdir, on_port, args.store_url)
    if not args.store_url:
        size -= store_bytes(workdir, off_port, None)
    per_million = size / max(recorded, 1) * 1e6
    print(f"\nthe `on` store holds {recorded:,} impressions ({requests:,} requests measured, the rest warm-up): "
          f"{size / 1e6:.1f} MB, {size / max(recorded, 1):.0f} bytes each, {per_million / 1e6:.0f} MB per million "
          f"requests (k=10)")
    costs = in_process()
    print(f"in-process: Impressions.record {costs['record_us']:.1f} us per answer (the request's share); a flush "
          f"{costs['flush_us_per_impression']:.1f} us per impression (I/O thread, one SQLite transaction of 10,000)")
    print(f"load average at the end {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "impressions": recorded, "bytes": size, **costs,
                                               "bytes_per_million": per_million, "command": " ".join(sys.argv)},
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
