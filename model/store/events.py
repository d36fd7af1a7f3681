"""The feedback store: durable interaction events shared by the serving processes (writes) and training (reads).

Two backends behind one interface (`FeedbackStore`), chosen by URL with `open_store`:
- SQLite (`FeedbackLog`, the embedded default: one file) in WAL mode with synchronous=FULL;
- PostgreSQL (`model.store.events_pg.PostgresFeedbackStore`), shared by many processes and replicas.

Both make the same promises. An event is durable before `append` returns (a process killed with SIGKILL loses
nothing it acknowledged). An `append` is one transaction: all of its events are stored, or none (a reused event id
with another payload, a full disk, a read-only file, an unreachable server). Every stored event gets a sequence
number (`seq`) and commits in seq order, so a reader that has seen seq N and asks for `events(after=N)` never
misses one that commits later.

Event ids are unique per writer (a name the caller chooses; "" by default): a retry with the same id and payload
is a duplicate, another payload under a used id is an `EventIdConflict`. Who the writers are is the caller's
business (the server names each API key, app/feedback.py); the column that holds the writer is `key_name`, the name
it had when only the server wrote.

A pair is stored once per writer: an event whose writer already stored its (user, item) with the same `verified`
flag is a repeat. It changes nothing that reads the log (seen-sets and N(i) are sets; training folds unique pairs),
so it gets no seq and is not replayed; its event id alone is recorded (table `repeats`), so that a retry of it is
still a duplicate and another payload under it still a conflict. `compact` moves the repeats of stores written
before this rule (or by `bulk_append`) out of the log, and forgets repeats' ids past a retention age.

`verified` records whether the serving model knew the event's user and item when it was written; training folds
unverified events into new embedding rows only when asked to (`--feedback-unverified`).

The store also records model rollouts (`publish_checkpoint`): the newest is the checkpoint every serving process
should be running.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from model.store.impressions import (INSERT_CLICK, INSERT_IMPRESSION, SELECT_CLICKS, SELECT_IMPRESSIONS, SET_ARM,
                                     TABLES, Click, Impression)

SCHEMA_VERSION = 4
# one statement each: sqlite3's executescript() commits the open transaction first, and creating or migrating the
# schema must be one transaction
SCHEMA = (
    """CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        key_name TEXT NOT NULL DEFAULT '',
        event_id TEXT,
        user_id TEXT NOT NULL,
        item_id TEXT NOT NULL,
        timestamp REAL NOT NULL,
        received REAL NOT NULL,
        verified INTEGER NOT NULL DEFAULT 0,
        UNIQUE (key_name, event_id))""",
)
# Schema 1 (event_id unique across all writers, no key_name and no verified flag) is rebuilt into schema 2 on the
# first open for writing: SQLite cannot change a UNIQUE constraint in place. Its rows keep their seq, belong to the
# "" writer, and are unverified: nobody checked them.
MIGRATE_FROM_1 = ("ALTER TABLE events RENAME TO events_v1",) + SCHEMA + (
    "INSERT INTO events (seq, key_name, event_id, user_id, item_id, timestamp, received, verified) "
    "SELECT seq, '', event_id, user_id, item_id, timestamp, received, 0 FROM events_v1",
    # the old counter, not max(seq): seq numbers are never reused
    "DELETE FROM sqlite_sequence WHERE name = 'events'",
    "UPDATE sqlite_sequence SET name = 'events' WHERE name = 'events_v1'",
    "DROP TABLE events_v1",
)
# schema 3 added the rollout records; created on every open for writing, so that a schema-2 store gains them
ROLLOUTS = """CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    version TEXT NOT NULL,
    published REAL NOT NULL)"""
# schema 4: the pair index (a writer's pair is looked up on every append, and compaction finds earlier copies
# by it: SQLite keeps the rowid, seq, in the index) and the repeats' ids; created on every open for writing
PAIRS = (
    "DROP INDEX IF EXISTS events_content",
    "CREATE INDEX IF NOT EXISTS events_pair ON events (key_name, user_id, item_id, verified)",
    """CREATE TABLE IF NOT EXISTS repeats (
        key_name TEXT NOT NULL,
        event_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        item_id TEXT NOT NULL,
        timestamp REAL NOT NULL,
        received REAL NOT NULL,
        PRIMARY KEY (key_name, event_id))""",
    "CREATE INDEX IF NOT EXISTS repeats_received ON repeats (received)",
)
CONFLICTS_LISTED = 10
COMPACT_PAGE = 10_000   # seq numbers per compaction transaction: appends wait for one page, never for the whole log
# between two pages the append lock is left free this long: longer than SQLite's longest busy-wait step (100 ms), so
# that an append waiting for the lock gets it before the next page does
COMPACT_PAUSE_S = 0.15

# The statements both backends run, with SQLite's "?" placeholders (the PostgreSQL store turns them into "%s").
INSERT_EVENT = ("INSERT INTO events (key_name, event_id, user_id, item_id, timestamp, received, verified) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)")
INSERT_ROLLOUT = "INSERT INTO rollouts (path, version, published) VALUES (?, ?, ?)"
SELECT_EVENTS = ("SELECT seq, user_id, item_id, timestamp, event_id, {verified}, received FROM events "
                 "WHERE seq > ? ORDER BY seq LIMIT ?")
INSERT_REPEAT = ("INSERT INTO repeats (key_name, event_id, user_id, item_id, timestamp, received) "
                 "VALUES (?, ?, ?, ?, ?, ?)")
SELECT_ID = ("SELECT user_id, item_id, timestamp FROM events WHERE key_name = ? AND event_id = ? UNION ALL "
             "SELECT user_id, item_id, timestamp FROM repeats WHERE key_name = ? AND event_id = ?")
SELECT_PAIR = "SELECT 1 FROM events WHERE key_name = ? AND user_id = ? AND item_id = ? AND verified = ? LIMIT 1"
# compaction, per page of seq numbers (lo, hi]: an event is a repeat when an earlier one has its writer, pair and flag
REPEATED = ("seq > ? AND seq <= ? AND EXISTS (SELECT 1 FROM events f WHERE f.key_name = events.key_name AND "
            "f.user_id = events.user_id AND f.item_id = events.item_id AND f.verified = events.verified AND "
            "f.seq < events.seq)")
KEEP_REPEAT_IDS = ("INSERT INTO repeats (key_name, event_id, user_id, item_id, timestamp, received) "
                   "SELECT key_name, event_id, user_id, item_id, timestamp, received FROM events "
                   f"WHERE event_id IS NOT NULL AND received >= ? AND {REPEATED} ON CONFLICT DO NOTHING")
DROP_REPEATS = f"DELETE FROM events WHERE {REPEATED}"
FORGET_IDS = "DELETE FROM repeats WHERE received < ?"

T = TypeVar("T")
Row = tuple  # (key_name, event_id, user_id, item_id, timestamp, received, verified): INSERT_EVENT's parameters
Pair = tuple  # (user_id, item_id, verified)


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    timestamp: float | None       # None on append: not sent by the client (the time received is stored)
    event_id: str | None = None
    verified: bool = True
    received: float | None = None  # when the store received it (filled on read; ignored on append)


@dataclass(frozen=True)
class Rollout:
    """A checkpoint published to every serving process; the newest (highest id) is the active one."""
    id: int
    path: str
    version: str
    published: float


@dataclass(frozen=True)
class Compaction:
    """What `compact` did: the log's events before and after, the repeats it moved out of the log, of which
    `ids_kept` keep their event id, and the recorded repeat ids it forgot (received before the retention age)."""
    events_before: int
    events_after: int
    moved: int
    ids_kept: int
    ids_forgotten: int


class EventIdConflict(ValueError):
    """Event ids already used by the same writer for another payload; nothing of the append was stored."""

    def __init__(self, ids: list[str]):
        listed = ", ".join(ids[:CONFLICTS_LISTED]) + (f" and {len(ids) - CONFLICTS_LISTED} more"
                                                      if len(ids) > CONFLICTS_LISTED else "")
        super().__init__(f"event ids already used for another event: {listed}")
        self.ids = ids


class StoreUnavailable(RuntimeError):
    """The store could not be reached, or could not make a write durable (disk full, read-only file or directory,
    I/O error, database server down); nothing of the write was stored. Its message is shown to clients (the 503,
    /health); `detail` (addresses, the driver's own words) is for the server log."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail or message


def reason(e: BaseException) -> str:
    # an OSError's str() names the file; the reason is shown on /health, which needs no key
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def masked(url: str) -> str:
    """`url` with its password (in the authority or a `password=` parameter) replaced by ***: safe to log or show."""
    parts = urlsplit(url)
    if parts.password is None and "password" not in parts.query:
        return url      # as it is: urlunsplit would also drop the empty authority of sqlite:////abs/path
    netloc, query = parts.netloc, parts.query
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    query = urlencode([(k, "***" if k == "password" else v) for k, v in parse_qsl(query, keep_blank_values=True)])
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def plan_append(events: list[Event], writer: str, now: float, stored: dict[str, tuple],
                pairs: set[Pair]) -> tuple[list[Row], list[int], list[Row], list[int], list[str]]:
    """What an append stores, given what the store holds: `stored` maps the writer's used event ids (among the
    events') to their (user_id, item_id, timestamp), `pairs` holds the (user_id, item_id, verified) the writer has
    in the log (among the events'). Returns the rows to insert, for each the index of its event, the repeats' ids
    to record (INSERT_REPEAT's parameters), for each the index of its event, and the conflicting ids.

    Events earlier in the same append count as stored: a repeated id is a duplicate (or a conflict), a repeated
    pair a repeat."""
    stored, pairs = dict(stored), set(pairs)
    rows: list[Row] = []
    slots: list[int] = []
    repeats: list[Row] = []
    repeat_slots: list[int] = []
    conflicts: list[str] = []
    for n, e in enumerate(events):
        if e.event_id is not None:
            if (old := stored.get(e.event_id)) is not None:
                # the timestamp is part of the payload only when the client sent one (a retry that leaves it out
                # is the same event)
                if old[:2] != (e.user_id, e.item_id) or (e.timestamp is not None and old[2] != e.timestamp):
                    conflicts.append(e.event_id)
                continue
        timestamp = now if e.timestamp is None else e.timestamp
        if e.event_id is not None:
            stored[e.event_id] = (e.user_id, e.item_id, timestamp)
        pair = (e.user_id, e.item_id, bool(e.verified))
        if pair in pairs:
            if e.event_id is not None:
                repeats.append((writer, e.event_id, e.user_id, e.item_id, timestamp, now))
                repeat_slots.append(n)
            continue
        pairs.add(pair)
        rows.append((writer, e.event_id, e.user_id, e.item_id, timestamp, now, bool(e.verified)))
        slots.append(n)
    return rows, slots, repeats, repeat_slots, conflicts


class FeedbackStore(ABC):
    """What the server and training use of a store; `open_store(url)` gives the backend the URL names.

    Every method raises StoreUnavailable when the store cannot be reached or written (never a driver's own error);
    `fault` says why the last write failed and is cleared by the next one that succeeds."""

    url: str                 # where the store is, any password masked
    readonly: bool
    fault: str | None        # why the store cannot be written now; None: writable
    NO_LIMIT: Any            # the LIMIT parameter that means "all rows"

    # ------------------------------------------------------------------ what a backend provides

    @abstractmethod
    def _write(self, work: Callable[[Any, float], T]) -> T:
        """work(connection, now) in one write transaction that holds the store's append lock (commits in seq
        order), `now` the store's clock; sets or clears `fault`."""

    @abstractmethod
    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """The rows of one read (SQLite placeholders)."""

    @abstractmethod
    def _stored_ids(self, conn, writer: str, ids: list[str]) -> dict[str, tuple]:
        """event id → (user_id, item_id, timestamp) of those of `ids` the writer has used."""

    @abstractmethod
    def _stored_pairs(self, conn, writer: str, pairs: list[Pair]) -> set[Pair]:
        """Those of `pairs` the writer has in the log."""

    @abstractmethod
    def _insert(self, conn, sql: str, rows: list[tuple]) -> list[int]:
        """Run INSERT_EVENT or INSERT_ROLLOUT for each row, in order; the new ids (seq or rollout id)."""

    @abstractmethod
    def _execute_many(self, conn, sql: str, rows: list[tuple]) -> None:
        """Run one statement (SQLite placeholders) once per row, inside a `_write`."""

    @abstractmethod
    def _execute(self, conn, sql: str, params: tuple = ()) -> int:
        """Run one statement (SQLite placeholders) inside a `_write`; the number of rows it changed."""

    @abstractmethod
    def bulk_append(self, events: Iterable[Event], writer: str = "") -> int:
        """Store events in one transaction without the duplicate and conflict checks of `append` (a reused id
        fails the whole load with ValueError): for filling a store fast (benchmarks, migrations). Returns how many
        were stored."""

    @abstractmethod
    def close(self) -> None: ...

    # ------------------------------------------------------------------ writes

    def append(self, events: list[Event], writer: str = "",
               clicks: list[tuple[str, int | None] | None] | None = None) -> list[int | None]:
        """Store events durably, all or none; returns, per event, its seq, or None for a duplicate (a retried id)
        or a repeat (a pair the writer has stored: its id is recorded, the log unchanged). `clicks`: per event, the
        (impression id, position) it answers, or None; each event stored in the log that names one is recorded in
        `impression_clicks` in the same transaction (model/store/impressions.py), and so is a repeat with an event
        id (a click again on a pair stored before: no seq, but a click); a duplicate is not.

        Raises EventIdConflict (a used id with another payload) or StoreUnavailable (the write failed); either
        way nothing was stored."""
        def work(conn, now: float) -> list[int | None]:
            ids = list({e.event_id for e in events if e.event_id is not None})
            stored = self._stored_ids(conn, writer, ids) if ids else {}
            pairs = list({(e.user_id, e.item_id, bool(e.verified)) for e in events})
            pairs = self._stored_pairs(conn, writer, pairs) if pairs else set()
            rows, slots, repeats, repeat_slots, conflicts = plan_append(events, writer, now, stored, pairs)
            if conflicts:
                raise EventIdConflict(conflicts)
            if repeats:
                self._execute_many(conn, INSERT_REPEAT, repeats)
            seqs: list[int | None] = [None] * len(events)
            for slot, seq in zip(slots, self._insert(conn, INSERT_EVENT, rows) if rows else []):
                seqs[slot] = seq
            if clicks:   # a repeat with an id of its own is a new click on a pair the log has; a retry is none
                clicked = [n for n, seq in enumerate(seqs) if seq is not None] + repeat_slots
                linked = [(seqs[n], *clicks[n], events[n]) for n in clicked if clicks[n] is not None]
                self._execute_many(conn, INSERT_CLICK, [(seq, impression, e.user_id, e.item_id, position, now)
                                                        for seq, impression, position, e in linked])
            return seqs
        return self._write(work)

    def compact(self, forget_ids_before: float | None = None,
                progress: Callable[[int], None] = lambda seqs: None) -> Compaction:
        """Move the repeats out of the log: every event whose writer stored its (user, item, verified) at a lower
        seq, except the last event (the store's last seq never goes back), a page of COMPACT_PAGE seq numbers per
        transaction, the append lock left free between pages. Their ids are recorded as appends record a repeat's,
        unless received before `forget_ids_before` (a time.time()); recorded ids received before it are forgotten.
        `progress(n)`: n more seq numbers done.

        What the log replays is unchanged (a repeat changes nothing: model/store/events.py), so a process starting
        after it reaches the state of one that applied every event. Appends, readers and followers carry on
        meanwhile: each page holds the append lock for one transaction, and a follower past a removed repeat only
        misses a no-op."""
        cutoff = float("-inf") if forget_ids_before is None else forget_ids_before
        last, before = self.last_seq(), self.count()
        moved = kept = 0
        for lo in range(0, last, COMPACT_PAGE):
            hi = min(lo + COMPACT_PAGE, last - 1)
            def page(conn, now: float) -> tuple[int, int]:
                return (self._execute(conn, KEEP_REPEAT_IDS, (cutoff, lo, hi)),
                        self._execute(conn, DROP_REPEATS, (lo, hi)))
            if lo < hi:
                ids, dropped = self._write(page)
                kept, moved = kept + ids, moved + dropped
                time.sleep(COMPACT_PAUSE_S)
            progress(min(lo + COMPACT_PAGE, last) - lo)
        forgotten = self._write(lambda conn, now: self._execute(conn, FORGET_IDS, (cutoff,))) \
            if forget_ids_before is not None else 0
        return Compaction(before, self.count(), moved, kept, forgotten)

    def publish_checkpoint(self, path: str, version: str) -> int:
        """Record `path` (at `version`) as the checkpoint every serving process should run; returns its id."""
        return self._write(lambda conn, now: self._insert(conn, INSERT_ROLLOUT, [(path, version, now)])[0])

    # ------------------------------------------------------------------ impressions, experiment arms

    def record_impressions(self, impressions: list[Impression]) -> None:
        """Store shown lists (one transaction); an impression id already stored is left as it is."""
        rows = [i.row() for i in impressions]
        self._write(lambda conn, now: self._execute_many(conn, INSERT_IMPRESSION, rows))

    def prune_impressions(self, before: float, keep: int) -> int:
        """The retention: remove impressions shown before `before` and all but the newest `keep`, and the clicks
        older than every impression left (none of those can join one); returns how many impressions went."""
        def work(conn, now: float) -> int:
            n = self._execute(conn, "DELETE FROM impressions WHERE shown < ? OR "
                                    "seq <= (SELECT MAX(seq) FROM impressions) - ?", (before, keep))
            self._execute(conn, "DELETE FROM impression_clicks WHERE received < "
                                "COALESCE((SELECT MIN(shown) FROM impressions), ?)", (before,))
            return n
        return self._write(work)

    def impressions(self, since: float = 0.0) -> list[Impression]:
        """The impressions shown at or after `since` (unix seconds), in the order they were stored."""
        return [Impression.of(r) for r in self._query(SELECT_IMPRESSIONS, (since,))]

    def impressions_by_id(self, ids: list[str]) -> dict[str, Impression]:
        if not ids:
            return {}
        rows = self._query(SELECT_IMPRESSIONS.replace("shown >= ?", f"impression_id IN ({', '.join('?' * len(ids))})"),
                           tuple(ids))
        return {r[0]: Impression.of(r) for r in rows}

    def clicks(self, since: float = 0.0) -> list[Click]:
        """The stored events that named an impression shown at or after `since`, in seq order."""
        return [Click(*r) for r in self._query(SELECT_CLICKS, (since,))]

    def impression_count(self) -> int:
        return self._query("SELECT COUNT(*) FROM impressions")[0][0]

    def click_count(self) -> int:
        return self._query("SELECT COUNT(*) FROM impression_clicks")[0][0]

    def set_arm(self, experiment: str, arm: str, stopped: bool) -> None:
        """Stop (or resume) an experiment's arm for every process sharing the store."""
        self._write(lambda conn, now: self._execute(conn, SET_ARM, (experiment, arm, stopped, now)))

    def arm_states(self, experiment: str) -> dict[str, bool]:
        """arm → stopped, for the arms of `experiment` an operator stopped or resumed."""
        rows = self._query("SELECT arm, stopped FROM arm_states WHERE experiment = ?", (experiment,))
        return {arm: bool(stopped) for arm, stopped in rows}

    # ------------------------------------------------------------------ reads

    def events(self, after: int = 0, limit: int | None = None) -> list[tuple[int, Event]]:
        """(seq, event) in seq order, those with seq > `after`; at most `limit` of them."""
        rows = self._query(SELECT_EVENTS.format(verified=self._verified_column()),
                           (after, self.NO_LIMIT if limit is None else limit))
        return [(r[0], Event(r[1], r[2], r[3], r[4], bool(r[5]), r[6])) for r in rows]

    def _verified_column(self) -> str:
        return "verified"

    def last_seq(self) -> int:
        """The highest seq stored; 0 when the store is empty."""
        return self._query("SELECT COALESCE(MAX(seq), 0) FROM events")[0][0]

    def count(self) -> int:
        """The events in the log (repeats are not)."""
        return self._query("SELECT COUNT(*) FROM events")[0][0]

    def repeat_ids(self) -> int:
        """The repeats' event ids recorded (what `compact` forgets past a retention age)."""
        return self._query("SELECT COUNT(*) FROM repeats")[0][0]

    def repeats(self) -> list[Event]:
        """The repeats whose ids are recorded, oldest first: acknowledged events that are not in the log."""
        rows = self._query("SELECT user_id, item_id, timestamp, event_id, received FROM repeats ORDER BY received")
        return [Event(r[0], r[1], r[2], r[3], received=r[4]) for r in rows]

    def ping(self) -> None:
        """Returns when the store can be read; raises StoreUnavailable otherwise."""
        self._query("SELECT 1 FROM events LIMIT 1")

    def active_checkpoint(self) -> Rollout | None:
        """The newest published checkpoint; None before any."""
        rows = self.rollouts(limit=1)
        return rows[0] if rows else None

    def rollouts(self, limit: int | None = None) -> list[Rollout]:
        """The published checkpoints, newest first (a rollback publishes an older one again, as a new record)."""
        rows = self._query("SELECT id, path, version, published FROM rollouts ORDER BY id DESC LIMIT ?",
                           (self.NO_LIMIT if limit is None else limit,))
        return [Rollout(*r) for r in rows]


class FeedbackLog(FeedbackStore):
    """The SQLite store: one file, which one process at a time writes (others wait for its lock)."""

    NO_LIMIT = -1

    def __init__(self, path: str, readonly: bool = False):
        self.path, self.readonly = path, readonly
        self.url = "sqlite:///" + path   # sqlite:////abs/path for an absolute one
        self.fault = None
        self._lock = threading.Lock()
        if readonly:
            if not os.path.exists(path):
                raise FileNotFoundError(f"feedback store not found: {path}")
            self._db = self._reader()
        else:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            except OSError:
                pass  # a directory that cannot be made is a store that cannot be written: `_open` says why
            self._open()

    # ------------------------------------------------------------------ opening, schema

    def _open(self) -> None:
        """Connect and bring the schema up to date. A store that cannot be written (read-only file or directory,
        full disk) is still served for reading, with `fault` saying why; the next write reopens it."""
        self.fault, db = None, None
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            columns = self._columns(db=db)
            statements = SCHEMA if not columns else MIGRATE_FROM_1 if "key_name" not in columns else ()
            db.execute("BEGIN IMMEDIATE")
            for statement in statements + (ROLLOUTS,) + PAIRS + TABLES["sqlite"]:
                db.execute(statement)
            # written on every open: a write that must commit, so a store that cannot be written is known at once
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except (sqlite3.Error, OSError) as e:
            if db is not None:
                self._rollback(db)
            self.fault = reason(e)
            if db is None or not self._readable(db):
                if db is not None:
                    db.close()
                db = self._reader() if os.path.exists(self.path) else self._empty()
        self._db = db

    def _reader(self) -> sqlite3.Connection:
        """A read-only connection. In a directory nobody may write, SQLite cannot make the WAL's shared-memory
        file: the store is then read as it is on disk (immutable), which is what it stays while nobody may write
        there."""
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        if self._readable(db):
            return db
        db.close()
        return sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1", uri=True, check_same_thread=False)

    @staticmethod
    def _readable(db: sqlite3.Connection) -> bool:
        try:
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return True
        except sqlite3.Error:
            return False

    @staticmethod
    def _empty() -> sqlite3.Connection:
        """What a store that could not be created reads as: no events, no rollouts."""
        db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        for statement in SCHEMA + (ROLLOUTS,) + PAIRS + TABLES["sqlite"]:
            db.execute(statement)
        return db

    def _columns(self, table: str = "events", db: sqlite3.Connection | None = None) -> set[str]:
        return {row[1] for row in (db or self._db).execute(f"PRAGMA table_info({table})")}

    def _rollback(self, db: sqlite3.Connection | None = None) -> None:
        db = db or self._db
        try:
            if db.in_transaction:  # SQLite rolls back by itself after some errors (SQLITE_FULL, I/O errors)
                db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the error that made us roll back is the one to report; the next write starts with a reopen

    # ------------------------------------------------------------------ the backend

    def _write(self, work):
        with self._lock:
            try:
                if self.fault and not self.readonly:
                    # reopened, so that a freed disk or a file made writable again is picked up without a restart
                    # (a connection SQLite opened read-only stays read-only); the old one serves reads until then
                    stale = self._db
                    self._open()
                    stale.close()
                    if self.fault:
                        raise StoreUnavailable(self.fault)
                # IMMEDIATE: the write lock first, so that seq order is commit order across processes
                self._db.execute("BEGIN IMMEDIATE")
                result = work(self._db, time.time())
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError as e:   # a reused id in bulk_append: the store itself is fine
                self._rollback()
                raise ValueError(reason(e)) from e
            except (sqlite3.Error, OSError) as e:
                self._rollback()
                self.fault = reason(e)
                raise StoreUnavailable(self.fault) from e
            except BaseException:
                self._rollback()
                raise
        return result

    def _query(self, sql, params=()):
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except (sqlite3.Error, OSError) as e:
                raise StoreUnavailable(reason(e)) from e

    def _stored_ids(self, conn, writer, ids):
        found = {i: conn.execute(SELECT_ID, (writer, i, writer, i)).fetchone() for i in ids}
        return {i: row for i, row in found.items() if row is not None}

    def _stored_pairs(self, conn, writer, pairs):
        return {p for p in pairs if conn.execute(SELECT_PAIR, (writer, *p)).fetchone()}

    def _insert(self, conn, sql, rows):
        return [conn.execute(sql, row).lastrowid for row in rows]

    def _execute_many(self, conn, sql, rows):
        conn.executemany(sql, rows)

    def _execute(self, conn, sql, params=()):
        return conn.execute(sql, params).rowcount

    def _verified_column(self) -> str:
        # a store of schema 1 (opened read-only, or not yet migrated) has no verified column: its events count as
        # unverified
        with self._lock:
            return "verified" if "verified" in self._columns() else "0"

    def active_checkpoint(self) -> Rollout | None:
        if self.readonly:  # a store written before schema 3, opened read-only, has no rollouts table
            with self._lock:
                if not self._columns("rollouts"):
                    return None
        return super().active_checkpoint()

    def bulk_append(self, events: Iterable[Event], writer: str = "") -> int:
        def work(conn, now: float) -> int:
            before = conn.total_changes
            conn.executemany(INSERT_EVENT, ((writer, e.event_id, e.user_id, e.item_id,
                                             now if e.timestamp is None else e.timestamp, now, bool(e.verified))
                                            for e in events))
            return conn.total_changes - before
        return self._write(work)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_store(url: str, readonly: bool = False) -> FeedbackStore:
    """The store at `url`: sqlite:///relative/path, sqlite:////absolute/path, a bare file path (SQLite), or
    postgresql://user:password@host:port/database (also postgres://...).

    Opened for writing, a store is created when missing; a PostgreSQL server that cannot be reached yet is not an
    error (`fault` says why, and the store connects when the server answers). Read-only, a missing or unreachable
    store is: FileNotFoundError or StoreUnavailable."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return FeedbackLog(url, readonly)
    if scheme == "sqlite":
        if not rest.startswith("/") or len(rest) < 2:
            raise ValueError(f"feedback store URL {url!r}: use sqlite:///relative/path or sqlite:////absolute/path")
        return FeedbackLog(rest[1:], readonly)
    if scheme in ("postgresql", "postgres"):
        try:
            from model.store.events_pg import PostgresFeedbackStore
        except ImportError as e:  # the driver is the `pg` extra: a training-only install need not have it
            raise ImportError(f"feedback store URL {masked(url)!r} needs psycopg, which is not installed ({e}): "
                              "pip install 'cmn-service[pg]' (the serve and dev extras include it)") from None
        return PostgresFeedbackStore(url, readonly)
    raise ValueError(f"feedback store URL {masked(url)!r}: unknown scheme {scheme!r} (use sqlite:///PATH, "
                     "postgresql://... or a file path)")
