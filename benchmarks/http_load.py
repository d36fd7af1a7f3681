"""HTTP throughput and latency of the real server against the web stack's ceiling, with wrk, same run.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.http_load                     # citeulike-a-sized random model
    python -m benchmarks.http_load --checkpoint artifacts/model.ckpt --duration 20 --json /tmp/http.json
    python -m benchmarks.http_load --quick                                     # 3 s per point, concurrency 1 and 32

Two servers on 127.0.0.1, both uvicorn with app/__main__.py's settings (one worker, log_config None, no access log):
- `real`: `python -m app` (CMN_* environment: checkpoint, port, a throw-away feedback store; the rest default);
- `bare`: a FastAPI app defined here that parses the same pydantic body (app.schemas.RecommendRequest) and answers
  a same-shaped RecommendResponse of k items without scoring anything: the web stack's ceiling.
For each request kind (100 candidates; full catalogue; `probe`: GET /livez, no body and no model work, the HTTP
layer alone: parser, connection limits, middleware) and concurrency (1, 8, 32, 64 connections), wrk
(`--wrk-threads`, default 1; `--latency`, a short warm-up first) hits bare then real, alternately, so both see the
same machine. With --baseline-tree a third server, `python -m app` of another checkout, joins them (e.g. the
revision before a change to the HTTP layer: issue 23 compared h11 with httptools this way); with --plain, the
same app under `uvicorn app.main:app` (uvicorn's defaults: httptools without app/protocol.py's head deadline,
head limit and connection cap, the limits a deployment would then leave to its proxy).
Requests cycle through 512 bodies of random known users (benchmarks/wrk_post.lua). Reported: req/s, p50, p99,
non-2xx responses and socket errors, real/bare throughput, and the server's CPU time per request (whole process
and its main thread, from /proc: robust to other jobs on a shared machine), and the share of the machine's cores
left idle meanwhile (idle cores under load: the server is bound by its GIL, not by the CPU). Target: 100 candidates
at concurrency 32
>= 70% of bare, p99 <= 50 ms, zero errors.

Needs wrk (`apt-get install -y wrk`). Without --checkpoint one is written to --workdir: a CMN with random
weights (memories scaled to std 0.5) on citeulike-a's training pairs, string ids as a service would see.

--strategies: instead, the cost of each strategy the checkpoint offers (full; two_stage and retrieval where it has a
retrieval stage) through the real server, `python -m app` alone (no wrk, no bare app):

    python -m benchmarks.http_load --strategies --checkpoint artifacts/model.ckpt --rounds 10 --duration 5

k 10, known users at random (the same users for every strategy), 1 user a request (`POST /recommend`) and 64
(`POST /recommend/batch`, one model call of CMN_MAX_BATCH's default 64 unless CMN_MAX_CALL_MS splits it), one keep-alive
connection, one request at a time. Each round runs every (users, strategy) cell for --duration seconds, the order of
the strategies reversed every other round, so a load spike on the shared machine hits them all; a --warmup of each
cell first is not counted. Reported per cell: requests, p50 and p99 of the client's latency over all rounds,
requests/s (one connection), the server's CPU ms per request (from /proc), its model calls per request (from
/metrics) and full's p50 and p99 over this cell's (full / two_stage: how much faster); every answer is checked to be
a 200 ranked by the strategy asked for. Also the checkpoint's size, its stage and, where the checkpoint records it,
the stage's fit time.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tests.harness.servers import free_port, stop, wait_healthy

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATA = (ROOT / ".." / "shared" / "data" / "citeulike-a.npz").resolve()
LUA = HERE / "wrk_post.lua"


# --------------------------------------------------------------------------- checkpoint

def make_checkpoint(path: Path, data: str = str(DEFAULT_DATA), hops: int = 3, seed: int = 0) -> Path:
    """A servable checkpoint with random weights on the data set's training pairs (cost does not depend on
    the weights). Written once; reused when it exists."""
    if path.exists():
        return path
    import torch

    from model.store.checkpoint import Checkpoint, save_checkpoint
    from model.cmn import CMN, CMNConfig
    from training import data as data_mod
    ds = data_mod.load(data)
    torch.manual_seed(seed)
    model = CMN(CMNConfig(ds.n_users, ds.n_items, 50, hops))
    with torch.no_grad():
        for table in (model.user_memory, model.user_output, model.item_memory):
            table.mul_(50)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(Checkpoint(model.cfg, model.state_dict(), list(ds.user_ids), list(ds.item_ids),
                               train=ds.train, seen=ds.all_pairs(), meta={"data": ds.name, "note": "random weights"}),
                    str(path))
    return path


# --------------------------------------------------------------------------- the bare ceiling app

def bare_app():
    from fastapi import FastAPI

    from app.schemas import RecommendRequest, RecommendResponse, ScoredItem
    app = FastAPI()
    filler = [str(i) for i in range(1000)]

    @app.post("/recommend", response_model=RecommendResponse, response_model_exclude_none=True)
    async def recommend(req: RecommendRequest):
        start = time.perf_counter()
        ids = (req.candidates or filler)[:req.k]
        return RecommendResponse(user_id=req.user_id, items=[ScoredItem(item_id=i, score=1.0 / (n + 1))
                                                             for n, i in enumerate(ids)],
                                 model_version="bare", took_ms=round((time.perf_counter() - start) * 1000, 3))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/livez")
    async def livez():
        return {"status": "alive"}
    return app


def serve_bare(port: int) -> None:
    import uvicorn
    uvicorn.run(bare_app(), host="127.0.0.1", port=port, log_config=None, access_log=False,
                timeout_graceful_shutdown=30)


# --------------------------------------------------------------------------- servers and wrk

def start_server(kind: str, checkpoint: Path, workdir: Path, extra_env: dict,
                 cwd: Path = ROOT) -> tuple[str, subprocess.Popen]:
    """`real` (and `baseline`: the same from another checkout, `cwd`; `plain`: the same app on uvicorn's
    defaults) or `bare`."""
    port = free_port()
    env = {**os.environ, **extra_env}
    if kind in ("real", "baseline", "plain"):
        env.update(CMN_CHECKPOINT=str(checkpoint), CMN_PORT=str(port), CMN_HOST="127.0.0.1",
                   CMN_FEEDBACK_PATH=str(workdir / f"feedback-{port}.sqlite3"))
        cmd = [sys.executable, "-m", "app"] if kind != "plain" else [
            sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port), "--no-access-log", "--log-level",
            "warning"]
    else:
        cmd = [sys.executable, "-m", "benchmarks.http_load", "--serve-bare", str(port)]
    log = open(workdir / f"server-{kind}-{port}.log", "wb")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, timeout=300)
    return url, proc


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_wrk(out: str) -> dict:
    def ms(text: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
        return float(number) * UNITS[unit]
    pct = {p: ms(v) for p, v in re.findall(r"^\s+(\d+)%\s+([\d.]+\w+)\s*$", out, re.M)}
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    return {"req_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": pct.get("50"), "p99_ms": pct.get("99"), "requests": int(total.group(1)) if total else None,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sum(map(int, socket_errors.groups())) if socket_errors else 0}


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(whole process, main thread) user+system CPU seconds, from /proc."""
    def read(path: str) -> float:
        fields = open(path).read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return read(f"/proc/{pid}/stat"), read(f"/proc/{pid}/task/{pid}/stat")


