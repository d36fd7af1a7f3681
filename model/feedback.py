"""The feedback log: durable interaction events shared by the server (writes) and training (reads).

SQLite in WAL mode with synchronous=FULL: an event is on disk before `append` returns, so a server
killed with SIGKILL loses nothing it acknowledged. A client-supplied `event_id` makes appends idempotent.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT UNIQUE,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    timestamp REAL NOT NULL,
    received REAL NOT NULL
)
"""


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    timestamp: float
    event_id: str | None = None


class FeedbackLog:
    def __init__(self, path: str, readonly: bool = False):
        self.path = path
        if readonly:
            if not os.path.exists(path):
                raise FileNotFoundError(f"feedback store not found: {path}")
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(SCHEMA)
        self._lock = threading.Lock()

    def append(self, events: list[Event]) -> list[bool]:
        """Store events durably; returns, per event, whether it is new (False: its event_id was seen before)."""
        now = time.time()
        new = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for e in events:
                    cur = self._db.execute(
                        "INSERT OR IGNORE INTO events (event_id, user_id, item_id, timestamp, received) "
                        "VALUES (?, ?, ?, ?, ?)", (e.event_id, e.user_id, e.item_id, e.timestamp, now))
                    new.append(cur.rowcount == 1)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return new

    def events(self, after: int = 0) -> list[tuple[int, Event]]:
        """(seq, event) in arrival order, those with seq > `after` (seq only grows)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, user_id, item_id, timestamp, event_id FROM events WHERE seq > ? "
                                    "ORDER BY seq", (after,)).fetchall()
        return [(r[0], Event(*r[1:])) for r in rows]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
