"""The feedback log: durable interaction events shared by the server (writes) and training (reads).

SQLite in WAL mode with synchronous=FULL: an event is on disk before `append` returns, so a server
killed with SIGKILL loses nothing it acknowledged. An `append` is one transaction: all of its events are stored,
or none (a reused event id with another payload, a full disk, a read-only file).

Event ids are unique per writer (`key`: the API key's name, "" when the server runs without auth): a retry with
the same id and payload is a duplicate, another payload under a used id is an `EventIdConflict`. Events without
an id are duplicates of an event with the same key, user and item received within the dedup window.

`verified` records whether the serving model knew the event's user and item when it was written; training folds
unverified events into new embedding rows only when asked to (`--feedback-unverified`).
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass

SCHEMA_VERSION = 2
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
    "CREATE INDEX events_content ON events (key_name, user_id, item_id, received)",
)
# Schema 1 (event_id unique across all writers, no key_name and no verified flag) is rebuilt into schema 2 on the
# first open for writing: SQLite cannot change a UNIQUE constraint in place. Its rows keep their seq, belong to the
# "" key, and are unverified: nobody checked them.
MIGRATE_FROM_1 = ("ALTER TABLE events RENAME TO events_v1",) + SCHEMA + (
    "INSERT INTO events (seq, key_name, event_id, user_id, item_id, timestamp, received, verified) "
    "SELECT seq, '', event_id, user_id, item_id, timestamp, received, 0 FROM events_v1",
    # the old counter, not max(seq): seq numbers are never reused
    "DELETE FROM sqlite_sequence WHERE name = 'events'",
    "UPDATE sqlite_sequence SET name = 'events' WHERE name = 'events_v1'",
    "DROP TABLE events_v1",
)
CONFLICTS_LISTED = 10


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    timestamp: float | None       # None on append: not sent by the client (the time received is stored)
    event_id: str | None = None
    verified: bool = True


class EventIdConflict(ValueError):
    """Event ids already used by the same key for another payload; nothing of the append was stored."""

    def __init__(self, ids: list[str]):
        listed = ", ".join(ids[:CONFLICTS_LISTED]) + (f" and {len(ids) - CONFLICTS_LISTED} more"
                                                      if len(ids) > CONFLICTS_LISTED else "")
        super().__init__(f"event ids already used for another event: {listed}")
        self.ids = ids


class StoreUnavailable(RuntimeError):
    """The store could not make a write durable (disk full, read-only file or directory, I/O error); nothing of
    the append was stored."""


def _reason(e: BaseException) -> str:
    # an OSError's str() names the file; the reason is shown on /health, which needs no key
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


class FeedbackLog:
    def __init__(self, path: str, readonly: bool = False):
        self.path, self.readonly = path, readonly
        self.fault: str | None = None     # why the store cannot be written now; None: writable
        self._lock = threading.Lock()
        if readonly:
            if not os.path.exists(path):
                raise FileNotFoundError(f"feedback store not found: {path}")
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._open()
            if self.fault and not self._columns():
                raise StoreUnavailable(f"cannot create the feedback store: {self.fault}")

    # ------------------------------------------------------------------ opening, schema

    def _open(self) -> None:
        """Connect and bring the schema up to date. A store that cannot be written (read-only file, full disk)
        still opens for reading, with `fault` saying why; the next `append` reopens it."""
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.fault = None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            columns = self._columns()
            statements = SCHEMA if not columns else MIGRATE_FROM_1 if "key_name" not in columns else ()
            self._db.execute("BEGIN IMMEDIATE")
            for statement in statements:
                self._db.execute(statement)
            # written on every open: a write that must commit, so a store that cannot be written is known at once
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except (sqlite3.Error, OSError) as e:
            self._rollback()
            self.fault = _reason(e)

    def _columns(self) -> set[str]:
        return {row[1] for row in self._db.execute("PRAGMA table_info(events)")}

    def _rollback(self) -> None:
        try:
            if self._db.in_transaction:  # SQLite rolls back by itself after some errors (SQLITE_FULL, I/O errors)
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the error that made us roll back is the one to report; the next append starts with a reopen

    # ------------------------------------------------------------------ writes

    def append(self, events: list[Event], key: str = "", dedup_window_s: float = 0.0) -> list[bool]:
        """Store events durably, all or none; returns, per event, whether it is new (False: a duplicate).

        Raises EventIdConflict (a used id with another payload) or StoreUnavailable (the write failed); either
        way nothing was stored."""
        now = time.time()
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
                self._db.execute("BEGIN IMMEDIATE")
                conflicts: list[str] = []
                new = [self._insert(e, key, now, dedup_window_s, conflicts) for e in events]
                if conflicts:
                    raise EventIdConflict(conflicts)
                self._db.execute("COMMIT")
            except (sqlite3.Error, OSError) as e:
                self._rollback()
                self.fault = _reason(e)
                raise StoreUnavailable(self.fault) from e
            except BaseException:
                self._rollback()
                raise
        return new

    def _insert(self, e: Event, key: str, now: float, dedup_window_s: float, conflicts: list[str]) -> bool:
        db = self._db
        if e.event_id is not None:
            row = db.execute("SELECT user_id, item_id, timestamp FROM events WHERE key_name = ? AND event_id = ?",
                             (key, e.event_id)).fetchone()
            if row is not None:
                # the timestamp is part of the payload only when the client sent one (a retry that leaves it out
                # is the same event)
                if row[:2] != (e.user_id, e.item_id) or (e.timestamp is not None and row[2] != e.timestamp):
                    conflicts.append(e.event_id)
                return False
        elif dedup_window_s > 0 and db.execute(
                "SELECT 1 FROM events WHERE key_name = ? AND user_id = ? AND item_id = ? AND received >= ? LIMIT 1",
                (key, e.user_id, e.item_id, now - dedup_window_s)).fetchone():
            return False
        db.execute("INSERT INTO events (key_name, event_id, user_id, item_id, timestamp, received, verified) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (key, e.event_id, e.user_id, e.item_id, now if e.timestamp is None else e.timestamp, now,
                    int(e.verified)))
        return True

    # ------------------------------------------------------------------ reads

    def events(self, after: int = 0, limit: int | None = None) -> list[tuple[int, Event]]:
        """(seq, event) in arrival order, those with seq > `after` (seq only grows); at most `limit` of them."""
        with self._lock:
            # a store of schema 1 opened read-only has no verified column: its events count as unverified
            verified = "verified" if "verified" in self._columns() else "0"
            rows = self._db.execute(f"SELECT seq, user_id, item_id, timestamp, event_id, {verified} FROM events "
                                    "WHERE seq > ? ORDER BY seq LIMIT ?",
                                    (after, -1 if limit is None else limit)).fetchall()
        return [(r[0], Event(r[1], r[2], r[3], r[4], bool(r[5]))) for r in rows]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
