"""One loaded model and everything derived from it: scorer cache, id maps, seen-sets, popularity.

Requests are first `prepare`d on the event loop (ids resolved, errors raised before queueing), then
scored in batches by `recommend` on the single model thread, which is also the only thread that
mutates the caches (`apply_feedback`), so scoring never sees a half-applied update.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from app import metrics
from app.schemas import RecommendRequest
from model.checkpoint import load_checkpoint
from model.feedback import Event, FeedbackLog
from model.scorer import Scorer, resolve_device, top_k

log = logging.getLogger("cmn.engine")


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
        self.device = resolve_device(device)
        ckpt = load_checkpoint(checkpoint)
        self.path, self.version = checkpoint, ckpt.model_version
        self.scorer = Scorer(ckpt.build_model(self.device), *ckpt.item_users(), device=self.device)
        self.user_ids, self.item_ids = ckpt.user_ids, ckpt.item_ids
        self.user_index = {u: n for n, u in enumerate(self.user_ids)}
        self.item_index = {i: n for n, i in enumerate(self.item_ids)}
        indptr, indices = ckpt.user_items()
        self.seen = [set(indices[indptr[u]:indptr[u + 1]].tolist()) for u in range(len(self.user_ids))]
        self.popularity = torch.as_tensor(np.bincount(ckpt.train[:, 1], minlength=len(self.item_ids)),
                                          dtype=torch.float32)
        self.interactions = int(len(ckpt.seen))
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
        # for the model thread to take the GIL (tensors are made once per batch, in `recommend`)
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

    @torch.no_grad()
    def recommend(self, jobs: list[Job]) -> list[Answer]:
        """Score a batch: one full-catalogue call for all whole-catalogue users, one pair call for all
        candidate lists, popularity for unknown users."""
        answers: list[Answer | None] = [None] * len(jobs)
        full = [n for n, j in enumerate(jobs) if j.user is not None and j.candidates is None]
        pairs = [n for n, j in enumerate(jobs) if j.user is not None and j.candidates is not None]
        unknown = [n for n, j in enumerate(jobs) if j.user is None]
        metrics.SCORED_ITEMS.inc(len(full) * self.n_items + sum(len(jobs[n].candidates) for n in pairs))
        if full:
            users = torch.tensor([jobs[n].user for n in full], device=self.device)
            scores = self.scorer.score(users)
            rows, cols = self._ban_rows([jobs[n] for n in full])
            scores[rows.to(self.device), cols.to(self.device)] = -torch.inf
            values, index = top_k(scores, max(jobs[n].k for n in full))
            for n, v, i in zip(full, values.tolist(), index.tolist()):
                answers[n] = self._answer(jobs[n], v[:jobs[n].k], i[:jobs[n].k], None)
        if pairs:
            listed = [jobs[n] for n in pairs]
            items, counts = self._item_lists(listed)
            users = torch.repeat_interleave(torch.tensor([j.user for j in listed]), counts)
            scores = self.scorer.score_pairs(users.to(self.device), items.to(self.device)).cpu()
            for n, answer in zip(pairs, self._rank_candidates(listed, items, counts, scores, None)):
                answers[n] = answer
        if unknown:
            listed = [jobs[n] for n in unknown]
            items, counts = self._item_lists(listed)
            for n, answer in zip(unknown, self._rank_candidates(listed, items, counts, self.popularity[items],
                                                                "unknown_user")):
                answers[n] = answer
        return answers

    def _item_lists(self, jobs: list[Job]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every job's item list (its candidates, or the catalogue) back to back, and their lengths."""
        counts = torch.tensor([self.n_items if j.candidates is None else len(j.candidates) for j in jobs])
        if any(j.candidates is None for j in jobs):
            items = torch.cat([torch.arange(self.n_items) if j.candidates is None
                               else torch.tensor(j.candidates, dtype=torch.long) for j in jobs])
        else:
            items = torch.tensor(list(chain.from_iterable(j.candidates for j in jobs)), dtype=torch.long)
        return items, counts

    def _ban_rows(self, jobs: list[Job]) -> tuple[torch.Tensor, torch.Tensor]:
        """(job row, item) of everything each job removes: its exclude list, and its seen-set if asked."""
        banned, counts = [], []
        for j in jobs:
            before = len(banned)
            banned += j.exclude
            if j.exclude_seen and j.user is not None:
                banned += self.seen[j.user]
            counts.append(len(banned) - before)
        return (torch.repeat_interleave(torch.arange(len(jobs)), torch.tensor(counts)),
                torch.tensor(banned, dtype=torch.long))

    def _rank_candidates(self, jobs: list[Job], items: torch.Tensor, counts: torch.Tensor, scores: torch.Tensor,
                         fallback: str | None) -> list[Answer]:
        """Top-k of each job's own item list, `items` and `scores` holding all the lists back to back (lengths
        `counts`): one masked, padded top-k for the whole batch instead of a handful of ops per request."""
        row = torch.repeat_interleave(torch.arange(len(jobs)), counts)
        col = torch.arange(len(row)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        rows, banned = self._ban_rows(jobs)
        keep = ~torch.isin(row * self.n_items + items, rows * self.n_items + banned)
        width = int(counts.max())
        padded = torch.full((len(jobs), width), -torch.inf)
        padded[row, col] = scores.masked_fill(~keep, -torch.inf)
        padded_items = torch.zeros((len(jobs), width), dtype=torch.long)
        padded_items[row, col] = items
        values, index = torch.topk(padded, min(max(j.k for j in jobs), width), dim=1)
        return [self._answer(j, v[:j.k], i[:j.k], fallback)
                for j, v, i in zip(jobs, values.tolist(), padded_items.gather(1, index).tolist())]

    def _answer(self, job: Job, values: list[float], items: list[int], fallback: str | None) -> Answer:
        kept = [(i, v) for i, v in zip(items, values) if v != -math.inf]  # -inf: banned, or padding
        explanations = [None] * len(kept)
        if job.explain and job.user is not None and kept:
            attended = self.scorer.attention(job.user, torch.tensor([i for i, _ in kept], device=self.device),
                                             self.explain_top)
            explanations = [[(self.user_ids[v], w) for v, w in row] for row in attended]
        return Answer([(self.item_ids[i], v, e) for (i, v), e in zip(kept, explanations)], fallback)

    # ------------------------------------------------------------------ online feedback

    def apply_feedback(self, events: list[Event]) -> tuple[int, int]:
        """Make events visible at once; returns (applied, deferred). Deferred events name a user or an item
        the model has no embedding for: the next training run (`--feedback`) picks them up."""
        known = [(self.user_index[e.user_id], self.item_index[e.item_id]) for e in events
                 if e.user_id in self.user_index and e.item_id in self.item_index]
        if known:
            users, items = torch.tensor(known).T
            new = [(u, i) for u, i in known if i not in self.seen[u]]
            for u, i in new:
                self.seen[u].add(i)
                self.popularity[i] += 1
            self.interactions += len(new)
            self.scorer.add_interactions(users, items)
        return len(known), len(events) - len(known)

    def catch_up(self, store: FeedbackLog) -> int:
        """Apply the store's events this engine has not seen (start-up replay, and after a reload)."""
        rows = store.events(after=self.feedback_seq)
        if rows:
            self.apply_feedback([e for _, e in rows])
            self.feedback_seq = rows[-1][0]
        return len(rows)

    def warmup(self, calls: int) -> None:
        """Real scoring calls so the first request does not pay for lazy initialisation."""
        for n in range(calls):
            user = n % self.n_users
            job = Job(self.user_ids[user], user, 10, None, [], True, False)
            pairs = Job(self.user_ids[user], user, 10, list(range(min(100, self.n_items))), [], True, False)
            self.recommend([job, pairs])
