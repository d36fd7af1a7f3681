"""The feedback store (model/store/events.py) under faults and across schema versions, and what the server and
training make of it: a failed write is a 503 + Retry-After with nothing stored, /health says the store is not
writable, the server recovers when the store does; stores written by the old code keep working.

The faults are real ones that a root process hits too (these tests run as root, which ignores file modes):
- disk full: SQLite's own page limit (`PRAGMA max_page_count`), which fails a write with SQLITE_FULL, the error
  a full disk gives; over real HTTP, security/test_auth.py uses a file-size limit (RLIMIT_FSIZE) instead;
- read-only: the immutable flag (`chattr +i`), which binds root as well (`chmod 0444` when not root).
"""
from __future__ import annotations

import sqlite3
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import pytest

import app.engine as engine_module
from app.engine import Engine
from app.main import create_app
from model.store.checkpoint import load_checkpoint
from model.store.events import SCHEMA_VERSION, Event, EventIdConflict, FeedbackLog, StoreUnavailable
import training.train
from training import cli
from training.data import Dataset
from training.feedback import fold_feedback
from conftest import read_only, serving, settings_for, wait_ready
from tests.harness.servers import running_server, server_log

# the schema the server wrote before event ids were per key (kept verbatim: stores written by it exist)
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT UNIQUE,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    timestamp REAL NOT NULL,
    received REAL NOT NULL
)
"""


def old_store(path: Path, rows: list[tuple]) -> Path:
    """A store as the old code left it: rows (event_id, user_id, item_id, timestamp); the last one deleted after
    it was written, so that its seq is used up."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(OLD_SCHEMA)
    for row in rows + [("gone", "u", "i", 1.0)]:
        db.execute("INSERT INTO events (event_id, user_id, item_id, timestamp, received) VALUES (?, ?, ?, ?, 0)", row)
    db.execute("DELETE FROM events WHERE event_id = 'gone'")
    db.close()
    return path


def full_disk(store: FeedbackLog) -> None:
    """Writes past the store's current size fail with SQLITE_FULL, as on a full disk (until it is reopened)."""
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")


def big_events(n: int, tag: str) -> list[Event]:
    return [Event(f"user-{tag}-{k}" + "u" * 200, "i" * 200, 1.0, f"{tag}-{k}") for k in range(n)]


# --------------------------------------------------------------------------- schema

