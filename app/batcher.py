"""Cross-request micro-batching: concurrent requests are scored together, off the event loop.

One dispatcher task feeds one model thread. While the model thread is busy, arriving requests queue up;
the moment it is free they go as one batch (up to `max_batch` jobs), so a lone request never waits and a
loaded server scores many users per call. The queue is bounded by the work it holds, not by its length: past
`max_queue_pairs` (user, item) pairs waiting to be scored, `submit` raises `QueueFull` (→ 503 + Retry-After)
instead of letting latency grow without limit. A whole-catalogue request weighs the catalogue and a 5-candidate
request 5, so a few expensive requests fill it as surely as many cheap ones.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from app import metrics


class QueueFull(RuntimeError):
    pass


class MicroBatcher:
    def __init__(self, executor: ThreadPoolExecutor, max_batch: int, max_wait_ms: float, max_queue_pairs: int):
        self.executor, self.max_batch, self.max_queue_pairs = executor, max_batch, max_queue_pairs
        self.max_wait = max_wait_ms / 1000
        self._queue: deque[tuple[Any, list, asyncio.Future, float]] = deque()
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

    async def submit(self, engine, jobs: list) -> list:
        """Answers for `jobs`, all scored by `engine` (requests in flight finish on the model they started on).
        More than `max_batch` jobs go as several groups, so no scorer call ever sees more than `max_batch` users.
        An empty queue takes any request, however large (the request limits bound it), so none waits forever."""
        pairs = sum(job.pairs for job in jobs)
        if self._queued_pairs and self._queued_pairs + pairs > self.max_queue_pairs:
            raise QueueFull(f"request queue is full ({self._queued_pairs} pairs waiting to be scored)")
        loop = asyncio.get_running_loop()
        futures = []
        for start in range(0, len(jobs), self.max_batch):
            group = jobs[start:start + self.max_batch]
            futures.append(loop.create_future())
            self._queue.append((engine, group, futures[-1], time.perf_counter()))
            self._queued_jobs += len(group)
        self._queued_pairs += pairs
        self._gauge()
        self._wakeup.set()
        return [answer for group_answers in await asyncio.gather(*futures) for answer in group_answers]

    def _take_batch(self) -> tuple[Any, list]:
        """Groups of the head's engine, in order, until max_batch jobs (a group is never split)."""
        engine = self._queue[0][0]
        groups, n, skipped = [], 0, deque()
        while self._queue and (not groups or n + len(self._queue[0][1]) <= self.max_batch):
            group = self._queue.popleft()
            if group[0] is not engine:
                skipped.append(group)
                continue
            groups.append(group)
            n += len(group[1])
        self._queue.extendleft(reversed(skipped))
        self._queued_jobs -= n
        self._queued_pairs -= sum(job.pairs for _, group_jobs, _, _ in groups for job in group_jobs)
        self._gauge()
        return engine, groups

    def _gauge(self) -> None:
        metrics.QUEUE_DEPTH.set(self._queued_jobs)
        metrics.QUEUE_PAIRS.set(self._queued_pairs)

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                if self.max_wait and self._queued_jobs < self.max_batch:
                    await asyncio.sleep(self.max_wait)
                engine, groups = self._take_batch()
                now = time.perf_counter()
                for _, _, _, enqueued in groups:
                    metrics.QUEUE_WAIT.observe(now - enqueued)
                jobs = [job for _, group_jobs, _, _ in groups for job in group_jobs]
                metrics.BATCH_SIZE.observe(len(jobs))
                try:
                    answers = await loop.run_in_executor(self.executor, engine.recommend, jobs)
                except Exception as e:  # a scoring failure fails its batch, never the dispatcher
                    for _, _, future, _ in groups:
                        if not future.done():
                            future.set_exception(e)
                    continue
                start = 0
                for _, group_jobs, future, _ in groups:
                    if not future.done():  # the client may have gone away
                        future.set_result(answers[start:start + len(group_jobs)])
                    start += len(group_jobs)


def run_on(executor: ThreadPoolExecutor, fn: Callable, *args):
    return asyncio.get_running_loop().run_in_executor(executor, fn, *args)
