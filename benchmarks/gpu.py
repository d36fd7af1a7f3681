"""The GPU path against the eager one, same run: training steps, full-catalogue scoring, serving, and equality.

    bash benchmarks/gpu.sh                          # python -m benchmarks.gpu --device cuda (an H200: < 6 min)
    bash benchmarks/gpu.sh --device cpu --quick     # dry run on a machine without a GPU (~3 min on 2 cores)

citeulike-a, CMN d 50, hops 3 (the paper's settings). Rows, each eager against the new path:
- training: triples/s at batch 128, 1,024 and 8,192. `eager` = training.train.fit_epoch with cmn_pair_scores and
  TFRMSProp (today's default); `graph` = training/graph_step.GraphStep (captured in a CUDA graph on a GPU). Both
  start from the same weights and run the same batches (a few warm-up batches, then the timed ones,
  --rounds times alternately, best round of each), so their weights and optimiser state are compared at the end.
- scorer: users/s over the whole catalogue at 1, 64 and 1,024 users per call. `eager` = Scorer with the CPU-tuned
  routes (packed up to 8 users, bucketed beyond); `graph` = model/scoring/graphed.GraphedCatalogue. Each call is timed
  to the end of its GPU work; best of each. Counted GFLOP/s as benchmarks/scorer.py counts them. Scores of both
  are compared with the CPU scorer's (tolerance 1e-4, tests/scoring/test_scorer_routes.py's).
- served: in process, the top-10 lists of 200 users from a Recommender on the CPU against one on the device; then
  full-catalogue /recommend at concurrency 64 against `python -m app` on the device, eager route then graph route
  (one server at a time), with wrk when installed, else with a few Python client processes (httpx). Skipped, with
  a line that says so, where FastAPI or uvicorn is missing.
The model has random weights with the memories scaled to std 0.5 (attention far from uniform; the cost does not
depend on the weights), written once as a checkpoint by benchmarks/http_load.make_checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.http_load import make_checkpoint, run_wrk, write_bodies
from tests.harness.servers import free_port, stop, wait_healthy

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATA = (ROOT / ".." / "shared" / "data" / "citeulike-a.npz").resolve()
TOLERANCE = 1e-4          # scores: the scorer routes' tested tolerance (docs/model.md)
TRAIN_TOLERANCE = 1e-4    # weights and optimiser state after the same steps (float order of index_add on a GPU)


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- training

def training_rows(args, device) -> list[dict]:
    import torch

    from benchmarks.train_speed import FirstBatches
    from model.store.checkpoint import csr
    from model.cmn import CMN, CMNConfig
    from training import data as data_mod
    from training.graph_step import WARMUP_STEPS, GraphStep
    from training.optim import TFRMSProp
    from training.sampler import TripleSampler
    from training.train import TrainConfig, cmn_pair_scores, fit_epoch

    ds = data_mod.load(args.data)
    indptr, indices = (torch.from_numpy(a).to(device) for a in csr(ds.train[:, 1], ds.train[:, 0], ds.n_items))
    sampler = TripleSampler(ds.train, ds.n_items, 4, seed=0)
    rows = []
    for batch, steps in zip(args.train_batches, args.train_steps):
        torch.manual_seed(0)
        eager = CMN(CMNConfig(ds.n_users, ds.n_items, 50, args.hops)).to(device)
        graph = copy.deepcopy(eager)
        eager_opt, graph_opt = TFRMSProp(eager.parameters()), TFRMSProp(graph.parameters())
        cfg = TrainConfig(batch_size=batch, progress=False)
        pair_scores = cmn_pair_scores(eager, indptr, indices, False)
        step = GraphStep.for_sampler(graph, graph_opt, indptr, indices, sampler, batch)
        budget = step.slot_budget
        # on a GPU the warm-up holds the graph step's uncaptured steps and its capture
        warm_steps = WARMUP_STEPS + 2 if device.type == "cuda" else 1
        warm, timed_batches = FirstBatches(sampler, warm_steps * batch), FirstBatches(sampler, steps * batch)
        for e in range(args.rounds):
            timed_batches.epoch(1 + e)   # sampled and cut outside the timing
        runs = {"eager": lambda s, e: fit_epoch(eager, pair_scores, eager_opt, s, e, cfg, device, ""),
                "graph": lambda s, e: step.fit_epoch(s, e)}
        for run in runs.values():
            run(warm, 0)   # graph: its uncaptured warm-up steps and the capture
        best = {name: math.inf for name in runs}
        for e in range(args.rounds):
            for name, run in runs.items():
                best[name] = min(best[name], timed(device, lambda: run(timed_batches, 1 + e)))
        fallbacks = step.fallback_steps
        diff = state_difference(eager, eager_opt, graph, graph_opt)
        n = steps * batch
        row = {"batch": batch, "steps": steps, "slot_budget": budget, "fallback_steps": fallbacks,
               "eager_triples_per_s": n / best["eager"], "graph_triples_per_s": n / best["graph"],
               "eager_ms_per_step": best["eager"] / steps * 1e3, "graph_ms_per_step": best["graph"] / steps * 1e3,
               **diff}
        row["speedup"] = row["graph_triples_per_s"] / row["eager_triples_per_s"]
        rows.append(row)
        verdict = "equal" if diff["equal"] else "DIFFER"
        print(f"  batch {batch:5d}: eager {row['eager_triples_per_s']:>10,.0f} triples/s "
              f"({row['eager_ms_per_step']:.2f} ms/step), graph {row['graph_triples_per_s']:>10,.0f} triples/s "
              f"({row['graph_ms_per_step']:.2f} ms/step): {row['speedup']:.1f}x; after "
              f"{warm_steps + args.rounds * steps} identical steps max |Δ| weights "
              f"{diff['weights_max_abs_diff']:.1e}, optimiser state {diff['state_max_abs_diff']:.1e} -> {verdict} "
              f"(tolerance {TRAIN_TOLERANCE:g}); slot budget {budget:,} slots, {fallbacks} batches over it",
              flush=True)
    return rows


def state_difference(a, a_opt, b, b_opt) -> dict:
    """Largest differences of two models' weights and of their TFRMSProp accumulators and momenta."""
    pairs = [(p.detach(), q.detach()) for p, q in zip(a.parameters(), b.parameters())]
    weights = max(float((p - q).abs().max()) for p, q in pairs)
    state = max(float((a_opt.state[p][k] - b_opt.state[q][k]).abs().max())
                for p, q in zip(a.parameters(), b.parameters()) for k in ("ms", "mom"))
    return {"weights_max_abs_diff": weights, "state_max_abs_diff": state,
            "equal": weights <= TRAIN_TOLERANCE and state <= TRAIN_TOLERANCE}