def test_a_store_written_by_the_old_code_is_migrated(tmp_path):
    path = old_store(tmp_path / "old.sqlite3",
                     [("a", "u1", "i1", 1.0), (None, "u2", "i2", 2.0), ("b", "u3", "i3", 3.0)])
    # read-only (training reading a store the server has not opened yet): readable as it is, nothing verified
    store = FeedbackLog(str(path), readonly=True)
    before = store.events()
    assert store.active_checkpoint() is None           # no rollouts table before schema 3
    store.close()
    assert [(s, e.event_id, e.user_id, e.verified) for s, e in before] == [
        (1, "a", "u1", False), (2, None, "u2", False), (3, "b", "u3", False)]
    store = FeedbackLog(str(path))
    try:
        assert store.fault is None and store.events() == before
        # the old ids belong to the no-key namespace ("", auth off): a retry there is a duplicate, another payload
        # a conflict; another key has ids of its own
        assert store.append([Event("u1", "i1", None, "a")]) == [None]
        with pytest.raises(EventIdConflict):
            store.append([Event("u9", "i1", None, "a")])
        # seq numbers are never reused, not even the deleted one's
        assert store.append([Event("u9", "i1", None, "a")], writer="writer") == [5]
        assert store.publish_checkpoint("m.ckpt", "v1") == store.active_checkpoint().id  # schema 3: rollouts
    finally:
        store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_failed_migration_leaves_the_old_store_as_it_was(tmp_path):
    path = old_store(tmp_path / "old.sqlite3", [("a", "u1", "i1", 1.0)])
    with read_only(path):
        store = FeedbackLog(str(path))        # opens for reading; the migration could not be written
        try:
            assert store.fault and [e.event_id for _, e in store.events()] == ["a"]
            with pytest.raises(StoreUnavailable):
                store.append([Event("u2", "i2", None, "c")])
        finally:
            store.close()
    columns = {row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(events)")}
    assert "key_name" not in columns


# --------------------------------------------------------------------------- faults, in the store

def test_a_full_disk_reports_its_own_error_and_stores_nothing(tmp_path):
    """The finding: the rollback raised 'cannot rollback - no transaction is active' (SQLite had already rolled
    back) and hid 'database or disk is full'."""
    store = FeedbackLog(str(tmp_path / "s.sqlite3"))
    try:
        store.append([Event("u", "i", None, "kept")])
        full_disk(store)
        with pytest.raises(StoreUnavailable, match="full") as e:
            store.append(big_events(200, "lost"))
        assert "rollback" not in str(e.value) and store.fault == str(e.value)
        assert [ev.event_id for _, ev in store.events()] == ["kept"]
        # the next append reopens the store (here: without the page limit, as when space was freed)
        assert store.append([Event("u", "i2", None, "after")])[0] and store.fault is None
    finally:
        store.close()


def test_a_store_made_read_only_while_open_fails_its_writes_and_recovers(tmp_path):
    path = tmp_path / "s.sqlite3"
    store = FeedbackLog(str(path))
    try:
        store.append([Event("u", "i", None, "kept")])
        wal = Path(str(path) + "-wal")
        with read_only(wal):
            with pytest.raises(StoreUnavailable):
                store.append([Event("u", "i2", None, "lost")])
            assert store.fault
            with pytest.raises(StoreUnavailable):            # still read-only: reopened, and still refused
                store.append([Event("u", "i2", None, "lost")])
            assert [ev.event_id for _, ev in store.events()] == ["kept"]
        assert store.append([Event("u", "i2", None, "after")])[0] and store.fault is None
    finally:
        store.close()
    assert [ev.event_id for _, ev in FeedbackLog(str(path), readonly=True).events()] == ["kept", "after"]


# --------------------------------------------------------------------------- faults, through the server

@pytest.mark.anyio
async def test_disk_full_is_503_health_degraded_then_recovered(api_checkpoint, tmp_path):
    ckpt = load_checkpoint(api_checkpoint)
    users, items = ckpt.user_ids, ckpt.item_ids
    events = [{"user_id": users[n % 50], "item_id": items[n], "event_id": f"e{n}"} for n in range(300)]
    app = create_app(settings_for(api_checkpoint, tmp_path))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cmn.test") as client:
            await wait_ready(client)
            assert (await client.post("/feedback", json={"events": events[:1]})).status_code == 200
            full_disk(app.state.service.store)
            r = await client.post("/feedback", json={"events": events[1:]})
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert "full" in r.json()["detail"] and "nothing of this request was stored" in r.json()["detail"]
            h = await client.get("/health")
            assert h.status_code == 200                      # recommendations are still served ...
            assert (h.json()["status"], h.json()["store"]) == ("degraded", "not_writable")
            assert "full" in h.json()["detail"] and h.json()["feedback_events"] == 1
            assert (await client.post("/recommend", json={"user_id": users[0]})).status_code == 200
            # space again (the store is reopened on the next write): the retry is stored in full, health is ok
            r = await client.post("/feedback", json={"events": events})
            assert r.status_code == 200 and (r.json()["stored"], r.json()["duplicates"]) == (299, 1)
            h = (await client.get("/health")).json()
            assert (h["status"], h["store"], h["feedback_events"]) == ("ok", "ok", 300) and "detail" not in h


@pytest.mark.anyio
async def test_a_read_only_store_at_start_is_reported_before_any_write(api_checkpoint, tmp_path):
    """The finding: a read-only store file left /health "ok" while every /feedback failed with 500."""
    ckpt = load_checkpoint(api_checkpoint)
    path = tmp_path / "feedback.sqlite3"
    store = FeedbackLog(str(path))
    store.append([Event(ckpt.user_ids[0], ckpt.item_ids[0], None, "before")])
    store.close()
    body = {"events": [{"user_id": ckpt.user_ids[1], "item_id": ckpt.item_ids[1], "event_id": "during"}]}
    with ExitStack() as writable_again:
        writable_again.enter_context(read_only(path))
        async with serving(settings_for(api_checkpoint, tmp_path)) as client:
            h = (await wait_ready(client)).json()
            assert (h["status"], h["store"], h["feedback_events"]) == ("degraded", "not_writable", 1)
            r = await client.post("/feedback", json=body)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert (await client.post("/recommend", json={"user_id": ckpt.user_ids[0]})).status_code == 200
            writable_again.close()
            r = await client.post("/feedback", json=body)
            assert r.status_code == 200 and r.json()["stored"] == 1
            assert (await client.get("/health")).json()["status"] == "ok"
    assert [e.event_id for _, e in FeedbackLog(str(path), readonly=True).events()] == ["before", "during"]


@pytest.mark.parametrize("stored", [1, 0], ids=["store-in-it", "no-store-yet"])
def test_a_read_only_store_directory_is_served_degraded_by_a_real_server(api_checkpoint, tmp_path, stored):
    """Issue 23, finding 7: with the store's directory read-only (SQLite can make neither the store nor the WAL's
    files there), `python -m app` exited with a traceback at start. It serves: recommendations 200, /health
    degraded and not writable, feedback 503 + Retry-After with nothing stored; then, the directory writable again,
    the next write succeeds without a restart."""
    ckpt = load_checkpoint(api_checkpoint)
    directory = tmp_path / "store"
    directory.mkdir()
    path = directory / "feedback.sqlite3"
    if stored:
        store = FeedbackLog(str(path))
        store.append([Event(ckpt.user_ids[0], ckpt.item_ids[0], None, "before")])
        store.close()
    body = {"events": [{"user_id": ckpt.user_ids[1], "item_id": ckpt.item_ids[1], "event_id": "during"}]}
    with ExitStack() as writable_again:
        writable_again.enter_context(read_only(directory))
        with running_server(api_checkpoint, tmp_path, feedback_path=path) as (url, _):
            h = httpx.get(f"{url}/health").json()
            assert (h["status"], h["store"], h["feedback_events"]) == ("degraded", "not_writable", stored)
            assert httpx.post(f"{url}/recommend", json={"user_id": ckpt.user_ids[0]}).status_code == 200
            r = httpx.post(f"{url}/feedback", json=body)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            writable_again.close()
            r = httpx.post(f"{url}/feedback", json=body)
            assert r.status_code == 200 and r.json()["stored"] == 1
            assert httpx.get(f"{url}/health").json()["status"] == "ok"
            assert "Traceback" not in server_log(tmp_path, url)
    assert [e.event_id for _, e in FeedbackLog(str(path), readonly=True).events()] == ["before"][:stored] + ["during"]


@pytest.mark.anyio
async def test_feedback_waits_for_a_model(api_checkpoint, tmp_path, held_loading):
    """Before a model is loaded no id can be verified: 503 + Retry-After, and nothing is stored."""
    gate = held_loading
    async with serving(settings_for(api_checkpoint, tmp_path)) as client:
        try:
            r = await client.post("/feedback", json={"events": [{"user_id": "1", "item_id": "2"}]})
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and "loading" in r.json()["detail"]
        finally:
            gate.set()
        assert (await wait_ready(client)).json()["feedback_events"] == 0


def test_start_up_replays_the_store_a_page_at_a_time(api_checkpoint, tmp_path, monkeypatch):
    """The finding: start-up and reload read the whole store into memory. Replay reads pages (2 events here);
    every event is applied, in order, and nothing twice."""
    monkeypatch.setattr(engine_module, "CATCH_UP_PAGE", 2)
    ckpt = load_checkpoint(api_checkpoint)
    engine = Engine(api_checkpoint, device="cpu")
    seen = set(map(tuple, ckpt.seen.tolist()))
    pairs = [(u, i) for u in range(3) for i in range(len(ckpt.item_ids)) if (u, i) not in seen][:5]
    store = FeedbackLog(str(tmp_path / "s.sqlite3"))
    try:
        store.append([Event(ckpt.user_ids[u], ckpt.item_ids[i], None) for u, i in pairs])
        pages = []
        read = store.events
        monkeypatch.setattr(store, "events", lambda after, limit: pages.append(limit) or read(after, limit))
        assert engine.catch_up(store) == 5 and pages == [2, 2, 2, 2]
        assert engine.recommender.interactions == len(seen) + 5
        assert engine.catch_up(store) == 0
    finally:
        store.close()


# --------------------------------------------------------------------------- training

def test_training_folds_unverified_events_only_when_asked(tmp_path):
    """The finding: 20 requests of invented ids turned 800 users into 20,801 at the next training run."""
    data = Dataset(3, 3, np.array([[0, 0], [1, 1], [2, 2]]), None, ["u0", "u1", "u2"], ["i0", "i1", "i2"])
    store = FeedbackLog(str(tmp_path / "s.sqlite3"))
    store.append([Event("u0", "i1", None, "known"),
                  Event("u1", "i2", None, "unverified-but-known", verified=False),
                  Event("invented", "i0", None, "new-user", verified=False),
                  Event("u2", "invented", None, "new-item", verified=False),
                  Event("newcomer", "i0", None, "trusted", verified=True)])
    store.close()
    lines = []
    folded = fold_feedback(data, str(tmp_path / "s.sqlite3"), log=lines.append)
    assert folded.user_ids == ["u0", "u1", "u2", "newcomer"] and folded.item_ids == ["i0", "i1", "i2"]
    assert {(folded.user_ids[u], folded.item_ids[i]) for u, i in folded.train.tolist()} >= {("u0", "i1"), ("u1", "i2")}
    assert any("2 unverified events" in line and "--feedback-unverified" in line for line in lines)
    everything = fold_feedback(data, str(tmp_path / "s.sqlite3"), log=lines.append, unverified=True)
    assert everything.user_ids[3:] == ["invented", "newcomer"] and everything.item_ids[3:] == ["invented"]


def test_the_command_line_passes_feedback_unverified(monkeypatch, capsys):
    configs = []
    monkeypatch.setattr(training.train, "train", configs.append)
    for flags, wanted in (([], False), (["--feedback-unverified"], True)):
        assert cli.main(["train", "--feedback", "store.sqlite3", *flags]) == 0
        assert (configs[-1].feedback, configs[-1].feedback_unverified) == ("store.sqlite3", wanted)
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "--feedback-unverified" in capsys.readouterr().out
