"""Heavier runs of the reliability scenarios of tests/e2e/test_reliability.py, with figures for docs/reliability.md.

    python -m benchmarks.reliability                       # two small checkpoints trained here, default sizes
    python -m benchmarks.reliability --checkpoint artifacts/model.ckpt --second other.ckpt --requests 20000

The drivers are the test suite's own (tests/harness/scenarios.py), at larger sizes.

Every server is `python -m app` on a free 127.0.0.1 port; all traffic stays on the loopback interface and is
bounded by the sizes below. Prints one JSON object (also written to --out) and exits 1 when any scenario saw
an error, a lost event or a schema violation.

  fuzz     schemathesis, positive and negative data, every route but /admin/reload
  load     --requests mixed /recommend + /feedback at --concurrency: status codes, acknowledged vs stored,
           fed-back items never recommended again, throughput
  crash    --crash-cycles × (feedback stream → SIGKILL at a random point → restart on the same store)
  reload   --reloads hot reloads alternating two checkpoints under /recommend load, plus corrupt ones (409)
  sigterm  a burst of batch + feedback requests, SIGTERM mid-burst: answered = 2xx, exit code, WAL state
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from tests.harness.servers import running_server
from model.store.checkpoint import load_checkpoint
from tests.harness import scenarios as rel  # the drivers the test suite uses, at larger sizes here


def fuzz(checkpoint: Path, work: Path, examples: int) -> dict:
    import schemathesis
    cases, failures = Counter(), []
    key = "adm-" + secrets.token_hex(16)
    with running_server(checkpoint, work, api_key=key) as (url, _):
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=10)
        for method, path in rel.FUZZED:
            for mode in ("positive", "negative") if method == "POST" else ("positive",):
                try:
                    rel.fuzz_operation(schema, url, method, path, mode, examples, cases)
                except Exception as e:  # a failing check: keep going, report it
                    failures.append(f"{method} {path} {mode}: {str(e)[:2000]}")
    return {"examples_per_operation": examples, "cases": sum(cases.values()), "by_operation": dict(cases),
            "failures": failures}


def load(checkpoint: Path, work: Path, requests: int, concurrency: int) -> dict:
    users, items = rel.known_ids(checkpoint)
    with running_server(checkpoint, work) as (url, _):
        reqs = rel.mixed_requests(requests, users[:500], items, seed=11, tag="bench")
        start = time.perf_counter()
        results = asyncio.run(rel.drive(url, reqs, concurrency, timeout=120))
        took = time.perf_counter() - start
        acked = sum(r.json["stored"] for r in results if r.path == "/feedback" and r.status in (200, 202))
        in_store = len(rel.stored_ids(work / "feedback.sqlite3"))
        pairs = rel.fed_back_pairs(results, set(users), set(items))
        violations = asyncio.run(rel.seen_violations(url, pairs, full_catalogue_users=100))
    latencies = sorted(r.ended - r.started for r in results if r.status is not None)
    codes = rel.status_counts(results)
    return {"requests": len(results), "concurrency": concurrency, "seconds": round(took, 2),
            "requests_per_s": round(len(results) / took, 1), "status": {str(k): v for k, v in codes.items()},
            "errors": sum(v for k, v in codes.items() if k not in (200, 202)),
            "latency_ms": {"p50": round(latencies[len(latencies) // 2] * 1000, 1),
                           "p99": round(latencies[int(len(latencies) * 0.99)] * 1000, 1)},
            "feedback_acknowledged": acked, "feedback_in_store": in_store,
            "users_checked_for_exclude_seen": len(pairs), "exclude_seen_violations": len(violations)}


def crash(checkpoint: Path, work: Path, cycles: int) -> dict:
    users, items = rel.known_ids(checkpoint)
    rng = random.Random(5)
    out = []
    all_acked, all_sent = set(), set()
    for cycle in range(cycles):
        reqs = rel.feedback_stream(600, users[:200], items, tag=f"crash{cycle}", seed=cycle)
        kill_after = rng.randint(20, 300)
        rep, acked, found, sent = rel.crash_cycle(checkpoint, work, reqs, kill_after, users, items)
        all_acked |= acked
        all_sent |= sent
        out.append({"kill_after_acknowledged_requests": kill_after, "events_sent": rep.sent,
                    "events_acknowledged": rep.acknowledged, "events_found": rep.found,
                    "acknowledged_missing": len(rep.lost), "found_after_restart": rep.found_after_restart,
                    "exclude_seen_violations": len(rep.visibility_violations), "return_code": rep.return_code})
    final = set(rel.stored_ids(work / "feedback.sqlite3"))
    return {"cycles": out, "total_acknowledged": len(all_acked), "total_in_store": len(final),
            "acknowledged_missing": len(all_acked - final), "stored_but_never_sent": len(final - all_sent)}


def reload(first: Path, second: Path, work: Path, reloads: int) -> dict:
    serving = work / "serving.ckpt"
    shutil.copy(first, serving)
    # a named reload must lie in the served checkpoint's directory (CMN_CHECKPOINT_DIR's default)
    first, second = Path(shutil.copy(first, work / "first.ckpt")), Path(shutil.copy(second, work / "second.ckpt"))
    corrupt = rel.truncated_copy(second, work / "corrupt.ckpt")
    versions = {load_checkpoint(str(p)).model_version: p.name for p in (first, second)}
    users, _ = rel.known_ids(first)
    steps = []
    for n in range(reloads):
        steps.append((f"swap{n}", second if n % 2 == 0 else first))
        if n % 3 == 2:
            steps.append((f"corrupt{n}", corrupt))
    key = "adm-" + secrets.token_hex(16)
    with running_server(serving, work, api_key=key) as (url, _):
        results, done = asyncio.run(rel.reload_under_load(url, key, steps, users, warm=30, timeout=600))
    codes = rel.status_counts(results)
    return {"recommendations": len(results), "status": {str(k): v for k, v in codes.items()},
            "errors": sum(v for k, v in codes.items() if k != 200),
            "versions_served": {versions.get(v, v): c for v, c in
                                Counter(r.json["model_version"] for r in results if r.status == 200).items()},
            "reloads": [{"step": name, "status": status, "took_ms": js.get("took_ms"),
                         "serving_after": versions.get(js.get("model_version"))} for name, status, js, _, _ in done]}


def sigterm(checkpoint: Path, work: Path) -> dict:
    users, items = rel.known_ids(checkpoint)
    with running_server(checkpoint, work) as (url, proc):
        answered = 0

        def on_result(r):
            nonlocal answered
            answered += r.status is not None
            if answered == 10:
                proc.send_signal(signal.SIGTERM)
        results = asyncio.run(rel.drive(url, rel.sigterm_burst(users[:100], items, n=300), 64, timeout=60,
                                        on_result=on_result))
        rc = proc.wait(timeout=60)
    store = work / "feedback.sqlite3"
    wal = Path(str(store) + "-wal")
    codes = rel.status_counts(results)
    return {"requests": len(results), "status": {str(k): v for k, v in codes.items()},
            "answered_after_sigterm": sum(r.status is not None for r in results) - 10,
            "answered_not_2xx": sum(1 for r in results if r.status is not None and r.status not in (200, 202)),
            "exit_code": rc, "wal_bytes_after_exit": wal.stat().st_size if wal.exists() else 0,
            "feedback_acknowledged": len(rel.acknowledged_ids(results)),
            "feedback_in_store": len(rel.stored_ids(store))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="served checkpoint (default: a small one trained here)")
    p.add_argument("--second", type=Path, help="second checkpoint for hot reloads (default: trained here)")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", type=Path, help="also write the JSON report here")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--examples", type=int, default=150, help="schemathesis examples per operation and mode")
    p.add_argument("--crash-cycles", type=int, default=5)
    p.add_argument("--reloads", type=int, default=10)
    p.add_argument("--only", nargs="*", choices=("fuzz", "load", "crash", "reload", "sigterm"))
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="cmn-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    first, second = args.checkpoint, args.second
    if first is None or second is None:
        from training.train import TrainConfig, train
        data = rel.write_tiny_csv(work / "interactions.csv")
        for seed, name in ((0, "old.ckpt"), (1, "new.ckpt")):
            if not (work / name).exists():
                train(TrainConfig(**rel.tiny_train_args(data, work / name, seed)), log=lambda *a, **k: None)
        first, second = first or work / "old.ckpt", second or work / "new.ckpt"
    only = set(args.only or ("fuzz", "load", "crash", "reload", "sigterm"))
    report = {"checkpoint": str(first), "second": str(second)}
    runs = {"fuzz": lambda d: fuzz(first, d, args.examples),
            "load": lambda d: load(first, d, args.requests, args.concurrency),
            "crash": lambda d: crash(first, d, args.crash_cycles),
            "reload": lambda d: reload(first, second, d, args.reloads),
            "sigterm": lambda d: sigterm(first, d)}
    for name, run in runs.items():
        if name in only:
            start = time.perf_counter()
            d = work / name
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            report[name] = run(d)
            report[name]["wall_s"] = round(time.perf_counter() - start, 1)
            print(f"{name}: {json.dumps(report[name])}", file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    bad = (report.get("fuzz", {}).get("failures")
           or report.get("load", {}).get("errors") or report.get("load", {}).get("exclude_seen_violations")
           or (report.get("load") and report["load"]["feedback_acknowledged"] != report["load"]["feedback_in_store"])
           or report.get("crash", {}).get("acknowledged_missing")
           or report.get("crash", {}).get("stored_but_never_sent")
           or any(c["exclude_seen_violations"] for c in report.get("crash", {}).get("cycles", []))
           or report.get("reload", {}).get("errors")
           or report.get("sigterm", {}).get("answered_not_2xx") or report.get("sigterm", {}).get("exit_code"))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
