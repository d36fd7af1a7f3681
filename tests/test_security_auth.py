"""Issue 15's findings on auth, quotas, event ids and storage faults, replayed over real HTTP against
`python -m app` subprocesses (tests/harness/servers.py): each now gets the safe answer, and no answer is a 500.

  1. 401 without a key, 403 without the route's scope, the history leak (exclude_seen true vs false) refused to
     a key without `history`; /health and /livez open
  2. 429 past a key's rate; wrong admin keys throttled per address; 409 for a reused event id; the key file
     re-read on SIGHUP
  3. disk full (a file-size limit on the server process) and a read-only store (the immutable flag, which binds
     root too): 503 + Retry-After, /health degraded with the store not writable, recovery, nothing acknowledged
     lost
  4. schemathesis over every route but /admin with auth on

The in-process versions, with more cases, are test_auth.py and test_store_faults.py (fast lane).
"""
from __future__ import annotations

import resource
import secrets
import signal
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import schemathesis

from tests.harness.scenarios import fuzz_operation
from tests.harness.servers import running_server
from model.store.checkpoint import load_checkpoint
from model.store.events import Event, FeedbackLog
from test_auth import SCOPES, bearer, key_line, write_keys
from test_reliability import FUZZ_CASES, SCHEMATHESIS_EXAMPLES, server_log
from test_store_faults import read_only

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ids(api_checkpoint):
    ckpt = load_checkpoint(api_checkpoint)
    return ckpt.user_ids, ckpt.item_ids


def no_500(tmp_path: Path, url: str) -> None:
    log = server_log(tmp_path, url)
    assert '"status": 500' not in log and "unhandled error" not in log


# --------------------------------------------------------------------------- 1, 2. keys, scopes, quotas

