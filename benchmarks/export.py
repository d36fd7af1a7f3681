"""Batch export against the HTTP path, same run: `python -m training export` of every user of a checkpoint (time,
users/s, peak RSS of the export process), then users/s of the export against asking the real server
(`python -m app`) for the same users' lists, one /recommend per user at a few connections, and /recommend/batch of
64 users, alternating round by round on the same sample (best of each); the ratios.

    python benchmarks/export.py --checkpoint /tmp/cite.ckpt                   # e.g. a quick citeulike-a model
    python benchmarks/export.py --checkpoint C --http-users 2000 --chunk-users 128 512 2048

    (train one: python -m training train --data ../shared/data/citeulike-a.npz --epochs 1 --pretrain-epochs 1
     --out /tmp/cite.ckpt)

The whole export runs as its own subprocess (as an operator runs it), so its peak RSS is its own (RUSAGE_CHILDREN
of a child that ran it alone). The comparison uses a sample of users (--http-users, drawn with a fixed seed): each
round runs `training.export.export` on it in this process (checkpoint load included, as the command pays it),
then the HTTP kinds against the server, started once and warmed before timing; the server idles while the export
runs and the other way round.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# threads first, as `python -m app` and `python -m training export` do: the export rounds run in this process
from model.threads import configure  # noqa: E402
configure()

import httpx  # noqa: E402

from model.store.checkpoint import load_checkpoint
from training.export import export
from tests.harness.servers import ROOT, running_server


def run_export(checkpoint: str, out: Path, k: int, chunk: int, fmt: str) -> dict:
    """One export in a fresh process: its wall time and peak RSS (the child's own: run in a child of a child)."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "rc = subprocess.call(sys.argv[1:]); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")
    cmd = [sys.executable, "-c", probe, sys.executable, "-m", "training", "export", "--checkpoint", checkpoint,
           "--out", str(out), "--k", str(k), "--format", fmt, "--chunk-users", str(chunk), "--device", "cpu",
           "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds, rss_kb, rc = proc.stdout.strip().splitlines()[-1].split()
    if rc != "0":
        sys.exit(f"export failed: {proc.stdout}{proc.stderr}")
    return {"chunk_users": chunk, "format": fmt, "seconds": float(seconds), "peak_rss_mb": int(rss_kb) / 1024,
            "bytes": out.stat().st_size, "summary": proc.stdout.strip().splitlines()[0]}


async def http_users_per_s(url: str, users: list[str], k: int, connections: int, batch: int) -> float:
    """Users answered per second by /recommend (batch 1) or /recommend/batch over `connections` connections."""
    groups = [users[n:n + batch] for n in range(0, len(users), batch)]
    queue = asyncio.Queue()
    for g in groups:
        queue.put_nowait(g)

    async def worker(client: httpx.AsyncClient):
        while not queue.empty():
            g = queue.get_nowait()
            if batch == 1:
                r = await client.post(f"{url}/recommend", json={"user_id": g[0], "k": k})
            else:
                r = await client.post(f"{url}/recommend/batch", json={"requests": [{"user_id": u, "k": k} for u in g]})
            r.raise_for_status()

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=connections)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(connections)))
        return len(users) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--chunk-users", type=int, nargs="+", default=[512])
    p.add_argument("--format", default="parquet", choices=("parquet", "jsonl", "csv"))
    p.add_argument("--http-users", type=int, default=500, help="users of the comparison (a seeded sample)")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-full", action="store_true", help="only the comparison rounds")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()

    users = list(load_checkpoint(args.checkpoint).user_ids)
    sample = random.Random(0).sample(users, min(args.http_users, len(users)))
    work = Path(tempfile.mkdtemp(prefix="cmn-export-bench-"))
    exports = [] if args.skip_full else [run_export(args.checkpoint, work / f"out-{c}.{args.format}", args.k, c,
                                                    args.format) for c in args.chunk_users]
    for e in exports:
        e["users_per_s"] = len(users) / e["seconds"]
        print(f"export   chunk {e['chunk_users']:>5}: {len(users):,} users in {e['seconds']:.1f} s = "
              f"{e['users_per_s']:,.0f} users/s, peak RSS {e['peak_rss_mb']:,.0f} MB, {e['bytes'] / 1e6:.1f} MB "
              f"{args.format}")
    rounds = {"export": [], "recommend": [], "recommend_batch_64": []}
    with running_server(args.checkpoint, work, device="cpu", timeout=300) as (url, _):
        asyncio.run(http_users_per_s(url, sample[:50], args.k, args.connections, 1))   # warm-up
        for n in range(args.rounds):
            result = export(args.checkpoint, str(work / f"sample-{n}.{args.format}"), args.k, users=sample,
                            fmt=args.format, chunk_users=max(args.chunk_users), device="cpu", progress=False)
            rounds["export"].append(result.users_per_s)
            rounds["recommend"].append(asyncio.run(http_users_per_s(url, sample, args.k, args.connections, 1)))
            rounds["recommend_batch_64"].append(asyncio.run(http_users_per_s(url, sample, args.k, args.connections,
                                                                             64)))
            print(f"round {n + 1}: " + ", ".join(f"{k} {v[-1]:,.1f}" for k, v in rounds.items()) + " users/s")
    best = {k: max(v) for k, v in rounds.items()}
    ratios = {name: best["export"] / best[name] for name in ("recommend", "recommend_batch_64")}
    print("\n".join(f"ratio    export / {name}: {best['export']:,.1f} / {best[name]:,.1f} users/s = {r:.2f}x"
                    for name, r in ratios.items()))
    print(f"(best of {args.rounds} rounds, {len(sample):,} users, {args.connections} connections; load average "
          f"{os.getloadavg()[0]:.1f})")
    figures = {"users": len(users), "exports": exports, "rounds": rounds, "ratios": ratios, "sample": len(sample)}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
