"""The bucketed route, the whole catalogue for more users than the packed route takes: items grouped into `Bucket`s of
similar neighbourhood length (padding stays within a bucket, not to the data set's maximum), each bucket's neighbour
keys and values precomputed, so a batch of users costs batched GEMMs. Items are scored in blocks of about
`BLOCK_PAIRS` (user, item) pairs: the hop maps and the output layer run as one GEMM over a block whatever the buckets
in it, a block's activations stay cache-sized and one `Workspace` serves every block (fresh large allocations
page-fault on every call). The scorer builds the buckets on the first call that needs them: training builds a scorer
every epoch for candidate lists only. Its softmax is `kernels.softmax_into`, unfloored (see `cmn.EXP_FLOOR`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import kernels
from model.cmn import CMN
from model.tables import Tables

BUCKET_CAPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
BLOCK_PAIRS = 16384  # (user, item) pairs per block: (pairs × d) floats per activation, L2-sized


def bucket_cap(length: int) -> int:
    for cap in BUCKET_CAPS:
        if length <= cap:
            return cap
    return 1 << (length - 1).bit_length()



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
