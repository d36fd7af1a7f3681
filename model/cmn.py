"""Collaborative Memory Network (Ebesu, Shen & Fang, SIGIR 2018), as the authors' TF1 code computes it.

Neighbourhoods travel packed, never padded: `nbr_users[t]` is a user in the neighbourhood of pair
`nbr_segment[t]` of the batch, so an item with 300 users and one with 3 cost what they hold.
See docs/model.md and ../shared/docs/cmn-reference.md for the equations.

Besides the module, this file owns the pieces every other computation of the equations shares: the
neighbourhood-to-slot expansion (`slot_rows`, `expand_slots`), packed neighbourhoods (`Packed`, `pack`), the
memory read outside autograd (`attend`) with the one exp floor (`EXP_FLOOR`), and the loss (`bpr_loss`) that
training, the graph step and fold-in minimise.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import kernels

# The one exp floor of every memory read outside autograd's own softmax (the scorer's packed and pair routes,
# fold-in): a weight is at least e^-30 (9e-14) of its neighbourhood's largest, which is exactly 1. Below float32's
# resolution of a sum that holds that 1 (6e-8) for up to ~10^6 slots, so scores do not change; and it keeps weights,
# and their products with table rows and gradients, out of float32's denormals, which x86 CPUs compute ~30x slower
# than normal numbers: a trained CMN's attention is so peaked that 70-90% of its slots land below e^-87 (citeulike-a,
# paper setting). Fold-in's backward treats floored slots as constant (no gradient: their true share is below that
# resolution too); with the floor at -87 its products underflowed, and a step on citeulike-a's model took 5.0 ms
# instead of 3.1 (50-item histories, median over 20). The bucketed route's fused softmax (and training) has no floor:
# measured on a trained checkpoint, the extra pass costs about what it saves.
EXP_FLOOR = -30.0


@dataclass
class CMNConfig:
    n_users: int
    n_items: int
    embed_size: int = 50
    hops: int = 3
    l2: float = 0.1
    # N(i) leaves the querying user out (not the paper's rule): an inference setting too, so it lives here
    exclude_self: bool = False
    # N(i) holds at most this many users, the item's newest (model/neighbours.py); None: all of them (the paper's)
    max_neighbours: int | None = None

    def __post_init__(self):
        if self.max_neighbours is not None and self.max_neighbours < 1:
            raise ValueError(f"max_neighbours must be >= 1, got {self.max_neighbours}")
        if self.hops < 1:
            raise ValueError(f"hops must be >= 1, got {self.hops}")
        if self.embed_size < 1:
            raise ValueError(f"embed_size must be >= 1, got {self.embed_size}")

    def to_dict(self) -> dict:
        return asdict(self)


def truncated_normal_(t: torch.Tensor, std: float) -> torch.Tensor:
    """TF's truncated_normal: redraws beyond two standard deviations."""
    return nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)


def variance_scaling_(linear: nn.Linear, bias: float) -> nn.Linear:
    """TF1 `variance_scaling_initializer(factor=2, mode=FAN_IN, uniform=False)`: std sqrt(1.3 * 2 / fan_in)."""
    truncated_normal_(linear.weight.data, math.sqrt(2.6 / linear.in_features))
    nn.init.constant_(linear.bias, bias)
    return linear


