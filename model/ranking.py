"""Ranking scored rows."""
from __future__ import annotations

import torch


def top_k(scores: torch.Tensor, k: int, banned: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row with `banned` (bool, same shape) entries removed; rows with fewer than k allowed entries
    return -inf in the tail, which callers drop."""
    if banned is not None:
        scores = scores.masked_fill(banned, -torch.inf)
    return torch.topk(scores, min(k, scores.shape[1]), dim=1)
