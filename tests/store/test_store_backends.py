"""The feedback store's promises, on both backends (SQLite and PostgreSQL): every case runs on each.

Appends are all or none and return seq numbers in commit order; event ids are idempotent per key; a pair is stored
once per key (repeats keep only their ids), and compaction moves the repeats of older stores out; reads page by seq, and training folds either store a page at a time; rollout
records; a store that cannot be reached raises StoreUnavailable for every operation and recovers by itself when
the server is back. PostgreSQL runs against a
real server (conftest: `postgres_url`, `stoppable_postgres`; skipped without one, failed in CI).
"""
from __future__ import annotations

import itertools
import json
import os
import random
import socket
import sys
import sqlite3
import threading
import time

import numpy as np
import psycopg
import pytest
import torch

from app.engine import Engine
from model.store.checkpoint import load_checkpoint

from model.store.events import (SCHEMA_VERSION, Event, EventIdConflict, FeedbackLog, FeedbackStore, Rollout,
                                StoreUnavailable, masked, open_store)
from model.store import events as events_mod, events_pg
from model.store.events_pg import NOTIFY_CHANNEL, PostgresFeedbackStore
from training import cli
from training.data import DataError, Dataset
from training.feedback import fold_feedback

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/feedback.sqlite3"    # sqlite:////tmp/...: an absolute path
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(url):
    store = open_store(url)
    yield store
    store.close()


def execute(url: str, sql: str) -> None:
    """`sql` on the store's database, behind the store's back."""
    if url.startswith("sqlite:///"):
        db = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None)
        db.execute(sql)
        db.close()
    else:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql)


def ids(store) -> list[str | None]:
    return [e.event_id for _, e in store.events()]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]       # nothing listens there once the socket is closed


# --------------------------------------------------------------------------- order, ids, dedup

def test_appends_get_increasing_seqs_and_read_back_in_order(store):
    assert (store.last_seq(), store.count(), store.events()) == (0, 0, [])
    first = store.append([Event("u1", "i1", 10.0, "a"), Event("u2", "i2", None, "b")])
    second = store.append([Event("u3", "i3", 30.0)])
    seqs = first + second
    assert all(isinstance(s, int) for s in seqs) and seqs == sorted(seqs) and len(set(seqs)) == 3
    rows = store.events()
    assert [s for s, _ in rows] == seqs
    assert [(e.user_id, e.item_id, e.event_id) for _, e in rows] == [("u1", "i1", "a"), ("u2", "i2", "b"),
                                                                      ("u3", "i3", None)]
    assert (store.last_seq(), store.count()) == (seqs[-1], 3)
    store.ping()


def test_a_reused_id_is_a_duplicate_or_a_conflict_and_a_conflict_stores_nothing(store):
    [seq] = store.append([Event("u1", "i1", 5.0, "a")])
    assert seq and store.append([Event("u1", "i1", 5.0, "a")]) == [None]     # a retry
    assert store.append([Event("u1", "i1", None, "a")]) == [None]            # a retry without the timestamp
    with pytest.raises(EventIdConflict) as e:
        store.append([Event("u2", "i2", None, "b"), Event("u1", "i9", None, "a"), Event("u3", "i3", None),
                      Event("u1", "i1", 6.0, "a")])
    assert e.value.ids == ["a", "a"]
    assert ids(store) == ["a"] and store.last_seq() == seq                  # all or none
    # another key has ids of its own; within one append, a repeated id is a duplicate of the first, or a conflict
    out = store.append([Event("u9", "i1", None, "a"), Event("u9", "i1", None, "a")], writer="writer")
    assert out[0] and out[1] is None
    with pytest.raises(EventIdConflict):
        store.append([Event("u7", "i7", None, "c"), Event("u8", "i7", None, "c")])
    assert ids(store) == ["a", "a"]


