"""Drivers of the reliability scenarios against a real server: request mixes, a concurrent client, a kill in the
middle of a feedback stream, reloads under load, schemathesis fuzzing. tests/e2e/test_reliability.py runs them at
sizes a test suite affords; benchmarks/reliability.py at larger ones (docs/reliability.md has the figures)."""
from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from tests.harness.servers import running_server
from model.store.checkpoint import load_checkpoint, save_checkpoint
from model.store.events import FeedbackLog

CONCURRENCY = 64


def write_tiny_csv(path: Path, n_users: int = 150, n_items: int = 400, per_user: int = 12, seed: int = 0) -> Path:
    """A small interaction file (user,item,timestamp) that trains in seconds on two cores."""
    rng = random.Random(seed)
    rows = ["user,item,timestamp"]
    for u in range(n_users):
        for i in rng.sample(range(n_items), per_user):
            rows.append(f"u{u},i{i},{rng.random():.6f}")
    path.write_text("\n".join(rows) + "\n")
    return path


def tiny_train_args(data: Path, out: Path, seed: int) -> dict:
    return dict(data=str(data), out=str(out), epochs=1, pretrain_epochs=1, neg=1, embed_size=16, hops=2,
                seed=seed, full_eval=False, holdout="none", progress=False, device="cpu")


def known_ids(checkpoint: Path) -> tuple[list[str], list[str]]:
    ckpt = load_checkpoint(str(checkpoint))
    return ckpt.user_ids, ckpt.item_ids


def perturbed_copy(src: Path, dst: Path) -> str:
    """A third valid checkpoint (weights nudged → another model_version) without another training run."""
    ckpt = load_checkpoint(str(src))
    name = sorted(ckpt.state)[0]
    ckpt.state[name] = ckpt.state[name] + 0.01
    ckpt.model_version = ""
    return save_checkpoint(ckpt, str(dst))


