"""The running service: the active Engine, its model thread and batcher, the shared feedback store, reloads.

Every serving process (workers on one host, replicas on many) follows the one feedback store: it applies the
events stored by any process, its own included, in sequence order on its model thread (`sync`), polled every
CMN_FEEDBACK_POLL_S and at once after its own writes, so all processes converge on the same state. A checkpoint
reloaded through /admin/reload is published in the store, and every process follows it too (`_follow_rollout`).
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from app import metrics
from app.auth import Auth, Caller, KeyFileError, is_loopback
from app.batcher import MicroBatcher, run_on
from app.engine import Engine
from app.engine import CATCH_UP_PAGE
from app.schemas import FeedbackEvent, FeedbackResponse, Health, ReloadResponse, Rollout, as_str
from app.settings import Settings
from model.store.events import Event, EventIdConflict, FeedbackStore, StoreUnavailable, open_store

log = logging.getLogger("cmn.service")


class NotReady(RuntimeError):
    pass


class NotCaughtUp(NotReady):
    """A request's after_seq is beyond what this process could read from the store (→ 503 + Retry-After)."""


WORKER = f"{socket.gethostname()}:{os.getpid()}"
REFUSED = "checkpoint refused, still serving the previous model (the reason is in the server log)"


class ReloadFailed(RuntimeError):
    def __init__(self, reason: str, serving: str | None):
        super().__init__(reason)
        self.serving = serving


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.auth = Auth(settings)  # a bad CMN_AUTH_FILE stops the start here
        self.started = time.time()
        self.engine: Engine | None = None
        self.status, self.detail = "loading", None
        # one model thread: scoring and cache mutation never overlap; a second pool for loading and disk I/O
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="cmn-model")
        self.io_threads = ThreadPoolExecutor(2, thread_name_prefix="cmn-io")
        self.batcher = MicroBatcher(self.model_thread, settings.max_batch, settings.max_wait_ms,
                                    settings.max_queue_pairs)
        self.store: FeedbackStore | None = None
        self.feedback_events = 0  # kept here so /health never queries the store on the event loop
        self._counted_seq = 0                     # feedback_events counts every event up to this seq,
        self._own_seqs: set[int] = set()          # and these (stored by this process, not yet read back)
        self.read_fault: str | None = None        # why the last read of the store failed; None: it worked
        self.synced_at = time.time()              # when this process last read the store to its end
        self.rollout: Rollout | None = None
        self._reload_lock = asyncio.Lock()
        self._sync_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        if not self.auth.enabled and not is_loopback(self.settings.host):
            log.warning("auth is off (CMN_AUTH_FILE unset) and the server listens on %s: whoever reaches it can read "
                        "any user's history and write feedback", self.settings.host, extra={"event": "auth_off"})
        self.store = open_store(self.settings.store_url)
        if self.store.fault:
            log.error("feedback store not writable: %s", self.store.fault, extra={"event": "store_unwritable"})
        try:
            self.feedback_events = await run_on(self.io_threads, self.store.count)
            self._counted_seq = await run_on(self.io_threads, self.store.last_seq)
        except StoreUnavailable as e:  # served anyway; the follower catches up when the store is back
            self.read_fault = str(e)
            log.error("feedback store unreachable: %s", e.detail, extra={"event": "store_unreachable"})
        self.batcher.start()
        self._spawn(self._initial_load())

    async def stop(self) -> None:
        """Graceful: uvicorn has already drained in-flight requests; finish the model thread, close the store."""
        for task in list(self._tasks):
            task.cancel()
        await self.batcher.stop()
        self.model_thread.shutdown(wait=True)
        self.io_threads.shutdown(wait=True)
        if self.store:
            self.store.close()
        metrics.process_exited()
        log.info("stopped", extra={"event": "shutdown"})

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _build(self, path: str, within: str | None = None) -> Engine:
        engine = Engine(path, self.settings.device, self.settings.explain_top, self.settings.max_checkpoint_bytes,
                        within, self.settings.graph_catalogue, self.settings.max_live_users,
                        self.settings.max_live_items)
        try:
            replayed = engine.catch_up(self.store)
        except StoreUnavailable as e:  # the follower replays the rest when the store is back
            replayed = engine.feedback_seq
            log.error("feedback store unreachable while loading: %s", e.detail, extra={"event": "store_unreachable"})
        engine.warmup(self.settings.warmup_calls)
        log.info("model loaded", extra={"event": "load", "model_version": engine.version, "path": path,
                                        "device": str(engine.device), "feedback_replayed": replayed,
                                        "seconds": round(engine.load_seconds, 3)})
        for warning in engine.warnings:
            log.warning("model %s: %s", engine.version, warning, extra={"event": "model_quality"})
        return engine

    async def _initial_load(self) -> None:
        """The checkpoint last published in the store (a replica started after a rollout serves what the others
        serve), else CMN_CHECKPOINT; then follow the store."""
        engine = None
        try:
            published = await run_on(self.io_threads, self.store.active_checkpoint)
        except StoreUnavailable:
            published = None
        if published is not None:
            engine = await self._load_published(published)
        if engine is None:
            try:
                engine = await run_on(self.io_threads, self._build, self.settings.checkpoint)
            except Exception as e:
                self.status, self.detail = "failed", str(e)
                log.error("model failed to load: %s", e, extra={"event": "load_failed"})
                return
        self._activate(engine)
        self._spawn(self._follow())
        # the ~200k long-lived objects of torch/FastAPI/pydantic and the loaded model leave the cyclic GC's
        # generations: each full collection would otherwise stall the server ~90 ms (p99 123 → 24 ms at
        # concurrency 32, docs/performance.md). Later objects, a reloaded engine's included, are collected as usual.
        gc.freeze()

    def _activate(self, engine: Engine) -> None:
        self.engine, self.status, self.detail = engine, "ok", None
        # no path label: /metrics may be open (CMN_METRICS_OPEN), and the filesystem layout is not its business
        metrics.serving(engine.version, str(engine.device))

    def engine_or_503(self) -> Engine:
        if self.engine is None:
            raise NotReady("model is loading" if self.status == "loading" else f"no model loaded: {self.detail}")
        return self.engine

    async def reload(self, path: str | None, publish: bool = True) -> ReloadResponse:
        """Load, warm and swap in a new checkpoint; a failure leaves the serving model untouched. `publish`: record
        it in the store as the active checkpoint, which every process sharing the store then loads.

        `path` is what a client named: it must lie in CMN_CHECKPOINT_DIR (see `load_checkpoint`). None: the
        configured CMN_CHECKPOINT, which the operator chose. The client learns only that the file was refused:
        why (missing, a FIFO, outside the directory, corrupt) is in the server log, not in the answer."""
        start = time.perf_counter()
        within = self.settings.checkpoint_dir if path else None
        path = path or self.settings.checkpoint
        async with self._reload_lock:
            await self._reload_keys()
            previous = self.engine
            try:
                engine = await run_on(self.io_threads, self._build, path, within)
            except Exception as e:
                metrics.RELOADS.labels("failed").inc()
                log.error("reload refused: %s", e, extra={"event": "reload_failed", "path": path})
                raise ReloadFailed(REFUSED, previous.version if previous else None) from None
            self._activate(engine)
            await self.sync()  # events stored while the new engine was being built
            rollout, note = "local", None
            if publish:
                try:
                    # the file loaded: a relative name is taken from CMN_CHECKPOINT_DIR (`load_checkpoint`)
                    loaded = os.path.abspath(os.path.join(within, path) if within else path)
                    rid = await run_on(self.io_threads, self.store.publish_checkpoint, loaded, engine.version)
                    self.rollout, rollout = Rollout(id=rid, model_version=engine.version, status="ok"), "published"
                except StoreUnavailable as e:
                    note = f"the feedback store cannot be written ({e}): only this process serves the new model"
                    log.error("reload not published: %s", e.detail, extra={"event": "rollout_unpublished"})
        metrics.RELOADS.labels("ok").inc()
        log.info("reloaded", extra={"event": "reload", "model_version": engine.version, "rollout": rollout,
                                    "previous_version": previous.version if previous else None})
        return ReloadResponse(model_version=engine.version, previous_version=previous.version if previous else None,
                              took_ms=round((time.perf_counter() - start) * 1000, 3), rollout=rollout, note=note)

    async def _load_published(self, published) -> Engine | None:
        """Build the engine of a checkpoint published in the store (by this process or another); None when it
        cannot be loaded here, which `rollout` then reports."""
        configured = published.path == os.path.abspath(self.settings.checkpoint)
        try:
            engine = await run_on(self.io_threads, self._build, published.path,
                                  None if configured else self.settings.checkpoint_dir)
        except Exception as e:
            self.rollout = Rollout(id=published.id, model_version=published.version, status="failed", detail=str(e))
            metrics.RELOADS.labels("failed").inc()
            log.error("published checkpoint %s refused, keeping the model served: %s", published.version, e,
                      extra={"event": "rollout_failed", "path": published.path})
            return None
        self.rollout = Rollout(id=published.id, model_version=engine.version, status="ok")
        return engine

    async def _follow(self) -> None:
        """Poll the store: other processes' events, and checkpoints published for every process."""
        while True:
            await asyncio.sleep(self.settings.feedback_poll_s)
            metrics.LAG.set(time.time() - self.synced_at)
            try:
                await self.sync()
                await self._follow_rollout()
            except Exception:  # a follower that dies would leave this process silently stale
                log.exception("following the feedback store failed", extra={"event": "follow_failed"})

    async def _follow_rollout(self) -> None:
        try:
            published = await run_on(self.io_threads, self.store.active_checkpoint)
        except StoreUnavailable:
            return  # sync has recorded the fault
        if published is None or (self.rollout and self.rollout.id >= published.id):
            return
        async with self._reload_lock:  # a reload of this process may have published it meanwhile
            if self.rollout and self.rollout.id >= published.id:
                return
            previous = self.engine
            engine = await self._load_published(published)
            if engine is None:
                return
            self._activate(engine)
            await self.sync()
        metrics.RELOADS.labels("ok").inc()
        log.info("rolled out", extra={"event": "rollout", "model_version": engine.version,
                                      "previous_version": previous.version if previous else None})

    async def sync(self, until: int = 0) -> None:
        """Apply every event stored so far, by any process, in sequence order, on the model thread; at once when
        this process has applied `until` already. A failed read is recorded (health, metrics), not raised."""
        async with self._sync_lock:
            engine = self.engine
            if engine is None or (until and engine.feedback_seq >= until):
                return
            try:
                while True:
                    rows = await run_on(self.io_threads, self.store.events, engine.feedback_seq, CATCH_UP_PAGE)
                    if rows:
                        await run_on(self.model_thread, engine.apply_rows, rows)
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

    async def _reload_keys(self) -> None:
        """Re-read CMN_AUTH_FILE (on every reload, SIGHUP included); a file that fails to parse changes nothing."""
        if not self.auth.enabled:
            return
        try:
            n = await run_on(self.io_threads, self.auth.reload)
        except KeyFileError as e:
            log.error("keys not reloaded, the keys in use stay: %s", e, extra={"event": "keys_reload_failed"})
            return
        log.info("keys reloaded: %d keys", n, extra={"event": "keys_reload"})

    def reload_in_background(self) -> None:
        async def run():
            try:
                await self.reload(None, publish=False)
            except ReloadFailed:
                pass  # already logged; the old model keeps serving
        self._spawn(run())

    def _count(self, last: int, seqs: list[int]) -> None:
        """Count newly read events in feedback_events, once: those this process stored were counted on writing."""
        self.feedback_events += sum(seq > self._counted_seq and seq not in self._own_seqs for seq in seqs)
        self._counted_seq = max(self._counted_seq, last)
        self._own_seqs = {seq for seq in self._own_seqs if seq > self._counted_seq}

    async def feedback(self, events: list[FeedbackEvent], caller: Caller) -> FeedbackResponse:
        """Store the events (durably, all or none) under the caller's key, then apply them through the store like
        every other process does. Raises NotReady until a model is loaded (ids cannot be verified before),
        HTTPException past the caller's quotas, EventIdConflict and StoreUnavailable (nothing stored)."""
        engine = self.engine_or_503()
        stored = []
        for e in events:
            user, item = as_str(e.user_id), as_str(e.item_id)
            # verified: the model knew the user and item, or creates them live (the training run folds those in)
            stored.append(Event(user, item, e.timestamp, e.event_id, verified=engine.accepts(user, item)))
        unknown = sum(not engine.knows(e.user_id, e.item_id) for e in stored)  # each may create a user or an item
        self.auth.charge_events(caller, len(stored), unknown)
        fault = self.store.fault
        try:  # durable before we answer
            seqs = await run_on(self.io_threads, self.store.append, stored, caller.name,
                                self.settings.dedup_window_s)
        except (EventIdConflict, StoreUnavailable) as e:
            self.auth.refund_events(caller, len(stored), unknown)
            if isinstance(e, StoreUnavailable) and str(e) != fault:  # logged once per fault, not once per request
                log.error("feedback store not writable: %s", e.detail, extra={"event": "store_unwritable"})
            raise
        if fault:
            log.info("feedback store writable again", extra={"event": "store_writable"})
        new = [e for e, seq in zip(stored, seqs) if seq is not None]
        self.feedback_events += len(new)
        self._own_seqs.update(seq for seq in seqs if seq is not None and seq > self._counted_seq)
        duplicates = len(stored) - len(new)
        note = None
        if new:
            last = max(seq for seq in seqs if seq is not None)
            await self.sync(until=last)
        engine = self.engine  # the one serving now: a reload may have swapped it meanwhile
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
        return FeedbackResponse(stored=len(new), duplicates=duplicates, applied=applied, deferred=deferred, note=note,
                                seq=seq)

    async def caught_up(self, seq: int | None) -> bool:
        """Whether this process has applied the store's events up to `seq`, reading them now if needed (False: the
        store holds no such seq yet). Raises NotCaughtUp when the store cannot be read."""
        if seq is None or self.engine is None or self.engine.feedback_seq >= seq:
            return True
        await self.sync(until=seq)
        if self.engine.feedback_seq >= seq:
            return True
        if self.read_fault:
            raise NotCaughtUp(f"this process has applied the feedback store up to seq {self.engine.feedback_seq}, "
                              f"not {seq}: the store cannot be read now ({self.read_fault})")
        return False

    def health(self) -> Health:
        """Readiness: "ok", or "degraded" (still 200: recommendations are served) while the feedback store cannot
        be written or read, or this process lags behind it; "loading"/"failed" (503) without a model."""
        e = self.engine
        uptime = round(time.time() - self.started, 3)
        fault = self.store.fault if self.store else None
        store = None if self.store is None else "unreachable" if self.read_fault else "not_writable" if fault else "ok"
        if e is None:
            return Health(status=self.status, detail=self.detail, store=store, uptime_s=uptime, worker=WORKER)
        lag = round(time.time() - self.synced_at, 3)
        problems = ([f"feedback store unreachable: {self.read_fault}"] if self.read_fault else
                    [f"feedback store not writable: {fault}"] if fault else [])
        if lag > self.settings.max_lag_s:
            problems.append(f"{lag:.1f} s since this process last read the feedback store to its end "
                            f"(CMN_MAX_LAG_S={self.settings.max_lag_s:g})")
        return Health(status="degraded" if problems else "ok", detail="; ".join(problems) or None, store=store,
                      model_version=e.version, device=str(e.device), users=e.n_users, items=e.n_items,
                      interactions=e.recommender.interactions, live_users=e.online.live_users,
                      live_items=e.online.live_items, feedback_events=self.feedback_events,
                      applied_seq=e.feedback_seq, lag_s=lag, rollout=self.rollout, worker=WORKER,
                      uptime_s=uptime, warnings=e.warnings)
