"""Online feedback through the shared store: writing a request's events, and following what every process stored.

Every serving process (workers on one host, replicas on many) applies the events stored by any process, its own
included, in sequence order on its model thread (`sync`), polled every CMN_FEEDBACK_POLL_S (`follow`, which also
follows published checkpoints) and at once after its own writes, so all processes converge on the same state.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import Executor

from app import metrics
from app.auth import Auth, Caller
from app.batcher import run_on
from app.impressions import Impressions
from app.engine import CATCH_UP_PAGE
from app.models import Models, NotReady
from app.schemas import FeedbackEvent, FeedbackResponse, as_str
from app.settings import Settings
from model.store.events import Event, EventIdConflict, FeedbackStore, StoreUnavailable

log = logging.getLogger("cmn.service")


class NotCaughtUp(NotReady):
    """A request's after_seq is beyond what this process could read from the store (→ 503 + Retry-After)."""


FED_BACK_WINDOW = 5_000     # events read back for /dashboard's "most fed-back items"
FED_BACK_TTL_S = 5.0        # how long that count is reused: a page polling every second reads the store every 5 s


class Feedback:
    """The store as this process sees it: how many events it holds (`events`, kept here so /health never queries
    the store on the event loop), whether it can be read (`read_fault`) and written (`store.fault`), and when this
    process last read it to its end (`synced_at`)."""

    def __init__(self, settings: Settings, store: FeedbackStore, auth: Auth, models: Models, model_thread: Executor,
                 io_threads: Executor, impressions: Impressions):
        self.settings, self.store, self.auth, self.models = settings, store, auth, models
        self.impressions = impressions
        self.model_thread, self.io_threads = model_thread, io_threads
        self.events = 0
        self._counted_seq = 0                     # `events` counts every event up to this seq,
        self._own_seqs: set[int] = set()          # and these (stored by this process, not yet read back)
        self.read_fault: str | None = None        # why the last read of the store failed; None: it worked
        self.synced_at = time.time()
        self._lock = asyncio.Lock()
        self._fed_back = (-FED_BACK_TTL_S, {"items": [], "events": 0, "error": None})   # (counted at, the count)

    async def count(self) -> None:
        """What the store holds at start; a store that cannot be read is served anyway, and followed when back."""
        try:
            self.events = await run_on(self.io_threads, self.store.count)
            self._counted_seq = await run_on(self.io_threads, self.store.last_seq)
        except StoreUnavailable as e:
            self.read_fault = str(e)
            log.error("feedback store unreachable: %s", e.detail, extra={"event": "store_unreachable"})

    async def most_fed_back(self, top: int) -> dict:
        """The `top` items of the store's last FED_BACK_WINDOW events with their counts (/dashboard), recounted at
        most every FED_BACK_TTL_S."""
        at, value = self._fed_back
        engine = self.models.engine
        if engine is None or time.monotonic() - at < FED_BACK_TTL_S:
            return value
        after = max(0, engine.feedback_seq - FED_BACK_WINDOW)
        try:
            rows = await run_on(self.io_threads, self.store.events, after, FED_BACK_WINDOW)
        except StoreUnavailable as e:
            value = {**value, "error": str(e)}
        else:
            tally = Counter(e.item_id for _, e in rows)
            value = {"items": [[i, n] for i, n in tally.most_common(top)], "events": len(rows), "error": None}
        self._fed_back = (time.monotonic(), value)
        return value

    async def follow(self) -> None:
        """Poll the store: other processes' events, and checkpoints published for every process."""
        while True:
            await asyncio.sleep(self.settings.feedback_poll_s)
            metrics.LAG.set(time.time() - self.synced_at)
            metrics.STORE_UP.set(0 if self.read_fault or self.store.fault else 1)
            try:
                await self.sync()
                await self.models.follow_rollout()
            except Exception:  # a follower that dies would leave this process silently stale
                log.exception("following the feedback store failed", extra={"event": "follow_failed"})

    async def sync(self, until: int = 0) -> None:
        """Apply every event stored so far, by any process, in sequence order, on the model thread, to the served
        engine and to those of experiment arms (app/models.py `keep_arms`); at once when this process has applied
        `until` already. A failed read is recorded (health, metrics), not raised."""
        async with self._lock:
            served = self.models.engine
            if served is None or (until and served.feedback_seq >= until):
                return
            try:
                for engine in (served, *self.models.arm_engines.values()):
                    while True:
                        rows = await run_on(self.io_threads, self.store.events, engine.feedback_seq, CATCH_UP_PAGE)
                        if rows:
                            await run_on(self.model_thread, engine.apply_rows, rows)
                            if engine is served:
                                self._count(rows[-1][0], [seq for seq, _ in rows])
                        if len(rows) < CATCH_UP_PAGE:
                            break
            except StoreUnavailable as e:
                if self.read_fault is None:
                    log.error("feedback store unreachable: %s", e.detail, extra={"event": "store_unreachable"})
                self.read_fault = str(e)
                return
            if self.read_fault is not None:
                log.info("feedback store reachable again", extra={"event": "store_reachable"})
            self.read_fault, self.synced_at = None, time.time()

    def _count(self, last: int, seqs: list[int]) -> None:
        """Count newly read events, once: those this process stored were counted on writing."""
        self.events += sum(seq > self._counted_seq and seq not in self._own_seqs for seq in seqs)
        self._counted_seq = max(self._counted_seq, last)
        self._own_seqs = {seq for seq in self._own_seqs if seq > self._counted_seq}

    async def write(self, events: list[FeedbackEvent], caller: Caller) -> FeedbackResponse:
        """Store the events (durably, all or none) under the caller's key, then apply them through the store like
        every other process does. Raises NotReady until a model is loaded (ids cannot be verified before),
        HTTPException past the caller's quotas, EventIdConflict and StoreUnavailable (nothing stored)."""
        engine = self.models.engine_or_503()
        stored = []
        for e in events:
            user, item = as_str(e.user_id), as_str(e.item_id)
            # verified: the model knew the user and item, or creates them live (the training run folds those in)
            stored.append(Event(user, item, e.timestamp, e.event_id, verified=engine.accepts(user, item)))
        unknown = sum(not engine.knows(e.user_id, e.item_id) for e in stored)  # each may create a user or an item
        users = [e.user_id for e in stored]
        self.auth.charge_events(caller, len(stored), unknown, users)
        clicks = [None if e.impression_id is None else (e.impression_id, e.position) for e in events]
        fault = self.store.fault
        try:  # durable before we answer; events are unique per writer, the caller's key
            seqs = await run_on(self.io_threads, self.store.append, stored, caller.name, clicks)
        except (EventIdConflict, StoreUnavailable) as e:
            self.auth.refund_events(caller, len(stored), unknown, users)
            if isinstance(e, StoreUnavailable) and str(e) != fault:  # logged once per fault, not once per request
                log.error("feedback store not writable: %s", e.detail, extra={"event": "store_unwritable"})
            raise
        if fault:
            log.info("feedback store writable again", extra={"event": "store_writable"})
        new = [e for e, seq in zip(stored, seqs) if seq is not None]
        self.events += len(new)
        self._own_seqs.update(seq for seq in seqs if seq is not None and seq > self._counted_seq)
        duplicates = len(stored) - len(new)
        unjoined = await self.impressions.count_clicks([(e.impression_id, s.user_id, s.item_id)
                                                        for e, s, seq in zip(events, stored, seqs)
                                                        if seq is not None and e.impression_id is not None])
        note = None
        if new:
            last = max(seq for seq in seqs if seq is not None)
            await self.sync(until=last)
        engine = self.models.engine  # the one serving now: a reload may have swapped it meanwhile
        deferred = sum(not engine.knows(e.user_id, e.item_id) for e in new)
        applied = len(new) - deferred
        if new and engine.feedback_seq < last:
            applied, deferred, note = 0, 0, (f"stored durably, but this process cannot read the store back now "
                                             f"({self.read_fault}): the events take effect when it can")
        seq = last if new else engine.feedback_seq
        if deferred:
            note = (f"{deferred} events name users or items this process could not create live (CMN_MAX_LIVE_USERS "
                    "/ CMN_MAX_LIVE_ITEMS reached, or both new): they are stored, and the next training run folds "
                    "them in (those stored as unverified only with --feedback-unverified)")
        metrics.FEEDBACK.labels("applied").inc(applied)
        metrics.FEEDBACK.labels("deferred").inc(deferred)
        metrics.FEEDBACK.labels("duplicate").inc(duplicates)
        return FeedbackResponse(stored=len(new), duplicates=duplicates, applied=applied, deferred=deferred,
                                unjoined=unjoined, note=note, seq=seq)

    async def caught_up(self, seq: int | None) -> bool:
        """Whether this process has applied the store's events up to `seq`, reading them now if needed (False: the
        store holds no such seq yet). Raises NotCaughtUp when the store cannot be read."""
        engine = self.models.engine
        if seq is None or engine is None or engine.feedback_seq >= seq:
            return True
        await self.sync(until=seq)
        if self.models.engine.feedback_seq >= seq:
            return True
        if self.read_fault:
            raise NotCaughtUp(f"this process has applied the feedback store up to seq "
                              f"{self.models.engine.feedback_seq}, not {seq}: the store cannot be read now "
                              f"({self.read_fault})")
        return False