# --------------------------------------------------------------------------- scorer

def scorer_rows(args, ckpt, device) -> list[dict]:
    import torch

    from benchmarks.scorer import counted_flops
    from model.scoring import Scorer

    routes = {"eager": Scorer.from_checkpoint(ckpt, device, graph_catalogue=False),
              "graph": Scorer.from_checkpoint(ckpt, device, graph_catalogue=True)}
    cpu = Scorer.from_checkpoint(ckpt, "cpu", graph_catalogue=False)
    lengths = np.diff(cpu.indptr.numpy())
    counted = counted_flops(lengths, ckpt.config.embed_size, ckpt.config.hops)
    rng = np.random.default_rng(0)
    rows = []
    for n in args.users:
        users = torch.as_tensor(rng.choice(ckpt.config.n_users, n, replace=False), device=device)
        expected = cpu.score(users.cpu())
        # the first call of each route: its equality, and its warm-up (buckets built, graph captured)
        diff = {name: float((route.score(users).cpu() - expected).abs().max()) for name, route in routes.items()}
        best = {name: math.inf for name in routes}
        for _ in range(args.rounds):
            for name, route in routes.items():
                spent, reps = 0.0, 0
                while reps < args.min_calls or (spent < args.time_per_point and reps < 50):
                    t = timed(device, lambda: route.score(users))
                    best[name], spent, reps = min(best[name], t), spent + t, reps + 1
        row = {"users": n, **{f"{k}_users_per_s": n / best[k] for k in routes},
               **{f"{k}_ms": best[k] * 1e3 for k in routes},
               **{f"{k}_counted_gflops_per_s": counted * n / best[k] / 1e9 for k in routes},
               **{f"{k}_max_abs_diff_vs_cpu": diff[k] for k in routes}}
        row["speedup"] = row["graph_users_per_s"] / row["eager_users_per_s"]
        rows.append(row)
        print(f"  {n:5d} users: eager {best['eager'] * 1e3:9.2f} ms ({row['eager_users_per_s']:>9,.0f} users/s, "
              f"{row['eager_counted_gflops_per_s']:,.0f} counted GFLOP/s), graph {best['graph'] * 1e3:9.2f} ms "
              f"({row['graph_users_per_s']:>9,.0f} users/s, {row['graph_counted_gflops_per_s']:,.0f} GFLOP/s): "
              f"{row['speedup']:.1f}x; max |Δ| vs the CPU scorer eager {diff['eager']:.1e}, graph {diff['graph']:.1e}"
              f" -> {'equal' if max(diff.values()) <= TOLERANCE else 'DIFFER'} (tolerance {TOLERANCE:g})",
              flush=True)
    print(f"  counted FLOPs per user (benchmarks/scorer.py): {counted / 1e6:.0f} MFLOP")
    return rows


