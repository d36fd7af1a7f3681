"""Server memory: RSS of `python -m app` after start-up (model loaded, warm-up calls done) and after a load
burst, next to the checkpoint's file size, the scorer cache's own tensors and a bare FastAPI process.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.memory                   # citeulike-a-sized random model
    python -m benchmarks.memory --checkpoint artifacts/model.ckpt --burst 20 --json /tmp/memory.json

The burst is wrk at 64 connections: --burst seconds of full-catalogue requests (64 users per scorer call, the
largest activations), then --burst seconds of 100-candidate requests. RSS is read from /proc (VmRSS; VmHWM is
the peak). The scorer cache is counted in this process by building the same Scorer over the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from benchmarks.http_load import DEFAULT_DATA, make_checkpoint, run_wrk, start_server, write_bodies
from tests.harness.servers import stop


def status_mb(pid: int) -> dict:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def tensor_mb(obj, exclude: torch.nn.Module | None = None) -> float:
    """MiB of the distinct tensor storages reachable from `obj` (attributes, lists, dataclasses, nested objects),
    leaving out those of `exclude`'s parameters."""
    seen = {p.untyped_storage().data_ptr() for p in exclude.parameters()} if exclude is not None else set()
    visited, total = set(), 0

    def walk(value):
        nonlocal total
        if isinstance(value, torch.Tensor):
            if value.layout == torch.sparse_csr:
                for part in (value.crow_indices(), value.col_indices(), value.values()):
                    walk(part)
            elif value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                total += value.untyped_storage().nbytes()
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, type)) and id(value) not in visited:
            visited.add(id(value))
            for item in vars(value).values():
                walk(item)

    walk(obj)
    return total / 2 ** 20


def scorer_cache_mb(checkpoint: Path) -> tuple[float, float]:
    """(model parameters, scorer cache beyond them, every route's cache built) in MiB."""
    from model.store.checkpoint import load_checkpoint
    from model.scoring import Scorer
    ckpt = load_checkpoint(str(checkpoint))
    scorer = Scorer.from_checkpoint(ckpt)
    scorer.bucketed_catalogue()
    params = sum(p.numel() * p.element_size() for p in scorer.model.parameters()) / 2 ** 20
    return params, tensor_mb(scorer, exclude=scorer.model)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--workdir", default="/tmp/cmn_bench")
    ap.add_argument("--burst", type=float, default=10.0, help="seconds of each burst kind")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not shutil.which("wrk"):
        print("error: wrk not found (apt-get install -y wrk)", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint) if args.checkpoint else make_checkpoint(workdir / "citeulike-random.ckpt",
                                                                                args.data)
    from model.store.checkpoint import load_checkpoint
    ckpt = load_checkpoint(str(checkpoint))
    full = write_bodies(workdir / "bodies-full.jsonl", ckpt.user_ids, ckpt.item_ids, None,
                        min(512, len(ckpt.user_ids)), 2)
    cand = write_bodies(workdir / "bodies-candidates.jsonl", ckpt.user_ids, ckpt.item_ids, 100,
                        min(512, len(ckpt.user_ids)), 1)
    del ckpt
    params_mb, cache_mb = scorer_cache_mb(checkpoint)
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    rows = {}
    for kind in ("bare", "real"):
        start = time.perf_counter()
        url, proc = start_server(kind, checkpoint, workdir, extra_env)
        try:
            ready_s = time.perf_counter() - start
            time.sleep(1.0)
            rows[kind] = {"ready_seconds": ready_s, "after_start": status_mb(proc.pid)}
            if kind == "real":
                served = {}
                for name, bodies in (("full", full), ("candidates", cand)):
                    served[name] = run_wrk(url, bodies, 64, args.burst, proc.pid)
                rows[kind]["burst"] = {k: {"requests": v["requests"], "req_per_s": v["req_per_s"],
                                           "errors": v["non_2xx"] + v["socket_errors"]} for k, v in served.items()}
                time.sleep(1.0)
                rows[kind]["after_burst"] = status_mb(proc.pid)
        finally:
            stop(proc)
    size_mb = checkpoint.stat().st_size / 2 ** 20
    print(f"checkpoint {checkpoint}: {size_mb:.1f} MiB on disk; model parameters {params_mb:.1f} MiB; scorer cache "
          f"(buckets, packed CSR, cached terms) {cache_mb:.1f} MiB; nproc {os.cpu_count()}, torch {torch.__version__}")
    b, r = rows["bare"]["after_start"], rows["real"]
    print(f"bare FastAPI process (imports, no model):  RSS {b['VmRSS']:.0f} MiB")
    print(f"real server after start-up + warm-up:      RSS {r['after_start']['VmRSS']:.0f} MiB "
          f"(anon {r['after_start']['RssAnon']:.0f}, file {r['after_start']['RssFile']:.0f}); "
          f"ready in {r['ready_seconds']:.1f} s")
    print(f"real server after the burst:               RSS {r['after_burst']['VmRSS']:.0f} MiB, peak (VmHWM) "
          f"{r['after_burst']['VmHWM']:.0f} MiB; burst "
          + ", ".join(f"{k} {v['requests']} requests ({v['req_per_s']:.0f}/s, {v['errors']} errors)"
                      for k, v in r["burst"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": str(checkpoint), "checkpoint_mib": size_mb,
                                               "model_parameters_mib": params_mb, "scorer_cache_mib": cache_mb,
                                               "servers": rows, "env": extra_env,
                                               "command": " ".join([sys.executable] + sys.argv)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