def test_auth_findings_over_http(api_checkpoint, ids, tmp_path):
    users, items = ids
    keys = write_keys(tmp_path / "keys", {**SCOPES, "flood": "recommend"})
    admin_key = "adm-" + secrets.token_hex(16)
    # every key may send 40 requests (a token every 1,000 s after that): enough for what each does here but flood
    with running_server(api_checkpoint, tmp_path, auth_file=tmp_path / "keys", api_key=admin_key, rate_per_s=0.001,
                        rate_burst=40, allow_explain="true") as (url, proc):
        with httpx.Client(base_url=url, timeout=30) as http:
            # 1. no key: 401 on every route with user state; /health and /livez open
            one_event = {"events": [{"user_id": users[0], "item_id": items[0]}]}
            for method, path, body in (("POST", "/recommend", {"user_id": users[0]}),
                                       ("POST", "/recommend/batch", {"requests": [{"user_id": users[0]}]}),
                                       ("POST", "/feedback", one_event), ("GET", "/metrics", None)):
                for headers in ({}, bearer("guess")):
                    r = http.request(method, path, json=body, headers=headers)
                    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
            assert http.get("/health").status_code == 200 and http.get("/livez").json() == {"status": "alive"}

            # "anyone can change what others are recommended": one 800-event request without a key is refused
            before = http.post("/recommend", json={"user_id": "stranger", "k": 10}, headers=bearer(keys["reader"]))
            flood = {"events": [{"user_id": users[n % len(users)], "item_id": items[-1]} for n in range(800)]}
            assert http.post("/feedback", json=flood).status_code == 401
            after = http.post("/recommend", json={"user_id": "stranger", "k": 10}, headers=bearer(keys["reader"]))
            assert after.json()["items"] == before.json()["items"]

            # 403: a key without the route's scope
            for name, method, path, body in (("reader", "POST", "/feedback", one_event),
                                             ("writer", "POST", "/recommend", {"user_id": users[0]}),
                                             ("reader", "GET", "/metrics", None),
                                             ("reader", "POST", "/admin/reload", None)):
                r = http.request(method, path, json=body, headers=bearer(keys[name]))
                assert r.status_code == 403, (name, path, r.text)
            assert http.get("/metrics", headers=bearer(keys["ops"])).status_code == 200

            # "any user's history can be read back": exclude_seen false (and explain, candidates) need `history`
            for extra in ({"exclude_seen": False}, {"explain": True, "k": 3}, {"candidates": items[:50]}):
                body = {"user_id": users[0], **extra}
                assert http.post("/recommend", json=body, headers=bearer(keys["reader"])).status_code == 403
                assert http.post("/recommend", json=body, headers=bearer(keys["historian"])).status_code == 200

            # 2. 429 past the key's rate, with Retry-After; another key is still served
            statuses = [http.post("/recommend", json={"user_id": users[1]}, headers=bearer(keys["flood"]))
                        for _ in range(41)]
            assert [r.status_code for r in statuses] == [200] * 40 + [429]
            assert int(statuses[-1].headers["retry-after"]) >= 1
            r = http.post("/recommend", json={"user_id": users[1]}, headers=bearer(keys["reader"]))
            assert r.status_code == 200

            # 409 for another event under a used id; the same event again is a duplicate; ids are per key
            w = bearer(keys["writer"])
            first = {"events": [{"user_id": users[2], "item_id": items[2], "event_id": "order-1"}]}
            other = {"events": [{"user_id": users[3], "item_id": items[3], "event_id": "order-1"}]}
            assert http.post("/feedback", json=first, headers=w).json()["stored"] == 1
            assert http.post("/feedback", json=first, headers=w).json()["duplicates"] == 1
            r = http.post("/feedback", json=other, headers=w)
            assert r.status_code == 409 and r.json()["detail"]["event_ids"] == ["order-1"]
            assert http.post("/feedback", json=other, headers=bearer(keys["other-writer"])).json()["stored"] == 1

            # the key file is re-read on SIGHUP
            newcomer, line = key_line("newcomer", "recommend")
            with open(tmp_path / "keys", "a") as f:
                f.write(line)
            assert http.post("/recommend", json={"user_id": users[0]}, headers=bearer(newcomer)).status_code == 401
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while '"event": "keys_reload"' not in server_log(tmp_path, url) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert http.post("/recommend", json={"user_id": users[0]}, headers=bearer(newcomer)).status_code == 200

            # "wrong admin keys are never throttled": past 10 wrong keys a minute from one address (4 were sent
            # above), 429 for everything from it, the right key included (last: the address stays throttled)
            wrong: list[int] = []
            while len(wrong) < 20 and wrong[-1:] != [429]:
                wrong.append(http.post("/admin/reload", headers={"X-API-Key": f"guess-{len(wrong)}"}).status_code)
            assert wrong[-1] == 429 and set(wrong[:-1]) == {401} and len(wrong) <= 7
            r = http.post("/admin/reload", headers={"X-API-Key": admin_key})
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        no_500(tmp_path, url)


# --------------------------------------------------------------------------- 3. storage faults