# --------------------------------------------------------------------------- served

def served_lists(ckpt, device, n_users: int = 200, k: int = 10) -> dict:
    """Top-k of the same users from a Recommender on the CPU (its CPU routes) and one on the device (its default
    there: the graphed route on CUDA; on a CPU, the dry run, the graphed route asked for)."""
    from model.recommender import Recommender
    users = np.random.default_rng(3).choice(ckpt.config.n_users, n_users, replace=False).tolist()
    cpu_items, cpu_scores = Recommender.from_checkpoint(ckpt, "cpu", graph_catalogue=False).recommend(users, k=k)
    dev_items, dev_scores = Recommender.from_checkpoint(ckpt, str(device), graph_catalogue=True).recommend(users, k=k)
    same = int((cpu_items == dev_items).all(1).sum())
    diff = float((cpu_scores - dev_scores).abs().max())
    print(f"  top-{k} of {n_users} users, CPU against {device}: {same} of {n_users} lists identical, max score |Δ| "
          f"{diff:.1e} -> {'equal' if same == n_users and diff <= TOLERANCE else 'DIFFER'}", flush=True)
    return {"users": n_users, "identical_lists": same, "max_abs_diff": diff}


def served_rows(args, checkpoint: Path, ckpt, device, workdir: Path) -> list[dict]:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"  served: skipped ({' and '.join(missing)} not installed; pip install fastapi uvicorn)")
        return []
    bodies = write_bodies(workdir / "bodies-full.jsonl", ckpt.user_ids, ckpt.item_ids, None,
                          min(512, len(ckpt.user_ids)), 2)
    tool = "wrk" if shutil.which("wrk") else "python clients (httpx; wrk not installed)"
    rows = []
    for mode in ("eager", "graph"):
        port = free_port()
        env = {**os.environ, "CMN_CHECKPOINT": str(checkpoint), "CMN_PORT": str(port), "CMN_HOST": "127.0.0.1",
               "CMN_DEVICE": device.type, "CMN_FEEDBACK_PATH": str(workdir / f"feedback-{mode}-{port}.sqlite3"),
               "CMN_GRAPH_CATALOGUE": str(mode == "graph").lower()}
        log = open(workdir / f"server-{mode}-{port}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc, timeout=300)
            result = load(url, bodies, args.concurrency, args.serve_warmup, args.serve_seconds)
        finally:
            stop(proc)
            log.close()
        rows.append({"route": mode, "concurrency": args.concurrency, "tool": tool, **result})
        print(f"  {mode:5s}: {result['req_per_s']:8,.0f} req/s at concurrency {args.concurrency}, p50 "
              f"{result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, {result['errors']} errors ({tool})",
              flush=True)
    return rows


def load(url: str, bodies: Path, concurrency: int, warmup: float, seconds: float) -> dict:
    if shutil.which("wrk"):
        run_wrk(url, bodies, concurrency, warmup)
        r = run_wrk(url, bodies, concurrency, seconds)
        return {"req_per_s": r["req_per_s"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                "errors": r["non_2xx"] + r["socket_errors"]}
    processes = max(1, min(4, (os.cpu_count() or 2) // 4))
    per = [concurrency // processes + (k < concurrency % processes) for k in range(processes)]
    out = [Path(f"{bodies}.client{k}.json") for k in range(processes)]
    clients = [subprocess.Popen([sys.executable, "-m", "benchmarks.gpu", "--client", url, str(bodies), str(c),
                                 str(warmup), str(seconds), str(o)], cwd=ROOT, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for c, o in zip(per, out)]
    for c in clients:   # all imported and connected-ready: then all start together
        c.stdout.readline()
    for c in clients:
        c.stdin.write("go\n")
        c.stdin.flush()
    for c in clients:
        c.wait(timeout=warmup + seconds + 120)
    results = [json.loads(o.read_text()) for o in out]
    latencies = np.sort(np.concatenate([r["latencies"] for r in results]))
    return {"req_per_s": len(latencies) / seconds, "p50_ms": float(np.percentile(latencies, 50) * 1e3),
            "p99_ms": float(np.percentile(latencies, 99) * 1e3), "errors": sum(r["errors"] for r in results)}


def client(url: str, bodies_path: str, connections: int, warmup: float, seconds: float, out: str) -> int:
    """`--client`: `connections` concurrent full-catalogue requests for warmup + seconds; the latencies of the
    requests started in the last `seconds` go to `out`."""
    import asyncio

    import httpx
    bodies = [json.loads(line) for line in open(bodies_path)]
    print("ready", flush=True)
    sys.stdin.readline()

    async def run():
        latencies, errors = [], 0
        measured = time.perf_counter() + warmup
        end = measured + seconds
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
            async def worker(k: int):
                nonlocal errors
                while (start := time.perf_counter()) < end:
                    try:
                        ok = (await http.post("/recommend", json=bodies[k % len(bodies)])).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    if start >= measured:
                        if ok:
                            latencies.append(time.perf_counter() - start)
                        else:
                            errors += 1
                    k += connections
            await asyncio.gather(*(worker(k) for k in range(connections)))
        return latencies, errors

    latencies, errors = asyncio.run(run())
    Path(out).write_text(json.dumps({"latencies": latencies, "errors": errors}))
    return 0


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--client", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help="cuda[:N], or cpu for a dry run")
    ap.add_argument("--quick", action="store_true", help="fewer steps, rounds and seconds (the CPU dry run)")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--hops", type=int, default=3)
    ap.add_argument("--train-batches", default="128,1024,8192")
    ap.add_argument("--train-steps", default="400,150,40", help="timed steps per batch size, per round")
    ap.add_argument("--users", default="1,64,1024", help="users per full-catalogue call")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--time-per-point", type=float, default=1.0, help="seconds of scorer calls per point per round")
    ap.add_argument("--min-calls", type=int, default=2, help="scorer calls per point per round, at least")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--serve-seconds", type=float, default=10.0)
    ap.add_argument("--serve-warmup", type=float, default=3.0)
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: train, scorer, served")
    ap.add_argument("--workdir", default="/tmp/cmn_bench")
    ap.add_argument("--json", help="also write every row here")
    args = ap.parse_args(argv)
    if args.client:
        url, bodies, connections, warmup, seconds, out = args.client
        return client(url, bodies, int(connections), float(warmup), float(seconds), out)
    from model.threads import configure, describe
    configure()   # before torch loads, as python -m app and python -m training do
    import torch

    from model.store.checkpoint import load_checkpoint
    from model.device import resolve_device
    device = resolve_device(args.device)
    if args.quick:
        args.train_steps, args.rounds, args.time_per_point, args.min_calls = "4,2,1", 1, 0.0, 1
        args.serve_seconds, args.serve_warmup = 3.0, 1.0
    args.train_batches = [int(x) for x in args.train_batches.split(",")]
    args.train_steps = [int(x) for x in args.train_steps.split(",")]
    args.users = [int(x) for x in args.users.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    started = time.perf_counter()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"device {device} (GPU: {gpu}), torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"{os.cpu_count()} CPUs, {describe()}, load average {os.getloadavg()}; "
          f"data {args.data}, hops {args.hops}, d 50")
    if device.type == "cpu":
        print("DRY RUN on the CPU: the code paths are the GPU's, uncaptured; speed ratios here say nothing about a "
              "GPU (the graph step pays dense masked table updates that a GPU does in microseconds)")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = make_checkpoint(workdir / f"citeulike-random-hops{args.hops}.ckpt", args.data, args.hops)
    ckpt = load_checkpoint(str(checkpoint))
    report = {"device": str(device), "gpu": gpu, "torch": torch.__version__, "quick": args.quick}
    sections = (("train", "training (TF1 RMSProp, clip 5, 4 negatives)", lambda: training_rows(args, device)),
                ("scorer", "full-catalogue scorer", lambda: scorer_rows(args, ckpt, device)),
                ("served", "served", lambda: {"lists": served_lists(ckpt, device),
                                              "load": served_rows(args, checkpoint, ckpt, device, workdir)}))
    for name, title, run in sections:
        if name in skip:
            continue
        t = time.perf_counter()
        print(f"\n{title}:", flush=True)
        report[name] = run()
        print(f"  ({time.perf_counter() - t:.0f} s)")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["seconds"] = time.perf_counter() - started
    print(f"\ntotal {report['seconds']:.0f} s; load average at the end {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
