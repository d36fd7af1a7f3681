"""The packed route, the whole catalogue for a few users (at most the scorer's `packed_max_users`), one user at a
time, with no padding: later hops' logits by `torch.sparse.sampled_addmm` on the item → users CSR, softmax by segment,
and the value sums by `F.embedding_bag` with the weights as per-sample weights (`cmn.attend`), which reads the
(cache-resident) user tables instead of streaming a padded copy of them per slot: one user is memory-bound
otherwise."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.cmn import CMN, attend, pack, slot_rows
from model.tables import Tables


class PackedCatalogue:
    """The whole catalogue for one user at a time: every item's neighbourhood packed back to back, no padding."""

    def __init__(self, model: CMN, tables: Tables, indptr: torch.Tensor, indices: torch.Tensor):
        self.model, self.tables = model, tables
        n_items, n_users = model.cfg.n_items, model.cfg.n_users
        lengths = indptr[1:] - indptr[:-1]
        rows = slot_rows(lengths, len(indices))
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