def machine_ticks() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of all cores, from /proc/stat."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def run_wrk(url: str, bodies: Path | None, connections: int, seconds: float, pid: int | None = None,
            timeout_s: int = 30, threads: int = 1) -> dict:
    """POST `bodies` to /recommend in turn; None: GET /livez."""
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", f"--timeout={timeout_s}s",
           "--latency"] + (["-s", str(LUA), url, "--", str(bodies), "/recommend"] if bodies else [f"{url}/livez"])
    before, ticks = (cpu_seconds(pid) if pid else None), machine_ticks()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = parse_wrk(out)
    if pid and result["requests"]:
        after = cpu_seconds(pid)  # server CPU per request: robust to other jobs taking the cores away
        result["cpu_ms_per_request"] = (after[0] - before[0]) * 1e3 / result["requests"]
        result["main_thread_cpu_ms_per_request"] = (after[1] - before[1]) * 1e3 / result["requests"]
        # cores left idle while the server was loaded: with idle cores, the bound is the server's GIL, not the CPU
        idle, total = (now - then for now, then in zip(machine_ticks(), ticks))
        result["machine_idle"] = idle / total if total else None
    return result


def write_bodies(path: Path, user_ids: list[str], item_ids: list[str], candidates: int | None, n: int,
                 seed: int, history: int | None = None) -> Path:
    """`n` request bodies for random known users (`candidates` random items each, or the whole catalogue); with
    `history`, anonymous sessions of that many random items instead (fold-in)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for u in rng.choice(len(user_ids), n, replace=False):
            body = {"user_id": user_ids[u], "k": 10}
            if history:
                body = {"history": [item_ids[i] for i in rng.choice(len(item_ids), history, replace=False)], "k": 10}
            if candidates:
                body["candidates"] = [item_ids[i] for i in rng.choice(len(item_ids), candidates, replace=False)]
            f.write(json.dumps(body) + "\n")
    return path


# --------------------------------------------------------------------------- strategies side by side

def strategy_bodies(user_ids: list[str], strategy: str, users: np.ndarray) -> list[tuple[str, bytes]]:
    """(path, body) for each row of `users` (indices): /recommend for one user, /recommend/batch for several."""
    def one(u: int) -> dict:
        return {"user_id": user_ids[u], "k": 10, "strategy": strategy}
    return [("/recommend", json.dumps(one(row[0])).encode()) if len(row) == 1 else
            ("/recommend/batch", json.dumps({"requests": [one(u) for u in row]}).encode()) for row in users]


def served_strategies(answer: dict) -> set:
    return {r.get("strategy") for r in answer["results"]} if "results" in answer else {answer.get("strategy")}


def model_calls(conn: http.client.HTTPConnection) -> float:
    """The server's model calls so far (/metrics: cmn_batch_size's count): a request is cut into several where
    CMN_MAX_BATCH or CMN_MAX_CALL_MS (at the model thread's measured pairs per second) says so."""
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    return float(re.search(r"^cmn_batch_size_count (\S+)$", text, re.M).group(1))


class Cell:
    """One (users a request, strategy): its bodies, taken in turn, and what its measured requests took."""

    def __init__(self, users: int, strategy: str, bodies: list[tuple[str, bytes]]):
        self.users, self.strategy, self.bodies = users, strategy, bodies
        self.next, self.latencies, self.cpu_s, self.calls, self.errors = 0, [], 0.0, 0.0, []

    def run(self, conn: http.client.HTTPConnection, seconds: float, pid: int, measured: bool, least: int = 3) -> None:
        """Requests one after the other for `seconds` (at least `least` of them)."""
        calls_before, cpu_before = model_calls(conn), cpu_seconds(pid)[0]
        n, until = 0, time.perf_counter() + seconds
        while n < least or time.perf_counter() < until:
            path, body = self.bodies[self.next % len(self.bodies)]
            self.next, n = self.next + 1, n + 1
            start = time.perf_counter()
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            took = time.perf_counter() - start
            if response.status != 200:
                self.errors.append(f"{response.status} {data[:200]!r}")
            elif (served := served_strategies(json.loads(data))) != {self.strategy}:
                self.errors.append(f"asked for {self.strategy}, ranked by {sorted(map(str, served))}")
            if measured:
                self.latencies.append(took)
        if measured:
            self.cpu_s += cpu_seconds(pid)[0] - cpu_before
            self.calls += model_calls(conn) - calls_before


def compare_strategies(url: str, pid: int, user_ids: list[str], strategies: tuple[str, ...], sizes: list[int],
                       rounds: int, seconds: float, warmup: float, seed: int = 0) -> list[dict]:
    """Every (users a request, strategy) cell, interleaved round by round; one row per cell."""
    rng = np.random.default_rng(seed)
    cells = []
    for size in sizes:
        users = np.stack([rng.choice(len(user_ids), size, replace=False) for _ in range(64)])
        cells += [Cell(size, s, strategy_bodies(user_ids, s, users)) for s in strategies]
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=300)
    try:
        for cell in cells:
            cell.run(conn, warmup, pid, measured=False, least=2)
        with tqdm(total=rounds * len(cells), desc="rounds x cells", leave=False) as progress:
            for r in range(rounds):
                for size in sizes:
                    for cell in [c for c in cells if c.users == size][::1 if r % 2 == 0 else -1]:
                        cell.run(conn, seconds, pid, measured=True)
                        progress.update()
    finally:
        conn.close()
    rows = []
    for cell in cells:
        lat = np.array(cell.latencies) * 1e3
        rows.append({"users": cell.users, "strategy": cell.strategy, "requests": len(lat),
                     "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                     "req_per_s": len(lat) / lat.sum() * 1e3, "cpu_ms_per_request": cell.cpu_s * 1e3 / len(lat),
                     "model_calls_per_request": cell.calls / len(lat),
                     "errors": len(cell.errors), "first_errors": cell.errors[:3]})
    for row in rows:
        full = next(r for r in rows if r["users"] == row["users"] and r["strategy"] == "full")
        row["full_over_p50"], row["full_over_p99"] = full["p50_ms"] / row["p50_ms"], full["p99_ms"] / row["p99_ms"]
    return rows


