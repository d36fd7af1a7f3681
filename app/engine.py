"""The serving side of one loaded model: external ↔ internal ids, batches of requests, metrics.

What a recommendation is (seen-sets, exclusions, top-k, the popularity fallback, online feedback) lives in
`model.recommender.Recommender`, the object the evaluator also ranks through. Requests are `prepare`d on the
event loop (ids resolved, errors raised before anything is queued), then `recommend`ed in batches on the single
model thread, which is also the only thread that applies feedback, so scoring never sees a half-applied update.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from app import metrics
from app.schemas import RecommendRequest
from model.checkpoint import load_checkpoint
from model.feedback import Event, FeedbackLog
from model.recommender import Recommender


class UnknownIds(ValueError):
    def __init__(self, field: str, ids: list[str]):
        super().__init__(f"unknown {field}: {ids[:20]}" + (f" and {len(ids) - 20} more" if len(ids) > 20 else ""))
        self.field, self.ids = field, ids


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


@dataclass
class Answer:
    items: list[tuple[str, float, list[tuple[str, float]] | None]]
    fallback: str | None


class Engine:
    def __init__(self, checkpoint: str, device: str = "auto", explain_top: int = 5):
        start = time.perf_counter()
        ckpt = load_checkpoint(checkpoint)
        self.recommender = Recommender.from_checkpoint(ckpt, device)
        self.device = self.recommender.device
        self.path, self.version = checkpoint, ckpt.model_version
        self.user_ids, self.item_ids = ckpt.user_ids, ckpt.item_ids
        self.user_index = {u: n for n, u in enumerate(self.user_ids)}
        self.item_index = {i: n for n, i in enumerate(self.item_ids)}
        self.explain_top = explain_top
        self.feedback_seq = 0
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
        candidates = None if req.candidates is None else self._items(req.candidates, "candidates",
                                                                      req.ignore_unknown)
        return Job(req.user_id, self.user_index.get(req.user_id), req.k, candidates,
                   self._items(req.exclude, "exclude", req.ignore_unknown), req.exclude_seen, req.explain)

    def recommend(self, jobs: list[Job]) -> list[Answer]:
        """Answers for a batch: one recommender call for every whole-catalogue job, one for every candidate list,
        and the popularity fallback for unknown users."""
        answers: list[Answer | None] = [None] * len(jobs)
        rec = self.recommender
        for wanted in (lambda j: j.candidates is None, lambda j: j.candidates is not None):
            group = [n for n, j in enumerate(jobs) if j.user is not None and wanted(j)]
            if not group:
                continue
            listed = [jobs[n] for n in group]
            candidates = None if listed[0].candidates is None else [j.candidates for j in listed]
            metrics.SCORED_ITEMS.inc(len(listed) * self.n_items if candidates is None else sum(map(len, candidates)))
            items, scores = rec.recommend([j.user for j in listed], [j.k for j in listed],
                                          [j.exclude_seen for j in listed], [j.exclude for j in listed], candidates)
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
        return Answer([(self.item_ids[i], s, e) for (i, s), e in zip(kept, explanations)], fallback)

    # ------------------------------------------------------------------ online feedback

    def apply_feedback(self, events: list[Event]) -> tuple[int, int]:
        """Make events visible at once; returns (applied, deferred). Deferred events name a user or an item
        the model has no embedding for: the next training run (`--feedback`) picks them up."""
        known = [(self.user_index[e.user_id], self.item_index[e.item_id]) for e in events
                 if e.user_id in self.user_index and e.item_id in self.item_index]
        if known:
            users, items = zip(*known)
            self.recommender.add_interactions(users, items)
        return len(known), len(events) - len(known)

    def catch_up(self, store: FeedbackLog) -> int:
        """Apply the store's events this engine has not seen (start-up replay, and after a reload)."""
        rows = store.events(after=self.feedback_seq)
        if rows:
            self.apply_feedback([e for _, e in rows])
            self.feedback_seq = rows[-1][0]
        return len(rows)

    def warmup(self, calls: int) -> None:
        self.recommender.warmup(calls)