def test_a_pair_is_stored_once_per_writer_and_a_repeats_id_stays_idempotent(store):
    """The finding: the same (user, item) was stored again under each new event id, and the log grew without bound.
    A repeat gets no seq (nothing replays it) but its id is recorded: a retry is a duplicate, another payload a
    conflict."""
    [first] = store.append([Event("u", "i", 1.0, "a")])
    assert store.append([Event("u", "i", 2.0, "b"), Event("u", "i", None), Event("u", "j", None, "c")])[:2] == \
        [None, None]
    assert store.append([Event("u", "i", 2.0, "b")]) == [None]                 # the repeat's retry: a duplicate
    with pytest.raises(EventIdConflict, match="b"):
        store.append([Event("u", "x", None, "b")])                             # its id with another payload
    with pytest.raises(EventIdConflict):
        store.append([Event("u", "i", 3.0, "b")])                              # or another timestamp
    assert store.append([Event("u", "i", None, "a2", verified=False)])[0]      # another flag: training tells them apart
    assert store.append([Event("u", "i", None, "k")], writer="k")[0]           # another writer
    assert [(e.user_id, e.item_id, e.event_id) for _, e in store.events()] == \
        [("u", "i", "a"), ("u", "j", "c"), ("u", "i", "a2"), ("u", "i", "k")]
    assert (store.count(), store.repeat_ids(), store.events()[0][0]) == (4, 1, first)


def test_compaction_moves_repeats_out_keeps_their_ids_and_forgets_old_ones(store, url):
    """A store written before the pair rule (here by bulk_append) holds repeats: compaction leaves one event per
    writer, pair and flag (and the last event: the store's last seq never goes back), in seq order, and records the
    repeats' ids, forgetting those received before the retention age."""
    events = [Event(f"u{n % 3}", f"i{n % 2}", float(n), f"e{n}") for n in range(12)] + [Event("u0", "i0", None)]
    store.bulk_append(events)
    store.append([Event("u0", "i0", None, "k0")], writer="k")
    execute(url, "UPDATE events SET received = received - 86400 WHERE event_id IN ('e7', 'e8')")   # a day old
    before = store.events()
    done = []
    result = store.compact(forget_ids_before=time.time() - 3600, progress=done.append)
    after = store.events()
    # e0..e5 are the six first (u, i); e6..e11 and the id-less one repeat them; k0 is another writer's, and last
    assert [e.event_id for _, e in after] == ["e0", "e1", "e2", "e3", "e4", "e5", "k0"]
    assert [s for s, _ in after] == [s for s, e in before if e.event_id in {e.event_id for _, e in after}]
    assert (result.events_before, result.events_after, result.moved) == (14, 7, 7)
    assert (result.ids_kept, store.repeat_ids()) == (4, 4) and sum(done) == store.last_seq() == before[-1][0]
    assert store.append([Event("u0", "i0", 6.0, "e6")]) == [None]              # a moved repeat's id: still a duplicate
    with pytest.raises(EventIdConflict):
        store.append([Event("u0", "i1", None, "e6")])
    assert store.append([Event("u1", "i1", 7.0, "e7")]) == [None]              # forgotten, but still a repeat
    assert store.repeat_ids() == 5                                             # (and recorded again)
    assert store.compact(forget_ids_before=time.time() + 1).ids_forgotten == 5
    assert store.repeat_ids() == 0 and [e.event_id for _, e in store.events()] == [e.event_id for _, e in after]
    assert store.compact() == type(result)(7, 7, 0, 0, 0)                      # nothing left to do


