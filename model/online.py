"""A Recommender that changes while it serves: online feedback, live users and live items, in internal ids.

    online = Online(Recommender.from_checkpoint("artifacts/model.ckpt"))
    online.add_interactions([3], [42])      # feedback: seen at once, counted in popularity, and 3 joins N(42)
    u = online.add_user([4, 8, 15])         # a live user: folded in, stored, joins N(4), N(8)…
    i = online.add_item([3, u])             # a live item: its row of E fitted from its users
    online.recommender.recommend([u], k=10) # ranked like any user

Users and items past the trained ones are live (`is_live_user`, `is_live_item`): fitted on this process by fold-in
(model/foldin.py, as the recommender's `foldin` sets) and gone at the next load; a training run makes them trained
ones. Every method changes the recommender's state and must not run concurrently with scoring: the server calls
them from its one model thread.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from model.foldin import fold_in_item, fold_in_user
from model.recommender import Recommender


class Online:
    def __init__(self, recommender: Recommender, max_popularity_gain: int | None = None):
        """`max_popularity_gain`: how much fed-back pairs may raise an item's popularity (the fallback's order) over
        its trained count before the next training run (None: no bound)."""
        self.recommender = recommender
        self.trained_users, self.trained_items = recommender.n_users, recommender.n_items
        self.max_popularity_gain = max_popularity_gain
        self._trained_popularity = recommender.popularity.clone()
        self._item_users: dict[int, list[int]] = {}     # each live item's users, in order: what it is fitted from

    @property
    def live_users(self) -> int:
        return self.recommender.n_users - self.trained_users

    @property
    def live_items(self) -> int:
        return self.recommender.n_items - self.trained_items

    def is_live_user(self, user: int) -> bool:
        return self.trained_users <= user < self.recommender.n_users

    def is_live_item(self, item: int) -> bool:
        return self.trained_items <= item < self.recommender.n_items

    @torch.no_grad()
    def add_interactions(self, users: Sequence[int], items: Sequence[int]) -> list[tuple[int, int]]:
        """Known (trained or live) users interacted with known items: never re-recommended from now on, counted in
        popularity, and each user joins its item's neighbourhood. Returns the pairs new to the seen-sets: a pair
        takes effect once, so one already seen changes nothing (a repeat in the feedback store is a no-op, and a
        store compacted of its repeats replays to the same state). A live user's or item's rows stay as fitted until
        `refit_user` / `refit_item`; a live item's retrieval mix follows at once."""
        rec = self.recommender
        users, items = [int(u) for u in users], [int(i) for i in items]
        n_users, n_items = rec.n_users, rec.n_items
        bad = [(u, i) for u, i in zip(users, items) if not (0 <= u < n_users and 0 <= i < n_items)]
        if bad:
            raise ValueError(f"interactions {bad[:3]} name users or items the model does not hold "
                             f"({rec.n_users} users, {rec.n_items} items)")
        new, mixes = [], set()
        for u, i in zip(users, items):
            if i not in rec.seen_sets[u]:
                rec.seen_sets[u].add(i)
                new.append((u, i))
                if i >= self.trained_items:
                    self._item_users[i].append(u)
                if rec.retrieval is not None and self.live_items:  # a live item's mix reads its users' seen-sets
                    mixes.update(j for j in rec.seen_sets[u] if j >= self.trained_items)
        for i in mixes:
            self._retrieval_mix(i)
        rec.interactions += len(new)
        if new:
            self._count([i for _, i in new])
            fresh_users, fresh_items = torch.tensor(new).T
            rec.scorer.add_interactions(fresh_users, fresh_items)
        return new

    def _count(self, items: list[int]) -> None:
        """Popularity counts fed-back pairs, each item gaining at most `max_popularity_gain` over its trained count
        until the next training run: feedback cannot put an item first in every fallback list (issue 23: 800 events
        from one key did). Every process applies the same events in the same order, so they agree on the counts."""
        rec = self.recommender
        index = torch.tensor(items, device=rec.device)
        rec.popularity.index_add_(0, index, torch.ones(len(items), device=rec.device))
        if self.max_popularity_gain is not None:
            touched = index.unique()
            trained = self._trained_popularity
            base = torch.where(touched < len(trained), trained[touched.clamp(max=len(trained) - 1)], 0.0)
            rec.popularity[touched] = torch.minimum(rec.popularity[touched], base + self.max_popularity_gain)

    @torch.no_grad()
    def add_user(self, items: Sequence[int], seed: int | None = None) -> int:
        """A live user: folded in from `items`, stored (its rows grow the user tables, amortised), its items its
        seen-set and counted in popularity, and it joins N(i) of each; returns its id (`n_users` grows by one)."""
        rec = self.recommender
        folded = rec.fold_in(items, seed)
        user = int(rec.scorer.add_users(folded.memory[None], folded.output[None])[0])
        rec.seen_sets.append(set())
        self.add_interactions([user] * len(folded.items), folded.items)
        return user

    @torch.no_grad()
    def refit_user(self, user: int, seed: int | None = None) -> None:
        """Fit a live user's rows again to its seen-set (after `add_interactions` grew it); its slots in N(i) are
        the rows being fitted, and the neighbour caches that hold them are rebuilt."""
        if not self.is_live_user(user):
            raise ValueError(f"user {user} is not a live user (trained users are refitted by a training run)")
        rec = self.recommender
        folded = fold_in_user(rec.scorer, sorted(rec.seen_sets[user]), rec.foldin, seed, user=user)
        rec.scorer.set_users([user], folded.memory[None], folded.output[None])

    @torch.no_grad()
    def add_item(self, users: Sequence[int], seed: int | None = None) -> int:
        """A live item: its row of E fitted from `users` (model/foldin.py), a candidate from now on, in their
        seen-sets and counted in popularity, its users its N(i); the retrieval stage proposes it as the mix of the
        items its users interacted with (model/retrieval.py). Returns its id (`n_items` grows by one)."""
        rec = self.recommender
        memory = fold_in_item(rec.scorer, users, rec.foldin, seed)
        item = int(rec.scorer.add_items(memory[None])[0])
        rec.popularity = torch.cat([rec.popularity, rec.popularity.new_zeros(1)])
        self._item_users[item] = []
        if rec.retrieval is not None:
            rec.retrieval.add_item([], [])
        listed = list(dict.fromkeys(int(u) for u in users))
        self.add_interactions(listed, [item] * len(listed))
        return item

    @torch.no_grad()
    def refit_item(self, item: int, seed: int | None = None) -> None:
        """Fit a live item's row of E again to its users (after `add_interactions` added some)."""
        if not self.is_live_item(item):
            raise ValueError(f"item {item} is not a live item (trained items are refitted by a training run)")
        rec = self.recommender
        rec.scorer.set_items([item], fold_in_item(rec.scorer, self._item_users[item], rec.foldin, seed,
                                                  item=item)[None])

    def _retrieval_mix(self, item: int) -> None:
        """A live item's retrieval mix: the trained items its users interacted with, each by how many of them."""
        counts: dict[int, int] = {}
        for u in self._item_users[item]:
            for i in self.recommender.seen_sets[u]:
                if i < self.trained_items:
                    counts[i] = counts.get(i, 0) + 1
        self.recommender.retrieval.set_item(item, list(counts), list(counts.values()))
