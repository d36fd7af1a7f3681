"""Vectorised BPR triples: every training pair `neg` times per epoch, each with a fresh negative."""
from __future__ import annotations

import numpy as np

from training.data import pair_keys


class TripleSampler:
    """Negatives are uniform over items with at least one training user that the user has not interacted
    with in training (the original code's rule). Epoch `e` is a pure function of (seed, e), so a resumed run
    sees the same batches.

    Hard negatives (training/finetune.py): `hard_items` is a (users, R) matrix of each user's candidates, a
    retrieval stage's top-R (-1 past a row's end). A fraction `hard` of the triples then draws its negative
    uniformly from its user's candidates less the user's training items; the rest, and every triple of a user
    left with no candidate, keep the uniform rule. With `hard` 0 an epoch is the uniform sampler's, bit for bit."""

    def __init__(self, train: np.ndarray, n_items: int, neg: int = 4, seed: int = 0,
                 hard_items: np.ndarray | None = None, hard: float = 0.0):
        if neg < 1:
            raise ValueError(f"neg must be >= 1, got {neg}")
        if not 0.0 <= hard <= 1.0:
            raise ValueError(f"the hard-negative fraction must be within [0, 1], got {hard}")
        if hard > 0 and hard_items is None:
            raise ValueError("hard negatives need each user's candidates (hard_items)")
        self.train, self.n_items, self.neg, self.seed, self.hard = train, n_items, neg, seed, hard
        self.train_keys = np.unique(pair_keys(train[:, 0], train[:, 1], n_items))
        self.candidates = np.flatnonzero(np.bincount(train[:, 1], minlength=n_items) > 0)
        per_user = np.bincount(train[:, 0])
        if per_user.max() >= len(self.candidates):
            raise ValueError("a user has interacted with every item that has training users; "
                             "no negative can be sampled for it")
        if hard_items is not None:
            if len(hard_items) < len(per_user):
                raise ValueError(f"hard_items has candidates for {len(hard_items):,} users; the training pairs "
                                 f"have {len(per_user):,}")
            self.hard_indptr, self.hard_indices = self._hard_csr(np.asarray(hard_items, dtype=np.int64))

    def _hard_csr(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each user's candidates as a user → items CSR, padding and training items removed."""
        users = np.repeat(np.arange(len(items)), items.shape[1]).reshape(items.shape)
        keep = (items >= 0) & ~np.isin(pair_keys(users, items.clip(min=0), self.n_items), self.train_keys)
        indptr = np.zeros(len(items) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum(keep.sum(1))
        return indptr, items[keep]

    def __len__(self) -> int:
        return len(self.train) * self.neg

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(users, positives, negatives), shuffled."""
        rng = np.random.default_rng([self.seed, epoch])
        idx = rng.permutation(np.repeat(np.arange(len(self.train)), self.neg))
        users, pos = self.train[idx, 0], self.train[idx, 1]
        neg = self.candidates[rng.integers(0, len(self.candidates), len(idx))]
        bad = np.flatnonzero(np.isin(pair_keys(users, neg, self.n_items), self.train_keys))
        while len(bad):  # rejection sampling, vectorised over the rejected slots only
            neg[bad] = self.candidates[rng.integers(0, len(self.candidates), len(bad))]
            bad = bad[np.isin(pair_keys(users[bad], neg[bad], self.n_items), self.train_keys)]
        if self.hard > 0:   # drawn after the uniform ones, so that hard 0 leaves the uniform epoch as it was
            start, count = self.hard_indptr[users], np.diff(self.hard_indptr)[users]
            slots = np.flatnonzero((rng.random(len(idx)) < self.hard) & (count > 0))
            neg[slots] = self.hard_indices[start[slots] + (rng.random(len(slots)) * count[slots]).astype(np.int64)]
        return users, pos, neg
