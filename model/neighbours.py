"""N(i) under a cap: an item's memory holds at most `max_neighbours` users, its newest ones.

The cost of a training triple and of scoring an item grows with the length of its neighbourhood, and popular items
are drawn and ranked the most: without a cap, an item with tens of thousands of users (MovieLens-sized data)
makes training and full-catalogue scoring unaffordable. "Newest" is the order the pairs are given in, oldest
first: training orders them by timestamp (a fixed seeded order where the data has none, training/data.py
`by_recency`), a checkpoint stores its training pairs in that order, and online feedback is newer than all of them.
One rule, `keep_newest`, serves training, evaluation, serving and feedback alike.

`NeighbourIndex` is the serving side's N(i): the CSR with its slots' recency, grown by online feedback under the cap.
A model trained without a cap (the paper's) is served with one for what feedback adds: `feedback_cap` users per
item, or the item's trained neighbourhood where that is longer (no trained neighbourhood is cut by it), so that
feedback (anyone with a feedback key) cannot grow an item's memory, and the cost of scoring and folding it in,
without bound.
"""
from __future__ import annotations

import numpy as np
import torch

from model.cmn import slot_rows


def keep_newest(items: np.ndarray, recency: np.ndarray, max_neighbours: int | np.ndarray | None) -> np.ndarray:
    """Mask of the pairs to keep: per item, the `max_neighbours` (one for all, or per item id) with the largest
    `recency` (ties: the later pair). Everything when `max_neighbours` is None."""
    items = np.asarray(items, dtype=np.int64)
    if max_neighbours is None or len(items) == 0:
        return np.ones(len(items), dtype=bool)
    order = np.lexsort((np.arange(len(items)), recency, items))
    sorted_items = items[order]
    group_end = np.searchsorted(sorted_items, sorted_items, side="right")
    keep = np.empty(len(items), dtype=bool)
    caps = max_neighbours[sorted_items] if isinstance(max_neighbours, np.ndarray) else max_neighbours
    keep[order] = group_end - np.arange(len(items)) <= caps
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


class NeighbourIndex:
    """The item → users CSR (`indptr`, `indices`: users sorted within an item) that defines N(i), on `device`;
    `recency` ranks its slots (larger: newer; None: all older than any feedback) so that an item over its cap drops
    its oldest. The cap is the model's `max_neighbours`; without one, `feedback_cap` or the item's length as given,
    whichever is larger (`caps`, per item; None: no cap)."""

    def __init__(self, indptr, indices, recency, max_neighbours: int | None, device: torch.device,
                 feedback_cap: int | None = None):
        self.device, self.max_neighbours = device, max_neighbours
        self.indptr = torch.as_tensor(indptr, dtype=torch.long, device=device)
        self.indices = torch.as_tensor(indices, dtype=torch.long, device=device)
        self.recency = torch.zeros(len(self.indices), dtype=torch.long) if recency is None else \
            torch.as_tensor(recency, dtype=torch.long).cpu()
        # what a new item may grow to; its users beyond that are not part of its memory (model/foldin.py)
        self.new_item_cap = max_neighbours if max_neighbours is not None else feedback_cap
        self.caps = None if max_neighbours is not None or feedback_cap is None else \
            np.maximum(self.lengths().cpu().numpy(), feedback_cap)

    @property
    def n_items(self) -> int:
        return len(self.indptr) - 1

    def lengths(self) -> torch.Tensor:
        return self.indptr[1:] - self.indptr[:-1]

    def slot_items(self) -> torch.Tensor:
        """The item of every slot."""
        return slot_rows(self.lengths(), len(self.indices))

    def add_items(self, n: int) -> None:
        """`n` new items with empty neighbourhoods."""
        self.indptr = torch.cat([self.indptr, self.indptr[-1:].expand(n)])
        if self.caps is not None:
            self.caps = np.concatenate([self.caps, np.full(n, self.new_item_cap)])

    def items_of(self, users: torch.Tensor) -> torch.Tensor:
        """The items in whose N(i) any of `users` sits (on the CPU)."""
        slots = torch.isin(self.indices, users)
        return torch.unique(self.slot_items()[slots]).cpu() if bool(slots.any()) else \
            torch.empty(0, dtype=torch.long)

    def insert(self, users, items, n_users: int) -> tuple[int, torch.Tensor]:
        """Put `users[k]` into N(items[k]), the newest member (users < `n_users`); an item that outgrows
        `max_neighbours` drops its oldest. Returns the number of new pairs and the items whose N(i) changed."""
        users = torch.as_tensor(users, dtype=torch.long).cpu()
        items = torch.as_tensor(items, dtype=torch.long).cpu()
        # the slots' keys item·n + user are sorted (items in order, users sorted within one): new pairs are found
        # and inserted by binary search, not by sorting every slot again
        old = (self.slot_items().cpu() * n_users + self.indices.cpu()).numpy()
        new = (items * n_users + users).numpy()
        at = np.searchsorted(old, new)
        fresh = (at == len(old)) | (old[np.minimum(at, len(old) - 1)] != new) if len(old) else np.ones(len(new), bool)
        if not fresh.any():
            return 0, torch.empty(0, dtype=torch.long)
        # a pair fed back twice in one call keeps its first place in line
        added, first = np.unique(new[fresh], return_index=True)
        touched = torch.unique(items[torch.from_numpy(fresh)])
        clock = int(self.recency.max()) + 1 if len(self.recency) else 0
        where = np.searchsorted(old, added)
        keys = np.insert(old, where, added)
        recency = np.insert(self.recency.numpy(), where, clock + first)
        cap = self.max_neighbours if self.max_neighbours is not None else self.caps
        if cap is not None:     # only the touched items can have outgrown their cap
            slot_items = keys // n_users
            near = np.isin(slot_items, touched.numpy())
            kept = np.ones(len(keys), dtype=bool)
            kept[near] = keep_newest(slot_items[near], recency[near], cap)
            keys, recency = keys[kept], recency[kept]
        keys, self.recency = torch.from_numpy(keys), torch.from_numpy(recency)
        counts = torch.bincount(keys // n_users, minlength=self.n_items)
        self.indptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]).to(self.device)
        self.indices = (keys % n_users).to(self.device)
        return len(added), touched