def segment_softmax(logits: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Softmax of `logits` within each segment (slots with equal `segment`)."""
    peak = torch.full((n_segments,), -torch.inf, dtype=logits.dtype, device=logits.device)
    peak = peak.scatter_reduce(0, segment, logits.detach(), "amax")
    w = torch.exp(logits - peak[segment])
    total = torch.zeros(n_segments, dtype=logits.dtype, device=logits.device).index_add(0, segment, w)
    return w / total.index_select(0, segment)  # index_select: its backward is a fast index_add


class CMN(nn.Module):
    def __init__(self, cfg: CMNConfig, sparse_grad: bool = True):
        super().__init__()
        self.cfg = cfg
        # TF's gather yields row-sparse gradients; keeping them sparse lets the optimiser touch only batch rows
        self.sparse_grad = sparse_grad
        d = cfg.embed_size
        self.user_memory = nn.Parameter(truncated_normal_(torch.empty(cfg.n_users, d), 0.01))  # M, keys and m_u
        self.user_output = nn.Parameter(truncated_normal_(torch.empty(cfg.n_users, d), 0.01))  # C, values
        self.item_memory = nn.Parameter(truncated_normal_(torch.empty(cfg.n_items, d), 0.01))  # E
        self.hop_maps = nn.ModuleList(variance_scaling_(nn.Linear(d, d), bias=1.0) for _ in range(cfg.hops - 1))
        self.output = variance_scaling_(nn.Linear(2 * d, d), bias=0.0)  # U, b
        self.v = nn.Linear(d, 1, bias=False)
        nn.init.xavier_uniform_(self.v.weight)

    def embed(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.sparse_grad:
            return F.embedding(ids, table, sparse=True)
        # index_select's backward is one index_add into a dense gradient: no host sync, so a CUDA graph can
        # capture it (training/graph_step.py)
        return table.index_select(0, ids)

    def forward(self, users: torch.Tensor, items: torch.Tensor, nbr_users: torch.Tensor, nbr_segment: torch.Tensor,
                return_attention: bool = False):
        """Scores r_ui for the (B,) pairs (users[b], items[b]); N(items[b]) = nbr_users[nbr_segment == b]."""
        n = len(users)
        m_u = self.embed(self.user_memory, users)
        e_i = self.embed(self.item_memory, items)
        keys = self.embed(self.user_memory, nbr_users)
        values = self.embed(self.user_output, nbr_users)
        z = m_u + e_i
        o = None
        for hop in range(self.cfg.hops):
            if hop > 0:
                z = F.relu(self.hop_maps[hop - 1](z) + o)
            p = segment_softmax((keys * z.index_select(0, nbr_segment)).sum(-1), nbr_segment, n)
            o = torch.zeros_like(z).index_add(0, nbr_segment, p.unsqueeze(-1) * values)
        score = self.v(F.relu(self.output(torch.cat([m_u * e_i, o], -1)))).squeeze(-1)
        return (score, p) if return_attention else score

    def l2_penalty(self) -> torch.Tensor:
        """TF `l2_regularizer(λ)` = λ·Σw²/2 on the hop maps, the output layer and the output vector only."""
        weights = [m.weight for m in self.hop_maps] + [self.output.weight, self.v.weight]
        return self.cfg.l2 * sum(w.pow(2).sum() for w in weights) / 2


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """BPR: -log σ(r_ui - r_uj), averaged; `neg` (B,) or (B, k), one positive per row."""
    return -torch.log(torch.sigmoid(pos.view(len(pos), -1) - neg.view(len(pos), -1)) + 1e-12).mean()


def slot_rows(lengths: torch.Tensor, n_slots: int | None = None) -> torch.Tensor:
    """The row of each slot when rows of `lengths` slots sit back to back (`n_slots`: their sum, if known)."""
    return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths, output_size=n_slots)


def expand_slots(start: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The neighbourhood-to-slot expansion: rows of a CSR (row r: its `lengths[r]` entries from `start[r]`) laid
    back to back. Returns (rows, at, crow): each slot's row, its position in the CSR's entries, and the (R + 1,)
    first slot of each row."""
    crow = torch.zeros(len(lengths) + 1, dtype=torch.long, device=lengths.device)
    torch.cumsum(lengths, 0, out=crow[1:])
    n_slots = int(crow[-1])
    rows = slot_rows(lengths, n_slots)
    at = torch.arange(n_slots, device=lengths.device).add_((start - crow[:-1]).index_select(0, rows))
    return rows, at, crow


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
    return pack_csr(users, rows, lengths, crow, n_users)


def pack_csr(users: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor, crow: torch.Tensor,
             n_users: int) -> Packed:
    """As `pack`, with `crow` (R + 1,) the rows' slot ranges."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta": sampled_addmm on CSR is all we use
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, users, torch.zeros(len(users), device=users.device),
                                          size=(len(lengths), n_users))
    return Packed(users, rows, lengths, crow[:-1], pattern)


def attend(nbrs: Packed, logits: torch.Tensor, table_ones: torch.Tensor, d: int) -> torch.Tensor:
    """The memory read without autograd: Σ_v softmax(logits)_v table[v] per row, by segment max, floored exp, and
    one embedding_bag whose ones column (`table_ones`' column d) yields the softmax denominator. Overwrites
    `logits`."""
    peak = kernels.segment_max(logits, nbrs.lengths, nbrs.rows)
    weights = logits.sub_(peak.index_select(0, nbrs.rows)).clamp_(min=EXP_FLOOR).exp_()
    sums = F.embedding_bag(nbrs.users, table_ones, nbrs.offsets, mode="sum", per_sample_weights=weights)
    return torch.div(sums[:, :d], sums[:, d:d + 1])


def gather_neighbourhoods(indptr: torch.Tensor, indices: torch.Tensor, users: torch.Tensor, items: torch.Tensor,
                          exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed neighbourhoods (nbr_users, nbr_segment) of the pairs (users[b], items[b]) from the item → users CSR.

    With `exclude_self`, the querying user is left out of its item's neighbourhood. A neighbourhood that is
    empty is `[u]`, the querying user alone (the original code's rule for items with no training users).
    """
    start = indptr[items]
    segment, at, _ = expand_slots(start, indptr[items + 1] - start)
    nbr = indices[at]
    if exclude_self:
        keep = nbr != users[segment]
        nbr, segment = nbr[keep], segment[keep]
    empty = torch.bincount(segment, minlength=len(items)) == 0
    if empty.any():
        alone = torch.nonzero(empty).squeeze(1)
        nbr, segment = torch.cat([nbr, users[alone]]), torch.cat([segment, alone])
    return nbr, segment
