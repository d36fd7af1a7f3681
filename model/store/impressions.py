"""What the service showed (impressions), which feedback events answer them (clicks), and the experiment arms an
operator stopped: the tables the feedback store keeps for online evaluation, on both backends.

- `impressions`: one row per recorded list: its id (the answer's `impression_id`), the user, the items in the order
  shown (position 1 first, a JSON array), the strategy, the model version, the experiment arm, the time shown.
  Written in batches off the request path (app/impressions.py); pruned by age and by count (`prune_impressions`).
- `impression_clicks`: one row per feedback event that named an impression and was not a retry, written in the same
  transaction as the event (`FeedbackStore.append(..., clicks=...)`), with the event's `seq` (none for a repeat: a
  pair the writer stored before is not logged again, but it is a click). Whether it joins the impression
  (the item was in the list, the user is the list's user) is decided when reading (`join`): an event may name an
  impression that was not sampled, is not flushed yet, or was pruned.
- `arm_states`: experiment arms stopped (or resumed) by /admin, which every process follows.

The statements are SQLite's ("?" placeholders); the PostgreSQL store rewrites them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

TABLES = {
    "sqlite": (
        """CREATE TABLE IF NOT EXISTS impressions (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            impression_id TEXT NOT NULL UNIQUE,
            user_id TEXT,
            items TEXT NOT NULL,
            strategy TEXT NOT NULL,
            model_version TEXT NOT NULL,
            arm TEXT,
            shown REAL NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS impressions_shown ON impressions (shown)",
        """CREATE TABLE IF NOT EXISTS impression_clicks (
            id INTEGER PRIMARY KEY,
            seq INTEGER,
            impression_id TEXT NOT NULL,
            user_id TEXT NOT NULL,
            item_id TEXT NOT NULL,
            position INTEGER,
            received REAL NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS impression_clicks_id ON impression_clicks (impression_id)",
        """CREATE TABLE IF NOT EXISTS arm_states (
            experiment TEXT NOT NULL,
            arm TEXT NOT NULL,
            stopped INTEGER NOT NULL,
            changed REAL NOT NULL,
            PRIMARY KEY (experiment, arm))""",
    ),
    "postgresql": (
        """CREATE TABLE IF NOT EXISTS impressions (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            impression_id TEXT NOT NULL UNIQUE,
            user_id TEXT,
            items TEXT NOT NULL,
            strategy TEXT NOT NULL,
            model_version TEXT NOT NULL,
            arm TEXT,
            shown DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS impressions_shown ON impressions (shown)",
        """CREATE TABLE IF NOT EXISTS impression_clicks (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            seq BIGINT,
            impression_id TEXT NOT NULL,
            user_id TEXT NOT NULL,
            item_id TEXT NOT NULL,
            position INTEGER,
            received DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS impression_clicks_id ON impression_clicks (impression_id)",
        """CREATE TABLE IF NOT EXISTS arm_states (
            experiment TEXT NOT NULL,
            arm TEXT NOT NULL,
            stopped BOOLEAN NOT NULL,
            changed DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (experiment, arm))""",
    ),
}

INSERT_IMPRESSION = ("INSERT INTO impressions (impression_id, user_id, items, strategy, model_version, arm, shown) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (impression_id) DO NOTHING")
INSERT_CLICK = ("INSERT INTO impression_clicks (seq, impression_id, user_id, item_id, position, received) "
                "VALUES (?, ?, ?, ?, ?, ?)")
SET_ARM = ("INSERT INTO arm_states (experiment, arm, stopped, changed) VALUES (?, ?, ?, ?) "
           "ON CONFLICT (experiment, arm) DO UPDATE SET stopped = excluded.stopped, changed = excluded.changed")
SELECT_IMPRESSIONS = ("SELECT impression_id, user_id, items, strategy, model_version, arm, shown FROM impressions "
                      "WHERE shown >= ? ORDER BY seq")
SELECT_CLICKS = ("SELECT c.impression_id, c.user_id, c.item_id, c.position, c.received FROM impression_clicks c "
                 "JOIN impressions i ON i.impression_id = c.impression_id WHERE i.shown >= ? ORDER BY c.id")


@dataclass(frozen=True)
class Impression:
    """A list as it was shown: `items` in order, position 1 first. `user_id` None: an anonymous session;
    `arm` None: outside any experiment."""
    impression_id: str
    user_id: str | None
    items: tuple[str, ...]
    strategy: str
    model_version: str
    arm: str | None
    shown: float

    def row(self) -> tuple:
        return (self.impression_id, self.user_id, json.dumps(self.items, separators=(",", ":")), self.strategy,
                self.model_version, self.arm, self.shown)

    @classmethod
    def of(cls, row: tuple) -> "Impression":
        return cls(row[0], row[1], tuple(json.loads(row[2])), row[3], row[4], row[5], row[6])


@dataclass(frozen=True)
class Click:
    """A stored feedback event that named an impression (`position`: as the client sent it, or None)."""
    impression_id: str
    user_id: str
    item_id: str
    position: int | None
    received: float


def joined_position(impression: Impression, user_id: str, item_id: str) -> int | None:
    """The position (1-based) at which the impression showed the item a feedback event names, or None when the
    event does not join it: another user's event, or an item the list did not hold. The position the client sent
    is not trusted for this: the list itself says where the item was."""
    if impression.user_id is not None and impression.user_id != user_id:
        return None
    try:
        return impression.items.index(item_id) + 1
    except ValueError:
        return None
