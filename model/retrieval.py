"""The cheap first stage of two-stage recommendation: item-to-item retrieval, and how CMN re-ranks what it finds.

A retrieval stage is a sparse item × item matrix `W` with a bounded number of entries per row, fitted at training
time (RP3beta, ItemKNN CF or EASE, training/baselines.py) and stored in the checkpoint. A user's retrieval score for
item j is `Σ_{i ∈ history(u)} W[i, j]`: its history is the seen-set the Recommender keeps, so online feedback changes
it at once, and a user folded in from a history list is served the same way. Every method's fitted profiles rank as
a binary history does (ItemKNN's TF-IDF scales every item of a user by the same idf), so one rule serves them all.

`TwoStage` holds what validation chose: the method, how many candidates R the retrieval proposes, how the two scores
are blended, the weight of CMN in the blend, and the default strategy (`retrieval` where CMN's best weight was 0). The two scales are unrelated, so each score enters either
standardised over the user's candidates (`zscore`, what checkpoints without a `blend` setting use) or by its rank
among them (`rrf`, reciprocal-rank fusion: only the orders count, not how far apart the scores are). Weight 1 is CMN's
order of the retrieved candidates, weight 0 the retrieval's own order, with either blend.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from model.cmn import expand_slots, slot_rows

STRATEGIES = ("full", "two_stage", "retrieval")
BLENDS = ("zscore", "rrf")
RRF_K = 60   # Cormack, Clarke & Büttcher (SIGIR 2009): a rank r counts 1 / (60 + r), r from 1


@dataclass
class TwoStage:
    method: str            # a training/baselines.py ITEM_METHODS name: rp3beta, itemknn or ease
    candidates: int        # R, retrieved per user before re-ranking
    weight: float          # CMN's weight in the blend, 0..1
    params: dict           # the retrieval method's hyperparameters (for the record)
    blend: str = "zscore"  # how the two scores are combined (BLENDS)
    strategy: str = "two_stage"   # the default strategy: two_stage, or retrieval (validation gave CMN weight 0)

    def __post_init__(self):
        if self.candidates < 1:
            raise ValueError(f"two-stage candidates must be >= 1, got {self.candidates}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"two-stage weight must be within [0, 1], got {self.weight}")
        if self.blend not in BLENDS:
            raise ValueError(f"two-stage blend must be one of {', '.join(BLENDS)}, got {self.blend!r}")
        if self.strategy not in STRATEGIES[1:]:
            raise ValueError(f"a retrieval stage's default strategy must be two_stage or retrieval, "
                             f"got {self.strategy!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class ItemRetrieval:
    """`W` as CSR tensors on the scoring device: row i holds the items retrieved by an interaction with i.

    An item added after training (a live item, model/online.py) has no row or column of W. It stands for a mix of
    trained items, those its users interacted with (weights summing to 1): its column is that mix of their columns (a
    user's retrieval score for it is the mix of its scores for them), and in a history it retrieves that mix of their
    rows. Live items are not saved with the stage (`tensors`, `to`): a retrained model has them as trained items.
    """

    def __init__(self, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n_items: int,
                 device: str | torch.device = "cpu"):
        if len(indptr) != n_items + 1 or len(indices) != len(values) or int(indptr[-1]) != len(indices):
            raise ValueError(f"retrieval matrix is not a CSR of {n_items} items "
                             f"({len(indptr)} row pointers, {len(indices)} indices, {len(values)} values)")
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= n_items):
            raise ValueError("retrieval matrix names items outside the catalogue")
        self.n_items = self.n_trained = n_items
        self.device = torch.device(device)
        self.indptr = indptr.to(self.device, torch.long)
        self.indices = indices.to(self.device, torch.long)
        self.values = values.to(self.device, torch.float32)
        self.live: list[tuple[torch.Tensor, torch.Tensor]] = []   # per live item: (trained items, weights)

    def add_item(self, items, weights) -> int:
        """A live item standing for `items` (trained) mixed by `weights`; returns its id (the next item id)."""
        self.live.append(self._mix(items, weights))
        self.n_items += 1
        return self.n_items - 1

    def set_item(self, item: int, items, weights) -> None:
        """A live item's mix, after more users interacted with it."""
        self.live[item - self.n_trained] = self._mix(items, weights)

    def _mix(self, items, weights) -> tuple[torch.Tensor, torch.Tensor]:
        items = torch.as_tensor(items, dtype=torch.long, device=self.device)
        weights = torch.as_tensor(weights, dtype=torch.float32, device=self.device)
        if len(items) and (int(items.min()) < 0 or int(items.max()) >= self.n_trained):
            raise ValueError("a live item's retrieval mix names items that are not trained items")
        return items, weights / weights.sum().clamp(min=1e-12)

    def to(self, device: str | torch.device) -> "ItemRetrieval":
        return ItemRetrieval(self.indptr, self.indices, self.values, self.n_items, device)

    def tensors(self) -> dict[str, torch.Tensor]:
        """For the checkpoint: int32 indices and float32 values (half the bytes of int64)."""
        return {"indptr": self.indptr.cpu(), "indices": self.indices.to(torch.int32).cpu(), "values": self.values.cpu()}

    def scores(self, histories: list[list[int]]) -> torch.Tensor:
        """(U, n_items) retrieval scores of each history: its items' rows of W summed, gathered slot by slot (a live
        item's row: its mix of rows), then live items' columns as their mixes of columns."""
        counts = torch.tensor([len(h) for h in histories], dtype=torch.long)
        items = torch.tensor([i for h in histories for i in h], dtype=torch.long, device=self.device)
        rows = slot_rows(counts).to(self.device)
        weight = torch.ones(len(items), device=self.device)
        live = torch.nonzero(items >= self.n_trained).squeeze(1).tolist() if self.live else []
        if live:
            mixes = [self.live[int(items[j]) - self.n_trained] for j in live]
            sizes = torch.tensor([len(m[0]) for m in mixes], device=self.device)
            keep = items < self.n_trained
            rows = torch.cat([rows[keep], rows[live][slot_rows(sizes)]])
            weight = torch.cat([weight[keep]] + [m[1] for m in mixes])
            items = torch.cat([items[keep]] + [m[0] for m in mixes])
        start = self.indptr[items]
        owner, slot, _ = expand_slots(start, self.indptr[items + 1] - start)
        out = torch.zeros(len(histories) * self.n_trained, device=self.device)
        out.index_add_(0, rows[owner] * self.n_trained + self.indices[slot], self.values[slot] * weight[owner])
        out = out.view(len(histories), self.n_trained)
        if not self.live:
            return out
        return torch.cat([out, torch.stack([out[:, mix] @ w for mix, w in self.live], 1)], 1)


def standardise(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per row, (x - mean) / std over the `valid` entries (std 1 where a row has no spread); 0 elsewhere."""
    n = valid.sum(1, keepdim=True).clamp(min=1)
    x = torch.where(valid, scores, 0.0)
    mean = x.sum(1, keepdim=True) / n
    std = ((torch.where(valid, scores - mean, 0.0) ** 2).sum(1, keepdim=True) / n).sqrt()
    return torch.where(valid, (scores - mean) / torch.where(std > 0, std, 1.0), 0.0)


def reciprocal_rank(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per row, 1 / (RRF_K + r) with r the 1-based rank among the `valid` entries by score, descending; tied scores
    share their best rank, so the result does not depend on the candidates' order. 0 elsewhere."""
    x = scores.masked_fill(~valid, -torch.inf)
    ascending = x.sort(1).values
    above = x.shape[1] - torch.searchsorted(ascending, x.contiguous(), right=True)
    return torch.where(valid, 1.0 / (RRF_K + 1.0 + above), 0.0)


def blend(cmn: torch.Tensor, retrieval: torch.Tensor, valid: torch.Tensor, weight: float,
          kind: str = "zscore") -> torch.Tensor:
    """The two-stage score of (U, W) candidate matrices (`kind`: one of BLENDS); -inf where not `valid`."""
    if kind not in BLENDS:
        raise ValueError(f"unknown blend {kind!r}; choose {', '.join(BLENDS)}")
    scale = standardise if kind == "zscore" else reciprocal_rank
    mixed = weight * scale(cmn, valid) + (1.0 - weight) * scale(retrieval, valid)
    return mixed.masked_fill(~valid, -torch.inf)
