"""What a recommendation is: one trained CMN, the neighbourhoods it reads, each user's seen-set and the
popularity fallback, in internal ids. The evaluator, every serving process and online feedback go through this
one object, so a served list is, by construction, the list the evaluator ranked. One entry ranks (`recommend`,
as implicit's), one scores (`score`); both take known users or anonymous histories, which are folded in
(model/foldin.py) for the call and stored nowhere:

    rec = Recommender.from_checkpoint("artifacts/model.ckpt", device="cpu")
    items, scores = rec.recommend([3, 17], k=10)                # whole catalogue, seen items removed
    items, scores = rec.recommend([3], k=5, candidates=[[4, 8, 15, 16, 23, 42]], exclude=[[8]])
    items, scores = rec.recommend(histories=[[4, 8, 15]], k=10) # an anonymous history, folded in
    items, scores = rec.popular(k=10)                           # the fallback for a user nobody knows
    rec.explain(3, [42])                                        # the neighbours the last hop attends to

Live users and items and feedback (what changes the model's state online) are model/online.py's.

Top-k, seen-filtering and exclusions run once per batch on the scoring device. Rows are padded to the batch's
largest k: item -1 and score -inf mark the end of a row that had fewer items left (or a smaller k).
The HTTP service maps external ids around it (app/jobs.py); nothing here knows about requests.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch

from model.store.checkpoint import Checkpoint, load_checkpoint
from model.cmn import CMN, slot_rows
from model.device import resolve_device
from model.foldin import FoldedUser, FoldInConfig, fold_in_user
from model.neighbours import neighbour_csr
from model.ranking import top_k
from model.retrieval import STRATEGIES, Retrieval, TwoStage, blend, tiered
from model.scoring import Scorer

Lists = Sequence[Sequence[int]]
Histories = Sequence[Sequence[int] | FoldedUser]   # anonymous users: their items, or their rows already fitted


def known(users) -> list[int]:
    if users is None:
        raise ValueError("give users or histories")
    return [int(u) for u in users]


def item_popularity(train: np.ndarray, n_items: int) -> torch.Tensor:
    """Training users per item: the non-personalised order every model must beat (TopPop) and the fallback."""
    return torch.as_tensor(np.bincount(np.asarray(train)[:, 1], minlength=n_items), dtype=torch.float32)


def per_row(value, n: int) -> list:
    """A setting given once for the batch, or once per row."""
    if isinstance(value, (bool, int, np.integer)):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"{len(value)} values for {n} users")
    return list(value)


class Recommender:
    """Recommendations from one trained CMN in internal ids (0..n_users-1, 0..n_items-1).

    `train` pairs define the neighbourhoods N(i) (inside `scorer`) and the popularity order; `seen` pairs
    (default: `train`) are what `exclude_seen` removes. `seen_sets` and `popularity` are the state online feedback
    grows (model/online.py). Changing it and the fold-in of anonymous histories must not run concurrently with
    scoring: the server calls them all from one model thread.
    """

    def __init__(self, scorer: Scorer, train: np.ndarray, seen: np.ndarray | None = None,
                 retrieval: Retrieval | None = None, two_stage: TwoStage | None = None,
                 foldin: FoldInConfig | None = None):
        if (retrieval is None) != (two_stage is None):
            raise ValueError("a retrieval stage comes with its two-stage settings, and only with them")
        self.scorer = scorer
        self.retrieval, self.two_stage = retrieval, two_stage
        self.device = scorer.device
        seen = train if seen is None else seen
        by_user = [[] for _ in range(self.n_users)]
        for u, i in np.asarray(seen, dtype=np.int64).reshape(-1, 2).tolist():
            by_user[u].append(i)
        self.seen_sets = [set(items) for items in by_user]
        self.interactions = sum(len(s) for s in self.seen_sets)
        self.popularity = item_popularity(train, self.n_items).to(self.device)
        self.foldin = foldin or FoldInConfig()

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint | str, device: str | torch.device = "cpu",
                        seen: np.ndarray | None = None, **scorer_options) -> "Recommender":
        """The model as trained, on `device` (`auto`: cuda when available). The seen-sets (never re-recommended, and
        the history retrieval reads) are every pair the checkpoint knows, or `seen` (evaluation: the training pairs)."""
        ckpt = load_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
        scorer = Scorer.from_checkpoint(ckpt, resolve_device(str(device)), **scorer_options)
        retrieval = None if ckpt.retrieval is None else ckpt.retrieval.to(scorer.device)
        return cls(scorer, ckpt.train, ckpt.seen if seen is None else seen, retrieval, ckpt.two_stage)

    @classmethod
    def from_model(cls, model: CMN, train: np.ndarray, seen: np.ndarray | None = None,
                   retrieval: Retrieval | None = None, two_stage: TwoStage | None = None,
                   **scorer_options) -> "Recommender":
        """A model being trained, with N(i) from `train` as training and evaluation build it: rows oldest first
        (as a checkpoint stores them), each item capped to its last `model.cfg.max_neighbours` rows."""
        indptr, indices, recency = neighbour_csr(train, model.cfg.n_items, model.cfg.max_neighbours)
        return cls(Scorer(model, indptr, indices, recency=recency, **scorer_options), train, seen, retrieval,
                   two_stage)

    @property
    def n_users(self) -> int:
        return self.scorer.n_users

    @property
    def n_items(self) -> int:
        return self.scorer.n_items

    def seen(self, user: int) -> frozenset[int]:
        return frozenset(self.seen_sets[user])

    # ------------------------------------------------------------------ scoring and ranking

    @property
    def strategies(self) -> tuple[str, ...]:
        return STRATEGIES if self.retrieval is not None else ("full",)

    @property
    def default_strategy(self) -> str:
        return self.two_stage.strategy if self.retrieval is not None else "full"

    def _strategy(self, strategy: str | None) -> str:
        strategy = strategy or self.default_strategy
        if strategy not in self.strategies:
            raise ValueError(f"strategy {strategy!r} is not offered by this model (it offers "
                             f"{', '.join(self.strategies)}; two_stage and retrieval need a retrieval stage)")
        return strategy

    @torch.no_grad()
    def recommend(self, users: Sequence[int] | torch.Tensor | None = None, k: int | Sequence[int] = 10,
                  exclude_seen: bool | Sequence[bool] = True, exclude: Lists | None = None,
                  candidates: Lists | None = None, strategy: str | None = None, *,
                  histories: Histories | None = None, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k items per user, best first, and their scores, as (U, max k) cpu tensors.

        The users are known ones (`users`) or anonymous ones given by their `histories` (see `_folded`). `k` and
        `exclude_seen` are given once or per user; `exclude` and `candidates` per user. Without `candidates` the
        whole catalogue is ranked: by CMN over every item (`full`), by CMN over the R items the retrieval stage
        proposes (`two_stage`), or by the retrieval stage alone (`retrieval`); the default is `full` without a
        retrieval stage, else the one validation chose (`TwoStage.strategy`). Given `candidates`, those are ranked in
        the order the whole-catalogue list gives them (`rank_candidates`).
        """
        strategy = self._strategy(strategy)
        if histories is None:
            return self._recommend(known(users), k, exclude_seen, exclude, candidates, strategy)
        with self._folded(histories, seed, users) as scratch:
            return self._recommend(scratch, k, exclude_seen, exclude, candidates, strategy)

    @torch.no_grad()
    def score(self, users: Sequence[int] | torch.Tensor | None = None, items=None, strategy: str | None = None, *,
              histories: Histories | None = None, seed: int | None = None) -> torch.Tensor:
        """(U, C) scores of users (or `histories`, as in `recommend`) × candidate items, or (U, n_items): the
        evaluator's protocol. `two_stage` and `retrieval` rank any items as their whole-catalogue lists do
        (`rank_candidates`): the R retrieved items first (seen items are never retrieved)."""
        strategy = self._strategy(strategy)
        if histories is None:
            return self._score(known(users), items, strategy)
        with self._folded(histories, seed, users) as scratch:
            return self._score(scratch, items, strategy)

    def _score(self, users: list[int], items, strategy: str) -> torch.Tensor:
        if strategy == "full":
            return self.scorer.score(torch.tensor(users, device=self.device), items)
        items = self._catalogue(len(users)) if items is None else torch.as_tensor(items, dtype=torch.long,
                                                                                   device=self.device)
        return self.rank_candidates(users, items, torch.ones_like(items, dtype=torch.bool), strategy,
                                    [list(self.seen_sets[u]) for u in users])

    def _recommend(self, users: list[int], k, exclude_seen, exclude, candidates,
                   strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(users)
        ks, drop_seen = per_row(k, n), per_row(exclude_seen, n)
        exclude = per_row(exclude, n) if exclude is not None else [()] * n
        banned = [list(x) + list(self.seen_sets[u]) if s else list(x) for u, s, x in zip(users, drop_seen, exclude)]
        if candidates is None and strategy == "two_stage":   # the list is the R proposed items, re-ranked
            dense = self._retrieval_scores(users)
            items, valid = self.retrieve(users, banned, dense)
            return self._top(self.score_lists(users, items, valid, strategy, dense), items, banned, ks)
        if candidates is None:
            return self._top(self._score(users, None, strategy), None, banned, ks)
        items, valid = self._pad(per_row(candidates, n))
        scores = (self.score_lists(users, items, valid, strategy) if strategy == "full" else
                  self.rank_candidates(users, items, valid, strategy, banned))
        return self._top(scores, items, banned, ks)

    def _catalogue(self, n_rows: int) -> torch.Tensor:
        return torch.arange(self.n_items, device=self.device).expand(n_rows, -1)

    def rank_candidates(self, users: list[int], items: torch.Tensor, valid: torch.Tensor, strategy: str,
                        banned: list[list[int]]) -> torch.Tensor:
        """(U, W) scores of any items (where `valid`) by `two_stage` or `retrieval`, ranked as the whole-catalogue
        list ranks them (model/retrieval.py `tiered`): the user's R proposed items (`banned` left out) by the
        strategy's score, then the rest by the stage's tail order."""
        histories = [list(self.seen_sets[u]) for u in users]
        if self.two_stage.tail is None:
            dense = tail = self.retrieval.scores(histories)
            if strategy == "retrieval":   # its own order past the R proposed too: the scores as they are
                return dense.gather(1, items.clamp(min=0)).masked_fill(~valid, -torch.inf)
        else:
            members = self.retrieval.member_scores(histories)
            dense, tail = self.retrieval.fuse(members), members[self.two_stage.tail]
        proposed, found = self.retrieve(users, banned, dense)
        return tiered(proposed, found, self.score_lists(users, proposed, found, strategy, dense), items, valid, tail)

    def fold_in(self, items: Sequence[int], seed: int | None = None) -> FoldedUser:
        """A user's rows of M and C fitted to `items` (model/foldin.py), stored nowhere. Deterministic for a seed
        (None: 0)."""
        return fold_in_user(self.scorer, items, self.foldin, seed)

    @contextmanager
    def _folded(self, histories: Histories, seed: int | None, users):
        """Anonymous users (`histories`; `users` must be None) for the duration of the block, as scratch user ids:
        each history is folded in (with `seed`: a history's rows do not depend on the others; a `FoldedUser` is
        used as fitted), its rows sit past the users, in no N(i), and its history is its seen-set (and what
        retrieval reads). Afterwards the users, the neighbourhoods and every trained or live user's scores are as
        before. The folded user is in no N(i), so with `exclude_seen=False` its history items score as if it had
        not joined their neighbourhoods (a live user would have)."""
        if users is not None:
            raise ValueError("give users or histories, not both")
        fitted = [h if isinstance(h, FoldedUser) else self.fold_in(h, seed) for h in histories]
        self.scorer.reserve_users(len(fitted))
        scratch = list(range(self.n_users, self.n_users + len(fitted)))
        if fitted:
            self.scorer.set_users(scratch, torch.stack([f.memory for f in fitted]),
                                  torch.stack([f.output for f in fitted]))
        self.seen_sets.extend(set(f.items) for f in fitted)
        try:
            yield scratch
        finally:
            del self.seen_sets[self.n_users:]

    def retrieve(self, users: list[int], banned: list[list[int]],
                 dense: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-stage candidates: each user's top-R items by retrieval score (`dense`, the users' retrieval scores,
        when already computed), best first, `banned` items left out, as a (U, R) matrix (-1 past a row's end) and
        its mask of real entries."""
        dense = self._retrieval_scores(users) if dense is None else dense.clone()
        found, _ = self._top(dense, None, banned, [self.two_stage.candidates] * len(users))
        found = found.to(self.device)
        return found, found >= 0

    def _retrieval_scores(self, users: list[int]) -> torch.Tensor:
        return self.retrieval.scores([list(self.seen_sets[u]) for u in users])

    def score_lists(self, users: list[int], items: torch.Tensor, valid: torch.Tensor, strategy: str,
                    dense: torch.Tensor | None = None) -> torch.Tensor:
        """(U, W) scores of each user's row of `items` (where `valid`; -inf elsewhere) by `strategy`; `dense`: the
        users' retrieval scores over the catalogue, when already computed."""
        rows = torch.arange(len(users), device=self.device)[:, None].expand_as(items)
        cmn = retrieved = None
        if strategy != "retrieval":
            pair_users = torch.tensor(users, device=self.device)[rows[valid]]
            cmn = torch.full(items.shape, -torch.inf, device=self.device)
            cmn[valid] = self.scorer.score_pairs(pair_users, items[valid])
        if strategy != "full":
            dense = self._retrieval_scores(users) if dense is None else dense
            retrieved = dense.gather(1, items.clamp(min=0)).masked_fill(~valid, -torch.inf)
        if strategy == "two_stage":
            return blend(cmn, retrieved, valid, self.two_stage.weight, self.two_stage.blend)
        return cmn if strategy == "full" else retrieved

    def _pad(self, lists: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Item lists as one (U, longest) matrix, -1 where a row is shorter, and the mask of real entries."""
        counts = torch.tensor([len(c) for c in lists], dtype=torch.long, device=self.device)
        width = int(counts.max()) if len(lists) else 0
        valid = torch.arange(width, device=self.device)[None, :] < counts[:, None]
        items = torch.full((len(lists), width), -1, dtype=torch.long, device=self.device)
        items[valid] = torch.tensor([i for c in lists for i in c], dtype=torch.long, device=self.device)
        return items, valid

    @torch.no_grad()
    def popular(self, k: int = 10, exclude: Sequence[int] = (),
                candidates: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The fallback for users the model does not know: the k most popular items (of `candidates`), as
        (k,) tensors padded like `recommend`'s rows."""
        if candidates is None:
            items, scores = self._top(self.popularity[None].clone(), None, [list(exclude)], [k])
        else:
            listed, valid = self._pad([candidates])
            items, scores = self._top(self.popularity[listed.clamp(min=0)].masked_fill(~valid, -torch.inf), listed,
                                      [list(exclude)], [k])
        return items[0], scores[0]

    def _top(self, scores: torch.Tensor, items: torch.Tensor | None, banned: list[list[int]],
             ks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-wise top-k of `scores` (U, W) whose column j is item `items[u, j]` (or item j when `items` is None),
        with each row's `banned` items removed; one masked top-k for the whole batch."""
        n_rows = len(scores)
        ban_rows = slot_rows(torch.tensor([len(b) for b in banned], dtype=torch.long))
        ban_items = torch.tensor([i for b in banned for i in b], dtype=torch.long)
        ban_rows, ban_items = ban_rows.to(self.device), ban_items.to(self.device)
        if items is None:
            scores[ban_rows, ban_items] = -torch.inf
        elif len(ban_items):
            rows = torch.arange(n_rows, device=self.device)[:, None]
            hit = torch.isin(rows * self.n_items + items, ban_rows * self.n_items + ban_items)
            scores = scores.masked_fill(hit, -torch.inf)
        values, index = top_k(scores, max(ks, default=0))
        top = index if items is None else items.gather(1, index)
        cut = (torch.arange(values.shape[1], device=self.device)[None, :] >=
               torch.tensor(ks, device=self.device)[:, None]) | (values == -torch.inf)
        return top.masked_fill(cut, -1).cpu(), values.masked_fill(cut, -torch.inf).cpu()

    def explain(self, user: int, items: Sequence[int], top: int = 5) -> list[list[tuple[int, float]]]:
        """Per item, the `top` neighbours the user's last hop attends to most, with their attention weights."""
        if not len(items):
            return []
        return self.scorer.attention(user, torch.tensor(list(items), dtype=torch.long, device=self.device), top)

    def warmup(self, calls: int = 1) -> None:
        """Real calls on every route (packed and bucketed catalogue, candidate lists) so that the first request
        does not pay for lazily built caches."""
        batch = min(self.n_users, self.scorer.packed_max_users + 1)
        for n in range(calls):
            self.recommend([n % self.n_users])
            self.recommend([(n + u) % self.n_users for u in range(batch)])
            self.recommend([n % self.n_users], candidates=[range(min(100, self.n_items))])