def truncated_copy(src: Path, dst: Path) -> Path:
    blob = src.read_bytes()
    dst.write_bytes(blob[: len(blob) // 2])
    return dst


@dataclass
class Result:
    path: str
    body: dict
    status: int | None = None          # None: no response (connection refused/reset, timeout)
    json: dict | None = None
    error: str | None = None
    started: float = 0.0
    ended: float = 0.0


def mixed_requests(n: int, users: list[str], items: list[str], seed: int = 0, tag: str = "load",
                   feedback_share: float = 0.5) -> list[tuple[str, dict]]:
    """/recommend (whole catalogue, candidate lists, unknown users) and /feedback (one or a few events with
    unique event_ids; ~10% name a user or item the model does not know, so they are stored and deferred)."""
    rng = random.Random(seed)
    out = []
    for n_ in range(n):
        user = rng.choice(users)
        if rng.random() < feedback_share:
            events = []
            for e in range(rng.choice((1, 1, 1, 3))):
                u, i = user, rng.choice(items)
                if rng.random() < 0.1:
                    u, i = (f"new-user-{tag}-{n_}", i) if rng.random() < 0.5 else (u, f"new-item-{tag}-{n_}")
                events.append({"user_id": u, "item_id": i, "event_id": f"{tag}-{n_}-{e}"})
            out.append(("/feedback", {"events": events}))
        else:
            kind = rng.random()
            if kind < 0.6:
                body = {"user_id": user, "k": rng.choice((1, 10, 50))}
            elif kind < 0.9:
                body = {"user_id": user, "k": 5, "candidates": rng.sample(items, min(len(items), 20))}
            else:
                body = {"user_id": f"stranger-{n_}", "k": 10}
            out.append(("/recommend", body))
    return out


async def drive(url: str, requests: list[tuple[str, dict]], concurrency: int = CONCURRENCY,
                timeout: float = 60, on_result=None) -> list[Result]:
    """Send every request, at most `concurrency` in flight; `on_result(result)` sees each as it completes."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def one(path: str, body: dict) -> Result:
            async with sem:
                r = Result(path, body, started=time.perf_counter())
                try:
                    resp = await client.post(path, json=body)
                    r.status = resp.status_code
                    r.json = resp.json() if resp.headers.get("content-type", "").startswith("application/json") \
                        else None
                except httpx.HTTPError as e:
                    r.error = f"{type(e).__name__}: {e}"
                r.ended = time.perf_counter()
                if on_result:
                    on_result(r)
                return r
        return await asyncio.wait_for(asyncio.gather(*(one(p, b) for p, b in requests)), timeout * 4)


def acknowledged_ids(results: list[Result]) -> set[str]:
    """event_ids of feedback requests answered 2xx (the server acknowledged them as stored)."""
    return {e["event_id"] for r in results if r.path == "/feedback" and r.status in (200, 202)
            for e in r.body["events"]}


def sent_ids(results: list[Result]) -> set[str]:
    return {e["event_id"] for r in results if r.path == "/feedback" for e in r.body["events"]}


def stored_ids(store: Path) -> list[str]:
    """The event ids the store holds durably: its log's, and the recorded ids of repeats (events of a pair the key
    had stored, which the log holds once)."""
    log = FeedbackLog(str(store), readonly=True)
    try:
        return [e.event_id for _, e in log.events()] + [e.event_id for e in log.repeats()]
    finally:
        log.close()


def logged(store: Path) -> int:
    """The events in the store's log (what a server replays and reports as `feedback_events`)."""
    log = FeedbackLog(str(store), readonly=True)
    try:
        return log.count()
    finally:
        log.close()


def fed_back_pairs(results: list[Result], users: set[str], items: set[str]) -> dict[str, set[str]]:
    """user → items of acknowledged feedback whose user and item the model knows (visible at once)."""
    out = defaultdict(set)
    for r in results:
        if r.path == "/feedback" and r.status in (200, 202):
            for e in r.body["events"]:
                if e["user_id"] in users and e["item_id"] in items:
                    out[e["user_id"]].add(e["item_id"])
    return out


async def seen_violations(url: str, pairs: dict[str, set[str]], concurrency: int = 16,
                          full_catalogue_users: int = 20) -> list[tuple]:
    """(user, item) pairs the server still recommends after they were fed back. Every user is asked with its
    fed-back items as the candidate list (exact); the first `full_catalogue_users` also for the top 1000 of the
    whole catalogue (the other scoring path)."""
    checks = [("/recommend", {"user_id": user, "k": len(items), "candidates": sorted(items)})
              for user, items in pairs.items()]
    checks += [("/recommend", {"user_id": user, "k": 1000}) for user in list(pairs)[:full_catalogue_users]]
    results = await drive(url, checks, concurrency)
    bad = [(r.body, r.status) for r in results if r.status != 200]
    for r in results:
        if r.status == 200:
            returned = {i["item_id"] for i in r.json["items"]}
            bad += [(r.body["user_id"], i) for i in returned & pairs[r.body["user_id"]]]
    return bad


def status_counts(results: list[Result]) -> Counter:
    return Counter(r.status if r.status is not None else "no response" for r in results)


FUZZED = [("POST", "/recommend"), ("POST", "/recommend/batch"), ("POST", "/feedback"), ("GET", "/health"),
          ("GET", "/livez"), ("GET", "/metrics"), ("GET", "/dashboard/data")]
# ^ every route in the schema but the /admin ones (reload tested with its key in 4, 5 and 7 of
# tests/e2e/test_reliability.py, the experiment's in tests/e2e/test_impressions_http.py)
# GET routes take no input, so there is nothing to violate: they are fuzzed with valid requests only
FUZZ_CASES = [(m, p, mode) for m, p in FUZZED for mode in ("positive", "negative") if m == "POST" or mode == "positive"]
SCHEMATHESIS_EXAMPLES = 25


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def fuzz_operation(schema, url: str, method: str, path: str, mode: str, examples: int, counter: Counter,
                   headers: dict | None = None) -> None:
    """`examples` hypothesis cases for one operation: positive (schema-valid) or negative (schema-violating)
    data, each sent to the server and checked: no 5xx, documented status, content type and body schema.
    `headers` go with every case (an API key, for a server with CMN_AUTH_FILE)."""
    operation = schema[path][method]
    gen = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=gen))
    def run(case):
        counter[f"{method} {path} {mode}"] += 1
        case.call_and_validate(base_url=url, timeout=30, checks=CHECKS, headers=headers)
    run()


def feedback_stream(n_requests: int, users: list[str], items: list[str], tag: str, seed: int = 0):
    """Feedback-only requests of 1–5 events with unique event_ids (some for unknown users/items)."""
    rng = random.Random(seed)
    out = []
    for n in range(n_requests):
        events = []
        for e in range(rng.randint(1, 5)):
            u, i = rng.choice(users), rng.choice(items)
            if rng.random() < 0.1:
                u = f"{tag}-newcomer-{n}"
            events.append({"user_id": u, "item_id": i, "event_id": f"{tag}-{n}-{e}"})
        out.append(("/feedback", {"events": events}))
    return out