def test_replay_after_compaction_reaches_the_same_live_state(store, api_checkpoint):
    """What compaction guarantees the serving processes: replaying the compacted store reaches the state that
    replaying every repeat reached (the same batches of seq numbers, less the repeats: a follower applies what
    arrived since its last read). The events repeat a known pair, and a live user's and a live item's pairs after
    other users joined their neighbourhoods (a repeat that refitted them would change their rows)."""
    ckpt = load_checkpoint(api_checkpoint)
    users, items = ckpt.user_ids, ckpt.item_ids
    events = [Event(users[n % 7], items[n % 5], None, f"k{n}") for n in range(20)]
    events += [Event("live-user", items[0], None, "l0"), Event("live-user", items[1], None, "l1"),
               Event(users[3], "live-item", None, "m0"), Event(users[4], "live-item", None, "m1")]
    events += [Event(users[10 + n], items[n % 2], None, f"j{n}") for n in range(6)]
    events += [Event("live-user", items[0], None, "l0-again"), Event(users[3], "live-item", None, "m0-again"),
               Event(users[0], items[0], None, "k0-again")]
    store.bulk_append(events)

    def replayed() -> Engine:
        engine = Engine(api_checkpoint, device="cpu")
        for _, batch in itertools.groupby(store.events(), key=lambda row: (row[0] - 1) // 8):
            engine.apply_rows(list(batch))
        return engine
    everything = replayed()
    assert store.compact().moved == 2           # the live user's and item's repeats (the last event is kept)
    compacted = replayed()
    a, b = everything.recommender, compacted.recommender
    assert (compacted.user_ids, compacted.item_ids) == (everything.user_ids, everything.item_ids)
    assert b.seen_sets == a.seen_sets and b.interactions == a.interactions
    assert torch.equal(b.popularity, a.popularity)
    assert torch.equal(b.scorer.indptr, a.scorer.indptr) and torch.equal(b.scorer.indices, a.scorer.indices)
    for table in ("user_memory", "user_output", "item_memory"):
        rows = a.n_users if table.startswith("user") else a.n_items
        assert torch.equal(getattr(b.scorer.model, table)[:rows], getattr(a.scorer.model, table)[:rows]), table
    assert torch.equal(b.score(list(range(b.n_users))), a.score(list(range(a.n_users))))


def test_appends_during_a_compaction_are_kept_in_order(url):
    """Compaction holds the append lock a page at a time: a writer appending meanwhile loses nothing, and seqs
    keep growing."""
    store, writer = open_store(url), open_store(url)
    try:
        store.bulk_append(Event(f"u{n % 50}", f"i{n % 7}", float(n), f"old{n}") for n in range(3000))
        appended, stop = [], threading.Event()

        def write():   # a busy server's appends: one every few milliseconds
            n = 0
            while not stop.is_set():
                appended.extend(writer.append([Event(f"w{n}", "i", None, f"new{n}")]))
                n += 1
                time.sleep(0.005)
        thread = threading.Thread(target=write)
        thread.start()
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(events_mod, "COMPACT_PAGE", 100)
                mp.setattr(events_mod, "COMPACT_PAUSE_S", 0.01)
                result = store.compact()
        finally:
            stop.set()
            thread.join()
        assert result.moved == 3000 - 350 - 1 and appended and all(appended)
        kept = store.events()
        assert [s for s, _ in kept] == sorted(s for s, _ in kept)
        assert [e.event_id for _, e in kept if e.event_id.startswith("new")] == [f"new{n}" for n in
                                                                                 range(len(appended))]
    finally:
        store.close()
        writer.close()


def test_verified_flags_and_timestamps_are_stored(store):
    before = time.time()
    store.append([Event("u", "i", 123.5, "a", verified=True), Event("x", "y", None, "b", verified=False)])
    after = time.time()
    (_, a), (_, b) = store.events()
    assert (a.verified, b.verified) == (True, False)
    assert a.timestamp == 123.5 and b.timestamp == b.received      # no timestamp sent: the time received
    # the store's clock (on PostgreSQL the server's; here the same machine)
    assert before - 1 <= a.received <= b.received <= after + 1


def test_reads_page_by_seq(store):
    store.append([Event(f"u{n}", "i", None, f"e{n}") for n in range(7)])
    pages, last = [], 0
    while page := store.events(after=last, limit=3):
        pages.append([e.event_id for _, e in page])
        last = page[-1][0]
    assert pages == [["e0", "e1", "e2"], ["e3", "e4", "e5"], ["e6"]]
    assert store.events(after=last) == [] and len(store.events(limit=None)) == 7


def test_bulk_append_stores_all_in_seq_order_and_refuses_reused_ids(store):
    store.append([Event("u", "i", None, "first")])
    assert store.bulk_append(Event(f"u{n}", "i", float(n), f"b{n}") for n in range(50)) == 50
    rows = store.events()
    assert [e.event_id for _, e in rows] == ["first"] + [f"b{n}" for n in range(50)]
    assert [s for s, _ in rows] == sorted(s for s, _ in rows)
    with pytest.raises(ValueError):
        store.bulk_append([Event("u", "i", None, "new"), Event("u", "i", None, "b3")])
    assert store.count() == 51 and store.fault is None


def test_training_folds_either_store_a_page_at_a_time(store, url, monkeypatch):
    """`python -m training train --feedback URL` on either backend: the events are read in pages, and the folded
    data set is what the events say (new ids appended in arrival order, unverified unknown ids left out)."""
    store.append([Event("u0", "i1", None, "known"), Event("new-user", "i0", None, "trusted"),
                  Event("invented", "i0", None, "unverified", verified=False), Event("u1", "i2", None),
                  Event("new-user", "new-item", None, "trusted-2")])
    limits = []
    events = FeedbackStore.events
    monkeypatch.setattr(FeedbackStore, "events", lambda self, after=0, limit=None: limits.append(limit)
                        or events(self, after, limit))
    data = Dataset(2, 3, np.array([[0, 0], [1, 1]]), None, ["u0", "u1"], ["i0", "i1", "i2"])
    lines = []
    folded = fold_feedback(data, url, log=lines.append, page=2, progress=False)
    assert limits == [2, 2, 2, 2]
    assert folded.user_ids == ["u0", "u1", "new-user"] and folded.item_ids == ["i0", "i1", "i2", "new-item"]
    assert sorted(map(tuple, folded.train.tolist())) == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 0), (2, 3)]
    assert any("1 unverified events" in line for line in lines)


