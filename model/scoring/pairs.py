"""The pair route, for candidate lists (per-epoch evaluation, `/recommend` with candidates): CMN.forward's
equations on each (user, item) pair's packed neighbourhood, with logits by `torch.sparse.sampled_addmm` and value sums
by `cmn.attend` as in the packed route, and none of CMN.forward's (slots × d) temporaries. Its pairs share neither
users nor items, so of the scorer's rewrites (model/scoring/__init__.py) it uses the output layer's only."""
from __future__ import annotations

import torch

from model.cmn import CMN, Packed, attend, expand_slots, gather_neighbourhoods, pack, pack_csr
from model.tables import Tables


class PairRoute:
    """Candidate lists: CMN.forward's equations on each (user, item) pair's packed neighbourhood."""

    def __init__(self, model: CMN, tables: Tables, exclude_self: bool):
        self.model, self.tables, self.exclude_self = model, tables, exclude_self

    def score(self, users: torch.Tensor, items: torch.Tensor, indptr: torch.Tensor,
              indices: torch.Tensor) -> torch.Tensor:
        m, t = self.model, self.tables
        d, hops = m.cfg.embed_size, m.cfg.hops
        nbrs = self.neighbourhoods(users, items, indptr, indices)
        m_u, e_i = m.user_memory.index_select(0, users), m.item_memory.index_select(0, items)
        z, o = m_u + e_i, None
        for hop in range(hops):
            if hop > 0:
                hop_map = m.hop_maps[hop - 1]
                z = torch.addmm(hop_map.bias, z, hop_map.weight.T).add_(o).relu_()
            logits = torch.sparse.sampled_addmm(nbrs.pattern, z, t.keys_t, beta=0).values()
            o = attend(nbrs, logits, t.out_values_ones if hop == hops - 1 else t.values_ones, d)
        h = o.addmm_(m_u * e_i, m.output.weight[:, :d].T).relu_()       # + U_1 (m_u ⊙ e_i); o is U_2 o + b
        return torch.mv(h, m.v.weight[0])

    def neighbourhoods(self, users: torch.Tensor, items: torch.Tensor, indptr: torch.Tensor,
                       indices: torch.Tensor) -> Packed:
        """N(items[b]) for every pair b, packed pair after pair (as gather_neighbourhoods, rows kept in order)."""
        n_users = self.model.cfg.n_users
        if self.exclude_self:
            nbr, seg = gather_neighbourhoods(indptr, indices, users, items, True)
            order = torch.argsort(seg, stable=True)  # its empty neighbourhoods come last
            return pack(seg[order], nbr[order], len(users), n_users)
        start = indptr.index_select(0, items)
        lengths = indptr.index_select(0, items + 1) - start
        alone = lengths == 0                           # N(i) = [u]
        lengths = lengths.masked_fill(alone, 1)
        rows, slot, crow = expand_slots(start, lengths)
        nbr = indices.index_select(0, slot.clamp_(max=max(len(indices) - 1, 0))) if len(indices) \
            else torch.zeros(len(slot), dtype=torch.long, device=indptr.device)
        if bool(alone.any()):
            nbr = torch.where(alone.index_select(0, rows), users.index_select(0, rows), nbr)
        return pack_csr(nbr, rows, lengths, crow, n_users)
