"""One loaded model as the service sees it: external ↔ internal ids, requests mapped to jobs and batches of jobs
to answers, the store's events applied to it, metrics.

What a recommendation is (seen-sets, exclusions, top-k, the popularity fallback) lives in
`model.recommender.Recommender`, the object the evaluator also ranks through; live users and items in
`model.online.Online`. Requests are `prepare`d on the event loop (ids resolved, errors raised before anything is
queued; app/jobs.py), then `recommend`ed in batches on the single model thread, which is also the only thread that
applies feedback, so scoring never sees a half-applied update.
"""
from __future__ import annotations

import os
import re
import time
import zlib

from app import metrics
from app.jobs import Answer, Job, UnknownIds, UnsupportedStrategy
from app.schemas import RecommendRequest
from model.store.checkpoint import MAX_BYTES, load_checkpoint, model_version
from model.store.events import Event, FeedbackStore
from model.quality import checkpoint_warnings
from model.online import Online
from model.recommender import Recommender


CATCH_UP_PAGE = 50_000
DEFAULT_PAIRS_PER_S = 1_000_000   # the scoring rate assumed until the model thread has measured one
SMOOTHING = 0.2                   # weight of the last call in the measured rates
# what a checkpoint's model_version may be: it is echoed in every answer, log line and metric label
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}")


def served_version(stored: str, state: dict, path: str) -> str:
    """The checkpoint's model_version when it is a short printable token, else the weights' content hash (stamped
    with the file's modification time, in the format training writes)."""
    return stored if VERSION.fullmatch(stored) else model_version(state, os.path.getmtime(path))


def stable_seed(external_id: str) -> int:
    """The fold-in seed of a live user or item: every process creating it from the same events fits the same rows."""
    return zlib.crc32(external_id.encode())


class Throughput:
    """What the model thread's work costs on this engine, measured on its own calls (moving averages): scored
    pairs per second, and seconds per fold-in. Every limit on that work counts scored pairs (app/batcher.py,
    app/auth.py); a fold-in counts as the pairs the thread scores in the time it takes (issue 23: it was counted as
    ~len(history) pairs, a thirtieth of its cost). Until measured, `foldin_pairs` and DEFAULT_PAIRS_PER_S stand in."""

    def __init__(self, foldin_pairs: int):
        self.assumed_foldin_pairs = foldin_pairs
        self.pairs_per_s: float | None = None
        self.foldin_s: float | None = None

    @property
    def rate(self) -> float:
        return self.pairs_per_s or DEFAULT_PAIRS_PER_S

    def foldin_pairs(self) -> int:
        if self.foldin_s is None or self.pairs_per_s is None:
            return self.assumed_foldin_pairs
        return max(1, round(self.foldin_s * self.pairs_per_s))

    def pairs_in(self, seconds: float) -> float:
        return seconds * self.rate

    def seconds(self, pairs: float) -> float:
        return pairs / self.rate

    def observe(self, scored: int, scoring_s: float, foldins: int, foldin_s: float) -> None:
        """One model call: `scored` pairs in `scoring_s` seconds, `foldins` histories fitted in `foldin_s`."""
        def smooth(old: float | None, new: float) -> float:
            return new if old is None else SMOOTHING * new + (1 - SMOOTHING) * old
        if scored and scoring_s > 0:
            self.pairs_per_s = smooth(self.pairs_per_s, scored / scoring_s)
        if foldins:
            self.foldin_s = smooth(self.foldin_s, foldin_s / foldins)