def test_training_explains_a_store_it_cannot_read(tmp_path):
    data = Dataset(1, 1, np.array([[0, 0]]), None, ["u"], ["i"])
    for url in (str(tmp_path / "missing.sqlite3"), f"postgresql://cmn:s3cret@127.0.0.1:{closed_port()}/feedback"):
        with pytest.raises(DataError, match="cannot read feedback store") as e:
            fold_feedback(data, url, progress=False)
        assert "s3cret" not in str(e.value)


# --------------------------------------------------------------------------- rollouts

def test_the_newest_published_checkpoint_is_the_active_one(store):
    assert store.active_checkpoint() is None
    first = store.publish_checkpoint("/models/a.ckpt", "v1")
    before = time.time()
    second = store.publish_checkpoint("/models/b.ckpt", "v2")
    assert second > first
    active = store.active_checkpoint()
    assert isinstance(active, Rollout) and (active.id, active.path, active.version) == (second, "/models/b.ckpt", "v2")
    assert before - 1 <= active.published <= time.time() + 1


# --------------------------------------------------------------------------- opening

def test_a_store_opened_read_only_reads_but_refuses_writes(store, url):
    store.append([Event("u", "i", None, "a")])
    reader = open_store(url, readonly=True)
    try:
        assert ids(reader) == ["a"] and reader.count() == 1
        with pytest.raises(StoreUnavailable):
            reader.append([Event("u", "j", None, "b")])
        assert reader.fault
    finally:
        reader.close()
    assert ids(store) == ["a"]


def test_a_missing_store_is_not_found_read_only(tmp_path, fresh_postgres_url):
    with pytest.raises(FileNotFoundError):
        open_store(str(tmp_path / "missing.sqlite3"), readonly=True)
    with pytest.raises(FileNotFoundError):
        open_store(fresh_postgres_url(), readonly=True)      # a database without the store's tables