def kill_mid_stream(url: str, proc: subprocess.Popen, requests, kill_after: int, concurrency: int = 8):
    """Stream `requests`; SIGKILL the server once `kill_after` of them were acknowledged (others in flight).

    The process is killed AND reaped inside the callback, which blocks the client's event loop: no request is
    sent after that point, so every request still queued in the driver (at least len(requests) - kill_after -
    concurrency of them) deterministically gets no answer."""
    acked = 0

    def on_result(r: Result):
        nonlocal acked
        if r.status in (200, 202):
            acked += 1
            if acked == kill_after:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
    results = asyncio.run(drive(url, requests, concurrency, timeout=20, on_result=on_result))
    proc.wait(timeout=30)
    return results


@dataclass
class CrashReport:
    sent: int = 0
    acknowledged: int = 0
    found: int = 0
    found_after_restart: int = 0
    in_log: int = 0                    # of those found, the events in the log (the rest: recorded repeats)
    lost: list = field(default_factory=list)
    return_code: int | None = None
    visibility_violations: list = field(default_factory=list)
    unanswered_requests: int = 0       # requests that got no response at all (sent after the kill, or cut off)


def crash_cycle(checkpoint: Path, tmp: Path, requests, kill_after: int, users, items) -> CrashReport:
    """One kill -9 + restart on the same store; returns what was acknowledged and what is found."""
    rep = CrashReport()
    with running_server(checkpoint, tmp) as (url, proc):
        results = kill_mid_stream(url, proc, requests, kill_after)
        rep.return_code = proc.returncode
    acked, sent = acknowledged_ids(results), sent_ids(results)
    rep.unanswered_requests = sum(r.status is None for r in results)
    found = set(stored_ids(tmp / "feedback.sqlite3"))  # read-only open of a store left by a killed writer
    rep.sent, rep.acknowledged, rep.found = len(sent), len(acked), len(found & sent)
    rep.in_log = logged(tmp / "feedback.sqlite3")
    rep.lost = sorted(acked - found)
    with running_server(checkpoint, tmp) as (url, proc):
        rep.found_after_restart = httpx.get(f"{url}/health").json()["feedback_events"]
        rep.visibility_violations = asyncio.run(seen_violations(url, fed_back_pairs(results, set(users),
                                                                                      set(items))))
    return rep, acked, found, sent


async def reload_under_load(url: str, key: str, steps, users: list[str], concurrency: int = 16,
                            warm: int = 40, timeout: float = 120):
    """Keep /recommend flowing while `steps` (a list of (name, path-or-None)) are POSTed to /admin/reload one
    after another, each once `warm` more responses arrived. Returns (results, [(name, status, json, t0, t1)])."""
    results: list[Result] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        async def worker(w: int):
            n = 0
            while not stop.is_set():
                body = {"user_id": users[(w * 7919 + n) % len(users)], "k": 10}
                n += 1
                r = Result("/recommend", body, started=time.perf_counter())
                try:
                    resp = await client.post("/recommend", json=body)
                    r.status, r.json = resp.status_code, resp.json()
                except httpx.HTTPError as e:
                    r.error = f"{type(e).__name__}: {e}"
                r.ended = time.perf_counter()
                results.append(r)

        async def wait_for(n: int):
            while len(results) < n:
                await asyncio.sleep(0.01)

        async def admin():
            done = []
            for name, path in steps:
                await wait_for(len(results) + warm)
                t0 = time.perf_counter()
                resp = await client.post("/admin/reload", headers={"X-API-Key": key},
                                         json={"checkpoint": str(path)} if path else None)
                done.append((name, resp.status_code, resp.json(), t0, time.perf_counter()))
            await wait_for(len(results) + warm)
            stop.set()
            return done
        workers = [asyncio.create_task(worker(w)) for w in range(concurrency)]
        steps_done = await asyncio.wait_for(admin(), timeout)
        await asyncio.gather(*workers)
    return results, steps_done


def wait_for_version(url: str, version: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = httpx.get(f"{url}/health").json().get("model_version")
        if seen == version:
            return seen
        time.sleep(0.1)
    return seen


def sigterm_burst(users: list[str], items: list[str], n: int = 160, seed: int = 3) -> list[tuple[str, dict]]:
    """Heavier requests (32-user batches) interleaved with feedback, so that many are in flight at SIGTERM."""
    rng = random.Random(seed)
    out = []
    for k, (path, body) in enumerate(mixed_requests(n, users, items, seed=seed, tag="term", feedback_share=0.5)):
        if path == "/recommend":
            body = {"requests": [{"user_id": u, "k": 50} for u in rng.sample(users, 32)]}
            path = "/recommend/batch"
        out.append((path, body))
    return out
