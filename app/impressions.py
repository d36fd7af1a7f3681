"""Impressions: what this process showed, recorded off the request path, and the clicks that answer them.

Every answer gets an impression id. A sampled one (CMN_IMPRESSION_SAMPLE) is appended to an in-memory buffer -
all a request pays - and `follow` writes the buffer to the feedback store every CMN_IMPRESSION_FLUSH_S in one
transaction on an I/O thread, so no request waits for a database write. The buffer is bounded
(CMN_IMPRESSION_BUFFER): while the store cannot be written the oldest waiting impressions are dropped and
counted, rather than the server growing without bound. What a process has not flushed when it is killed with
SIGKILL is lost (a graceful stop flushes it): impressions are statistics, not acknowledged writes.

The store keeps impressions for CMN_IMPRESSION_RETENTION_DAYS and at most CMN_IMPRESSION_MAX_ROWS of them; every
process prunes every PRUNE_EVERY_S.

A feedback event that names an impression joins it when the impression holds the event's user and item
(`joined_position`); /metrics counts the joined clicks per strategy, model version and arm at once (from this
process's recent impressions, else the store), and `python -m training online-report` joins the store's tables.
"""
from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections import OrderedDict, deque
from concurrent.futures import Executor

from app import metrics
from app.batcher import run_on
from app.settings import Settings
from model.store.events import FeedbackStore, StoreUnavailable
from model.store.impressions import Impression, joined_position

log = logging.getLogger("cmn.service")

PRUNE_EVERY_S = 60.0
RECENT = 20_000          # impressions remembered to label the clicks on them without reading the store
ID_BYTES = 12            # 16 URL-safe characters, 96 random bits: unique across processes without coordination


def new_id() -> str:
    return secrets.token_urlsafe(ID_BYTES)


def labels(impression: Impression) -> tuple[str, str, str]:
    return impression.strategy, impression.model_version, impression.arm or "none"


class Impressions:
    def __init__(self, settings: Settings, store: FeedbackStore, io_threads: Executor):
        self.settings, self.store, self.io_threads = settings, store, io_threads
        self.pending: deque[Impression] = deque()
        self.recent: OrderedDict[str, Impression] = OrderedDict()
        self.fault: str | None = None
        self._pruned_at = 0.0
        self._lock = asyncio.Lock()

    def record(self, user_id: str | None, items: tuple[str, ...], strategy: str, version: str,
               arm: str | None) -> str:
        """The answer's impression id; the impression is buffered for the store when sampled. On the event loop:
        no I/O, no waiting."""
        impression_id = new_id()
        sample = self.settings.impression_sample
        if sample <= 0 or (sample < 1 and random.random() >= sample):
            return impression_id
        impression = Impression(impression_id, user_id, items, strategy, version, arm, time.time())
        if len(self.pending) >= self.settings.impression_buffer:
            self.pending.popleft()
            metrics.IMPRESSIONS_DROPPED.inc()
        self.pending.append(impression)
        self.recent[impression_id] = impression
        if len(self.recent) > RECENT:
            self.recent.popitem(last=False)
        metrics.IMPRESSIONS.labels(*labels(impression)).inc()
        return impression_id

    async def follow(self) -> None:
        while True:
            await asyncio.sleep(self.settings.impression_flush_s)
            try:
                await self.flush()
                if time.monotonic() - self._pruned_at >= PRUNE_EVERY_S:
                    await self.prune()
            except Exception:  # a writer that dies would silently stop recording
                log.exception("writing impressions failed", extra={"event": "impressions_failed"})

    async def flush(self) -> int:
        """Write what is buffered, in one transaction; kept for the next try when the store cannot be written."""
        async with self._lock:
            batch = list(self.pending)
            if not batch:
                return 0
            self.pending.clear()
            try:
                await run_on(self.io_threads, self.store.record_impressions, batch)
            except StoreUnavailable as e:
                # back in front of what arrived meanwhile, within the bound (the oldest go first)
                room = max(0, self.settings.impression_buffer - len(self.pending))
                kept = batch[len(batch) - room:] if room < len(batch) else batch
                metrics.IMPRESSIONS_DROPPED.inc(len(batch) - len(kept))
                self.pending.extendleft(reversed(kept))
                if self.fault is None:
                    log.error("impressions not written, kept in memory: %s", e.detail,
                              extra={"event": "impressions_unwritable"})
                self.fault = str(e)
                return 0
            if self.fault is not None:
                log.info("impressions written again", extra={"event": "impressions_writable"})
            self.fault = None
            return len(batch)

    async def prune(self) -> None:
        s = self.settings
        before = time.time() - s.impression_retention_days * 86400
        try:
            removed = await run_on(self.io_threads, self.store.prune_impressions, before, s.impression_max_rows)
        except StoreUnavailable:
            return  # retried at the next prune; the flush has reported the fault
        self._pruned_at = time.monotonic()
        if removed:
            log.info("pruned %d impressions", removed, extra={"event": "impressions_pruned", "removed": removed})

    def flush_now(self) -> None:
        """At shutdown, on the calling thread: what is still buffered goes to the store (or is lost with a log
        line when the store cannot be written)."""
        batch = list(self.pending)
        self.pending.clear()
        if not batch:
            return
        try:
            self.store.record_impressions(batch)
        except StoreUnavailable as e:
            log.error("%d impressions lost at shutdown: %s", len(batch), e.detail,
                      extra={"event": "impressions_lost"})

    async def count_clicks(self, clicks: list[tuple[str, str, str]]) -> int:
        """Count stored feedback events (impression id, user id, item id) in /metrics: joined to the impression
        they name (per its strategy, model version and arm), or unjoined. Returns how many are unjoined."""
        if not clicks:
            return 0
        found = {i: self.recent[i] for i, _, _ in clicks if i in self.recent}
        missing = sorted({i for i, _, _ in clicks} - found.keys())
        if missing:
            try:
                found.update(await run_on(self.io_threads, self.store.impressions_by_id, missing))
            except StoreUnavailable:
                pass  # the events are stored: only this count misses them (the report joins them later)
        unjoined = 0
        for impression_id, user_id, item_id in clicks:
            impression = found.get(impression_id)
            if impression is not None and joined_position(impression, user_id, item_id) is not None:
                metrics.ONLINE_CLICKS.labels(*labels(impression)).inc()
            else:
                unjoined += 1
        metrics.FEEDBACK_IMPRESSIONS.labels("joined").inc(len(clicks) - unjoined)
        metrics.FEEDBACK_IMPRESSIONS.labels("unjoined").inc(unjoined)
        return unjoined
