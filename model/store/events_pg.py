"""The feedback store on PostgreSQL (psycopg 3 with a connection pool), for many serving processes and replicas.

Same promises as the SQLite store (model/store/events.py). What PostgreSQL needs on top:
- Total order. An identity column hands out seq at insert time, but transactions commit in any order: a reader
  that has seen seq 11 commit could miss seq 10 committing later. Every write transaction therefore takes one
  advisory lock first (held to its commit), so writes commit one after another, in seq order.
- Durability: `synchronous_commit` is set on for the store's connections, whatever the server's default.
- Outages: connecting and waiting for a pooled connection give up after CONNECT_TIMEOUT_S, so an unreachable
  server is a StoreUnavailable within seconds; the pool reconnects by itself when the server is back (pooled
  connections are checked before use, dead ones replaced).
- Followers may LISTEN on NOTIFY_CHANNEL: every append that stores events notifies it, on commit, with its
  highest seq.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterable, Iterator

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from model.store.events import INSERT_ROLLOUT, SCHEMA_VERSION, Event, FeedbackStore, StoreUnavailable, masked, reason
from model.store.impressions import TABLES

CONNECT_TIMEOUT_S = 2            # libpq's connect_timeout is whole seconds (and at least 2)
# how long a request waits for a connection while the last attempt to connect failed: an outage answers fast, and
# a server that is back is connected to by then (the pool keeps trying in the background)
OUTAGE_TIMEOUT_S = 0.25
# the longest a failing reconnection backs off before a request starts a fresh one: the lag of recovery
RECONNECT_TIMEOUT_S = 4.0
POOL_SIZE = 4
LOCK_WAIT_S = 5                  # the longest a write waits for the others' (each takes milliseconds)
STALLED_WRITER_S = 10            # a session idle that long inside a transaction is ended by the server
NOTIFY_CHANNEL = "cmn_feedback"
# what clients are told (a 503, the open /health): the server's address and the driver's words stay in the log
UNREACHABLE = "PostgreSQL unreachable"
# advisory lock keys (database-wide): b"CMN\0" for creating the schema, b"CMN\1" for writes
SCHEMA_LOCK, WRITE_LOCK = 0x434D4E00, 0x434D4E01

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS events (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        key_name TEXT NOT NULL DEFAULT '',
        event_id TEXT,
        user_id TEXT NOT NULL,
        item_id TEXT NOT NULL,
        timestamp DOUBLE PRECISION NOT NULL,
        received DOUBLE PRECISION NOT NULL,
        verified BOOLEAN NOT NULL DEFAULT false,
        UNIQUE (key_name, event_id))""",
    # schema 4: a writer's pair is looked up on every append, and compaction finds its earlier copies by it
    "DROP INDEX IF EXISTS events_content",
    "CREATE INDEX IF NOT EXISTS events_pair ON events (key_name, user_id, item_id, verified, seq)",
    """CREATE TABLE IF NOT EXISTS repeats (
        key_name TEXT NOT NULL,
        event_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        item_id TEXT NOT NULL,
        timestamp DOUBLE PRECISION NOT NULL,
        received DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (key_name, event_id))""",
    "CREATE INDEX IF NOT EXISTS repeats_received ON repeats (received)",
    """CREATE TABLE IF NOT EXISTS rollouts (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        path TEXT NOT NULL,
        version TEXT NOT NULL,
        published DOUBLE PRECISION NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
) + TABLES["postgresql"]
# INSERT_EVENT for all the rows of an append in one statement (the arrays: its parameters' columns)
INSERT_EVENTS = (
    "INSERT INTO events (key_name, event_id, user_id, item_id, timestamp, received, verified) "
    "SELECT k, e, u, i, t, r, v FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::float8[], "
    "%s::float8[], %s::bool[]) WITH ORDINALITY AS rows (k, e, u, i, t, r, v, n) ORDER BY n RETURNING seq")
COPY_EVENTS = "COPY events (key_name, event_id, user_id, item_id, timestamp, received, verified) FROM STDIN"


def pg(sql: str) -> str:
    """A statement written for SQLite ("?" placeholders) in psycopg's style."""
    return sql.replace("?", "%s")


