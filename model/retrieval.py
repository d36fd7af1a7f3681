"""The cheap first stage of two-stage recommendation: item-to-item retrieval, and how CMN re-ranks what it finds.

A retrieval stage is a sparse item × item matrix `W` with a bounded number of entries per row, fitted at training
time (RP3beta or ItemKNN CF, training/baselines.py) and stored in the checkpoint. A user's retrieval score for item
j is `Σ_{i ∈ history(u)} W[i, j]`: its history is the seen-set the Recommender keeps, so online feedback changes it
at once, and a user folded in from a history list is served the same way. Both methods' fitted profiles rank as a
binary history does (ItemKNN's TF-IDF scales every item of a user by the same idf), so one rule serves both.

`TwoStage` holds what validation chose: the method, how many candidates R the retrieval proposes, and the weight of
CMN in the blend of the two scores (each standardised over the user's candidates: the two scales are unrelated).
Weight 1 is CMN's order of the retrieved candidates, weight 0 the retrieval's own order.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

STRATEGIES = ("full", "two_stage", "retrieval")


@dataclass
class TwoStage:
    method: str            # rp3beta or itemknn
    candidates: int        # R, retrieved per user before re-ranking
    weight: float          # CMN's weight in the blend, 0..1
    params: dict           # the retrieval method's hyperparameters (for the record)

    def __post_init__(self):
        if self.candidates < 1:
            raise ValueError(f"two-stage candidates must be >= 1, got {self.candidates}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"two-stage weight must be within [0, 1], got {self.weight}")

    def to_dict(self) -> dict:
        return asdict(self)


class ItemRetrieval:
    """`W` as CSR tensors on the scoring device: row i holds the items retrieved by an interaction with i."""

    def __init__(self, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n_items: int,
                 device: str | torch.device = "cpu"):
        if len(indptr) != n_items + 1 or len(indices) != len(values) or int(indptr[-1]) != len(indices):
            raise ValueError(f"retrieval matrix is not a CSR of {n_items} items "
                             f"({len(indptr)} row pointers, {len(indices)} indices, {len(values)} values)")
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= n_items):
            raise ValueError("retrieval matrix names items outside the catalogue")
        self.n_items = n_items
        self.device = torch.device(device)
        self.indptr = indptr.to(self.device, torch.long)
        self.indices = indices.to(self.device, torch.long)
        self.values = values.to(self.device, torch.float32)

    def to(self, device: str | torch.device) -> "ItemRetrieval":
        return ItemRetrieval(self.indptr, self.indices, self.values, self.n_items, device)

    def tensors(self) -> dict[str, torch.Tensor]:
        """For the checkpoint: int32 indices and float32 values (half the bytes of int64)."""
        return {"indptr": self.indptr.cpu(), "indices": self.indices.to(torch.int32).cpu(), "values": self.values.cpu()}

    def scores(self, histories: list[list[int]]) -> torch.Tensor:
        """(U, n_items) retrieval scores of each history: its items' rows of W summed, gathered slot by slot."""
        counts = torch.tensor([len(h) for h in histories], dtype=torch.long)
        items = torch.tensor([i for h in histories for i in h], dtype=torch.long, device=self.device)
        rows = torch.repeat_interleave(torch.arange(len(histories)), counts).to(self.device)
        start, length = self.indptr[items], self.indptr[items + 1] - self.indptr[items]
        n_slots = int(length.sum())
        owner = torch.repeat_interleave(torch.arange(len(items), device=self.device), length, output_size=n_slots)
        slot = torch.arange(n_slots, device=self.device) - (torch.cumsum(length, 0) - length)[owner] + start[owner]
        out = torch.zeros(len(histories) * self.n_items, device=self.device)
        out.index_add_(0, rows[owner] * self.n_items + self.indices[slot], self.values[slot])
        return out.view(len(histories), self.n_items)


def standardise(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per row, (x - mean) / std over the `valid` entries (std 1 where a row has no spread); 0 elsewhere."""
    n = valid.sum(1, keepdim=True).clamp(min=1)
    x = torch.where(valid, scores, 0.0)
    mean = x.sum(1, keepdim=True) / n
    std = ((torch.where(valid, scores - mean, 0.0) ** 2).sum(1, keepdim=True) / n).sqrt()
    return torch.where(valid, (scores - mean) / torch.where(std > 0, std, 1.0), 0.0)


def blend(cmn: torch.Tensor, retrieval: torch.Tensor, valid: torch.Tensor, weight: float) -> torch.Tensor:
    """The two-stage score of (U, W) candidate matrices; -inf where not `valid`."""
    mixed = weight * standardise(cmn, valid) + (1.0 - weight) * standardise(retrieval, valid)
    return mixed.masked_fill(~valid, -torch.inf)
