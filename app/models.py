"""The model a process serves: load, warm and swap an Engine; reloads (/admin/reload, SIGHUP) and rollouts.

A checkpoint reloaded through /admin/reload is published in the feedback store, and every process sharing the
store follows it (`follow_rollout`); a replica started after a rollout serves what the others serve (`load_first`).
A load that fails leaves the serving model untouched. Each new engine replays the store's events before it is
swapped in, and the events stored meanwhile are applied right after (`sync`, app/feedback.py).

Experiment arms may serve other model versions side by side (`keep_arms`): each is a whole Engine, as large in
memory as the served one, loaded off the request path, fed the store's events like it, and dropped when no active
arm names its version any more.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor

from app import metrics
from app.batcher import run_on
from app.engine import Engine
from app.schemas import ArmModel, ReloadResponse, Rollout
from app.settings import Settings
from model.store.events import FeedbackStore, StoreUnavailable

log = logging.getLogger("cmn.service")

REFUSED = "checkpoint refused, still serving the previous model (the reason is in the server log)"
# what the open /health says of a checkpoint this process could not load: the reason names paths and files,
# which are the server log's business (event load_failed, rollout_failed)
UNLOADABLE = "the checkpoint could not be loaded here (the reason is in the server log)"


class NotReady(RuntimeError):
    pass


class ReloadFailed(RuntimeError):
    def __init__(self, reason: str, serving: str | None):
        super().__init__(reason)
        self.serving = serving


class Models:
    """The active Engine (None until the first load), why there is none (`status`, `detail`), and the rollout
    this process follows. `sync` applies the store's events stored since the engine's last one."""

    def __init__(self, settings: Settings, store: FeedbackStore, io_threads: Executor,
                 sync: Callable[[], Awaitable[None]]):
        self.settings, self.store, self.io_threads, self.sync = settings, store, io_threads, sync
        self.engine: Engine | None = None
        self.status, self.detail = "loading", None
        self.rollout: Rollout | None = None
        self.arm_engines: dict[str, Engine] = {}   # model version → its engine, for experiment arms
        self.arm_faults: dict[str, str] = {}       # model version → why it is not loaded (no paths: /health shows it)
        self._arms_lock = asyncio.Lock()
        self._lock = asyncio.Lock()   # one load-and-swap at a time: a reload, or a rollout being followed

    def engine_or_503(self) -> Engine:
        if self.engine is None:
            raise NotReady("model is loading" if self.status == "loading" else f"no model loaded: {self.detail}")
        return self.engine

    def _build(self, path: str, within: str | None = None) -> Engine:
        s = self.settings
        engine = Engine(path, s.device, s.explain_top, s.max_checkpoint_bytes, within, s.graph_catalogue,
                        s.max_live_users, s.max_live_items, s.foldin_pairs, s.max_popularity_gain,
                        s.feedback_neighbours_cap)
        try:
            replayed = engine.catch_up(self.store)
        except StoreUnavailable as e:  # the follower replays the rest when the store is back
            replayed = engine.feedback_seq
            log.error("feedback store unreachable while loading: %s", e.detail, extra={"event": "store_unreachable"})
        engine.recommender.warmup(s.warmup_calls)
        log.info("model loaded", extra={"event": "load", "model_version": engine.version, "path": path,
                                        "device": str(engine.device), "feedback_replayed": replayed,
                                        "seconds": round(engine.load_seconds, 3)})
        for warning in engine.warnings:
            log.warning("model %s: %s", engine.version, warning, extra={"event": "model_quality"})
        return engine

    def _activate(self, engine: Engine) -> None:
        self.engine, self.status, self.detail = engine, "ok", None
        # no path label: /metrics may be open (CMN_METRICS_OPEN), and the filesystem layout is not its business
        metrics.serving(engine.version, str(engine.device))

    async def load_first(self) -> bool:
        """The checkpoint last published in the store, else CMN_CHECKPOINT; False when neither loads."""
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
                self.status, self.detail = "failed", UNLOADABLE
                log.error("model failed to load: %s", e, extra={"event": "load_failed"})
                return False
        self._activate(engine)
        return True

    async def reload(self, path: str | None, publish: bool = True) -> ReloadResponse:
        """Load, warm and swap in a new checkpoint; a failure leaves the serving model untouched. `publish`: record
        it in the store as the active checkpoint, which every process sharing the store then loads.

        `path` is what a client named: it must lie in CMN_CHECKPOINT_DIR (see `load_checkpoint`). None: the
        configured CMN_CHECKPOINT, which the operator chose. The client learns only that the file was refused:
        why (missing, a FIFO, outside the directory, corrupt) is in the server log, not in the answer."""
        start = time.perf_counter()
        within = self.settings.checkpoint_dir if path else None
        path = path or self.settings.checkpoint
        async with self._lock:
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
            self.rollout = Rollout(id=published.id, model_version=published.version, status="failed",
                                   detail=UNLOADABLE)
            metrics.RELOADS.labels("failed").inc()
            log.error("published checkpoint %s refused, keeping the model served: %s", published.version, e,
                      extra={"event": "rollout_failed", "path": published.path})
            return None
        self.rollout = Rollout(id=published.id, model_version=engine.version, status="ok")
        return engine

    async def keep_arms(self, wanted: dict[str, str | None]) -> None:
        """Load the engine of each version in `wanted` (version → the arm's checkpoint, None: the newest published
        with that version) not loaded yet, and drop those no longer wanted. A version that fails is logged once and
        not tried again until an arm stops wanting it (a fixed file is then picked up by removing and re-adding
        the arm, or by a restart)."""
        async with self._arms_lock:  # the follower and the first load may both ask
            for version in set(self.arm_engines) - set(wanted):
                del self.arm_engines[version]
                log.info("arm model %s unloaded", version,
                         extra={"event": "arm_model_unload", "model_version": version})
            self.arm_faults = {v: why for v, why in self.arm_faults.items() if v in wanted}
            for version, path in wanted.items():
                if version in self.arm_engines or version in self.arm_faults:
                    continue
                if len(self.arm_engines) >= self.settings.max_arm_models:
                    self.arm_faults[version] = (f"more model versions in the experiment than CMN_MAX_ARM_MODELS="
                                                f"{self.settings.max_arm_models}")
                    log.error("arm model %s not loaded: %s", version, self.arm_faults[version],
                              extra={"event": "arm_model_failed", "model_version": version})
                    continue
                try:
                    engine = await run_on(self.io_threads, self._build_arm, version, path)
                except StoreUnavailable:
                    continue  # tried again at the next poll; the event follower reports the store's state
                except Exception as e:
                    self.arm_faults[version] = UNLOADABLE
                    log.error("arm model %s not loaded, its arm serves nobody: %s", version, e,
                              extra={"event": "arm_model_failed", "model_version": version, "path": path})
                    continue
                self.arm_engines[version] = engine
                await self.sync()  # events stored while it was being built

    def _build_arm(self, version: str, path: str | None) -> Engine:
        if path is None:
            published = next((r for r in self.store.rollouts() if r.version == version), None)
            if published is None:
                raise LookupError(f"no checkpoint of version {version} was published in the feedback store, and "
                                  "the arm names no checkpoint")
            path = published.path
        configured = path == os.path.abspath(self.settings.checkpoint)
        engine = self._build(path, None if configured else self.settings.checkpoint_dir)
        if engine.version != version:
            raise ValueError(f"{path} holds model version {engine.version}, not {version}")
        return engine

    def arm_models(self) -> list[ArmModel]:
        return [*(ArmModel(model_version=v, status="ok") for v in self.arm_engines),
                *(ArmModel(model_version=v, status="failed", detail=why) for v, why in self.arm_faults.items())]

    async def follow_rollout(self) -> None:
        """Load the checkpoint published last, when it is newer than the one this process follows."""
        try:
            published = await run_on(self.io_threads, self.store.active_checkpoint)
        except StoreUnavailable:
            return  # the event follower has recorded the fault
        if published is None or (self.rollout and self.rollout.id >= published.id):
            return
        async with self._lock:  # a reload of this process may have published it meanwhile
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
