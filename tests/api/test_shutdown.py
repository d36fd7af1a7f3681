"""Graceful shutdown, deterministically: what SIGTERM must do, with the requests provably in flight.

A real `uvicorn.Server` runs `create_app(settings)` in a background thread on a loopback socket, the way
`python -m app` runs it (same `timeout_graceful_shutdown`). Its model thread is held on a gate, so requests
stay in flight for as long as the test wants: recommendations being scored or queued behind the gate, and
feedback already stored but not yet answered (its apply step waits for the model thread). The test then asks
uvicorn to exit (`should_exit = True`: what uvicorn's SIGTERM handler does), waits until the server has stopped
accepting connections and is waiting for the in-flight ones, and only then opens the gate. No assertion
depends on how fast anything runs.

The subprocess side (SIGTERM to `python -m app` → exit status 0) is in e2e/test_server.py and e2e/test_reliability.py.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

import app.models as models_module
import app.service as service_module
from app.engine import Engine
from app.main import create_app
from app.settings import Settings
from model.store.checkpoint import load_checkpoint
from model.store.events import FeedbackLog

WAIT = 60       # upper bound for things that must happen; never an expectation of speed


def wait_until(predicate, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout} s")
        time.sleep(0.01)


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


class ObservedServer(uvicorn.Server):
    """uvicorn's server, telling the test when its graceful shutdown has begun."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.shutting_down = threading.Event()

    async def shutdown(self, sockets=None) -> None:
        self.shutting_down.set()
        await super().shutdown(sockets)


@pytest.fixture
def uvicorn_waits():
    """Set when uvicorn logs that it is waiting for the connections still open: the point past which a server
    that drops in-flight requests (`force_exit`, a zero graceful timeout, no drain at all) never gets."""
    waiting = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Waiting for connections to close"):
                waiting.set()
    logger, handler = logging.getLogger("uvicorn.error"), Watch(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield waiting
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_graceful_shutdown_answers_every_in_flight_request_and_closes_the_store(api_checkpoint, tmp_path,
                                                                               monkeypatch, capsys, uvicorn_waits):
    holding, entered, gate = threading.Event(), threading.Event(), threading.Event()
    closed: list[str] = []

    class GatedEngine(Engine):
        def recommend(self, jobs):
            if holding.is_set():
                entered.set()
                gate.wait(WAIT)
            return super().recommend(jobs)

    class ObservedLog(FeedbackLog):
        def close(self):
            super().close()
            closed.append(self.path)

    monkeypatch.setattr(models_module, "Engine", GatedEngine)
    monkeypatch.setattr(service_module, "open_store", ObservedLog)

    ckpt = load_checkpoint(api_checkpoint)
    users, items = ckpt.user_ids, ckpt.item_ids
    store = tmp_path / "feedback.sqlite3"
    settings = Settings(checkpoint=api_checkpoint, feedback_path=str(store), device="cpu", warmup_calls=1)
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = ObservedServer(uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, "uvicorn started")
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, "the model loaded")
        service = app.state.service

        # what will be in flight: the batch being scored, then 2 batches + 2 single requests queued behind it,
        # and 3 feedback requests (known users and items: applied on the model thread, so they wait too)
        batches = [{"requests": [{"user_id": users[8 * b + n], "k": 5} for n in range(8)]} for b in range(3)]
        singles = [{"user_id": users[40], "k": 7}, {"user_id": "someone-new", "k": 3}]
        feedback = [{"events": [{"user_id": users[50 + f], "item_id": items[e], "event_id": f"term-{f}-{e}"}
                                for e in range(f + 1)]} for f in range(3)]
        n_events = sum(len(b["events"]) for b in feedback)
        queued_jobs = sum(len(b["requests"]) for b in batches[1:]) + len(singles)

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=WAIT) as client:
                holding.set()
                scoring = asyncio.create_task(client.post("/recommend/batch", json=batches[0]))
                assert await asyncio.to_thread(entered.wait, WAIT), "the model thread never reached the gate"
                queued = [asyncio.create_task(client.post("/recommend/batch", json=b)) for b in batches[1:]]
                queued += [asyncio.create_task(client.post("/recommend", json=b)) for b in singles]
                stored = [asyncio.create_task(client.post("/feedback", json=b)) for b in feedback]
                # every request has reached the server: the recommendations are in the batcher's queue, the
                # feedback is in the store (the count is kept before the apply step that waits for the gate)
                await asyncio.to_thread(wait_until, lambda: service.batcher.depth == queued_jobs and
                                        service.feedback.events == n_events, "all requests in flight")
                tasks = [scoring, *queued, *stored]
                assert not any(t.done() for t in tasks), "a request was answered past the gate"

                server.should_exit = True          # what uvicorn's SIGTERM handler does
                assert await asyncio.to_thread(server.shutting_down.wait, WAIT), "uvicorn never began to shut down"
                await asyncio.to_thread(wait_until, lambda: refuses_connections(port), "listener closed")
                assert await asyncio.to_thread(uvicorn_waits.wait, WAIT), \
                    "uvicorn did not wait for the requests in flight"
                assert not any(t.done() for t in tasks), "a request was answered past the gate"
                assert thread.is_alive() and closed == [], "the server stopped before its requests were answered"
                gate.set()
                return await asyncio.gather(*tasks)

        answers = asyncio.run(scenario())
        thread.join(WAIT)
        assert not thread.is_alive(), "uvicorn did not finish its shutdown"
    finally:
        gate.set()
        server.should_exit = True
        thread.join(WAIT)
        sock.close()

    # every in-flight request was answered in full
    sent = batches + singles + feedback
    for body, r in zip(sent, answers):
        assert r.status_code == 200, (body, r.status_code, r.text[:300])
    for body, r in zip(batches, answers):
        results = r.json()["results"]
        assert [x["user_id"] for x in results] == [q["user_id"] for q in body["requests"]]
        assert all(len(x["items"]) == 5 and x.get("fallback") is None for x in results)
    for body, r in zip(singles, answers[len(batches):]):
        assert r.json()["user_id"] == body["user_id"] and len(r.json()["items"]) == body["k"]
    assert answers[len(batches) + 1].json()["fallback"] == "unknown_user"
    for body, r in zip(feedback, answers[len(batches) + len(singles):]):
        assert r.json()["stored"] == len(body["events"]) and r.json()["applied"] == len(body["events"])

    # then the lifespan shutdown ran: the store was closed (its WAL checkpointed into the database) and holds
    # exactly the acknowledged events
    assert closed == [str(store)]
    assert '"event": "shutdown"' in capsys.readouterr().out
    wal = Path(str(store) + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    con = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # a repeated pair is held once in the log; its event id is recorded with the repeats
        stored_ids = {row[0] for row in con.execute("SELECT event_id FROM events UNION "
                                                    "SELECT event_id FROM repeats")}
    finally:
        con.close()
    assert stored_ids == {e["event_id"] for b in feedback for e in b["events"]}
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)
