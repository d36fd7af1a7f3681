"""The running service: one object the routes call, made of one part per job.

- `Models` (app/models.py): the served model: load, warm, swap, reloads and rollouts;
- `Feedback` (app/feedback.py): writing events to the shared store, and following what every process stored;
- `Engine.prepare` / `Engine.recommend` (app/engine.py, app/jobs.py): requests ↔ jobs on the model thread,
  batched by the MicroBatcher (app/batcher.py);
- `Auth` (app/auth.py): keys, scopes and quotas.

Opened by the app's lifespan (`start`, `stop`): nothing is loaded or opened before it.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

from app import metrics
from app.auth import Auth, Caller, KeyFileError, is_loopback
from app.batcher import Backlogged, MicroBatcher, QueueFull, run_on
from app.engine import Engine
from app.experiments import Experiments
from app.feedback import Feedback
from app.impressions import Impressions
from app.jobs import Answer, beyond_the_store, check_limits
from app.models import Models, ReloadFailed
from app.schemas import (ExperimentStatus, FeedbackEvent, FeedbackResponse, Health, RecommendRequest,
                         ReloadResponse)
from app.settings import Settings
from model.store.events import open_store

log = logging.getLogger("cmn.service")

WORKER = f"{socket.gethostname()}:{os.getpid()}"
RECENT_LISTS = 10_000


class Shown(NamedTuple):
    impression_id: str
    arm: str | None
    model_version: str


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.auth = Auth(settings)  # a bad CMN_AUTH_FILE stops the start here
        self.started = time.time()
        # one model thread: scoring and cache mutation never overlap; a second pool for loading and disk I/O
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="cmn-model")
        self.io_threads = ThreadPoolExecutor(2, thread_name_prefix="cmn-io")
        self.batcher = MicroBatcher(self.model_thread, settings.max_batch, settings.max_wait_ms,
                                    settings.max_queue_pairs, settings.max_call_ms, settings.max_key_backlog_s)
        self.experiments = Experiments(settings.experiment_file, self.io_threads, settings.feedback_poll_s)
        self.store = self.models = self.feedback = self.impressions = None
        # the item ids of the last lists served, for /dashboard's "most recommended" (counted when the page asks:
        # appending is all a request pays)
        self.recent_lists: deque[tuple[str, ...]] = deque(maxlen=RECENT_LISTS)
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
        self.models = Models(self.settings, self.store, self.io_threads, sync=lambda: self.feedback.sync())
        self.impressions = Impressions(self.settings, self.store, self.io_threads)
        self.feedback = Feedback(self.settings, self.store, self.auth, self.models, self.model_thread,
                                 self.io_threads, self.impressions)
        await self.feedback.count()
        self.experiments.store = self.store
        await self.experiments.refresh()
        self.batcher.start()
        self._spawn(self.impressions.follow())
        self._spawn(self.experiments.follow(then=self._keep_arm_models))
        self._spawn(self._serve())

    async def _serve(self) -> None:
        if not await self.models.load_first():
            return
        self._spawn(self.feedback.follow())
        # the ~200k long-lived objects of torch/FastAPI/pydantic and the loaded model leave the cyclic GC's
        # generations: each full collection would otherwise stall the server ~90 ms (p99 123 → 24 ms at
        # concurrency 32, docs/performance.md). Later objects, a reloaded engine's included, are collected as usual.
        gc.freeze()
        await self._keep_arm_models()   # after the freeze: an arm's model is dropped when its arm goes

    async def stop(self) -> None:
        """Graceful: uvicorn has already drained in-flight requests; finish the model thread, close the store."""
        for task in list(self._tasks):
            task.cancel()
        await self.batcher.stop()
        self.model_thread.shutdown(wait=True)
        self.io_threads.shutdown(wait=True)
        if self.store:
            self.impressions.flush_now()
            self.store.close()
        metrics.process_exited()
        log.info("stopped", extra={"event": "shutdown"})

    async def _keep_arm_models(self) -> None:
        """Load the model versions the experiment's arms serve beside the served one, drop those they no longer do."""
        if self.models.engine is not None:
            await self.models.keep_arms(self.experiments.arm_models(self.models.engine.version))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ what the routes call

    async def recommend(self, reqs: list[RecommendRequest], caller: Caller,
                        batch: bool) -> tuple[Engine, list[Answer], list[Shown]]:
        """The answers to /recommend (one request) or /recommend/batch, the engine that gave them, and for each
        its impression id and experiment arm. Everything that can refuse a request does so before it is queued:
        a model to answer, the cost limits, the after_seq asked for (read from the store now if need be), the
        key's scope, its work rate (in scored pairs). A request in an active arm is served with the arm's strategy,
        by the arm's model (app/experiments.py); each answer's Shown names the model version that gave it."""
        self.models.engine_or_503()
        check_limits(self.settings, reqs, batch)
        seq = max((r.after_seq for r in reqs if r.after_seq is not None), default=None)
        if not await self.feedback.caught_up(seq):
            raise beyond_the_store(seq, self.models.engine.feedback_seq, batch)
        engine = self.models.engine_or_503()
        arms, engines = [], []
        for r in reqs:
            arm = self.experiments.assign(r.user_id, r.strategy)
            by = engine if arm is None or arm.model_version in (None, engine.version) else \
                self.models.arm_engines.get(arm.model_version)
            if by is None or (arm is not None and arm.strategy not in by.recommender.strategies):
                arm, by = None, engine    # the arm's model is not loaded here, or does not offer its strategy
            arms.append(arm)
            engines.append(by)
        jobs = [by.prepare(r if arm is None else r.model_copy(update={"strategy": arm.strategy}))
                for r, arm, by in zip(reqs, arms, engines)]
        self.auth.require_history(caller, reqs, jobs)
        pairs = sum(job.pairs for job in jobs)
        self.auth.charge_pairs(caller, pairs)
        # one submission per model: each batch is scored by one engine
        groups: dict[int, list[int]] = {}
        for i, by in enumerate(engines):
            groups.setdefault(id(by), []).append(i)
        try:
            done = await asyncio.gather(*(self.batcher.submit(engines[at[0]], [jobs[i] for i in at], caller.name)
                                          for at in groups.values()))
        except QueueFull:
            self.auth.refund_pairs(caller, pairs)
            raise
        except Backlogged as e:
            self.auth.refund_pairs(caller, pairs)
            raise self.auth.too_much_work(caller, str(e), e.wait) from None
        answers: list[Answer] = [None] * len(reqs)
        for at, got in zip(groups.values(), done):
            for i, answer in zip(at, got):
                answers[i] = answer
        lists = [tuple(i for i, *_ in a.items) for a in answers]
        self.recent_lists.extend(lists)
        shown = [Shown(self.impressions.record(r.user_id, items, a.strategy or "popularity", by.version,
                                               arm and arm.name), arm and arm.name, by.version)
                 for r, a, items, arm, by in zip(reqs, answers, lists, arms, engines)]
        return engine, answers, shown

    async def write_feedback(self, events: list[FeedbackEvent], caller: Caller) -> FeedbackResponse:
        return await self.feedback.write(events, caller)

    async def stop_arm(self, arm: str, stopped: bool) -> ExperimentStatus:
        """Stop (or resume) an experiment's arm in every process sharing the store; KeyError: no such arm."""
        await self.experiments.set_stopped(arm, stopped)
        return self.experiments.status()

    async def reload(self, path: str | None, publish: bool = True) -> ReloadResponse:
        """Re-read CMN_AUTH_FILE, then load, warm and swap `path` (app/models.py). A key file with errors stops
        the reload there (ReloadFailed, a 409): the keys are what the file's good lines say, and the operator
        fixes the file before anything else changes."""
        await self._reload_keys()
        return await self.models.reload(path, publish)

    def reload_in_background(self) -> None:
        """SIGHUP: reload the configured checkpoint for this process alone."""
        async def run():
            try:
                await self.reload(None, publish=False)
            except ReloadFailed:
                pass  # already logged; the old model keeps serving
        self._spawn(run())

    async def _reload_keys(self) -> None:
        if not self.auth.enabled:
            return
        try:
            n = await run_on(self.io_threads, self.auth.reload)
        except KeyFileError as e:
            n = len(self.auth.keys or ())
            log.error("key file reloaded with errors, %d keys valid: %s", n, e, extra={"event": "keys_reload_failed"})
            engine = self.models.engine if self.models else None
            raise ReloadFailed(f"{e}; {n} keys of the file are valid now (keys of lines that do not parse are not); "
                               "the checkpoint was not reloaded", engine.version if engine else None) from None
        log.info("keys reloaded: %d keys", n, extra={"event": "keys_reload"})

    def health(self) -> Health:
        """Readiness: "ok", or "degraded" (still 200: recommendations are served) while the feedback store cannot
        be written or read, or this process lags behind it; "loading"/"failed" (503) without a model."""
        uptime = round(time.time() - self.started, 3)
        if self.models is None:
            return Health(status="loading", uptime_s=uptime, worker=WORKER)
        e, f = self.models.engine, self.feedback
        fault = self.store.fault
        store = "unreachable" if f.read_fault else "not_writable" if fault else "ok"
        if e is None:
            return Health(status=self.models.status, detail=self.models.detail, store=store, uptime_s=uptime,
                          worker=WORKER)
        lag = round(time.time() - f.synced_at, 3)
        problems = ([f"feedback store unreachable: {f.read_fault}"] if f.read_fault else
                    [f"feedback store not writable: {fault}"] if fault else [])
        if lag > self.settings.max_lag_s:
            problems.append(f"{lag:.1f} s since this process last read the feedback store to its end "
                            f"(CMN_MAX_LAG_S={self.settings.max_lag_s:g})")
        return Health(status="degraded" if problems else "ok", detail="; ".join(problems) or None, store=store,
                      model_version=e.version, device=str(e.device), users=e.n_users, items=e.n_items,
                      interactions=e.recommender.interactions, live_users=e.online.live_users,
                      live_items=e.online.live_items, feedback_events=f.events, applied_seq=e.feedback_seq,
                      lag_s=lag, rollout=self.models.rollout, arm_models=self.models.arm_models(), worker=WORKER,
                      uptime_s=uptime, warnings=e.warnings)
