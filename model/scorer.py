"""THE scorer: the one code path that scores (user, item) pairs for evaluation and for `/recommend`.

`Scorer` is the facade every caller uses. It picks one of three exact routes to the numbers of `CMN.forward`
(tests hold every route to it within 1e-4):
- `PairRoute`, candidate lists (per-epoch evaluation, `/recommend` with candidates): CMN.forward's equations on
  each pair's packed neighbourhood, with logits and value sums as in the packed route below and none of its
  (slots × d) temporaries. Attention weights for explanations come from CMN.forward itself.
- `PackedCatalogue`, the whole catalogue for a few users (at most `packed_max_users`), one user at a time, with
  no padding: later hops' logits by `torch.sparse.sampled_addmm` on the item → users CSR, softmax by segment,
  and the value sums by `F.embedding_bag` with the weights as per-sample weights, which reads the
  (cache-resident) user tables instead of streaming a padded copy of them per slot: one user is memory-bound
  otherwise.
- `BucketedCatalogue`, the whole catalogue for more users: items grouped into `Bucket`s of similar
  neighbourhood length (padding stays within a bucket, not to the data set's maximum), each bucket's neighbour
  keys and values precomputed, so a batch of users costs batched GEMMs. Items are scored in blocks of about
  `BLOCK_PAIRS` (user, item) pairs: the hop maps and the output layer run as one GEMM over a block whatever the
  buckets in it, a block's activations stay cache-sized and one `Workspace` serves every block (fresh large
  allocations page-fault on every call). The buckets are built by the first call that needs them: training
  builds a scorer every epoch for candidate lists only.

User-independent terms are rewritten by linearity (exact up to float rounding) and cached, in `Tables` or in
the catalogue routes:
  * hop 1 logits `(m_u + e_i)·M[v] = e_i·M[v] + m_u·M[v]`: the item half cached per slot, the user half one
    product `m_u Mᵀ` per call, gathered per slot;
  * hop 2 query `W_2(m_u + e_i) + b_2 = (W_2 e_i + b_2) + W_2 m_u`: the item half cached per item;
  * the output layer's `U_2 o^H + b = Σ_v p_v (U_2 C[v] + b)` (attention weights sum to 1): the last hop
    sums cached `U_2 C[v] + b` rows instead of `C[v]`, so the `U_2` product never runs per (user, item);
  * `U_1 (m_u ⊙ e_i) = (U_1 diag(m_u)) e_i`: one GEMM of all items against every user's `U_1 diag(m_u)`.
The pair route uses the third only: its pairs share neither users nor items.

The private torch calls the hot loops want (a softmax into a reused buffer, an unchecked segment maximum) sit
in model/kernels.py, which falls back to public calls where they do not work.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from model import kernels
from model.cmn import CMN, gather_neighbourhoods
from model.neighbours import keep_newest, neighbour_csr

if TYPE_CHECKING:
    from model.store.checkpoint import Checkpoint

BUCKET_CAPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
BLOCK_PAIRS = 16384  # (user, item) pairs per block of the bucketed route: (pairs × d) floats per activation, L2-sized
PACKED_MAX_USERS = 8  # up to this many users per call: the packed per-user route (see benchmarks/scorer.py)


# exp of anything below this underflows float32 into denormals (or 0), which x86 CPUs compute ~30x slower than
# normal numbers, and a trained CMN's attention is so peaked that 70-90% of its slots land there (citeulike-a,
# paper setting). Raising a gap to the floor changes its weight by < 1.7e-38 next to the neighbourhood's
# largest (exactly 1): invisible in a float32 sum. Packed routes only: measured on a trained checkpoint, the
# extra pass costs the bucketed route's fused softmax (and training) about what it saves.
EXP_FLOOR = -87.0


@dataclass
class Packed:
    """Neighbourhoods of R rows (items, or (user, item) pairs) back to back, no padding."""
    users: torch.Tensor    # (S,) neighbour ids, row after row
    rows: torch.Tensor     # (S,) the row of each slot
    lengths: torch.Tensor  # (R,)
    offsets: torch.Tensor  # (R,) each row's first slot
    pattern: torch.Tensor  # (R, n_users) sparse CSR whose entries are the slots: sampled_addmm gives their logits


def pack(rows: torch.Tensor, users: torch.Tensor, n_rows: int, n_users: int) -> Packed:
    """`rows` non-decreasing."""
    lengths = torch.bincount(rows, minlength=n_rows)
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
    torch.cumsum(lengths, 0, out=crow[1:])
    return Packed(users, rows, lengths, crow[:-1], _pattern(crow, users, n_rows, n_users))


def _pattern(crow: torch.Tensor, users: torch.Tensor, n_rows: int, n_users: int) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": sampled_addmm on CSR is all we use
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, users, torch.zeros(len(users), device=users.device),
                                       size=(n_rows, n_users))


def bucket_cap(length: int) -> int:
    for cap in BUCKET_CAPS:
        if length <= cap:
            return cap
    return 1 << (length - 1).bit_length()


@dataclass
class Tables:
    """User-independent tables of one model's weights, shared by the routes."""
    out_values: torch.Tensor        # (n_users, d) U_2 C[v] + b: the last hop's values already in the output layer
    values_ones: torch.Tensor       # (n_users, d') C[v], then a ones column (see `of`)
    out_values_ones: torch.Tensor   # (n_users, d') U_2 C[v] + b, then a ones column
    keys_t: torch.Tensor            # (d, n_users) Mᵀ, a view: sampled_addmm then reads M[v] as one contiguous row
    hop2_item: torch.Tensor | None  # (n_items, d) W_2 e_i + b_2, hop 2's item half (None with one hop)

    @classmethod
    def of(cls, model: CMN) -> Tables:
        m, d = model, model.cfg.embed_size
        out_values = F.linear(m.user_output, m.output.weight[:, d:], m.output.bias)
        # the ones column makes embedding_bag sum the softmax denominator too; zero columns after it round rows up
        # to a multiple of 16 floats (64-byte rows: embedding_bag runs measurably faster on them)
        ones = torch.zeros(m.cfg.n_users, -(-(d + 1) // 16) * 16 - d, device=out_values.device)
        ones[:, 0] = 1
        hop2_item = cls.hop2_rows(m, m.item_memory)
        return cls(out_values, torch.cat([m.user_output, ones], 1), torch.cat([out_values, ones], 1),
                   m.user_memory.T, hop2_item)

    def grown(self, model: CMN) -> Tables:
        """These tables for `model` after its user tables grew: the old rows kept as they are (bit for bit, and no
        O(users) recomputation), the new ones zero (no user yet; `set_users` fills them)."""
        extra = model.user_memory.shape[0] - self.out_values.shape[0]
        grow = lambda t: torch.cat([t, t.new_zeros(extra, t.shape[1])])
        values_ones, out_values_ones = grow(self.values_ones), grow(self.out_values_ones)
        values_ones[-extra:, model.cfg.embed_size] = out_values_ones[-extra:, model.cfg.embed_size] = 1
        return Tables(grow(self.out_values), values_ones, out_values_ones, model.user_memory.T, self.hop2_item)

    def set_users(self, model: CMN, users: torch.Tensor) -> None:
        """The rows of `users` after their rows of M and C changed (`keys_t` is a view of M: nothing to do)."""
        d = model.cfg.embed_size
        out = F.linear(model.user_output[users], model.output.weight[:, d:], model.output.bias)
        self.out_values[users] = out
        self.values_ones[users, :d] = model.user_output[users]
        self.out_values_ones[users, :d] = out

    @staticmethod
    def hop2_rows(model: CMN, memory: torch.Tensor) -> torch.Tensor | None:
        """Hop 2's item half `W_2 e + b_2` of the item rows `memory` (None with one hop)."""
        return F.linear(memory, model.hop_maps[0].weight, model.hop_maps[0].bias) if model.hop_maps else None


def attend(packed: Packed, logits: torch.Tensor, table_ones: torch.Tensor, d: int) -> torch.Tensor:
    """Σ_v softmax(logits)_v table[v] per row: segment max, exp, one embedding_bag whose ones column yields the
    softmax denominator. Overwrites `logits`."""
    peak = kernels.segment_max(logits, packed.lengths, packed.rows)
    weights = logits.sub_(peak.index_select(0, packed.rows)).clamp_(min=EXP_FLOOR).exp_()
    sums = F.embedding_bag(packed.users, table_ones, packed.offsets, mode="sum", per_sample_weights=weights)
    return torch.div(sums[:, :d], sums[:, d:d + 1])


class PairRoute:
    """Candidate lists: CMN.forward's equations on each (user, item) pair's packed neighbourhood."""

    def __init__(self, model: CMN, tables: Tables, exclude_self: bool):
        self.model, self.tables, self.exclude_self = model, tables, exclude_self

    def score(self, users: torch.Tensor, items: torch.Tensor, indptr: torch.Tensor,
              indices: torch.Tensor) -> torch.Tensor:
        m, t = self.model, self.tables
        d, hops = m.cfg.embed_size, m.cfg.hops
        packed = self.neighbourhoods(users, items, indptr, indices)
        m_u, e_i = m.user_memory.index_select(0, users), m.item_memory.index_select(0, items)
        z, o = m_u + e_i, None
        for hop in range(hops):
            if hop > 0:
                hop_map = m.hop_maps[hop - 1]
                z = torch.addmm(hop_map.bias, z, hop_map.weight.T).add_(o).relu_()
            logits = torch.sparse.sampled_addmm(packed.pattern, z, t.keys_t, beta=0).values()
            o = attend(packed, logits, t.out_values_ones if hop == hops - 1 else t.values_ones, d)
        h = o.addmm_(m_u * e_i, m.output.weight[:, :d].T).relu_()       # + U_1 (m_u ⊙ e_i); o is U_2 o + b
        return torch.mv(h, m.v.weight[0])

    def neighbourhoods(self, users: torch.Tensor, items: torch.Tensor, indptr: torch.Tensor,
                       indices: torch.Tensor) -> Packed:
        """N(items[b]) for every pair b, packed pair after pair (as gather_neighbourhoods, rows kept in order)."""
        n_users, device = self.model.cfg.n_users, indptr.device
        if self.exclude_self:
            nbr, seg = gather_neighbourhoods(indptr, indices, users, items, True)
            order = torch.argsort(seg, stable=True)  # its empty neighbourhoods come last
            return pack(seg[order], nbr[order], len(users), n_users)
        start = indptr.index_select(0, items)
        lengths = indptr.index_select(0, items + 1) - start
        alone = lengths == 0                           # N(i) = [u]
        lengths = lengths.masked_fill(alone, 1)
        crow = torch.zeros(len(items) + 1, dtype=torch.long, device=device)
        torch.cumsum(lengths, 0, out=crow[1:])
        n_slots = int(crow[-1])
        rows = torch.repeat_interleave(torch.arange(len(items), device=device), lengths, output_size=n_slots)
        slot = torch.arange(n_slots, device=device).add_((start - crow[:-1]).index_select(0, rows))
        nbr = indices.index_select(0, slot.clamp_(max=max(len(indices) - 1, 0))) if len(indices) \
            else torch.zeros(n_slots, dtype=torch.long, device=device)
        if bool(alone.any()):
            nbr = torch.where(alone.index_select(0, rows), users.index_select(0, rows), nbr)
        return Packed(nbr, rows, lengths, crow[:-1], _pattern(crow, nbr, len(items), n_users))


class PackedCatalogue:
    """The whole catalogue for one user at a time: every item's neighbourhood packed back to back, no padding."""

    def __init__(self, model: CMN, tables: Tables, indptr: torch.Tensor, indices: torch.Tensor):
        self.model, self.tables = model, tables
        n_items, n_users = model.cfg.n_items, model.cfg.n_users
        lengths = indptr[1:] - indptr[:-1]
        rows = torch.repeat_interleave(torch.arange(n_items, device=indptr.device), lengths)
        users, keys = indices, rows * n_users + indices
        if len(keys) > 1 and not bool((keys[1:] > keys[:-1]).all()):  # sampled_addmm's CSR wants users sorted
            users = indices[torch.argsort(keys)]
        self.neighbours = pack(rows, users, n_items, n_users)
        self.item_logits = torch.sparse.sampled_addmm(self.neighbours.pattern, model.item_memory, tables.keys_t,
                                                      beta=0).values()  # e_i·M[v] per slot
        self.empty_items = torch.nonzero(lengths == 0).squeeze(1)

    def score(self, user: int) -> torch.Tensor:
        """(n_items,) scores of one user."""
        m, t, nbrs = self.model, self.tables, self.neighbours
        d, hops = m.cfg.embed_size, m.cfg.hops
        m_u = m.user_memory[user]
        logits = self.item_logits + (m.user_memory @ m_u).index_select(0, nbrs.users)
        z = None
        for hop in range(hops):
            last = hop == hops - 1
            if hop > 0:
                logits = torch.sparse.sampled_addmm(nbrs.pattern, z, t.keys_t, beta=0).values()
            o = attend(nbrs, logits, t.out_values_ones if last else t.values_ones, d)
            if last:
                break
            if hop == 0:  # z² = ReLU(W_2 e_i + b_2 + W_2 m_u + o¹)
                z = o.add_(t.hop2_item).add_(F.linear(m_u, m.hop_maps[0].weight)).relu_()
            else:
                hop_map = m.hop_maps[hop]
                z = o.addmm_(z, hop_map.weight.T).add_(hop_map.bias).relu_()
        if len(self.empty_items):  # N(i) = [u]: o^H = C[u]
            o[self.empty_items] = t.out_values[user]
        h = o.addmm_(m.item_memory, m.output.weight[:, :d].T * m_u[:, None]).relu_()   # U_1 diag(m_u) e_i
        return torch.mv(h, m.v.weight[0])


@dataclass
class Bucket:
    items: torch.Tensor               # (n,) item ids
    keys: torch.Tensor | None         # (n, L, d) M[v] of the neighbours, zero at padding (None with one hop)
    values: torch.Tensor | None       # (n, L, d) C[v], for hops 1..H-1 (None with one hop)
    out_values: torch.Tensor          # (n, L, d) U_2 C[v] + b, the last hop's values already in the output layer
    item_logits: torch.Tensor         # (n, L) e_i·M[v], -inf at padding
    pad: torch.Tensor                 # (n, L, 1) 0 or -inf, added to later hops' logits
    nbr: torch.Tensor                 # (n, L) neighbour ids, for reading attention


@dataclass
class Workspace:
    """One bucketed call's buffers, reused by every block."""
    activations: tuple[torch.Tensor, torch.Tensor]  # (step, U, d) each: zʰ and oʰ, trading buffers hop by hop
    output: torch.Tensor    # (step, U, d) the last hop's U_2 o^H + b, then the output layer's hidden activations
    logits: torch.Tensor    # (slots·U,) one bucket piece's attention logits, laid out (items, slots, users)
    weights: torch.Tensor   # (slots·U,) their softmax over slots


class BucketedCatalogue:
    """The whole catalogue for a batch of users: buckets of padded neighbourhoods, scored block by block."""

    def __init__(self, model: CMN, tables: Tables, indptr: torch.Tensor, indices: torch.Tensor,
                 chunk_items: int, block_pairs: int):
        self.model, self.tables, self.block_pairs = model, tables, block_pairs
        self.indptr, self.indices = indptr, indices
        device = indptr.device
        lengths = (indptr[1:] - indptr[:-1]).cpu()
        caps = torch.tensor([bucket_cap(int(n)) if n > 0 else 0 for n in lengths.tolist()])
        self.empty_items = torch.nonzero(caps == 0).squeeze(1).to(device)
        self.buckets: list[Bucket] = []
        self.item_bucket = torch.full((model.cfg.n_items,), -1, dtype=torch.long)
        for cap in sorted(set(caps.tolist()) - {0}):
            items_cap = torch.nonzero(caps == cap).squeeze(1)
            for chunk in items_cap.split(max(1, min(chunk_items, chunk_items * 16 // cap))):
                self.item_bucket[chunk] = len(self.buckets)
                self.buckets.append(self._bucket(chunk.to(device), cap))
        self.layout()

    def add_neighbours(self, indptr: torch.Tensor, indices: torch.Tensor, touched: torch.Tensor) -> None:
        """The CSR after the neighbourhoods of `touched` items changed (grew, or under a `max_neighbours` cap swapped
        their oldest users for new ones): only their buckets are rebuilt (a bucket whose cap is outgrown gets a
        larger cap; items that had no neighbours form a new bucket)."""
        self.indptr, self.indices = indptr, indices
        counts = (indptr[1:] - indptr[:-1]).cpu()
        touched = touched.cpu()
        for b in torch.unique(self.item_bucket[touched]).tolist():
            if b >= 0:
                bucket = self.buckets[b]
                mine = touched[self.item_bucket[touched] == b]
                cap = bucket.nbr.shape[1]
                if int(counts[mine].max()) <= cap:      # their rows rewritten in place: a bucket holds ~2,048 items
                    self._fill(bucket, torch.searchsorted(bucket.items, mine.to(bucket.items.device)))
                else:
                    self.buckets[b] = self._bucket(bucket.items, bucket_cap(int(counts[bucket.items.cpu()].max())))
        newly = touched[(self.item_bucket[touched] < 0) & (counts[touched] > 0)]
        if len(newly):
            self.item_bucket[newly] = len(self.buckets)
            self.buckets.append(self._bucket(newly.to(indptr.device), bucket_cap(int(counts[newly].max()))))
            self.empty_items = self.empty_items[~torch.isin(self.empty_items, newly.to(indptr.device))]
            self.layout()

    def add_items(self, items: torch.Tensor) -> None:
        """New items, with no neighbours yet (the model's item rows already grown)."""
        self.item_bucket = torch.cat([self.item_bucket, torch.full((len(items),), -1, dtype=torch.long)])
        self.empty_items = torch.cat([self.empty_items, items.to(self.empty_items.device)])
        self.layout()

    def _bucket(self, items: torch.Tensor, cap: int) -> Bucket:
        return Bucket(items, *self._rows(items, cap))

    def _fill(self, bucket: Bucket, rows: torch.Tensor) -> None:
        """Rewrite the rows `rows` of a bucket (their items' neighbourhoods changed within its cap)."""
        fresh = self._rows(bucket.items[rows], bucket.nbr.shape[1])
        for name, value in zip(("keys", "values", "out_values", "item_logits", "pad", "nbr"), fresh):
            if value is not None:
                getattr(bucket, name)[rows] = value

    def _rows(self, items: torch.Tensor, cap: int) -> tuple:
        """A bucket's tensors for `items` padded to `cap` slots, in `Bucket`'s field order after `items`."""
        m, indptr, indices = self.model, self.indptr, self.indices
        start, length = indptr[items], indptr[items + 1] - indptr[items]
        slot = torch.arange(cap, device=items.device)
        real = slot[None, :] < length[:, None]
        nbr = torch.where(real, indices[(start[:, None] + slot[None, :]).clamp(max=len(indices) - 1)], 0)
        keys = m.user_memory[nbr] * real[..., None]
        item_logits = torch.einsum("nld,nd->nl", keys, m.item_memory[items]).masked_fill(~real, -torch.inf)
        pad = torch.zeros(real.shape, device=items.device).masked_fill(~real, -torch.inf).unsqueeze(2)
        deep = m.cfg.hops > 1
        return (keys if deep else None, m.user_output[nbr] * real[..., None] if deep else None,
                self.tables.out_values[nbr] * real[..., None], item_logits, pad, nbr)

    def layout(self) -> None:
        """The item order of a call (bucket after bucket, then the items without neighbours) and the item rows'
        copies in that order; again after item rows changed."""
        order = torch.cat([b.items for b in self.buckets] + [self.empty_items])
        self.position = torch.empty_like(order)
        self.position[order] = torch.arange(len(order), device=order.device)
        self.bucket_start = [0]
        for b in self.buckets:
            self.bucket_start.append(self.bucket_start[-1] + len(b.items))
        self.item_memory = self.model.item_memory[order].contiguous()
        hop2_item = self.tables.hop2_item
        self.hop2_item = None if hop2_item is None else hop2_item[order].contiguous()

    def score(self, users: torch.Tensor) -> torch.Tensor:
        """(U, n_items) scores."""
        m = self.model
        n_users, n_items, d = len(users), m.cfg.n_items, m.cfg.embed_size
        m_u = m.user_memory[users]                                         # (U, d)
        user_logits = m.user_memory @ m_u.T                                # (n_users, U): m_u·M[v], rows per v
        # U_1 diag(m_u) for every user side by side: (d, U·d), so U_1(m_u ⊙ e_i) is e_i @ gmf
        gmf = (m.output.weight[:, :d].T[:, None, :] * m_u.T[:, :, None]).reshape(d, n_users * d)
        hop2_user = F.linear(m_u, m.hop_maps[0].weight) if m.hop_maps else None   # W_2 m_u
        n_real = self.bucket_start[-1]
        step = min(max(1, self.block_pairs // n_users), n_items)
        scores = torch.empty(n_items, n_users, device=users.device)       # in block order, item-major
        ws = self._workspace(step, n_users, d)
        for s in range(0, n_items, step):
            e = min(s + step, n_items)
            o = ws.output[:e - s]
            if e > n_real:  # no neighbours: N(i) = [u], every hop attends to u alone, so o^H = C[u]
                o[max(s, n_real) - s:] = self.tables.out_values[users]
            if s < n_real:
                self._hops(s, min(e, n_real), ws, user_logits, hop2_user)
            h = o.view(e - s, n_users * d).addmm_(self.item_memory[s:e], gmf).relu_()
            torch.mv(h.view(-1, d), m.v.weight[0], out=scores[s:e].view(-1))
        return scores.T.index_select(1, self.position)

    def _workspace(self, step: int, n_users: int, d: int) -> Workspace:
        slots = max((min(len(b.items), step) * b.nbr.shape[1] for b in self.buckets), default=1)
        new = lambda *shape: torch.empty(*shape, device=self.indptr.device)
        return Workspace((new(step, n_users, d), new(step, n_users, d)), new(step, n_users, d),
                         new(slots * n_users), new(slots * n_users))

    def _hops(self, s: int, e: int, ws: Workspace, user_logits: torch.Tensor,
              hop2_user: torch.Tensor | None) -> None:
        """Every hop for the items at block positions s..e (all with neighbours); the last hop's U_2 o + b
        lands in ws.output[:e - s]."""
        m = self.model
        hops, n_users, d = m.cfg.hops, user_logits.shape[1], m.cfg.embed_size
        n = e - s
        pieces = [(b, max(s, lo) - lo, min(e, hi) - lo, max(s, lo) - s)
                  for b, lo, hi in zip(self.buckets, self.bucket_start, self.bucket_start[1:]) if lo < e and hi > s]
        out, spare = ws.activations[0][:n], ws.activations[1][:n]
        z = None
        for hop in range(hops):
            last = hop == hops - 1
            if hop == 1:    # z² = ReLU(W_2 e_i + b_2 + W_2 m_u + o¹), in o¹'s buffer
                z = out.add_(self.hop2_item[s:e, None]).add_(hop2_user).relu_()
                out = spare
            elif hop > 1:   # zʰ = ReLU(W_h zʰ⁻¹ + b_h + oʰ⁻¹), in oʰ⁻¹'s buffer; zʰ⁻¹'s is free after it
                hop_map = m.hop_maps[hop - 1]
                z_next = out.view(-1, d).addmm_(z.view(-1, d), hop_map.weight.T).add_(hop_map.bias).relu_()
                z, out = z_next.view(n, n_users, d), z
            if last:
                out = ws.output[:n]
            for b, lo, hi, at in pieces:
                # logits laid out (items, slots, users): softmax over slots then runs along contiguous users
                k, cap = hi - lo, b.nbr.shape[1]
                logits = ws.logits[:k * cap * n_users].view(k, cap, n_users)
                if hop == 0:  # (m_u + e_i)·M[v]: the user half gathered per slot, the item half cached
                    torch.index_select(user_logits, 0, b.nbr[lo:hi].reshape(-1), out=logits.view(-1, n_users))
                    logits.add_(b.item_logits[lo:hi, :, None])
                else:
                    torch.baddbmm(b.pad[lo:hi], b.keys[lo:hi], z[at:at + k].transpose(1, 2), out=logits)
                weights = kernels.softmax_into(logits, 1, ws.weights[:k * cap * n_users].view(k, cap, n_users))
                values = b.out_values if last else b.values
                torch.bmm(weights.transpose(1, 2), values[lo:hi], out=out[at:at + k])


def _holds(model: CMN, device: torch.device) -> bool:
    """Whether every parameter of `model` is on `device` (a bare `cuda` meaning the current GPU)."""
    target = torch.empty(0, device=device).device
    return all(p.device == target for p in model.parameters())


class Scorer:
    """Scores users against candidate items or the full catalogue for one trained CMN and one neighbourhood set.

    `indptr`/`indices` are the item → users CSR that defines N(i); `recency` ranks its slots (larger: newer), so
    that online feedback under the model's `max_neighbours` cap can drop each item's oldest (None: the slots are
    older than any feedback, in user order). The caller's model is used as it is when it
    already lives on `device`, else a copy is moved there; either way the scorer never changes it (CMN has no
    dropout or batch norm: its training mode does not change scores). The cached tables are rebuilt by
    `refresh()` after the model's weights or the neighbourhoods change. `chunk_items` bounds a bucket's size (so
    online feedback rebuilds little); `block_pairs` sets the bucketed route's block of (user, item) pairs; calls
    with at most `packed_max_users` users take the packed route (0: never). `graph_catalogue` sends every
    whole-catalogue call through the graph-captured route of model/gpu_scorer.py (opt-in: not yet measured on a
    GPU). Live users and items grow the model's tables (`add_users`, `add_items`): a caller's model is copied first
    unless `owns_model` (`from_checkpoint`'s own). `n_users` counts the users; the user tables may hold more rows
    (`capacity`), free for the next users or for scoring anonymous histories.
    """

    def __init__(self, model: CMN, indptr, indices, device: str | torch.device | None = None,
                 chunk_items: int = 2048, block_pairs: int = BLOCK_PAIRS,
                 packed_max_users: int = PACKED_MAX_USERS, recency=None,
                 graph_catalogue: bool = False, owns_model: bool = False):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model if _holds(model, self.device) else copy.deepcopy(model).to(self.device)
        self.owns_model = owns_model or self.model is not model
        self.n_items = model.cfg.n_items
        self.n_users = model.cfg.n_users
        self.chunk_items = chunk_items
        self.block_pairs = block_pairs
        self.packed_max_users = packed_max_users
        self.graph_catalogue = graph_catalogue
        self.exclude_self = model.cfg.exclude_self
        self.max_neighbours = model.cfg.max_neighbours
        self.set_neighbourhoods(indptr, indices, recency)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, device: str | torch.device = "cpu", **options) -> Scorer:
        """The scorer of a checkpoint's model over its training neighbourhoods (capped as trained); `options` as for
        `Scorer`."""
        device = resolve_device(device) if isinstance(device, str) else device
        indptr, indices, recency = neighbour_csr(ckpt.train, ckpt.config.n_items, ckpt.config.max_neighbours)
        return cls(ckpt.build_model(device), indptr, indices, device=device, recency=recency, owns_model=True,
                   **options)

    def set_neighbourhoods(self, indptr, indices, recency=None) -> None:
        self.indptr = torch.as_tensor(indptr, dtype=torch.long, device=self.device)
        self.indices = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        if len(self.indptr) != self.n_items + 1:
            raise ValueError(f"neighbourhood CSR has {len(self.indptr) - 1} items, the model {self.n_items}")
        self.recency = torch.zeros(len(self.indices), dtype=torch.long) if recency is None else \
            torch.as_tensor(recency, dtype=torch.long).cpu()
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        self.tables = Tables.of(self.model)
        self.pairs = PairRoute(self.model, self.tables, self.exclude_self)
        self.packed = PackedCatalogue(self.model, self.tables, self.indptr, self.indices)
        self.bucketed: BucketedCatalogue | None = None  # built by the first call that takes that route
        self.graphed = None                              # likewise (a gpu_scorer.GraphedCatalogue)

    @torch.no_grad()
    def bucketed_catalogue(self) -> BucketedCatalogue:
        """The bucketed route, its buckets built now if they are not yet."""
        if self.bucketed is None:
            self.bucketed = BucketedCatalogue(self.model, self.tables, self.indptr, self.indices,
                                              self.chunk_items, self.block_pairs)
        return self.bucketed

    @torch.no_grad()
    def graphed_catalogue(self):
        """The graph-captured route, its buckets built now if they are not yet."""
        if self.graphed is None:
            from model.gpu_scorer import GraphedCatalogue
            self.graphed = GraphedCatalogue.build(self.model, self.tables, self.indptr, self.indices)
        return self.graphed

    # ------------------------------------------------------------------ growth: live users and items

    @property
    def capacity(self) -> int:
        """Rows of the user tables: users past `n_users` are free (scratch rows for anonymous histories)."""
        return self.model.user_memory.shape[0]

    def _own_model(self) -> None:
        """Growth writes into the model: a caller's model is copied first (the scorer never changes it)."""
        if not self.owns_model:
            self.model = copy.deepcopy(self.model)
            self.owns_model = True
            self.refresh()

    @torch.no_grad()
    def reserve_users(self, n: int) -> None:
        """Room for `n` rows past the current users. The user tables grow by half their size at a time, so users
        added one by one cost amortised O(d) each, not a rebuild of every user-sized cache per user."""
        rows = self.capacity
        if self.n_users + n <= rows:
            return
        self._own_model()
        grown = max(self.n_users + n, rows + rows // 2, rows + 64)
        for name in ("user_memory", "user_output"):
            old = getattr(self.model, name)
            table = torch.cat([old.detach(), old.new_zeros(grown - rows, old.shape[1])])
            setattr(self.model, name, torch.nn.Parameter(table, requires_grad=old.requires_grad))
        self.model.cfg = replace(self.model.cfg, n_users=grown)     # a copy: the config may be a checkpoint's
        self.tables = self.tables.grown(self.model)
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
        self.model.user_memory[users] = memory.to(self.device)
        self.model.user_output[users] = output.to(self.device)
        self.tables.set_users(self.model, users)
        placed = users[users < self.n_users]    # rows past n_users are in no neighbourhood
        if len(placed):
            lengths = self.indptr[1:] - self.indptr[:-1]
            slots = torch.isin(self.indices, placed)
            if bool(slots.any()):
                touched = torch.unique(torch.repeat_interleave(torch.arange(self.n_items, device=self.device),
                                                               lengths)[slots])
                self._neighbours_changed(touched.cpu())

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
        """New items with these rows of E, no users in their neighbourhoods yet; returns their ids. The item tables
        grow by exactly these rows: an item changes the catalogue's width, which every score row has."""
        self._own_model()
        items = torch.arange(self.n_items, self.n_items + len(memory), device=self.device)
        old = self.model.item_memory
        table = torch.cat([old.detach(), memory.to(self.device)])
        self.model.item_memory = torch.nn.Parameter(table, requires_grad=old.requires_grad)
        self.model.cfg = replace(self.model.cfg, n_items=len(table))
        self.n_items = len(table)
        self.indptr = torch.cat([self.indptr, self.indptr[-1:].expand(len(memory))])
        if self.tables.hop2_item is not None:
            self.tables.hop2_item = torch.cat([self.tables.hop2_item, Tables.hop2_rows(self.model, memory)])
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
        self.model.item_memory[items] = memory.to(self.device)
        if self.tables.hop2_item is not None:
            self.tables.hop2_item[items] = Tables.hop2_rows(self.model, self.model.item_memory[items])
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
        """Online feedback: put `users[k]` into N(items[k]), the newest member; under the model's `max_neighbours`
        an item that outgrows it drops its oldest. Returns the number of new pairs. Built buckets are updated in
        place (see `BucketedCatalogue.add_neighbours`)."""
        users = torch.as_tensor(users, dtype=torch.long).cpu()
        items = torch.as_tensor(items, dtype=torch.long).cpu()
        indptr, indices = self.indptr.cpu(), self.indices.cpu()
        lengths = indptr[1:] - indptr[:-1]
        # the slots' keys item·n + user are sorted (items in order, users sorted within one): new pairs are found
        # and inserted by binary search, not by sorting every slot again
        old = (torch.repeat_interleave(torch.arange(self.n_items), lengths) * self.n_users + indices).numpy()
        new = (items * self.n_users + users).numpy()
        at = np.searchsorted(old, new)
        fresh = (at == len(old)) | (old[np.minimum(at, len(old) - 1)] != new) if len(old) else np.ones(len(new), bool)
        if not fresh.any():
            return 0
        # a pair fed back twice in one call keeps its first place in line
        added, first = np.unique(new[fresh], return_index=True)
        touched = torch.unique(items[torch.from_numpy(fresh)])
        clock = int(self.recency.max()) + 1 if len(self.recency) else 0
        where = np.searchsorted(old, added)
        keys = np.insert(old, where, added)
        recency = np.insert(self.recency.numpy(), where, clock + first)
        if self.max_neighbours is not None:     # only the touched items can have outgrown the cap
            slot_items = keys // self.n_users
            near = np.isin(slot_items, touched.numpy())
            kept = np.ones(len(keys), dtype=bool)
            kept[near] = keep_newest(slot_items[near], recency[near], self.max_neighbours)
            keys, recency = keys[kept], recency[kept]
        keys, self.recency = torch.from_numpy(keys), torch.from_numpy(recency)
        counts = torch.bincount(keys // self.n_users, minlength=self.n_items)
        self.indptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]).to(self.device)
        self.indices = (keys % self.n_users).to(self.device)
        self._neighbours_changed(touched)
        return len(added)

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


def top_k(scores: torch.Tensor, k: int, banned: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row with `banned` (bool, same shape) entries removed; rows with fewer than k allowed entries
    return -inf in the tail, which callers drop."""
    if banned is not None:
        scores = scores.masked_fill(banned, -torch.inf)
    return torch.topk(scores, min(k, scores.shape[1]), dim=1)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` = cuda when available, else cpu; an explicit `cuda` without a GPU is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA GPU is available (use --device cpu or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
