"""The ranking metrics of every evaluation in training/: the held-out positive's rank, and HR@k and NDCG@k from it.

One rank rule everywhere (docs/results.md): ties count against the positive, so a model that scores everything
alike ranks it last, not first.
"""
from __future__ import annotations

import torch

KS = tuple(range(1, 11))


def positive_rank(scores: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each row's positive, whose score is `positive` and which is one of the row's `scores`:
    how many of the others (those `valid` marks, or all) score at least as high."""
    at_least = scores >= positive.unsqueeze(1)
    if valid is not None:
        at_least &= valid
    return at_least.sum(1) - 1


def rank_metrics(ranks: torch.Tensor, ks=KS) -> dict[str, float]:
    """HR@k and NDCG@k from 0-based ranks of the positive (one per user; inf where it was not ranked at all)."""
    ranks = ranks.double()
    gain = 1.0 / torch.log2(ranks + 2.0)
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = hit.double().mean().item()
        out[f"ndcg@{k}"] = torch.where(hit, gain, torch.zeros_like(gain)).mean().item()
    return out
