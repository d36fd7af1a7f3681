"""Vectorised BPR triples: every training pair `neg` times per epoch, each with a fresh negative."""
from __future__ import annotations

import numpy as np

from training.data import pair_keys


class TripleSampler:
    """Negatives are uniform over items with at least one training user that the user has not interacted
    with in training (the original code's rule). Epoch `e` is a pure function of (seed, e), so a resumed run
    sees the same batches."""

    def __init__(self, train: np.ndarray, n_items: int, neg: int = 4, seed: int = 0):
        if neg < 1:
            raise ValueError(f"neg must be >= 1, got {neg}")
        self.train, self.n_items, self.neg, self.seed = train, n_items, neg, seed
        self.train_keys = np.unique(pair_keys(train[:, 0], train[:, 1], n_items))
        self.candidates = np.flatnonzero(np.bincount(train[:, 1], minlength=n_items) > 0)
        per_user = np.bincount(train[:, 0])
        if per_user.max() >= len(self.candidates):
            raise ValueError("a user has interacted with every item that has training users; "
                             "no negative can be sampled for it")

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
        return users, pos, neg