def test_disk_full_is_503_and_nothing_acknowledged_is_lost(api_checkpoint, ids, tmp_path):
    users, items = ids
    store = tmp_path / "feedback.sqlite3"

    def request(n: int) -> dict:
        return {"events": [{"user_id": users[(n * 7 + e) % len(users)], "item_id": items[e], "event_id": f"r{n}-{e}"}
                           for e in range(1000)]}
    acked: set[str] = set()
    with running_server(api_checkpoint, tmp_path) as (url, proc), httpx.Client(base_url=url, timeout=60) as http:
        assert http.post("/feedback", json=request(0)).status_code == 200
        acked |= {e["event_id"] for e in request(0)["events"]}
        # the server may not grow any file past 256 KiB more than the largest it has (its log included): the
        # store's write-ahead log fills up within a few requests, as on a full disk
        files = [store, Path(f"{store}-wal"), *tmp_path.glob("server-*.log")]
        limit = max(f.stat().st_size for f in files if f.exists()) + 256 * 1024
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        try:
            for n in range(1, 30):
                r = http.post("/feedback", json=request(n))
                if r.status_code != 200:
                    break
                acked |= {e["event_id"] for e in request(n)["events"]}
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 1 and "nothing of this request was stored" in r.json()["detail"]
            health = http.get("/health")
            assert health.status_code == 200 and health.json()["status"] == "degraded"
            assert health.json()["store"] == "not_writable"
            assert http.post("/recommend", json={"user_id": users[0]}).status_code == 200
            assert http.post("/feedback", json=request(n)).status_code == 503      # still full
            print(f"\ndisk full: {n} requests of 1000 events acknowledged, request {n + 1} → 503 "
                  f"Retry-After {r.headers['retry-after']}: {r.json()['detail']}; /health {health.json()}")
        finally:
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        r = http.post("/feedback", json=request(n))                                  # space again: the retry
        assert r.status_code == 200 and r.json()["stored"] == 1000
        acked |= {e["event_id"] for e in request(n)["events"]}
        assert http.get("/health").json()["status"] == "ok"
    stored = FeedbackLog(str(store), readonly=True)
    try:
        assert {e.event_id for _, e in stored.events()} == acked
    finally:
        stored.close()
    no_500(tmp_path, url)


def test_read_only_store_is_503_and_reported_by_health(api_checkpoint, ids, tmp_path):
    users, items = ids
    store = tmp_path / "feedback.sqlite3"
    log = FeedbackLog(str(store))
    log.append([Event(users[0], items[0], None, "before")])
    log.close()
    body = {"events": [{"user_id": users[1], "item_id": items[1], "event_id": "during"}]}
    with ExitStack() as writable_again:
        writable_again.enter_context(read_only(store))
        with running_server(api_checkpoint, tmp_path) as (url, proc), httpx.Client(base_url=url, timeout=30) as http:
            health = http.get("/health").json()
            assert (health["status"], health["store"], health["feedback_events"]) == ("degraded", "not_writable", 1)
            r = http.post("/feedback", json=body)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert http.post("/recommend", json={"user_id": users[0]}).status_code == 200
            writable_again.close()                          # the next write reopens the store: no restart
            assert http.post("/feedback", json=body).json()["stored"] == 1
            assert http.get("/health").json()["status"] == "ok"
    stored = FeedbackLog(str(store), readonly=True)
    try:
        assert [e.event_id for _, e in stored.events()] == ["before", "during"]
    finally:
        stored.close()
    no_500(tmp_path, url)


# --------------------------------------------------------------------------- 4. schemathesis, auth on

@pytest.fixture(scope="module")
def authed_server(api_checkpoint, tmp_path_factory):
    """Auth on, one key with every scope, no quotas (the fuzzer's cases are not a flood)."""
    tmp = tmp_path_factory.mktemp("authed-server")
    keys = write_keys(tmp / "keys", {"everything": SCOPES["everything"]})
    with running_server(api_checkpoint, tmp, auth_file=tmp / "keys", rate_per_s=0, feedback_events_per_min=0,
                        unknown_events_per_min=0) as (url, proc):
        yield {"url": url, "key": keys["everything"], "tmp": tmp}


@pytest.mark.parametrize("method,path,mode", FUZZ_CASES, ids=[f"{m} {p} {mode}" for m, p, mode in FUZZ_CASES])
def test_schemathesis_with_auth_on(authed_server, method, path, mode):
    schema = schemathesis.openapi.from_url(f"{authed_server['url']}/openapi.json", timeout=10)
    cases: Counter = Counter()
    fuzz_operation(schema, authed_server["url"], method, path, mode, SCHEMATHESIS_EXAMPLES, cases,
                   headers=bearer(authed_server["key"]))
    assert cases[f"{method} {path} {mode}"] > 0
    no_500(authed_server["tmp"], authed_server["url"])
