"""THE scorer: the one code path that scores (user, item) pairs for evaluation and for `/recommend`.

Two exact routes to the same numbers:
- candidate lists go through `CMN.forward` itself on packed neighbourhoods;
- the whole catalogue goes through a per-model cache: items grouped into buckets of similar neighbourhood
  length (padding stays within a bucket, not to the data set's maximum), each bucket's neighbour keys, values
  and user-independent hop-1 term `e_i·M[v]` precomputed, so a batch of users costs batched GEMMs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.cmn import CMN, gather_neighbourhoods

BUCKET_CAPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


@dataclass
class Bucket:
    items: torch.Tensor        # (n,) item ids
    keys: torch.Tensor         # (n, L, d) M[v] of the neighbours, zero at padding
    values: torch.Tensor       # (n, L, d) C[v]
    item_logits: torch.Tensor  # (n, L) e_i·M[v], -inf at padding
    pad: torch.Tensor          # (n, 1, L) 0 or -inf, added to later hops' logits
    nbr: torch.Tensor          # (n, L) neighbour ids, for reading attention


def bucket_cap(length: int) -> int:
    for cap in BUCKET_CAPS:
        if length <= cap:
            return cap
    return 1 << (length - 1).bit_length()


class Scorer:
    """Scores users against candidate items or the full catalogue for one trained CMN and one neighbourhood set.

    `indptr`/`indices` are the item → users CSR that defines N(i). The cache is rebuilt by `refresh()` after the
    model's weights or the neighbourhoods change.
    """

    def __init__(self, model: CMN, indptr, indices, device: str | torch.device | None = None,
                 chunk_items: int = 2048, exclude_self: bool = False):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.n_items = model.cfg.n_items
        self.n_users = model.cfg.n_users
        self.chunk_items = chunk_items
        self.exclude_self = exclude_self
        self.set_neighbourhoods(indptr, indices)

    def set_neighbourhoods(self, indptr, indices) -> None:
        self.indptr = torch.as_tensor(indptr, dtype=torch.long, device=self.device)
        self.indices = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        if len(self.indptr) != self.n_items + 1:
            raise ValueError(f"neighbourhood CSR has {len(self.indptr) - 1} items, the model {self.n_items}")
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        lengths = (self.indptr[1:] - self.indptr[:-1]).cpu()
        caps = torch.tensor([bucket_cap(int(n)) if n > 0 else 0 for n in lengths.tolist()])
        self.empty_items = torch.nonzero(caps == 0).squeeze(1).to(self.device)
        self.buckets = []
        self.item_bucket = torch.full((self.n_items,), -1, dtype=torch.long)
        for cap in sorted(set(caps.tolist()) - {0}):
            items_cap = torch.nonzero(caps == cap).squeeze(1)
            for chunk in items_cap.split(max(1, min(self.chunk_items, self.chunk_items * 16 // cap))):
                self.item_bucket[chunk] = len(self.buckets)
                self.buckets.append(self._bucket(chunk.to(self.device), cap))

    @torch.no_grad()
    def add_interactions(self, users, items) -> int:
        """Online feedback: put `users[k]` into N(items[k]). Returns the number of new pairs. Only the cache
        buckets holding a touched item are rebuilt (a bucket whose cap is outgrown gets a larger cap)."""
        users = torch.as_tensor(users, dtype=torch.long).cpu()
        items = torch.as_tensor(items, dtype=torch.long).cpu()
        indptr, indices = self.indptr.cpu(), self.indices.cpu()
        lengths = indptr[1:] - indptr[:-1]
        old = torch.repeat_interleave(torch.arange(self.n_items), lengths) * self.n_users + indices
        keys = torch.unique(torch.cat([old, items * self.n_users + users]))
        if len(keys) == len(old):
            return 0
        touched = torch.unique(items[~torch.isin(items * self.n_users + users, old)])
        counts = torch.bincount(keys // self.n_users, minlength=self.n_items)
        self.indptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]).to(self.device)
        self.indices = (keys % self.n_users).to(self.device)
        for b in torch.unique(self.item_bucket[touched]).tolist():
            if b >= 0:
                bucket = self.buckets[b]
                cap = max(bucket.keys.shape[1], bucket_cap(int(counts[bucket.items.cpu()].max())))
                self.buckets[b] = self._bucket(bucket.items, cap)
        newly = touched[self.item_bucket[touched] < 0]
        if len(newly):  # first users of items that had none
            self.item_bucket[newly] = len(self.buckets)
            self.buckets.append(self._bucket(newly.to(self.device), bucket_cap(int(counts[newly].max()))))
            self.empty_items = self.empty_items[~torch.isin(self.empty_items, newly.to(self.device))]
        return len(keys) - len(old)

    def _bucket(self, items: torch.Tensor, cap: int) -> Bucket:
        m = self.model
        start, length = self.indptr[items], self.indptr[items + 1] - self.indptr[items]
        slot = torch.arange(cap, device=self.device)
        real = slot[None, :] < length[:, None]
        nbr = torch.where(real, self.indices[(start[:, None] + slot[None, :]).clamp(max=len(self.indices) - 1)], 0)
        keys = m.user_memory[nbr] * real[..., None]
        item_logits = torch.einsum("nld,nd->nl", keys, m.item_memory[items]).masked_fill(~real, -torch.inf)
        pad = torch.zeros(real.shape, device=self.device).masked_fill(~real, -torch.inf).unsqueeze(1)
        return Bucket(items, keys, m.user_output[nbr] * real[..., None], item_logits, pad, nbr)

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
            u, i = users[s:s + chunk], items[s:s + chunk]
            nbr, seg = gather_neighbourhoods(self.indptr, self.indices, u, i, self.exclude_self)
            out[s:s + chunk] = self.model(u, i, nbr, seg)
        return out

    @torch.no_grad()
    def attention(self, user: int, items: torch.Tensor, top: int = 5) -> list[list[tuple[int, float]]]:
        """For each item, the `top` most attended neighbour users in the last hop with their weights."""
        items = torch.as_tensor(items, dtype=torch.long, device=self.device)
        users = torch.full_like(items, user)
        nbr, seg = gather_neighbourhoods(self.indptr, self.indices, users, items, self.exclude_self)
        _, p = self.model(users, items, nbr, seg, return_attention=True)
        order = torch.argsort(seg * 2.0 - p)  # by item, then by weight descending
        nbr, seg, p = nbr[order].tolist(), seg[order].tolist(), p[order].tolist()
        out: list[list[tuple[int, float]]] = [[] for _ in range(len(items))]
        for v, s, w in zip(nbr, seg, p):
            if len(out[s]) < top:
                out[s].append((v, w))
        return out

    @torch.no_grad()
    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.exclude_self:  # the cache holds neighbourhoods with every user in; per-user exclusion takes pairs
            return self.score(users, torch.arange(self.n_items, device=self.device).expand(len(users), -1))
        m_u = m.user_memory[users]                      # (U, d)
        user_logits = m_u @ m.user_memory.T             # (U, n_users): m_u·M[v] for every v, gathered per bucket
        w_out = m.output.weight                         # (d, 2d) = [U_1 | U_2]
        d = m_u.shape[1]
        out = torch.empty(len(users), self.n_items, device=self.device)
        for b in self.buckets:
            e = m.item_memory[b.items]                                     # (n, d)
            p = torch.softmax(b.item_logits[:, None, :] + user_logits[:, b.nbr].transpose(0, 1), -1)  # (n, U, L)
            o = torch.bmm(p, b.values)                                     # (n, U, d)
            z = m_u[None] + e[:, None]
            for hop_map in m.hop_maps:
                z = F.relu(F.linear(z, hop_map.weight, hop_map.bias) + o)
                p = torch.softmax(torch.baddbmm(b.pad, z, b.keys.transpose(1, 2)), -1)
                o = torch.bmm(p, b.values)
            out[:, b.items] = self._output(m_u[None] * e[:, None], o, w_out, d).T
        if len(self.empty_items):  # N(i) = [u]: every hop attends to u alone, so o = C[u]
            e = m.item_memory[self.empty_items]
            o = m.user_output[users][None].expand(len(e), -1, -1)
            out[:, self.empty_items] = self._output(m_u[None] * e[:, None], o, w_out, d).T
        return out

    def _output(self, gmf: torch.Tensor, o: torch.Tensor, w_out: torch.Tensor, d: int) -> torch.Tensor:
        """vᵀ ReLU(U [m_u ⊙ e_i ; o] + b) with U split in halves, so [;] never materialises."""
        m = self.model
        h = F.relu(F.linear(gmf, w_out[:, :d], m.output.bias) + F.linear(o, w_out[:, d:]))
        return F.linear(h, m.v.weight).squeeze(-1)


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