class PostgresFeedbackStore(FeedbackStore):
    NO_LIMIT = None

    def __init__(self, url: str, readonly: bool = False, pool_size: int = POOL_SIZE):
        try:
            psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as e:
            raise ValueError(f"feedback store URL {masked(url)!r}: {reason(e)}") from None
        self.url, self.readonly, self.fault = masked(url), readonly, None
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._connect_error: str | None = None     # the last failed connection's error: more telling than a timeout
        store = self

        class Connection(psycopg.Connection):
            @classmethod
            def connect(cls, *args, **kwargs):
                try:
                    conn = super().connect(*args, **kwargs)
                except psycopg.Error as e:
                    store._connect_error = reason(e)
                    raise
                store._connect_error = None
                return conn

        # client_encoding: a database created SQL_ASCII (initdb without a UTF-8 locale) would hand text back as bytes
        kwargs = {"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S, "client_encoding": "utf8"}
        try:   # one connection of our own first: a refused one fails at once, with its reason (the pool's waits)
            Connection.connect(url, **kwargs).close()
        except psycopg.Error:
            if readonly:
                raise StoreUnavailable(UNREACHABLE, f"PostgreSQL at {self.url} unreachable: {self._connect_error}"
                                       ) from None
            # not an error for a writer: the pool connects (and creates the schema) when the server answers
            self.fault = UNREACHABLE
        self._pool = ConnectionPool(
            url, connection_class=Connection, min_size=1, max_size=pool_size, open=False, name="cmn-feedback",
            kwargs=kwargs, configure=self._configure, check=ConnectionPool.check_connection,
            timeout=CONNECT_TIMEOUT_S, reconnect_timeout=RECONNECT_TIMEOUT_S)
        self._pool.open(wait=False)
        if self.fault:
            return
        try:
            self._query("SELECT 1")        # connects, and creates the schema when writable
        except StoreUnavailable as e:
            if readonly:
                self._pool.close()
                raise
            self.fault = str(e)
            return
        if readonly and not self._query("SELECT to_regclass('events') IS NOT NULL")[0][0]:
            self._pool.close()
            raise FileNotFoundError(f"feedback store not found: {self.url} has no events table")

    def _configure(self, conn: psycopg.Connection) -> None:
        conn.execute("SET synchronous_commit TO on")
        # A writer that stops inside its transaction (a frozen or cut-off process) holds the write lock: the server
        # ends such a session, and the others stop waiting for the lock before a request would time out.
        conn.execute(f"SET idle_in_transaction_session_timeout TO '{STALLED_WRITER_S}s'")
        conn.execute(f"SET lock_timeout TO '{LOCK_WAIT_S}s'")
        if self.readonly:
            conn.execute("SET default_transaction_read_only TO on")

    def _ensure_schema(self, conn: psycopg.Connection) -> None:
        """Create the tables on the first connection of a writable store; the advisory lock keeps two processes
        starting together from racing on CREATE ... IF NOT EXISTS (which is not safe under concurrency)."""
        with self._schema_lock:
            if self._schema_ready:
                return
            if not self.readonly:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                    for statement in SCHEMA:
                        conn.execute(statement)
                    conn.execute("DELETE FROM schema_version")
                    conn.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION,))
            self._schema_ready = True

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection; any failure to reach or use the database is a StoreUnavailable."""
        try:
            with self._pool.connection(OUTAGE_TIMEOUT_S if self._connect_error else CONNECT_TIMEOUT_S) as conn:
                if not self._schema_ready:
                    self._ensure_schema(conn)
                yield conn
        except PoolTimeout as e:
            why = self._connect_error or reason(e)
            raise StoreUnavailable(UNREACHABLE, f"PostgreSQL at {self.url} unreachable: {why}") from e
        except psycopg.errors.IntegrityError as e:     # a reused id in bulk_append: the store itself is fine
            raise ValueError(reason(e)) from e
        except psycopg.Error as e:
            # no SQLSTATE, class 08 (connection) or 57P (server shutting down): the server is gone; else its code
            gone = e.sqlstate is None or e.sqlstate.startswith(("08", "57P"))
            public = UNREACHABLE if gone else f"PostgreSQL error {e.sqlstate} ({type(e).__name__})"
            raise StoreUnavailable(public, f"PostgreSQL at {self.url}: {reason(e)}") from e

    # ------------------------------------------------------------------ the backend

    def _write(self, work):
        try:
            with self._connection() as conn, conn.transaction():
                # the clock read once the lock is held: `received` grows with seq
                now = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8 "
                                   "FROM (SELECT pg_advisory_xact_lock(%s)) AS locked", (WRITE_LOCK,)).fetchone()[0]
                result = work(conn, now)
        except StoreUnavailable as e:
            self.fault = str(e)
            raise
        self.fault = None
        return result

    def _query(self, sql, params=()):
        with self._connection() as conn:
            rows = conn.execute(pg(sql), params).fetchall()
        if self.fault == UNREACHABLE:  # reached again: writes work too (a follower's reads notice it first)
            self.fault = None
        return rows

    # Whole-append statements, one round trip each. prepare=False: a prepared (generic) plan compares each row
    # with every element of the array (measured: 10 ms against 1.6 ms for 100 ids over 3,000 rows).
    def _stored_ids(self, conn, writer, ids):
        rows = conn.execute("SELECT event_id, user_id, item_id, timestamp FROM events "
                            "WHERE key_name = %s AND event_id = ANY(%s) UNION ALL "
                            "SELECT event_id, user_id, item_id, timestamp FROM repeats "
                            "WHERE key_name = %s AND event_id = ANY(%s)", (writer, ids, writer, ids),
                            prepare=False).fetchall()
        return {r[0]: r[1:] for r in rows}

    def _stored_pairs(self, conn, writer, pairs):
        users, items, verified = (list(column) for column in zip(*pairs))
        rows = conn.execute("SELECT DISTINCT e.user_id, e.item_id, e.verified FROM events e "
                            "JOIN unnest(%s::text[], %s::text[], %s::bool[]) AS p (user_id, item_id, verified) "
                            "ON e.user_id = p.user_id AND e.item_id = p.item_id AND e.verified = p.verified "
                            "WHERE e.key_name = %s", (users, items, verified, writer), prepare=False).fetchall()
        return set(rows)

    def _insert(self, conn, sql, rows):
        if sql == INSERT_ROLLOUT:
            return [conn.execute(pg(sql) + " RETURNING id", row).fetchone()[0] for row in rows]
        # seq is handed out in the order the SELECT yields the rows, so the sorted seqs are the rows' in order
        seqs = sorted(r[0] for r in conn.execute(INSERT_EVENTS, [list(column) for column in zip(*rows)]))
        conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(seqs[-1])))
        return seqs

    def _execute_many(self, conn, sql, rows):
        if rows:
            conn.cursor().executemany(pg(sql), rows)

    def _execute(self, conn, sql, params=()):
        return conn.execute(pg(sql), params).rowcount

    def bulk_append(self, events: Iterable[Event], writer: str = "") -> int:
        def work(conn, now: float) -> int:
            n = 0
            with conn.cursor().copy(COPY_EVENTS) as copy:
                for e in events:
                    copy.write_row((writer, e.event_id, e.user_id, e.item_id,
                                    now if e.timestamp is None else e.timestamp, now, bool(e.verified)))
                    n += 1
            if n:
                last = conn.execute("SELECT MAX(seq) FROM events").fetchone()[0]
                conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(last)))
            return n
        return self._write(work)

    def close(self) -> None:
        self._pool.close()