def fit_seconds(ckpt) -> dict:
    """Fit times the checkpoint records for its retrieval stage (keys ending in `seconds`), by where they are."""
    found = {}

    def walk(value, where: str) -> None:
        if isinstance(value, dict):
            for key, v in value.items():
                if str(key).endswith("seconds") and isinstance(v, (int, float)):
                    found[f"{where}.{key}"] = v
                else:
                    walk(v, f"{where}.{key}")
    walk(ckpt.meta, "meta")
    walk(ckpt.metrics.get("two_stage", {}), "metrics.two_stage")
    return found


def users_per_request(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated integers: {text!r}") from None
    if not all(1 <= n <= 256 for n in sizes):
        raise argparse.ArgumentTypeError(f"users a request run from 1 to 256 (a batch's most): {text!r}")
    return sizes


def strategies_main(args, checkpoint: Path, extra_env: dict) -> int:
    from model.recommender import STRATEGIES
    from model.store.checkpoint import CheckpointError, load_checkpoint
    try:
        ckpt = load_checkpoint(str(checkpoint))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    offered = STRATEGIES if ckpt.retrieval is not None else ("full",)
    if missing := set(args.only or ()) - set(offered):
        print(f"error: {checkpoint} does not offer {sorted(missing)} (it offers {list(offered)})", file=sys.stderr)
        return 2
    strategies = tuple(s for s in offered if s == "full" or s in (args.only or offered))
    if max(args.users) > len(ckpt.user_ids):
        print(f"error: {max(args.users)} users a request, but {checkpoint} knows {len(ckpt.user_ids)}", file=sys.stderr)
        return 2
    stage = ckpt.two_stage.to_dict() if ckpt.two_stage is not None else None
    fits = fit_seconds(ckpt)
    user_ids = list(ckpt.user_ids)
    print(f"checkpoint {checkpoint}: {checkpoint.stat().st_size / 1e6:.1f} MB; {len(user_ids):,} users, "
          f"{len(ckpt.item_ids):,} items; retrieval stage {stage or '(none: full only)'}; stage fit time "
          f"{fits or '(not recorded in the checkpoint)'}")
    print(f"nproc {os.cpu_count()}; load average {os.getloadavg()}; server env {extra_env or '(defaults)'}; "
          f"{args.rounds} rounds x {args.duration:g} s a cell after {args.warmup:g} s of warm-up", flush=True)
    del ckpt
    url, proc = start_server("real", checkpoint, Path(args.workdir), extra_env)
    try:
        rows = compare_strategies(url, proc.pid, user_ids, strategies, args.users, args.rounds, args.duration,
                                  args.warmup)
    finally:
        stop(proc)
    print(f"{'users':>5} {'strategy':>9} {'requests':>8} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>7} {'CPU ms/req':>10} "
          f"{'calls/req':>9} {'full/p50':>8} {'full/p99':>8} {'errors':>6}")
    for r in rows:
        print(f"{r['users']:>5} {r['strategy']:>9} {r['requests']:>8} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f} "
              f"{r['req_per_s']:>7.1f} {r['cpu_ms_per_request']:>10.2f} "
              f"{r['model_calls_per_request']:>9.1f} {r['full_over_p50']:>7.2f}x "
              f"{r['full_over_p99']:>7.2f}x {r['errors']:>6}")
        for e in r["first_errors"]:
            print(f"      error: {e}")
    print(f"load average at the end {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": str(checkpoint), "bytes": checkpoint.stat().st_size,
                                               "stage": stage, "fit_seconds": fits, "rows": rows, "env": extra_env,
                                               "command": " ".join(sys.argv)}, indent=2))
    return 1 if any(r["errors"] for r in rows) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help="serve this checkpoint (default: a random citeulike-a-sized one)")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--workdir", default="/tmp/cmn_bench")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured point")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each measured point")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--kinds", default="candidates,full", help="candidates (100 per request), full, history "
                    "(anonymous sessions of 50 items, folded in, whole catalogue: compare with full) and/or probe "
                    "(GET /livez: the HTTP layer alone)")
    ap.add_argument("--wrk-threads", type=int, default=1, help="wrk's -t")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra server environment")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--baseline-tree", type=Path, metavar="DIR",
                    help="also serve `python -m app` from this checkout of another revision (e.g. `git worktree add "
                         "/tmp/before REV`), interleaved with the others, and report real/baseline")
    ap.add_argument("--plain", action="store_true", help="also serve the app under `uvicorn app.main:app` "
                    "(uvicorn's defaults, without app/protocol.py), interleaved with the others")
    ap.add_argument("--strategies", action="store_true", help="instead: p50/p99 of each strategy the checkpoint "
                    "offers, 1 and 64 users a request, interleaved rounds (see above)")
    ap.add_argument("--rounds", type=int, default=5, help="--strategies: rounds")
    ap.add_argument("--users", default="1,64", type=users_per_request, help="--strategies: users a request, "
                    "comma-separated (1: /recommend; 2..256: /recommend/batch)")
    ap.add_argument("--only", type=lambda text: text.split(","), metavar="STRATEGY,...",
                    help="--strategies: measure only these (and full, the reference), e.g. `--only full` to see "
                         "full's model calls without the other strategies' calls moving the measured rate")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return 0
    if args.strategies:
        if not args.checkpoint:
            ap.error("--strategies needs --checkpoint (a trained one: a random model has no retrieval stage)")
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        if args.quick:
            args.duration, args.warmup, args.rounds = 0.5, 0.2, 2
        return strategies_main(args, Path(args.checkpoint), dict(kv.split("=", 1) for kv in args.env))
    if not shutil.which("wrk"):
        print("error: wrk not found (apt-get install -y wrk)", file=sys.stderr)
        return 2
    if args.quick:
        args.duration, args.warmup, args.concurrency = 3.0, 1.0, "1,32"
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint) if args.checkpoint else make_checkpoint(workdir / "citeulike-random.ckpt",
                                                                                args.data)
    from model.store.checkpoint import load_checkpoint
    ckpt = load_checkpoint(str(checkpoint))
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    bodies = {}
    if "candidates" in args.kinds:
        bodies["candidates"] = write_bodies(workdir / "bodies-candidates.jsonl", ckpt.user_ids, ckpt.item_ids,
                                            100, min(512, len(ckpt.user_ids)), 1)
    if "full" in args.kinds:
        bodies["full"] = write_bodies(workdir / "bodies-full.jsonl", ckpt.user_ids, ckpt.item_ids, None,
                                      min(512, len(ckpt.user_ids)), 2)
    if "history" in args.kinds:
        bodies["history"] = write_bodies(workdir / "bodies-history.jsonl", ckpt.user_ids, ckpt.item_ids, None,
                                         min(512, len(ckpt.user_ids)), 3, history=50)
    if "probe" in args.kinds:
        bodies["probe"] = None
    print(f"checkpoint {checkpoint} ({checkpoint.stat().st_size / 1e6:.1f} MB; {len(ckpt.user_ids)} users, "
          f"{len(ckpt.item_ids)} items); nproc {os.cpu_count()}; load average {os.getloadavg()}; "
          f"server env {extra_env or '(defaults)'}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    del ckpt
    servers = {}
    try:
        names = ("bare", "real") + (("plain",) if args.plain else ()) + (("baseline",) if args.baseline_tree else ())
        for kind in names:
            servers[kind] = start_server(kind, checkpoint, workdir, extra_env,
                                         args.baseline_tree if kind == "baseline" else ROOT)
        rows = []
        header = f"{'kind':>10} {'conc':>4} {'server':>6} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non2xx':>6} " \
                 f"{'sockerr':>7} {'real/bare':>9} {'CPU ms/req':>10} {'main thr':>8} {'idle':>5}"
        print(header)
        for kind, path in bodies.items():
            for n, c in enumerate(int(x) for x in args.concurrency.split(",")):
                pair = {}
                for server in (names if n % 2 == 0 else names[::-1]):
                    url, proc = servers[server]
                    if args.warmup:
                        run_wrk(url, path, c, args.warmup, threads=args.wrk_threads)
                    pair[server] = run_wrk(url, path, c, args.duration, proc.pid, threads=args.wrk_threads)
                for server in names:
                    r = pair[server]
                    ratio = r["req_per_s"] / pair["bare"]["req_per_s"]
                    row = {"kind": kind, "concurrency": c, "server": server, **r,
                           "real_over_bare": ratio if server != "bare" else None}
                    rows.append(row)
                    print(f"{kind:>10} {c:>4} {server:>6} {r['req_per_s']:>9.1f} {r['p50_ms']:>8.2f} "
                          f"{r['p99_ms']:>8.2f} {r['non_2xx']:>6} {r['socket_errors']:>7} "
                          f"{(f'{ratio:.0%}' if server != 'bare' else ''):>9} "
                          f"{r.get('cpu_ms_per_request', float('nan')):>10.3f} "
                          f"{r.get('main_thread_cpu_ms_per_request', float('nan')):>8.3f} "
                          f"{(r.get('machine_idle') or float('nan')):>5.0%}", flush=True)
    finally:
        for _, proc in servers.values():
            stop(proc)
    if args.baseline_tree:
        real = {(r["kind"], r["concurrency"]): r for r in rows if r["server"] == "real"}
        print("\nreal vs baseline (same run): " + "; ".join(
            f"{r['kind']} c{r['concurrency']}: req/s x{real[r['kind'], r['concurrency']]['req_per_s'] / r['req_per_s']:.2f}, "
            f"p99 {r['p99_ms']:.1f} -> {real[r['kind'], r['concurrency']]['p99_ms']:.1f} ms"
            for r in rows if r["server"] == "baseline"))
    target = [r for r in rows if r["kind"] == "candidates" and r["concurrency"] == 32 and r["server"] == "real"]
    if target:
        t = target[0]
        ok = t["real_over_bare"] >= 0.7 and t["p99_ms"] <= 50 and t["non_2xx"] + t["socket_errors"] == 0
        print(f"\ntarget (100 candidates, concurrency 32): real/bare {t['real_over_bare']:.0%} (>= 70%), "
              f"p99 {t['p99_ms']:.1f} ms (<= 50), errors {t['non_2xx'] + t['socket_errors']} (0) -> "
              f"{'met' if ok else 'MISSED'}")
    print(f"load average at the end {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": str(checkpoint), "rows": rows, "env": extra_env,
                                               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                                               "duration_s": args.duration, "command": " ".join(sys.argv)},
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
