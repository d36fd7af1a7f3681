"""The serving side of one loaded model: external ↔ internal ids, batches of requests, metrics.

What a recommendation is (seen-sets, exclusions, top-k, the popularity fallback, online feedback) lives in
`model.recommender.Recommender`, the object the evaluator also ranks through. Requests are `prepare`d on the
event loop (ids resolved, errors raised before anything is queued), then `recommend`ed in batches on the single
model thread, which is also the only thread that applies feedback, so scoring never sees a half-applied update.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from app import metrics
from app.schemas import RecommendRequest
from model.checkpoint import MAX_BYTES, load_checkpoint, model_version
from model.feedback import Event, FeedbackStore
from model.quality import checkpoint_warnings
from model.recommender import Recommender


CATCH_UP_PAGE = 50_000
# what a checkpoint's model_version may be: it is echoed in every answer, log line and metric label
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}")


def served_version(stored: str, state: dict, path: str) -> str:
    """The checkpoint's model_version when it is a short printable token, else the weights' content hash (stamped
    with the file's modification time, in the format training writes)."""
    return stored if VERSION.fullmatch(stored) else model_version(state, os.path.getmtime(path))


class UnsupportedStrategy(ValueError):
    """A strategy the loaded model does not offer (→ 422)."""


class UnknownIds(ValueError):
    """Candidate or exclude ids the model does not know. The 422 lists only the first ECHOED of them (each id is
    up to 256 characters) and counts the rest: a request naming 10,000 unknown ids gets a short answer."""
    ECHOED = 20

    def __init__(self, field: str, ids: list[str]):
        more = f" (the first {self.ECHOED} are listed)" if len(ids) > self.ECHOED else ""
        super().__init__(f"{len(ids)} {field} ids are unknown to the model{more}")
        self.field, self.ids = field, ids[:self.ECHOED]
        self.count = len(ids)


@dataclass
class Job:
    """One request with ids resolved against one engine."""
    user_id: str
    user: int | None                  # None: unknown user, served by popularity
    k: int
    candidates: list[int] | None      # item ids, or None for the whole catalogue
    exclude: list[int]                # item ids removed besides the seen-set
    exclude_seen: bool
    explain: bool
    strategy: str
    pairs: int                        # what it costs the model thread: the queue limit counts these


@dataclass
class Answer:
    items: list[tuple[str, float, list[tuple[str, float]] | None]]
    fallback: str | None
    strategy: str | None = None


class Engine:
    def __init__(self, checkpoint: str, device: str = "auto", explain_top: int = 5, max_bytes: int = MAX_BYTES,
                 within: str | None = None, graph_catalogue: bool = False):
        """`max_bytes`, `within`: see `load_checkpoint` (a path a client named must lie `within` a directory)."""
        start = time.perf_counter()
        ckpt = load_checkpoint(checkpoint, max_bytes, within)
        self.recommender = Recommender.from_checkpoint(ckpt, device, graph_catalogue=graph_catalogue)
        self.device = self.recommender.device
        self.path, self.version = checkpoint, served_version(ckpt.model_version, ckpt.state, checkpoint)
        self.user_ids, self.item_ids = ckpt.user_ids, ckpt.item_ids
        self.user_index = {u: n for n, u in enumerate(self.user_ids)}
        self.item_index = {i: n for n, i in enumerate(self.item_ids)}
        self.explain_top = explain_top
        self.feedback_seq = 0
        self.warnings = checkpoint_warnings(ckpt.metrics)  # /health and the load log repeat them
        self.load_seconds = time.perf_counter() - start

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    # ------------------------------------------------------------------ requests

    def _items(self, ids: list[str], field: str, ignore_unknown: bool) -> list[int]:
        # one C-level pass, and no torch call: this runs on the event loop, where every torch call is a chance
        # for the model thread to take the GIL (tensors are made once per batch, on the model thread)
        found = list(map(self.item_index.get, ids))
        if None in found:
            if not ignore_unknown:
                raise UnknownIds(field, [i for i, n in zip(ids, found) if n is None])
            found = [n for n in found if n is not None]
        return found

    def prepare(self, req: RecommendRequest) -> Job:
        """Resolve ids; raises UnknownIds (→ 422) before anything is queued."""
        strategy = req.strategy or self.recommender.default_strategy
        if strategy not in self.recommender.strategies:
            raise UnsupportedStrategy(f"strategy {strategy!r} needs a retrieval stage, which this model does not have "
                                      f"(it offers {', '.join(self.recommender.strategies)}; train with --validation "
                                      "to fit one)")
        candidates = None if req.candidates is None else self._items(req.candidates, "candidates",
                                                                      req.ignore_unknown)
        # a retrieval-only request scores no CMN pair but is still work: it counts as one
        pairs = max(1, self.scored_per_user(strategy) if candidates is None else len(candidates))
        return Job(req.user_id, self.user_index.get(req.user_id), req.k, candidates,
                   self._items(req.exclude, "exclude", req.ignore_unknown), req.exclude_seen, req.explain, strategy,
                   pairs)

    def recommend(self, jobs: list[Job]) -> list[Answer]:
        """Answers for a batch: one recommender call per strategy for the whole-catalogue jobs and one per strategy
        for the candidate lists, and the popularity fallback for unknown users."""
        answers: list[Answer | None] = [None] * len(jobs)
        rec = self.recommender
        groups: dict[tuple[bool, str], list[int]] = {}
        for n, j in enumerate(jobs):
            if j.user is not None:
                groups.setdefault((j.candidates is None, j.strategy), []).append(n)
        for (whole, strategy), group in groups.items():
            listed = [jobs[n] for n in group]
            candidates = None if whole else [j.candidates for j in listed]
            metrics.SCORED_ITEMS.labels(strategy).inc(
                sum(map(len, candidates)) if candidates else len(listed) * self.scored_per_user(strategy))
            items, scores = rec.recommend([j.user for j in listed], [j.k for j in listed],
                                          [j.exclude_seen for j in listed], [j.exclude for j in listed], candidates,
                                          strategy)
            for n, job, row_items, row_scores in zip(group, listed, items.tolist(), scores.tolist()):
                answers[n] = self._answer(job, row_items, row_scores, None)
        for n, job in enumerate(jobs):
            if job.user is None:
                items, scores = rec.popular(job.k, job.exclude, job.candidates)
                answers[n] = self._answer(job, items.tolist(), scores.tolist(), "unknown_user")
        return answers

    def _answer(self, job: Job, items: list[int], scores: list[float], fallback: str | None) -> Answer:
        kept = [(i, s) for i, s in zip(items, scores) if i >= 0]
        explanations = [None] * len(kept)
        if job.explain and job.user is not None:
            explanations = [[(self.user_ids[v], w) for v, w in row]
                            for row in self.recommender.explain(job.user, [i for i, _ in kept], self.explain_top)]
        return Answer([(self.item_ids[i], s, e) for (i, s), e in zip(kept, explanations)], fallback,
                      None if fallback else job.strategy)

    def scored_per_user(self, strategy: str) -> int:
        """Items CMN scores for one whole-catalogue request (the retrieval stage alone scores none)."""
        return {"full": self.n_items, "two_stage": getattr(self.recommender.two_stage, "candidates", 0),
                "retrieval": 0}[strategy]

    # ------------------------------------------------------------------ online feedback

    def knows(self, user_id: str, item_id: str) -> bool:
        return user_id in self.user_index and item_id in self.item_index

    def apply_feedback(self, events: list[Event]) -> tuple[int, int]:
        """Make events visible at once; returns (applied, deferred). Deferred events name a user or an item
        the model has no embedding for: the next training run (`--feedback`) picks them up."""
        known = [(self.user_index[e.user_id], self.item_index[e.item_id]) for e in events
                 if self.knows(e.user_id, e.item_id)]
        if known:
            users, items = zip(*known)
            self.recommender.add_interactions(users, items)
        return len(known), len(events) - len(known)

    def apply_rows(self, rows: list[tuple[int, Event]]) -> None:
        """Apply the store's next events, in sequence order: every process, the writer included, applies each
        event through here exactly once, so all of them reach the same state."""
        if not rows or rows[0][0] <= self.feedback_seq:
            rows = [(seq, e) for seq, e in rows if seq > self.feedback_seq]
        if not rows:
            return
        applied, deferred = self.apply_feedback([e for _, e in rows])
        self.feedback_seq = rows[-1][0]
        metrics.FEEDBACK_APPLIED.labels("applied").inc(applied)
        metrics.FEEDBACK_APPLIED.labels("deferred").inc(deferred)
        metrics.APPLIED_SEQ.set(self.feedback_seq)
        now = time.time()
        for _, e in rows:
            if e.received is not None:
                metrics.APPLY_LAG.observe(max(0.0, now - e.received))

    def catch_up(self, store: FeedbackStore) -> int:
        """Apply the store's events this engine has not seen (start-up replay, and after a reload), a page at a
        time: a store of millions of events is never all in memory."""
        replayed = 0
        while rows := store.events(after=self.feedback_seq, limit=CATCH_UP_PAGE):
            self.apply_rows(rows)
            replayed += len(rows)
        return replayed

    def warmup(self, calls: int) -> None:
        self.recommender.warmup(calls)