class Engine:
    def __init__(self, checkpoint: str, device: str = "auto", explain_top: int = 5, max_bytes: int = MAX_BYTES,
                 within: str | None = None, graph_catalogue: bool = False, max_live_users: int = 10_000,
                 max_live_items: int = 1_000, foldin_pairs: int = 30_000, max_popularity_gain: int | None = None,
                 feedback_cap: int | None = None):
        """`max_bytes`, `within`: see `load_checkpoint` (a path a client named must lie `within` a directory).
        `max_live_users`, `max_live_items`: how many users and items feedback may create before the next training
        run (past them, events for new ones are stored and deferred to it). `foldin_pairs`: what fitting one history
        costs the model thread, in scored pairs, until measured (CMN_FOLDIN_PAIRS). `max_popularity_gain`: see
        `Online` (CMN_MAX_POPULARITY_GAIN). `feedback_cap`: how far feedback grows N(i) of a model trained without a
        cap (model/neighbours.py, CMN_FEEDBACK_NEIGHBOURS_CAP)."""
        start = time.perf_counter()
        ckpt = load_checkpoint(checkpoint, max_bytes, within)
        self.recommender = Recommender.from_checkpoint(ckpt, device, graph_catalogue=graph_catalogue,
                                                       feedback_cap=feedback_cap)
        self.online = Online(self.recommender, max_popularity_gain)   # live users and items: what feedback creates
        self.device = self.recommender.device
        self.path, self.version = checkpoint, served_version(ckpt.model_version, ckpt.state, checkpoint)
        self.user_ids, self.item_ids = list(ckpt.user_ids), list(ckpt.item_ids)  # live ones are appended
        self.max_live_users, self.max_live_items = max_live_users, max_live_items
        self.user_index = {u: n for n, u in enumerate(self.user_ids)}
        self.item_index = {i: n for n, i in enumerate(self.item_ids)}
        self.explain_top = explain_top
        self.throughput = Throughput(foldin_pairs)
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
        exclude = self._items(req.exclude, "exclude", req.ignore_unknown)
        history = None if req.history is None else self._items(req.history, "history", req.ignore_unknown)
        user = None if req.user_id is None else self.user_index.get(req.user_id)
        if user is not None and history and req.exclude_seen:  # a known user's extra items: seen, for this call
            exclude = list(dict.fromkeys(exclude + history))
        # a retrieval-only request scores no CMN pair but is still work: it counts as one
        pairs = max(1, self.scored_per_user(strategy) if candidates is None else len(candidates))
        history = history if user is None and history else None
        if history:
            pairs += self.throughput.foldin_pairs()
        return Job(req.user_id, user, req.k, candidates, exclude, req.exclude_seen, req.explain, strategy, pairs,
                   history)

    def recommend(self, jobs: list[Job]) -> list[Answer]:
        """Answers for a batch: one recommender call per kind of user (known; folded in from a history), strategy,
        and whole catalogue or candidate lists; the popularity fallback for unknown users without a history."""
        start = time.perf_counter()
        answers: list[Answer | None] = [None] * len(jobs)
        rec = self.recommender
        scored, foldins, foldin_s = 0, 0, 0.0
        groups: dict[tuple[bool, bool, str], list[int]] = {}
        for n, j in enumerate(jobs):
            if j.user is not None or j.history:
                groups.setdefault((j.user is None, j.candidates is None, j.strategy), []).append(n)
        for (folded, whole, strategy), group in groups.items():
            listed = [jobs[n] for n in group]
            candidates = None if whole else [j.candidates for j in listed]
            pairs = sum(map(len, candidates)) if candidates else len(listed) * self.scored_per_user(strategy)
            metrics.SCORED_ITEMS.labels(strategy).inc(pairs)
            scored += pairs
            if folded:   # fitted here, timed apart from the scoring: the two rates a job's cost is made of
                fitting = time.perf_counter()
                who = {"histories": [rec.fold_in(j.history, seed=0) for j in listed]}
                foldins, foldin_s = foldins + len(listed), foldin_s + time.perf_counter() - fitting
            else:
                who = {"users": [j.user for j in listed]}
            items, scores = rec.recommend(k=[j.k for j in listed], exclude_seen=[j.exclude_seen for j in listed],
                                          exclude=[j.exclude for j in listed], candidates=candidates,
                                          strategy=strategy, **who)
            for n, job, row_items, row_scores in zip(group, listed, items.tolist(), scores.tolist()):
                cold = "fold_in" if folded else "live_user" if self.online.is_live_user(job.user) else None
                answers[n] = self._answer(job, row_items, row_scores, None, cold)
        for n, job in enumerate(jobs):
            if answers[n] is None:
                items, scores = rec.popular(job.k, job.exclude, job.candidates)
                answers[n] = self._answer(job, items.tolist(), scores.tolist(), "unknown_user")
        self.throughput.observe(scored, time.perf_counter() - start - foldin_s, foldins, foldin_s)
        return answers

    def _answer(self, job: Job, items: list[int], scores: list[float], fallback: str | None,
                cold_start: str | None = None) -> Answer:
        online = self.online
        kept = [(i, s) for i, s in zip(items, scores) if i >= 0]
        explanations = [None] * len(kept)
        if job.explain and job.user is not None:
            explanations = [[(self.user_ids[v], w, online.is_live_user(v)) for v, w in row]
                            for row in self.recommender.explain(job.user, [i for i, _ in kept], self.explain_top)]
        return Answer([(self.item_ids[i], s, online.is_live_item(i), e) for (i, s), e in zip(kept, explanations)],
                      fallback, None if fallback else job.strategy, cold_start)

    def scored_per_user(self, strategy: str) -> int:
        """Items CMN scores for one whole-catalogue request (the retrieval stage alone scores none)."""
        return {"full": self.n_items, "two_stage": getattr(self.recommender.two_stage, "candidates", 0),
                "retrieval": 0}[strategy]

    # ------------------------------------------------------------------ online feedback

    def knows(self, user_id: str, item_id: str) -> bool:
        return user_id in self.user_index and item_id in self.item_index

    def accepts(self, user_id: str, item_id: str) -> bool:
        """Whether an event can take effect now: its user and item are known, or may still be created live."""
        online = self.online
        return ((user_id in self.user_index or online.live_users < self.max_live_users) and
                (item_id in self.item_index or online.live_items < self.max_live_items))

    def apply_feedback(self, events: list[Event]) -> tuple[int, int]:
        """Make events visible at once; returns (applied, deferred).

        An event naming a user or an item the model does not know creates it live (`Online.add_user` /
        `add_item`: rows fitted by fold-in to what it interacted with) while fewer than `max_live_users` /
        `max_live_items` exist; a live user or item given more interactions is fitted again. Deferred: events
        past those bounds, or whose user and item are both new and linked to nothing known; the next training run
        (`--feedback`) folds them in."""
        online = self.online
        created: dict[str, set[int]] = {"item_id": set(), "user_id": set()}
        while True:  # a new item may make a new user's history known, and the other way round
            grew = {new: self._create_live(events, new) for new in created}
            for new, ids in grew.items():
                created[new] |= ids
            if not any(grew.values()):
                break
        created_users, created_items = created["user_id"], created["item_id"]
        users_of, items_of = self.user_index.get, self.item_index.get   # a replay passes here once per event
        known = [(u, i) for u, i in ((users_of(e.user_id), items_of(e.item_id)) for e in events)
                 if u is not None and i is not None]
        if known:
            users, items = zip(*known)
            # refitted only when their interactions grew: a repeated pair changes nothing
            new = online.add_interactions(users, items)
            for u in sorted({u for u, _ in new if online.is_live_user(u)} - created_users):
                online.refit_user(u, seed=stable_seed(self.user_ids[u]))
            for i in sorted({i for _, i in new if online.is_live_item(i)} - created_items):
                online.refit_item(i, seed=stable_seed(self.item_ids[i]))
        metrics.LIVE_USERS.set(online.live_users)
        metrics.LIVE_ITEMS.set(online.live_items)
        return len(known), len(events) - len(known)

    def _create_live(self, events: list[Event], new: str) -> set[int]:
        """Create live the unknown users (`new` = "user_id") or items ("item_id") of `events` that interacted with
        known items (users), in order, while the bound allows; returns their internal ids."""
        online = self.online
        other, ids, index, partners, add, bound, count = (
            ("item_id", self.user_ids, self.user_index, self.item_index, online.add_user, self.max_live_users,
             lambda: online.live_users) if new == "user_id" else
            ("user_id", self.item_ids, self.item_index, self.user_index, online.add_item, self.max_live_items,
             lambda: online.live_items))
        found: dict[str, list[int]] = {}
        for e in events:
            key, partner = getattr(e, new), getattr(e, other)
            if key not in index and partner in partners:
                found.setdefault(key, []).append(partners[partner])
        created = set()
        for key, linked in found.items():
            if count() >= bound:
                break
            created.add(self._register(key, add(linked, seed=stable_seed(key)), ids, index))
        return created

    @staticmethod
    def _register(external_id: str, internal: int, ids: list[str], index: dict[str, int]) -> int:
        if internal != len(ids):
            raise RuntimeError(f"the model gave live id {internal} to {external_id!r}, expected {len(ids)}")
        ids.append(external_id)
        index[external_id] = internal
        return internal

    def apply_rows(self, rows: list[tuple[int, Event]], fresh: bool = True) -> None:
        """Apply the store's next events, in sequence order: every process, the writer included, applies each
        event through here exactly once, so all of them reach the same state. `fresh`: the events were stored
        since this engine last read the store, and their apply lag is observed (a replay's events are as old as
        the store: their lag would measure its age, one histogram observation per event)."""
        if not rows or rows[0][0] <= self.feedback_seq:
            rows = [(seq, e) for seq, e in rows if seq > self.feedback_seq]
        if not rows:
            return
        applied, deferred = self.apply_feedback([e for _, e in rows])
        self.feedback_seq = rows[-1][0]
        metrics.FEEDBACK_APPLIED.labels("applied").inc(applied)
        metrics.FEEDBACK_APPLIED.labels("deferred").inc(deferred)
        metrics.APPLIED_SEQ.set(self.feedback_seq)
        if fresh:
            now = time.time()
            for _, e in rows:
                if e.received is not None:
                    metrics.APPLY_LAG.observe(max(0.0, now - e.received))

    def catch_up(self, store: FeedbackStore) -> int:
        """Apply the store's events this engine has not seen (start-up replay, and after a reload), a page at a
        time: a store of millions of events is never all in memory."""
        replayed = 0
        while rows := store.events(after=self.feedback_seq, limit=CATCH_UP_PAGE):
            self.apply_rows(rows, fresh=False)
            replayed += len(rows)
        return replayed