def test_urls_choose_the_backend_and_never_show_a_password(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url, path in (("sqlite:///rel/a.sqlite3", "rel/a.sqlite3"), (f"sqlite:///{tmp_path}/b.sqlite3",
                                                                      f"{tmp_path}/b.sqlite3"),
                      ("plain.sqlite3", "plain.sqlite3")):
        store = open_store(url)
        try:
            assert isinstance(store, FeedbackLog) and store.path == path and (tmp_path / path).exists()
            assert open_store(store.url, readonly=True).path == path          # its url names the same file
        finally:
            store.close()
    for bad in ("sqlite://a.sqlite3", "mysql://u@h/db"):
        with pytest.raises(ValueError, match="sqlite:///"):
            open_store(bad)
    assert masked("postgresql://cmn:s3cret@db:5432/feedback?password=s3cret&sslmode=require") == \
        "postgresql://cmn:***@db:5432/feedback?password=%2A%2A%2A&sslmode=require"
    for url in ("postgresql://cmn@db/feedback", "sqlite:////abs/feedback.sqlite3"):
        assert masked(url) == url


def test_the_schema_is_created_once_by_processes_starting_together(postgres_url):
    stores, errors = [], []

    def open_one():
        try:
            stores.append(open_store(postgres_url))
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            errors.append(e)
    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors and all(s.fault is None for s in stores)
        with psycopg.connect(postgres_url) as conn:
            assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    finally:
        for s in stores:
            s.close()


# --------------------------------------------------------------------------- concurrency

def test_a_follower_polling_by_seq_never_misses_an_event_of_concurrent_writers(url):
    """Writers (each its own store, as separate processes have) append while a follower polls `events(after=last)`.
    Each writer dawdles between its insert and its commit, so that without commit order = seq order a later seq
    would commit first and the follower would step over the earlier one for good."""
    writers = [open_store(url) for _ in range(4)]
    follower = open_store(url)
    rng = random.Random(0)
    for w in writers:
        insert = w._insert
        w._insert = lambda *a, insert=insert: (insert(*a), time.sleep(rng.random() * 0.004))[0]
    seen: list[int] = []
    done = threading.Event()

    def follow():
        last = 0
        while True:
            finished = done.is_set()
            for seq, _ in follower.events(after=last, limit=50):
                seen.append(seq)
                last = seq
            if finished:
                return

    def write(n, w):
        for k in range(25):
            w.append([Event(f"w{n}", f"i{k}", None, f"{n}-{k}-{j}") for j in range(rng.randint(1, 3))])
    reader = threading.Thread(target=follow)
    reader.start()
    threads = [threading.Thread(target=write, args=(n, w)) for n, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()
    try:
        stored = [s for s, _ in follower.events()]
        assert seen == stored and len(stored) >= 100
    finally:
        for s in writers + [follower]:
            s.close()


def test_ids_stay_idempotent_under_concurrent_writers(url):
    """The same ids sent by several writers at once (retries racing each other): each is stored once; a payload
    racing another under the same id is a conflict for all but one writer. Each writer dawdles between looking its
    ids up and inserting them, so that unserialised writers would both find an id unused."""
    writers = [open_store(url) for _ in range(4)]
    for w in writers:
        lookup = w._stored_ids
        w._stored_ids = lambda *a, lookup=lookup: (lookup(*a), time.sleep(0.005))[0]
    results: dict[int, object] = {}

    def write(n, w):
        try:
            results[n] = w.append([Event("u", f"i{k}", None, f"same-{k}") for k in range(20)]
                                  + [Event(f"u{n}", "i", None, "raced")])
        except Exception as e:  # noqa: BLE001 - which exception, if any, is the finding
            results[n] = e
    threads = [threading.Thread(target=write, args=(n, w)) for n, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        won = [r for r in results.values() if isinstance(r, list)]
        assert len(results) == len(writers) and len(won) == 1 and all(won[0])
        assert all(isinstance(r, EventIdConflict) and r.ids == ["raced"] for r in results.values() if r is not won[0])
        assert sorted(ids(writers[0])) == sorted([f"same-{k}" for k in range(20)] + ["raced"])
    finally:
        for w in writers:
            w.close()


def test_postgres_notifies_followers_of_the_highest_new_seq(postgres_url):
    store = open_store(postgres_url)
    try:
        with psycopg.connect(postgres_url, autocommit=True) as listener:
            listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
            seqs = store.append([Event("u", "i", None, "a"), Event("u", "j", None, "b")])
            store.append([Event("u", "i", None, "a")])               # nothing new: no notification
            notes = [n.payload for n in listener.notifies(timeout=0.5, stop_after=2)]
        assert notes == [str(seqs[-1])]
    finally:
        store.close()


def appended_within(seconds: float, store, event: Event) -> int:
    """Retry one append until it goes through (its seq) or `seconds` have passed (the last error is raised)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return store.append([event])[0]
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_writer_stalled_in_its_transaction_holds_the_others_up_only_briefly(postgres_url, monkeypatch):
    """A writer that stops between its statements (a frozen or cut-off process) holds the write lock: the others
    give up waiting for it (a 503 to their clients, not a hang) and the server ends the stalled session."""
    monkeypatch.setattr(events_pg, "LOCK_WAIT_S", 1)
    monkeypatch.setattr(events_pg, "STALLED_WRITER_S", 2)
    stalled, other = open_store(postgres_url), open_store(postgres_url)
    inside, outcome = threading.Event(), []

    def stall():
        try:
            stalled._write(lambda conn, now: (inside.set(), time.sleep(3.5), conn.execute("SELECT 1")))
        except StoreUnavailable as e:
            outcome.append(e)
    thread = threading.Thread(target=stall)
    thread.start()
    try:
        assert inside.wait(10)
        with pytest.raises(StoreUnavailable, match="LockNotAvailable"):
            other.append([Event("u", "i", None, "held-up")])
        # once the server has ended the stalled session
        assert appended_within(10, other, Event("u", "i", None, "through"))
        thread.join()
        assert len(outcome) == 1 and ids(other) == ["through"]
    finally:
        thread.join()
        stalled.close()
        other.close()


# --------------------------------------------------------------------------- outages

def test_an_unreachable_server_is_store_unavailable_for_every_operation():
    url = f"postgresql://cmn:s3cret@127.0.0.1:{closed_port()}/feedback"
    store = open_store(url)        # opening for writing is not an error: the server may come later
    try:
        assert isinstance(store, PostgresFeedbackStore) and store.fault and "s3cret" not in store.url
        assert store.fault == "PostgreSQL unreachable"   # what clients see: no address, no driver message
        for operation in (lambda: store.append([Event("u", "i", None, "a")]), store.events, store.count,
                          store.last_seq, store.ping, store.active_checkpoint,
                          lambda: store.publish_checkpoint("/m.ckpt", "v1")):
            with pytest.raises(StoreUnavailable) as raised:
                operation()
            assert "127.0.0.1" not in str(raised.value)
            assert "refused" in raised.value.detail.lower() and "s3cret" not in raised.value.detail  # the log's
    finally:
        store.close()
    with pytest.raises(StoreUnavailable):
        open_store(url, readonly=True)                             # training cannot read it: an error at once


def test_a_server_stopped_mid_way_fails_writes_and_the_store_recovers_by_itself(stoppable_postgres):
    store = open_store(stoppable_postgres.url)
    try:
        store.append([Event("u", "i", None, "before")])
        stoppable_postgres.stop()
        with pytest.raises(StoreUnavailable):
            store.append([Event("u", "j", None, "lost")])
        assert store.fault
        for read in (store.events, store.count, store.ping):
            with pytest.raises(StoreUnavailable):
                read()
        stoppable_postgres.start()
        # the pool reconnects on its own; no reopen, no restart
        assert appended_within(30, store, Event("u", "k", None, "after"))
        assert store.fault is None and ids(store) == ["before", "after"]
    finally:
        store.close()


def test_postgresql_without_psycopg_names_the_extra_to_install(monkeypatch):
    """psycopg is the `pg` extra, not a dependency of the model package: a PostgreSQL URL without it says what
    to install (and keeps the password out of the message)."""
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.delitem(sys.modules, "model.store.events_pg")
    with pytest.raises(ImportError, match=r"cmn-service\[pg\]") as e:
        open_store("postgresql://cmn:secret@127.0.0.1:1/cmn")
    assert "secret" not in str(e.value)


def test_the_compact_command_reports_what_it_did_and_explains_bad_input(store, url, capsys):
    store.bulk_append(Event("u", f"i{n % 3}", None, f"e{n}") for n in range(10))
    assert cli.main(["compact", "--feedback", url, "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) | {"seconds": 0} == {
        "events_before": 10, "events_after": 4, "moved": 6, "ids_kept": 6, "ids_forgotten": 0, "seconds": 0}
    assert cli.main(["compact", "--feedback", url, "--quiet", "--forget-ids-after", "0"]) == 0
    assert "4 → 4 events" in capsys.readouterr().out and store.repeat_ids() == 0
    assert cli.main(["compact", "--feedback", url, "--forget-ids-after", "-1"]) == 2
    assert "--forget-ids-after must be" in capsys.readouterr().err
    missing = url.rsplit("/", 1)[0] + "/missing.sqlite3" if url.startswith("sqlite") else \
        f"postgresql://cmn:s3cret@127.0.0.1:{closed_port()}/feedback"
    assert cli.main(["compact", "--feedback", missing, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot compact feedback store" in err and "s3cret" not in err and "Traceback" not in err
    assert not url.startswith("sqlite") or not os.path.exists(missing[len("sqlite:///"):])   # not created
