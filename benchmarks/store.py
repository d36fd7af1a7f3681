"""Feedback store throughput, SQLite against PostgreSQL in the same run; and `fill`, which writes N events fast.

    python -m benchmarks.store                               # PostgreSQL from CMN_TEST_POSTGRES_URL (else SQLite only)
    python -m benchmarks.store --postgres-url postgresql://user:pw@host/db --appends 2000 --events 200000
    python -m benchmarks.store fill URL N                    # N synthetic events into the store at URL

Measured on each backend, in a fresh store (SQLite: a file under --workdir; PostgreSQL: a scratch database
created with the URL's role, which needs CREATEDB, and dropped afterwards):
  append x1     --appends appends of one event each (with an event id): what one /feedback request costs
  append x100   --appends / 10 appends of 100 events each (with ids)
  append x100 no ids   the same without ids (all new pairs: each one looked up, as every event's pair is)
  fill          --events events by `fill` (one bulk transaction per chunk: COPY on PostgreSQL)
  read          all of them again in pages of --page (`events(after, limit)`, as catch-up and training read)
Every append is durable before it returns (SQLite synchronous=FULL, PostgreSQL synchronous_commit=on), so the
append rows measure the disk's flush as much as the store. Ratios are PostgreSQL over SQLite (> 1: PostgreSQL
is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from model.store.events import Event, masked, open_store
from tests.harness.postgres import ScratchDatabases

FILL_CHUNK = 100_000   # events per bulk transaction: bounded memory on both sides, any N


def synthetic_event(k: int) -> Event:
    """The k-th filler event: 10,000 users, 5,000 items, a distinct event id."""
    return Event(f"user-{k % 10_000}", f"item-{(k * 7919) % 5_000}", 1.6e9 + k, f"fill-{k}")


def fill(url: str, n: int, make: Callable[[int], Event] = synthetic_event, progress: bool = True) -> float:
    """Write events make(0) ... make(n - 1) into the store at `url` (created when missing) with `bulk_append`:
    COPY on PostgreSQL, executemany on SQLite, FILL_CHUNK events per transaction. Returns the seconds it took."""
    store = open_store(url)
    start = time.perf_counter()
    try:
        with tqdm(total=n, desc="fill", unit="event", disable=not progress, mininterval=1.0) as bar:
            for first in range(0, n, FILL_CHUNK):
                last = min(n, first + FILL_CHUNK)
                store.bulk_append(make(k) for k in range(first, last))
                bar.update(last - first)
    finally:
        store.close()
    return time.perf_counter() - start


@contextmanager
def scratch_store_urls(postgres_url: str | None, workdir: str) -> Iterator[dict[str, str]]:
    """backend → the URL of a fresh store for it."""
    databases = ScratchDatabases(postgres_url) if postgres_url else None
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        urls = {"sqlite": f"sqlite:///{Path(tmp).resolve() / 'feedback.sqlite3'}"}
        try:
            if databases:
                urls["postgresql"] = databases()
            yield urls
        finally:
            if databases:
                databases.drop()


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def measure(url: str, appends: int, events: int, page: int) -> dict[str, float]:
    """events/s of each row of the module's table, on the (empty) store at `url`."""
    out = {}
    store = open_store(url)
    try:
        for label, batches, size, ids in (("append x1", appends, 1, True),
                                          ("append x100", appends // 10, 100, True),
                                          ("append x100 no ids", appends // 10, 100, False)):
            start = time.perf_counter()
            for b in range(batches):
                store.append([Event(f"{label}-u{b}", f"i{k}", None, f"{label}-{b}-{k}" if ids else None)
                              for k in range(size)])
            out[label] = rate(batches * size, time.perf_counter() - start)
    finally:
        store.close()
    out["fill"] = rate(events, fill(url, events))
    store = open_store(url, readonly=True)
    try:
        start, last, read = time.perf_counter(), 0, 0
        with tqdm(total=store.count(), desc="read", unit="event", mininterval=1.0, leave=False) as bar:
            while rows := store.events(after=last, limit=page):
                last, read = rows[-1][0], read + len(rows)
                bar.update(len(rows))
        out["read"] = rate(read, time.perf_counter() - start)
    finally:
        store.close()
    return out


def main(argv=None) -> int:
    if argv is None:
        import sys
        argv = sys.argv[1:]
    if argv[:1] == ["fill"]:
        ap = argparse.ArgumentParser(prog="python -m benchmarks.store fill", description=fill.__doc__.split("\n")[0])
        ap.add_argument("url", help="the store: sqlite:///PATH, postgresql://... or a file path")
        ap.add_argument("n", type=int, help="how many events")
        args = ap.parse_args(argv[1:])
        seconds = fill(args.url, args.n)
        print(f"filled {masked(args.url)} with {args.n:,} events in {seconds:.1f} s "
              f"({rate(args.n, seconds):,.0f} events/s)")
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--postgres-url", default=os.environ.get("CMN_TEST_POSTGRES_URL"),
                    help="a PostgreSQL server (role with CREATEDB) to measure on; default $CMN_TEST_POSTGRES_URL")
    ap.add_argument("--appends", type=int, default=2000, help="appends of one event (a tenth of it of 100 events)")
    ap.add_argument("--events", type=int, default=200_000, help="events to fill and read back")
    ap.add_argument("--page", type=int, default=10_000, help="events per read")
    ap.add_argument("--workdir", default=tempfile.gettempdir(), help="where the SQLite store is written")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if not args.postgres_url:
        print("no --postgres-url (or CMN_TEST_POSTGRES_URL): SQLite only")
    results = {}
    with scratch_store_urls(args.postgres_url, args.workdir) as urls:
        for backend, url in urls.items():
            print(f"{backend}: {masked(url)}", flush=True)
            results[backend] = measure(url, args.appends, args.events, args.page)
    rows = list(results["sqlite"])
    print(f"\n{'events/s':<20}" + "".join(f"{b:>14}" for b in results) + ("   postgresql/sqlite" if len(results) > 1
                                                                          else ""))
    for row in rows:
        line = f"{row:<20}" + "".join(f"{results[b][row]:>14,.0f}" for b in results)
        if len(results) > 1:
            line += f"   {results['postgresql'][row] / results['sqlite'][row]:>17.2f}"
        print(line)
    print(f"(appends: {args.appends:,} of 1 event, {args.appends // 10:,} of 100; fill and read: {args.events:,} "
          f"events, pages of {args.page:,}; load average {os.getloadavg()[0]:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args) | {"postgres_url": None}, "events_per_s": results},
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
