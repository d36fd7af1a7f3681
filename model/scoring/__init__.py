"""THE scorer: the one code path that scores (user, item) pairs for evaluation and for `/recommend`.

`Scorer` is the facade every caller uses; it picks one of four exact routes to the numbers of `CMN.forward` (tests
hold every route to it within 1e-4), one module each:
- pairs.py, `PairRoute`: candidate lists, each (user, item) pair's packed neighbourhood;
- packed.py, `PackedCatalogue`: the whole catalogue for a few users (at most `packed_max_users`), one at a time;
- bucketed.py, `BucketedCatalogue`: the whole catalogue for more users, items in buckets of similar neighbourhood
  length, scored block by block as batched GEMMs;
- graphed.py, `GraphedCatalogue`: the bucketed route sized for a GPU and captured in CUDA graphs (opt-in,
  `graph_catalogue`).
The scorer owns no equations and no state of its own: N(i) is a `NeighbourIndex` (model/neighbours.py), the model's
growable tables a `LiveModel` (model/tables.py); after either changes, the scorer tells the routes what changed.

User-independent terms are rewritten by linearity (exact up to float rounding) and cached, in `Tables` or in
the catalogue routes:
  * hop 1 logits `(m_u + e_i)·M[v] = e_i·M[v] + m_u·M[v]`: the item half cached per slot, the user half one
    product `m_u Mᵀ` per call, gathered per slot;
  * hop 2 query `W_2(m_u + e_i) + b_2 = (W_2 e_i + b_2) + W_2 m_u`: the item half cached per item;
  * the output layer's `U_2 o^H + b = Σ_v p_v (U_2 C[v] + b)` (attention weights sum to 1): the last hop
    sums cached `U_2 C[v] + b` rows instead of `C[v]`, so the `U_2` product never runs per (user, item);
  * `U_1 (m_u ⊙ e_i) = (U_1 diag(m_u)) e_i`: one GEMM of all items against every user's `U_1 diag(m_u)`.

The private torch calls the hot loops want (a softmax into a reused buffer, an unchecked segment maximum) sit
in model/kernels.py, which falls back to public calls where they do not work.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from model.cmn import CMN, gather_neighbourhoods
from model.device import resolve_device
from model.neighbours import NeighbourIndex, neighbour_csr
from model.scoring.bucketed import BLOCK_PAIRS, BucketedCatalogue
from model.scoring.packed import PackedCatalogue
from model.scoring.pairs import PairRoute
from model.tables import LiveModel, Tables

if TYPE_CHECKING:
    from model.scoring.graphed import GraphedCatalogue
    from model.store.checkpoint import Checkpoint

PACKED_MAX_USERS = 8  # up to this many users per call: the packed per-user route (see benchmarks/scorer.py)


def _holds(model: CMN, device: torch.device) -> bool:
    """Whether every parameter of `model` is on `device` (a bare `cuda` meaning the current GPU)."""
    target = torch.empty(0, device=device).device
    return all(p.device == target for p in model.parameters())


class Scorer:
    """Scores users against candidate items or the full catalogue for one trained CMN and one neighbourhood set.

    `indptr`/`indices` are the item → users CSR that defines N(i); `recency` ranks its slots (see `NeighbourIndex`).
    The caller's model is used as it is when it already lives on `device`, else a copy is moved there; either way the
    scorer never changes it (CMN has no dropout or batch norm: its training mode does not change scores). The cached
    tables are rebuilt by `refresh()` after the model's weights change. `chunk_items` bounds a bucket's size (so
    online feedback rebuilds little); `block_pairs` sets the bucketed route's block of (user, item) pairs; calls
    with at most `packed_max_users` users take the packed route (0: never). `graph_catalogue` sends every
    whole-catalogue call through the graph-captured route (opt-in: not yet measured on a GPU). Live users and items
    grow the model's tables (`add_users`, `add_items`): a caller's model is copied first unless `owns_model`
    (`from_checkpoint`'s own). `n_users` counts the users; the user tables may hold more rows (`capacity`), free for
    the next users or for scoring anonymous histories. `feedback_cap` bounds what online feedback adds to N(i) of a
    model trained without a cap (see `NeighbourIndex`).
    """

    def __init__(self, model: CMN, indptr, indices, device: str | torch.device | None = None,
                 chunk_items: int = 2048, block_pairs: int = BLOCK_PAIRS,
                 packed_max_users: int = PACKED_MAX_USERS, recency=None,
                 graph_catalogue: bool = False, owns_model: bool = False, feedback_cap: int | None = None):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        held = model if _holds(model, self.device) else copy.deepcopy(model).to(self.device)
        self.live = LiveModel(held, owns_model or held is not model)
        self.n_items = model.cfg.n_items
        self.n_users = model.cfg.n_users
        self.chunk_items = chunk_items
        self.block_pairs = block_pairs
        self.packed_max_users = packed_max_users
        self.graph_catalogue = graph_catalogue
        self.exclude_self = model.cfg.exclude_self
        self.neighbours = NeighbourIndex(indptr, indices, recency, model.cfg.max_neighbours, self.device,
                                         feedback_cap)
        if self.neighbours.n_items != self.n_items:
            raise ValueError(f"neighbourhood CSR has {self.neighbours.n_items} items, the model {self.n_items}")
        self.routes()

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, device: str | torch.device = "cpu", **options) -> Scorer:
        """The scorer of a checkpoint's model over its training neighbourhoods (capped as trained); `options` as for
        `Scorer`."""
        device = resolve_device(device) if isinstance(device, str) else device
        indptr, indices, recency = neighbour_csr(ckpt.train, ckpt.config.n_items, ckpt.config.max_neighbours)
        return cls(ckpt.build_model(device), indptr, indices, device=device, recency=recency, owns_model=True,
                   **options)

    @property
    def model(self) -> CMN:
        return self.live.model

    @property
    def tables(self) -> Tables:
        return self.live.tables

    @property
    def indptr(self) -> torch.Tensor:
        return self.neighbours.indptr

    @property
    def indices(self) -> torch.Tensor:
        return self.neighbours.indices

    @property
    def capacity(self) -> int:
        """Rows of the user tables: users past `n_users` are free (scratch rows for anonymous histories)."""
        return self.live.capacity

    @torch.no_grad()
    def refresh(self) -> None:
        """Every cache again, after the model's weights changed."""
        self.live.refresh()
        self.routes()

    def routes(self) -> None:
        self.pairs = PairRoute(self.model, self.tables, self.exclude_self)
        self.packed = PackedCatalogue(self.model, self.tables, self.indptr, self.indices)
        self.bucketed: BucketedCatalogue | None = None  # built by the first call that takes that route
        self.graphed: GraphedCatalogue | None = None    # likewise

    @torch.no_grad()
    def bucketed_catalogue(self) -> BucketedCatalogue:
        """The bucketed route, its buckets built now if they are not yet."""
        if self.bucketed is None:
            self.bucketed = BucketedCatalogue(self.model, self.tables, self.indptr, self.indices,
                                              self.chunk_items, self.block_pairs)
        return self.bucketed

    @torch.no_grad()
    def graphed_catalogue(self) -> GraphedCatalogue:
        """The graph-captured route, its buckets built now if they are not yet."""
        if self.graphed is None:
            from model.scoring.graphed import GraphedCatalogue
            self.graphed = GraphedCatalogue.build(self.model, self.tables, self.indptr, self.indices)
        return self.graphed

    # ------------------------------------------------------------------ growth: live users and items

    def _own_model(self) -> None:
        if self.live.own():
            self.routes()

    @torch.no_grad()
    def reserve_users(self, n: int) -> None:
        """Room for `n` rows past the current users (see `LiveModel.reserve_users`)."""
        if self.n_users + n <= self.capacity:
            return
        self._own_model()
        self.live.reserve_users(self.n_users + n)
        self.pairs = PairRoute(self.model, self.tables, self.exclude_self)
        self.packed = PackedCatalogue(self.model, self.tables, self.indptr, self.indices)  # its pattern is user-wide
        if self.bucketed is not None:   # its buckets hold copies of rows that did not change
            self.bucketed.tables = self.tables
        self.graphed = None

    @torch.no_grad()
    def set_users(self, users, memory: torch.Tensor, output: torch.Tensor) -> None:
        """Write rows of M and C (users < `capacity`) and every cache that reads them: the tables' rows, and where a
        user sits in some N(i) (a refit), the neighbour caches of those items."""
        self._own_model()
        users = torch.as_tensor(users, dtype=torch.long, device=self.device)
        self.live.set_users(users, memory, output)
        placed = users[users < self.n_users]    # rows past n_users are in no neighbourhood
        if len(placed):
            touched = self.neighbours.items_of(placed)
            if len(touched):
                self._neighbours_changed(touched)

    @torch.no_grad()
    def add_users(self, memory: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """New users with these rows of M and C, in no neighbourhood yet; returns their ids."""
        self.reserve_users(len(memory))
        users = torch.arange(self.n_users, self.n_users + len(memory), device=self.device)
        self.set_users(users, memory, output)
        self.n_users += len(memory)
        return users

    @torch.no_grad()
    def add_items(self, memory: torch.Tensor) -> torch.Tensor:
        """New items with these rows of E, no users in their neighbourhoods yet; returns their ids."""
        self._own_model()
        items = torch.arange(self.n_items, self.n_items + len(memory), device=self.device)
        self.live.add_items(memory)
        self.neighbours.add_items(len(memory))
        self.n_items += len(memory)
        self.packed = PackedCatalogue(self.model, self.tables, self.indptr, self.indices)
        if self.bucketed is not None:
            self.bucketed.add_items(items)
        self.graphed = None
        return items

    @torch.no_grad()
    def set_items(self, items, memory: torch.Tensor) -> None:
        """Rewrite rows of E (a refit) and the caches that read them."""
        self._own_model()
        items = torch.as_tensor(items, dtype=torch.long, device=self.device)
        self.live.set_items(items, memory)
        self._neighbours_changed(items.cpu())
        if self.bucketed is not None:   # its copy of the item rows, in its order
            self.bucketed.layout()
        self.graphed = None

    def _neighbours_changed(self, touched: torch.Tensor) -> None:
        """Rebuild what caches rows of the `touched` items' neighbourhoods (or of the items themselves)."""
        self.packed = PackedCatalogue(self.model, self.tables, self.indptr, self.indices)
        if self.bucketed is not None:
            self.bucketed.add_neighbours(self.indptr, self.indices, touched)
        if self.graphed is not None:
            self.graphed.add_neighbours(self.indptr, self.indices, touched)

    @torch.no_grad()
    def add_interactions(self, users, items) -> int:
        """Online feedback: put `users[k]` into N(items[k]) (see `NeighbourIndex.insert`). Returns the number of new
        pairs. Built buckets are updated in place (see `BucketedCatalogue.add_neighbours`)."""
        added, touched = self.neighbours.insert(users, items, self.n_users)
        if added:
            self._neighbours_changed(touched)
        return added

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def score(self, users, items=None) -> torch.Tensor:
        """(U, C) scores of users × their candidate items (U, C), or (U, n_items) when `items` is None."""
        users = torch.as_tensor(users, dtype=torch.long, device=self.device)
        if items is None:
            return self.score_all(users)
        items = torch.as_tensor(items, dtype=torch.long, device=self.device)
        flat_users = users[:, None].expand_as(items).reshape(-1)
        return self.score_pairs(flat_users, items.reshape(-1)).view(items.shape)

    @torch.no_grad()
    def score_pairs(self, users: torch.Tensor, items: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        out = torch.empty(len(users), device=self.device)
        for s in range(0, len(users), chunk):
            out[s:s + chunk] = self.pairs.score(users[s:s + chunk], items[s:s + chunk], self.indptr, self.indices)
        return out

    @torch.no_grad()
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        if self.exclude_self:  # the catalogue routes hold neighbourhoods with every user in; exclusion takes pairs
            return self.score(users, torch.arange(self.n_items, device=self.device).expand(len(users), -1))
        if self.graph_catalogue:
            return self.graphed_catalogue().score(users)
        if len(users) <= self.packed_max_users:
            return torch.stack([self.packed.score(int(u)) for u in users.tolist()]) if len(users) else \
                torch.empty(0, self.n_items, device=self.device)
        return self.bucketed_catalogue().score(users)

    @torch.no_grad()
    def attention(self, user: int, items: torch.Tensor, top: int = 5) -> list[list[tuple[int, float]]]:
        """For each item, the `top` most attended neighbour users in the last hop with their (non-zero) weights."""
        items = torch.as_tensor(items, dtype=torch.long, device=self.device)
        users = torch.full_like(items, user)
        nbr, seg = gather_neighbourhoods(self.indptr, self.indices, users, items, self.exclude_self)
        _, p = self.model(users, items, nbr, seg, return_attention=True)
        # by item, then by weight descending: two stable sorts, exact (a float key seg·2 − p rounds small
        # weights away in float32 and mis-orders them)
        order = torch.argsort(p, descending=True, stable=True)
        order = order[torch.argsort(seg[order], stable=True)]
        nbr, seg, p = nbr[order].tolist(), seg[order].tolist(), p[order].tolist()
        out: list[list[tuple[int, float]]] = [[] for _ in range(len(items))]
        for v, s, w in zip(nbr, seg, p):
            if len(out[s]) < top and w > 0:  # peaked attention underflows to exactly 0: nobody to name
                out[s].append((v, w))
        return out
