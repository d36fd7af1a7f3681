"""Cross-request micro-batching: concurrent requests are scored together, off the event loop.

One dispatcher task feeds one model thread. While the model thread is busy, arriving requests queue up;
the moment it is free they go as one model call, so a lone request never waits and a loaded server scores many
users per call. Work is counted in scored (user, item) pairs, a fold-in at CMN_FOLDIN_PAIRS (app/engine.py):

- the queue is bounded by the work it holds, not by its length: past `max_queue_pairs`, `submit` raises
  `QueueFull` (→ 503 + Retry-After, the time the model thread takes to score what is queued, at the rate it has
  been scoring);
- a model call holds at most `max_batch` jobs and `max_call_pairs` pairs (one job costing more goes alone), so the
  model thread is back at the queue after a bounded time;
- each owner (an API key's name) has its own queue, and calls take the owners' oldest work in turn: a request
  waits behind at most one call's worth of another key's work, however much that key has queued (issue 23: four
  batches of 256 fold-ins made a normal request wait 17.1 s in a FIFO queue).
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

RATE_SMOOTHING = 0.2   # weight of the last call in the scoring rate Retry-After is estimated from


class QueueFull(RuntimeError):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Group:
    """Jobs of one request scored in one model call, and the future their answers go to."""
    engine: Any
    jobs: list
    future: asyncio.Future
    enqueued: float
    pairs: int


class MicroBatcher:
    def __init__(self, executor: ThreadPoolExecutor, max_batch: int, max_wait_ms: float, max_queue_pairs: int,
                 max_call_pairs: int):
        self.executor, self.max_batch, self.max_queue_pairs = executor, max_batch, max_queue_pairs
        self.max_call_pairs = max_call_pairs
        self.max_wait = max_wait_ms / 1000
        self._queues: OrderedDict[str, deque[Group]] = OrderedDict()   # per owner; the next one to serve first
        self._queued_jobs = 0
        self._queued_pairs = 0
        self.pairs_per_s: float | None = None    # the model thread's scoring rate, measured on its calls
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

    def drain_seconds(self, pairs: float) -> float:
        """How long the model thread takes for `pairs`, at the rate it has been scoring (1 s until measured)."""
        return pairs / self.pairs_per_s if self.pairs_per_s else 1.0

    def _groups(self, jobs: list) -> list[list]:
        """`jobs` in order, cut into model calls of at most `max_batch` jobs and `max_call_pairs` pairs."""
        groups, pairs = [], 0
        for job in jobs:
            if not groups or len(groups[-1]) >= self.max_batch or pairs + job.pairs > self.max_call_pairs:
                groups.append([])
                pairs = 0
            groups[-1].append(job)
            pairs += job.pairs
        return groups

    async def submit(self, engine, jobs: list, owner: str = "") -> list:
        """Answers for `jobs`, all scored by `engine` (requests in flight finish on the model they started on), in
        model calls of at most `max_batch` jobs and `max_call_pairs` pairs, queued under `owner`. An empty queue
        takes any request, however large (the request limits bound it), so none waits forever."""
        pairs = sum(job.pairs for job in jobs)
        if self._queued_pairs and self._queued_pairs + pairs > self.max_queue_pairs:
            wait = self.drain_seconds(self._queued_pairs)
            raise QueueFull(f"request queue is full ({self._queued_pairs} pairs waiting to be scored, about "
                            f"{wait:.1f} s of work)", max(1, math.ceil(wait)))
        loop = asyncio.get_running_loop()
        queue = self._queues.setdefault(owner, deque())
        futures = []
        for group in self._groups(jobs):
            futures.append(loop.create_future())
            queue.append(Group(engine, group, futures[-1], time.perf_counter(), sum(job.pairs for job in group)))
            self._queued_jobs += len(group)
        self._queued_pairs += pairs
        self._gauge()
        self._wakeup.set()
        return [answer for group_answers in await asyncio.gather(*futures) for answer in group_answers]

    def _take_batch(self) -> tuple[Any, list[Group]]:
        """One model call: the owners' oldest groups in turn (an owner served goes to the back of the line), of the
        first one's engine, while they fit in `max_batch` jobs and `max_call_pairs` pairs (a group is never split;
        the first is taken whatever its size)."""
        engine = next(iter(self._queues.values()))[0].engine
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
                if taken and (jobs + len(group.jobs) > self.max_batch or pairs + group.pairs > self.max_call_pairs):
                    continue
                taken.append(queue.popleft())
                jobs, pairs, progress = jobs + len(group.jobs), pairs + group.pairs, True
                self._queues.move_to_end(owner)
                if not queue:
                    del self._queues[owner]
        self._queued_jobs -= jobs
        self._queued_pairs -= pairs
        self._gauge()
        return engine, taken

    def _gauge(self) -> None:
        metrics.QUEUE_DEPTH.set(self._queued_jobs)
        metrics.QUEUE_PAIRS.set(self._queued_pairs)

    def _measured(self, pairs: int, seconds: float) -> None:
        if seconds > 0:
            rate = pairs / seconds
            self.pairs_per_s = rate if self.pairs_per_s is None else (
                RATE_SMOOTHING * rate + (1 - RATE_SMOOTHING) * self.pairs_per_s)

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
                self._measured(sum(group.pairs for group in groups), time.perf_counter() - now)
                start = 0
                for group in groups:
                    if not group.future.done():  # the client may have gone away
                        group.future.set_result(answers[start:start + len(group.jobs)])
                    start += len(group.jobs)


def run_on(executor: ThreadPoolExecutor, fn: Callable, *args):
    return asyncio.get_running_loop().run_in_executor(executor, fn, *args)
