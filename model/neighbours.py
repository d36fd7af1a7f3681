"""N(i) under a cap: an item's memory holds at most `max_neighbours` users, its newest ones.

The cost of a training triple and of scoring an item grows with the length of its neighbourhood, and popular items
are drawn and ranked the most: without a cap, an item with tens of thousands of users (MovieLens-sized data)
makes training and full-catalogue scoring unaffordable. "Newest" is the order the pairs are given in, oldest
first: training orders them by timestamp (a fixed seeded order where the data has none, training/data.py
`by_recency`), a checkpoint stores its training pairs in that order, and online feedback is newer than all of them.
One rule, `keep_newest`, serves training, evaluation, serving and feedback alike.
"""
from __future__ import annotations

import numpy as np


def keep_newest(items: np.ndarray, recency: np.ndarray, max_neighbours: int | None) -> np.ndarray:
    """Mask of the pairs to keep: per item, the `max_neighbours` with the largest `recency` (ties: the later
    pair). Everything when `max_neighbours` is None."""
    items = np.asarray(items, dtype=np.int64)
    if max_neighbours is None or len(items) == 0:
        return np.ones(len(items), dtype=bool)
    order = np.lexsort((np.arange(len(items)), recency, items))
    sorted_items = items[order]
    group_end = np.searchsorted(sorted_items, sorted_items, side="right")
    keep = np.empty(len(items), dtype=bool)
    keep[order] = group_end - np.arange(len(items)) <= max_neighbours
    return keep


def neighbour_csr(pairs: np.ndarray, n_items: int,
                  max_neighbours: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, indices, recency) of the item → users CSR of `pairs` ((user, item) rows, oldest first), each item
    capped to its newest `max_neighbours` users; users sorted within an item, `recency` = each kept pair's row."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    rows = np.flatnonzero(keep_newest(pairs[:, 1], np.arange(len(pairs)), max_neighbours))
    rows = rows[np.lexsort((pairs[rows, 0], pairs[rows, 1]))]
    indptr = np.zeros(n_items + 1, dtype=np.int64)
    np.cumsum(np.bincount(pairs[rows, 1], minlength=n_items), out=indptr[1:])
    return indptr, pairs[rows, 0].copy(), rows
