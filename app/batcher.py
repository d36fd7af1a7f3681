"""Cross-request micro-batching: concurrent requests are scored together, off the event loop.

One dispatcher task feeds one model thread. While the model thread is busy, arriving requests queue up;
the moment it is free they go as one model call, so a lone request never waits and a loaded server scores many
users per call. Work is counted in scored (user, item) pairs, a fold-in at the pairs the model thread scores in the
time one takes, and turned into time at the rate it scores (both measured: `Engine.throughput`):

- the queue is bounded by the work it holds, not by its length: past `max_queue_pairs`, `submit` raises
  `QueueFull` (→ 503 + Retry-After, the time the model thread takes for what is queued);
- each owner (an API key's name) has its own queue, and calls take the owners' oldest work in turn: a request
  waits behind at most one call's worth of another key's work, however much that key has queued (issue 23: four
  batches of 256 fold-ins made a normal request wait 17.1 s in a FIFO queue);
- a model call holds at most `max_batch` jobs and `max_call_ms` of work (one job costing more goes alone), so the
  model thread is back at the queue, and at the next owner's work, after a bounded time;
- an owner may have at most `max_key_backlog_s` of work waiting (`Backlogged` past it: 429 + Retry-After), so
  one key cannot fill the queue the others need; the owner "" (no auth: no keys to tell apart) is bounded by the
  queue alone.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from app import metrics


class QueueFull(RuntimeError):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Backlogged(RuntimeError):
    """An owner's work waiting is past `max_key_backlog_s` (→ 429 + Retry-After: `wait`, its drain time)."""

    def __init__(self, message: str, wait: float):
        super().__init__(message)
        self.wait = wait


@dataclass
class Group:
    """Jobs of one request scored in one model call, and the future their answers go to."""
    engine: Any
    jobs: list
    future: asyncio.Future
    enqueued: float
    pairs: int
    owner: str


class MicroBatcher:
    def __init__(self, executor: ThreadPoolExecutor, max_batch: int, max_wait_ms: float, max_queue_pairs: int,
                 max_call_ms: float, max_key_backlog_s: float):
        self.executor, self.max_batch, self.max_queue_pairs = executor, max_batch, max_queue_pairs
        self.max_call_s, self.max_key_backlog_s = max_call_ms / 1000, max_key_backlog_s
        self.max_wait = max_wait_ms / 1000
        self._queues: OrderedDict[str, deque[Group]] = OrderedDict()   # per owner; the next one to serve first
        self._owed: dict[str, int] = {}                                # pairs queued per owner
        self._queued_jobs = 0
        self._queued_pairs = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._dispatch(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @property
    def depth(self) -> int:
        return self._queued_jobs

    def _groups(self, engine, jobs: list) -> list[list]:
        """`jobs` in order, cut into model calls of at most `max_batch` jobs and `max_call_ms` of work."""
        bound = engine.throughput.pairs_in(self.max_call_s)
        groups, pairs = [], 0
        for job in jobs:
            if not groups or len(groups[-1]) >= self.max_batch or pairs + job.pairs > bound:
                groups.append([])
                pairs = 0
            groups[-1].append(job)
            pairs += job.pairs
        return groups

    def _admit(self, engine, pairs: int, owner: str) -> None:
        """QueueFull past the queue's bound, Backlogged past the owner's; work is always taken into an empty queue
        (the owner's, for its bound), however large (the request limits bound it), so none waits forever."""
        seconds = engine.throughput.seconds
        if self._queued_pairs and self._queued_pairs + pairs > self.max_queue_pairs:
            wait = seconds(self._queued_pairs)
            raise QueueFull(f"request queue is full ({self._queued_pairs} pairs waiting to be scored, about "
                            f"{wait:.1f} s of work)", max(1, math.ceil(wait)))
        owed = self._owed.get(owner, 0)
        if owner and owed and seconds(owed + pairs) > self.max_key_backlog_s:
            raise Backlogged(f"this key has {seconds(owed):.1f} s of work waiting for the model thread; at most "
                             f"{self.max_key_backlog_s:g} s (CMN_MAX_KEY_BACKLOG_S)", seconds(owed))

    async def submit(self, engine, jobs: list, owner: str = "") -> list:
        """Answers for `jobs`, all scored by `engine` (requests in flight finish on the model they started on), in
        model calls of at most `max_batch` jobs and `max_call_ms` of work, queued under `owner`."""
        pairs = sum(job.pairs for job in jobs)
        self._admit(engine, pairs, owner)
        loop = asyncio.get_running_loop()
        queue = self._queues.setdefault(owner, deque())
        futures = []
        for group in self._groups(engine, jobs):
            futures.append(loop.create_future())
            queue.append(Group(engine, group, futures[-1], time.perf_counter(), sum(job.pairs for job in group),
                               owner))
            self._queued_jobs += len(group)
        self._queued_pairs += pairs
        self._owed[owner] = self._owed.get(owner, 0) + pairs
        self._gauge()
        self._wakeup.set()
        return [answer for group_answers in await asyncio.gather(*futures) for answer in group_answers]

    def _take_batch(self) -> tuple[Any, list[Group]]:
        """One model call: the owners' oldest groups in turn (an owner served goes to the back of the line), of the
        first one's engine, while they fit in `max_batch` jobs and `max_call_ms` of work (a group is never split;
        the first is taken whatever its size)."""
        engine = next(iter(self._queues.values()))[0].engine
        bound = engine.throughput.pairs_in(self.max_call_s)
        taken: list[Group] = []
        jobs = pairs = 0
        progress = True
        while progress:
            progress = False
            for owner in list(self._queues):
                queue = self._queues[owner]
                group = queue[0]
                if group.engine is not engine:
                    continue
                if taken and (jobs + len(group.jobs) > self.max_batch or pairs + group.pairs > bound):
                    continue
                taken.append(queue.popleft())
                jobs, pairs, progress = jobs + len(group.jobs), pairs + group.pairs, True
                self._owed[owner] -= group.pairs
                self._queues.move_to_end(owner)
                if not queue:
                    del self._queues[owner], self._owed[owner]
        self._queued_jobs -= jobs
        self._queued_pairs -= pairs
        self._gauge()
        return engine, taken

    def _gauge(self) -> None:
        metrics.QUEUE_DEPTH.set(self._queued_jobs)
        metrics.QUEUE_PAIRS.set(self._queued_pairs)

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queues:
                if self.max_wait and self._queued_jobs < self.max_batch:
                    await asyncio.sleep(self.max_wait)
                engine, groups = self._take_batch()
                now = time.perf_counter()
                for group in groups:
                    metrics.QUEUE_WAIT.observe(now - group.enqueued)
                jobs = [job for group in groups for job in group.jobs]
                metrics.BATCH_SIZE.observe(len(jobs))
                try:
                    answers = await loop.run_in_executor(self.executor, engine.recommend, jobs)
                except Exception as e:  # a scoring failure fails its batch, never the dispatcher
                    for group in groups:
                        if not group.future.done():
                            group.future.set_exception(e)
                    continue
                start = 0
                for group in groups:
                    if not group.future.done():  # the client may have gone away
                        group.future.set_result(answers[start:start + len(group.jobs)])
                    start += len(group.jobs)


def run_on(executor: ThreadPoolExecutor, fn: Callable, *args):
    return asyncio.get_running_loop().run_in_executor(executor, fn, *args)
