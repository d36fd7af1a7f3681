"""The running service: the active Engine, its model thread and batcher, the feedback store, reloads."""
from __future__ import annotations

import asyncio
import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from app import metrics
from app.auth import Auth, Caller, KeyFileError, is_loopback
from app.batcher import MicroBatcher, run_on
from app.engine import Engine
from app.schemas import FeedbackEvent, FeedbackResponse, Health, ReloadResponse, as_str
from app.settings import Settings
from model.feedback import Event, EventIdConflict, FeedbackLog, StoreUnavailable

log = logging.getLogger("cmn.service")


class NotReady(RuntimeError):
    pass


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
        self.store: FeedbackLog | None = None
        self.feedback_events = 0  # kept here so /health never queries the store on the event loop
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        if not self.auth.enabled and not is_loopback(self.settings.host):
            log.warning("auth is off (CMN_AUTH_FILE unset) and the server listens on %s: whoever reaches it can read "
                        "any user's history and write feedback", self.settings.host, extra={"event": "auth_off"})
        self.store = FeedbackLog(self.settings.feedback_path)
        if self.store.fault:
            log.error("feedback store not writable: %s", self.store.fault, extra={"event": "store_unwritable"})
        self.feedback_events = await run_on(self.io_threads, self.store.count)
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
        log.info("stopped", extra={"event": "shutdown"})

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _build(self, path: str, within: str | None = None) -> Engine:
        engine = Engine(path, self.settings.device, self.settings.explain_top, self.settings.max_checkpoint_bytes,
                        within, self.settings.graph_catalogue)
        replayed = engine.catch_up(self.store)
        engine.warmup(self.settings.warmup_calls)
        log.info("model loaded", extra={"event": "load", "model_version": engine.version, "path": path,
                                        "device": str(engine.device), "feedback_replayed": replayed,
                                        "seconds": round(engine.load_seconds, 3)})
        for warning in engine.warnings:
            log.warning("model %s: %s", engine.version, warning, extra={"event": "model_quality"})
        return engine

    async def _initial_load(self) -> None:
        try:
            engine = await run_on(self.io_threads, self._build, self.settings.checkpoint)
        except Exception as e:
            self.status, self.detail = "failed", str(e)
            log.error("model failed to load: %s", e, extra={"event": "load_failed"})
            return
        self._activate(engine)
        # the ~200k long-lived objects of torch/FastAPI/pydantic and the loaded model leave the cyclic GC's
        # generations: each full collection would otherwise stall the server ~90 ms (p99 123 → 24 ms at
        # concurrency 32, docs/performance.md). Later objects, a reloaded engine's included, are collected as usual.
        gc.freeze()

    def _activate(self, engine: Engine) -> None:
        self.engine, self.status, self.detail = engine, "ok", None
        # no path label: /metrics may be open (CMN_METRICS_OPEN), and the filesystem layout is not its business
        metrics.MODEL.info({"model_version": engine.version, "device": str(engine.device)})

    def engine_or_503(self) -> Engine:
        if self.engine is None:
            raise NotReady("model is loading" if self.status == "loading" else f"no model loaded: {self.detail}")
        return self.engine

    async def reload(self, path: str | None) -> ReloadResponse:
        """Load, warm and swap in a new checkpoint; a failure leaves the serving model untouched.

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
            # events stored while the new engine was being built
            await run_on(self.model_thread, engine.catch_up, self.store)
        metrics.RELOADS.labels("ok").inc()
        log.info("reloaded", extra={"event": "reload", "model_version": engine.version,
                                    "previous_version": previous.version if previous else None})
        return ReloadResponse(model_version=engine.version, previous_version=previous.version if previous else None,
                              took_ms=round((time.perf_counter() - start) * 1000, 3))

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
                await self.reload(None)
            except ReloadFailed:
                pass  # already logged; the old model keeps serving
        self._spawn(run())

    async def feedback(self, events: list[FeedbackEvent], caller: Caller) -> FeedbackResponse:
        """Store the events (durably, all or none) under the caller's key, then apply them. Raises NotReady until a
        model is loaded (ids cannot be verified before), HTTPException past the caller's quotas, EventIdConflict
        and StoreUnavailable (nothing stored)."""
        engine = self.engine_or_503()
        stored = []
        for e in events:
            user, item = as_str(e.user_id), as_str(e.item_id)
            stored.append(Event(user, item, e.timestamp, e.event_id, verified=engine.knows(user, item)))
        unknown = sum(not e.verified for e in stored)
        self.auth.charge_events(caller, len(stored), unknown)
        fault = self.store.fault
        try:  # durable before we answer
            is_new = await run_on(self.io_threads, self.store.append, stored, caller.name,
                                  self.settings.dedup_window_s)
        except (EventIdConflict, StoreUnavailable) as e:
            self.auth.refund_events(caller, len(stored), unknown)
            if isinstance(e, StoreUnavailable) and str(e) != fault:  # logged once per fault, not once per request
                log.error("feedback store not writable: %s", e, extra={"event": "store_unwritable"})
            raise
        if fault:
            log.info("feedback store writable again", extra={"event": "store_writable"})
        new = [e for e, fresh in zip(stored, is_new) if fresh]
        self.feedback_events += len(new)
        duplicates = len(stored) - len(new)
        engine = self.engine  # the one serving now: a reload may have swapped it meanwhile
        applied, deferred = await run_on(self.model_thread, engine.apply_feedback, new) if new else (0, 0)
        note = (f"{deferred} events name users or items the model does not know: they are stored as unverified, "
                "and a training run folds them in only with --feedback-unverified") if deferred else None
        metrics.FEEDBACK.labels("applied").inc(applied)
        metrics.FEEDBACK.labels("deferred").inc(deferred)
        metrics.FEEDBACK.labels("duplicate").inc(duplicates)
        return FeedbackResponse(stored=len(new), duplicates=duplicates, applied=applied, deferred=deferred, note=note)

    def health(self) -> Health:
        """Readiness: "ok", or "degraded" (still 200: recommendations are served) while the feedback store cannot
        be written; "loading"/"failed" (503) without a model."""
        e = self.engine
        uptime = round(time.time() - self.started, 3)
        fault = self.store.fault if self.store else None
        store = None if self.store is None else "not_writable" if fault else "ok"
        if e is None:
            return Health(status=self.status, detail=self.detail, store=store, uptime_s=uptime)
        return Health(status="degraded" if fault else "ok",
                      detail=f"feedback store not writable: {fault}" if fault else None, store=store,
                      model_version=e.version, device=str(e.device), users=e.n_users, items=e.n_items,
                      interactions=e.recommender.interactions, feedback_events=self.feedback_events, uptime_s=uptime,
                      warnings=e.warnings)
