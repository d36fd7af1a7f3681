"""Bounded cost per request (fast lane).

- The app in-process (httpx's ASGI transport): Σk and explain-k limits, the queue limit counted in scored pairs,
  the short 422 for unknown ids, integer ids held to the 256-character limit, the body read timeout (408), the
  head-size check (431), and large answers serialised off the event loop (shown on a gate).
- The connection limits on real loopback sockets: uvicorn run in-process with `server_options`, exactly as
  `python -m app` runs it, around the real middleware and a trivial app (no model: these are about the HTTP layer).
  Slow clients are replayed with bounded byte counts; every wait is an upper bound on something that would
  otherwise hang, never a speed expectation.

tests/security/test_limits_server.py replays the same findings against a real `python -m app` (slow lane).
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn

import app.routes.recommend as recommend_module
import app.models as models_module
from app.engine import Engine
from app.middleware import RequestContext
from app.protocol import server_options
from app.settings import Settings
from model.store.checkpoint import load_checkpoint
from conftest import serving, settings_for, wait_ready

anyio = pytest.mark.anyio
BOUND = 30   # seconds: how long anything below may take before the test calls it hung


# --------------------------------------------------------------------------- request limits, in-process

@pytest.fixture(scope="module")
async def limited(api_checkpoint, tmp_path_factory):
    settings = settings_for(api_checkpoint, tmp_path_factory.mktemp("limited"), allow_explain=True, max_total_k=50,
                            max_explain_k=3, body_timeout_s=0.5)
    async with serving(settings) as c:
        yield c, (await wait_ready(c)).json()


def one_error(r) -> dict:
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert len(errors) == 1, errors
    return errors[0]


@anyio
async def test_sum_of_k_over_a_batch_is_bounded(limited):
    c, _ = limited
    r = await c.post("/recommend/batch", json={"requests": [{"user_id": str(u), "k": 10} for u in range(5)]})
    assert r.status_code == 200 and sum(len(x["items"]) for x in r.json()["results"]) == 50
    r = await c.post("/recommend/batch", json={"requests": [{"user_id": str(u), "k": 10} for u in range(5)] +
                                              [{"user_id": "5", "k": 1}]})
    err = one_error(r)
    assert err["loc"] == ["body", "requests"] and "adds up to 51" in err["msg"] and "at most 50" in err["msg"]
    err = one_error(await c.post("/recommend", json={"user_id": "1", "k": 51}))
    assert err["loc"] == ["body", "k"] and "at most 50" in err["msg"]


@anyio
async def test_k_with_explain_is_bounded(limited):
    c, _ = limited
    r = await c.post("/recommend", json={"user_id": "1", "k": 3, "explain": True})
    assert r.status_code == 200 and all(x["explanation"] for x in r.json()["items"])
    assert (await c.post("/recommend", json={"user_id": "1", "k": 4})).status_code == 200
    err = one_error(await c.post("/recommend", json={"user_id": "1", "k": 4, "explain": True}))
    assert err["loc"] == ["body", "k"] and "at most 3 when explain" in err["msg"]
    err = one_error(await c.post("/recommend/batch", json={"requests": [{"user_id": "1", "k": 3, "explain": True},
                                                                        {"user_id": "2", "k": 4, "explain": True}]}))
    assert err["loc"] == ["body", "requests", 1, "k"]


@anyio
async def test_unknown_ids_answer_is_short(limited):
    """The finding: a 422 echoed up to 1,000 unknown ids (262 KB). Now the first 20 and a count."""
    c, _ = limited
    unknown = [f"{n:03d}" + "x" * 253 for n in range(1000)]
    r = await c.post("/recommend", json={"user_id": "1", "candidates": unknown})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail["field"] == "candidates" and detail["unknown"] == unknown[:20] and detail["unknown_count"] == 1000
    assert "1000 candidates ids are unknown" in detail["message"] and len(detail["message"]) < 200
    assert len(r.content) < 8_000


@anyio
async def test_integer_ids_have_the_length_limit_of_string_ids(limited):
    c, _ = limited
    assert (await c.post("/recommend", json={"user_id": 10 ** 255, "k": 1})).json()["fallback"] == "unknown_user"
    for too_long in (10 ** 256, -10 ** 255):   # 257 characters
        r = await c.post("/recommend", json={"user_id": too_long})
        assert r.status_code == 422 and any(e["loc"][:2] == ["body", "user_id"] for e in r.json()["detail"])
        r = await c.post("/recommend", json={"user_id": "1", "exclude": [too_long]})
        assert r.status_code == 422
        r = await c.post("/feedback", json={"events": [{"user_id": "1", "item_id": too_long}]})
        assert r.status_code == 422


@anyio
async def test_a_body_not_received_in_time_is_408(limited):
    c, _ = limited
    stalled = asyncio.Event()   # never set: the body stops after its first chunk

    async def trickle():
        yield b'{"user_id": "1",'
        await asyncio.wait_for(stalled.wait(), BOUND)
        yield b' "k": 3}'
    r = await asyncio.wait_for(c.post("/recommend", content=trickle(), headers={"content-type": "application/json"}),
                               BOUND)
    assert r.status_code == 408 and "not received within 0.5 s" in r.json()["detail"]
    assert r.headers["connection"] == "close"


@anyio
async def test_a_head_too_large_is_431(limited):
    c, _ = limited
    r = await c.post("/recommend", json={"user_id": "1"}, headers={"x-padding": "p" * Settings().max_header_bytes})
    assert r.status_code == 431 and "request headers exceed" in r.json()["detail"]
    assert (await c.post("/recommend", json={"user_id": "1"}, headers={"x-padding": "p" * 8000})).status_code == 200


@anyio
async def test_a_large_answer_is_serialised_while_health_is_answered(api_checkpoint, tmp_path, monkeypatch):
    """Building the answer is held on a gate: /health is answered meanwhile, so the building is not on the event
    loop (were it, the gate would block the loop and /health with it, until the gate gave up)."""
    entered, gate = threading.Event(), threading.Event()
    build = recommend_module.response

    def gated(*args):
        entered.set()
        gate.wait(BOUND)
        return build(*args)
    monkeypatch.setattr(recommend_module, "response", gated)
    async with serving(settings_for(api_checkpoint, tmp_path)) as c:
        await wait_ready(c)
        users = [str(u) for u in range(10)]
        batch = asyncio.create_task(c.post("/recommend/batch", json={"requests": [{"user_id": u, "k": 1000}
                                                                                  for u in users]}))
        assert await asyncio.to_thread(entered.wait, BOUND)
        try:
            health = await asyncio.wait_for(c.get("/health"), BOUND)
            assert health.status_code == 200
            assert not gate.is_set() and not batch.done()
        finally:
            gate.set()
        r = await batch
    assert r.status_code == 200 and [len(x["items"]) for x in r.json()["results"]] == [1000] * 10


@anyio
async def test_the_queue_limit_counts_scored_pairs(api_checkpoint, tmp_path, monkeypatch):
    """With the model thread held, a 60-candidate request waits in a 100-pair queue: a 50-candidate request does
    not fit (503 + Retry-After), a 40-candidate one does. A request limit would have taken both or neither."""
    holding, entered, gate = threading.Event(), threading.Event(), threading.Event()

    class GatedEngine(Engine):
        def recommend(self, jobs):
            if holding.is_set():
                entered.set()
                gate.wait(BOUND)
            return super().recommend(jobs)
    monkeypatch.setattr(models_module, "Engine", GatedEngine)
    items = load_checkpoint(api_checkpoint).item_ids
    async with serving(settings_for(api_checkpoint, tmp_path, max_queue_pairs=100)) as c:
        await wait_ready(c)

        def asking(n):
            return c.post("/recommend", json={"user_id": "1", "candidates": items[:n], "exclude_seen": False, "k": 1})

        async def queued_pairs(n):
            for _ in range(BOUND * 50):
                if f"cmn_queue_pairs {float(n)}" in (await c.get("/metrics")).text:
                    return n
                await asyncio.sleep(0.02)
        holding.set()
        try:
            scoring = asyncio.create_task(asking(5))           # on the model thread, out of the queue
            assert await asyncio.to_thread(entered.wait, BOUND)
            queued = asyncio.create_task(asking(60))
            assert await queued_pairs(60) == 60
            r = await asking(50)
            assert r.status_code == 503 and r.headers["retry-after"] == "1" and "pairs" in r.json()["detail"]
            fits = asyncio.create_task(asking(40))
            assert await queued_pairs(100) == 100
        finally:
            gate.set()
        assert [(await t).status_code for t in (scoring, queued, fits)] == [200, 200, 200]


# --------------------------------------------------------------------------- connection limits, real sockets

async def ok_app(scope, receive, send):
    """200 "ok"; GET /hold first waits for `ok_app.gate` (a request in progress for as long as a test wants)."""
    if scope["type"] != "http":
        return
    ok_app.calls += 1
    if scope["path"] == "/hold":
        await asyncio.to_thread(ok_app.gate.wait, BOUND)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextmanager
def uvicorn_on_loopback(**settings):
    """uvicorn with `server_options` (as `python -m app`) around the real middleware and `ok_app`, on a free
    127.0.0.1 port, in a thread; yields the port."""
    s = Settings(**settings)
    options = {k: v for k, v in server_options(s).items() if k not in ("host", "port")}
    ok_app.calls, ok_app.gate = 0, threading.Event()
    app = RequestContext(ok_app, s)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", **options))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + BOUND
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(BOUND)
        sock.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=BOUND)


def read_response(reader) -> tuple[int, bytes] | None:
    """(status, body) of the next response with a Content-Length on `reader` (a socket's makefile("rb")), or
    None when the server closed or reset the connection instead."""
    try:
        status = reader.readline()
        if not status:
            return None
        length = 0
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return int(status.split()[1]), reader.read(length)
    except ConnectionResetError:
        return None


def exchange(s: socket.socket, request: bytes = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n") -> tuple[int, bytes] | None:
    s.sendall(request)
    with s.makefile("rb") as reader:
        return read_response(reader)


def closed_by_server(s: socket.socket, trickle: bytes = b"") -> bool:
    """Sends `trickle` a byte every 50 ms (at most 600 of them, about 30 s) until the server closes the
    connection; True when it did."""
    s.settimeout(0.05)
    for n in range(600):
        try:
            if trickle:
                s.sendall(trickle[n % len(trickle):][:1])
            if s.recv(65536) == b"":
                return True
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def test_a_slow_or_silent_client_is_disconnected_after_the_head_timeout():
    """The finding: slow-header connections stayed open for over a minute (uvicorn re-arms its keep-alive timer
    on every byte, and arms none before the first request). Two clients: one silent, one sending a header byte
    every 50 ms; both are cut at the 0.5 s head deadline, long before the test's 30 s bound."""
    with uvicorn_on_loopback(header_timeout_s=0.5) as port:
        silent, slow = connect(port), connect(port)
        slow.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\n")
        assert closed_by_server(slow, trickle=b"X-Slow: yes\r\n")
        assert closed_by_server(silent)
        assert ok_app.calls == 0
        with connect(port) as s:   # a client that sends its request gets its answer
            assert exchange(s) == (200, b"ok")


def test_pipelined_requests_are_answered_and_a_refused_body_cannot_hold_the_connection():
    with uvicorn_on_loopback(header_timeout_s=0.5, max_body_bytes=1024) as port:
        with connect(port) as s, s.makefile("rb") as reader:
            s.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n" * 3)
            assert [read_response(reader) for _ in range(3)] == [(200, b"ok")] * 3
        with connect(port) as s:
            refused = exchange(s, b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: 10000000\r\n\r\n")
            assert refused[0] == 413
            assert closed_by_server(s, trickle=b"x")   # the rest of the 10 MB body is not read for ever
    assert ok_app.calls == 3


def test_a_large_head_is_refused_before_the_parser_buffers_it():
    """httptools buffers a header value of any length; the protocol counts a head's bytes before they reach it and
    answers 431 once a head passes CMN_MAX_HEADER_BYTES, however it is split. The finding's 8 MB head is sent in
    64 KB pieces until refused. A head under the limit is served, and so is one whose body arrives in the same
    read (the body is not counted as head)."""
    with uvicorn_on_loopback(max_header_bytes=16_384) as port:
        for padding in (16_384, 20_000, 8 * 1024 * 1024):
            with connect(port) as s, s.makefile("rb") as reader:
                head = b"GET /x HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * padding + b"\r\n\r\n"
                try:
                    for start in range(0, len(head), 65536):
                        s.sendall(head[start:start + 65536])
                except (ConnectionResetError, BrokenPipeError):
                    pass   # refused and closed while the head was still being sent
                answer = read_response(reader)
                # None: the server's close reached the client as a reset, before the 431 could be read
                assert answer is None or answer[0] == 431, answer
        with connect(port) as s, s.makefile("rb") as reader:   # split a byte at a time: the same limit
            s.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\n")
            try:
                for _ in range(17_000):
                    s.send(b"X")
            except (ConnectionResetError, BrokenPipeError):
                pass
            answer = read_response(reader)
            assert answer is None or answer[0] == 431, answer
        assert ok_app.calls == 0
        with connect(port) as s:
            assert exchange(s, b"GET /x HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * 16_000 + b"\r\n\r\n") == (200, b"ok")
        with connect(port) as s:
            body = b"x" * 200_000
            assert exchange(s, b"POST /x HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * 8_000 +
                            b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body) == (200, b"ok")


def test_idle_connections_take_no_place_of_requests():
    """The finding: 300 idle connections made every route, /health included, answer 503 (uvicorn's limit counted
    connections with requests). Here CMN_LIMIT_CONCURRENCY counts requests in progress alone: with 3 allowed, 20
    idle connections change nothing; 3 requests in progress make the 4th a 503 with Retry-After, never /health."""
    with uvicorn_on_loopback(limit_concurrency=3, keep_alive_s=BOUND, header_timeout_s=BOUND) as port:
        idle = [connect(port) for _ in range(20)]
        with connect(port) as s:
            assert exchange(s) == (200, b"ok")
        held = [connect(port) for _ in range(3)]
        try:
            for s in held:
                s.sendall(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n")
            deadline = time.monotonic() + BOUND
            while ok_app.calls < 4 and time.monotonic() < deadline:   # the 3 held requests have reached the app
                time.sleep(0.01)
            with connect(port) as s:
                status, body = exchange(s)
                assert status == 503 and b"3 requests in progress" in body
            with connect(port) as s:
                assert exchange(s, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n") == (200, b"ok")
        finally:
            ok_app.gate.set()
        for s in held:
            with s.makefile("rb") as reader:
                assert read_response(reader) == (200, b"ok")
            s.close()
        for s in idle:
            s.close()


def test_past_the_connection_cap_the_longest_idle_connection_makes_room():
    """With 3 connections allowed: one holding a request in progress, two idle. A fourth connection closes the
    idle one that waited longest, never the one being answered, and is served itself."""
    with uvicorn_on_loopback(max_connections=3, keep_alive_s=BOUND, header_timeout_s=BOUND) as port:
        busy = connect(port)
        busy.sendall(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n")
        oldest = connect(port)
        assert exchange(oldest) == (200, b"ok")     # the server has certainly registered it, then it waits again
        newer = connect(port)
        assert exchange(newer) == (200, b"ok")
        try:
            with connect(port) as s:
                assert exchange(s) == (200, b"ok")
            assert closed_by_server(oldest)
            assert exchange(newer) == (200, b"ok")
        finally:
            ok_app.gate.set()
        with busy.makefile("rb") as reader:
            assert read_response(reader) == (200, b"ok")
        for s in (busy, oldest, newer):
            s.close()


def test_past_the_connection_cap_a_trickling_body_makes_room_when_none_is_idle():
    """With 2 connections allowed: one answering a request, one sending its body slowly (behind nginx bodies
    arrive whole; without it such clients are cheap to hold open). A third connection closes the trickling one,
    and is served."""
    with uvicorn_on_loopback(max_connections=2, keep_alive_s=BOUND, header_timeout_s=BOUND,
                             body_timeout_s=BOUND) as port:
        busy = connect(port)
        busy.sendall(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n")
        deadline = time.monotonic() + BOUND
        while ok_app.calls < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        trickling = connect(port)
        trickling.sendall(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n")
        # the server asks for the body once its head has arrived and the body is being read
        assert trickling.recv(65536).startswith(b"HTTP/1.1 100")
        trickling.sendall(b"x" * 10)
        try:
            with connect(port) as s:
                assert exchange(s) == (200, b"ok")
            assert closed_by_server(trickling, trickle=b"x")
        finally:
            ok_app.gate.set()
        with busy.makefile("rb") as reader:
            assert read_response(reader) == (200, b"ok")
        for s in (busy, trickling):
            s.close()
