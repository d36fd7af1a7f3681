"""The paper's leave-one-out evaluation, and full-catalogue ranking, for any recommender.

A recommender here is anything with `n_items` and `score(users, items=None)`: `users` a (U,) id tensor,
`items` a (U, C) id tensor of candidates or None for the whole catalogue; it returns (U, C) or (U, n_items)
scores. CMN is evaluated through `model.recommender.Recommender`, the object that also answers `/recommend`;
the baselines in `training.baselines` go through this same evaluator.

Conventions (see docs/results.md): ties count against the held-out positive; `sampled` scores candidates
that are training items of the user as -inf and de-duplicates candidates (Dacrema et al.'s evaluator, the
reference table's); `sampled_raw` scores all 101 as the original code does; `full` ranks the positive against
every item the user has not trained on.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from model.recommender import item_popularity
from training.data import Split, pair_keys

KS = tuple(range(1, 11))


class ScoringModel(Protocol):
    n_items: int

    def score(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor: ...


def rank_metrics(ranks: torch.Tensor, ks=KS) -> dict[str, float]:
    """HR@k and NDCG@k from 0-based ranks of the positive (one per user)."""
    ranks = ranks.double()
    gain = 1.0 / torch.log2(ranks + 2.0)
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = hit.double().mean().item()
        out[f"ndcg@{k}"] = torch.where(hit, gain, torch.zeros_like(gain)).mean().item()
    return out


def _first_occurrence(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, axis=1, kind="stable")
    srt = np.take_along_axis(a, order, 1)
    first_sorted = np.ones_like(srt, dtype=bool)
    first_sorted[:, 1:] = srt[:, 1:] != srt[:, :-1]
    first = np.empty_like(first_sorted)
    np.put_along_axis(first, order, first_sorted, 1)
    return first


def evaluate(rec: ScoringModel, split: Split, train: np.ndarray, full: bool = True, batch_users: int = 256,
             progress: bool = False) -> dict[str, dict[str, float]]:
    """Metrics of `rec` on `split`; `train` is the (n, 2) training pairs whose items are excluded."""
    n_items = rec.n_items
    train_keys = np.unique(pair_keys(train[:, 0], train[:, 1], n_items))
    candidates = np.concatenate([split.positives[:, None], split.negatives], 1)
    is_train = np.isin(pair_keys(np.repeat(split.users, candidates.shape[1]), candidates.ravel(), n_items),
                       train_keys).reshape(candidates.shape)
    valid = _first_occurrence(candidates) & ~is_train
    valid[:, 0] = True
    train_by_user = _train_lists(train, split.users)
    ranks = {"sampled": [], "sampled_raw": [], "full": []}
    starts = range(0, len(split), batch_users)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="evaluate", unit="batch", leave=False)
    with torch.no_grad():
        for s in starts:
            sl = slice(s, s + batch_users)
            users = torch.as_tensor(split.users[sl])
            scores = torch.as_tensor(rec.score(users, torch.as_tensor(candidates[sl]))).double().cpu()
            pos = scores[:, :1]
            beats = scores[:, 1:] >= pos
            ranks["sampled_raw"].append(beats.sum(1))
            ranks["sampled"].append((beats & torch.as_tensor(valid[sl, 1:])).sum(1))
            if full:
                all_scores = torch.as_tensor(rec.score(users)).double().cpu()
                rows, cols = train_by_user(s, min(s + batch_users, len(split)))
                all_scores[rows, cols] = -torch.inf
                pos_all = all_scores.gather(1, torch.as_tensor(split.positives[sl])[:, None])
                ranks["full"].append((all_scores >= pos_all).sum(1) - 1)
    out = {name: rank_metrics(torch.cat(r)) for name, r in ranks.items() if r}
    if full:
        out["full"] = {"hr@10": out["full"]["hr@10"], "recall@10": out["full"]["hr@10"],
                       "ndcg@10": out["full"]["ndcg@10"]}
    return out


def evaluate_strategies(rec, split: Split, train: np.ndarray, full: bool = True) -> dict[str, dict]:
    """`evaluate` for each strategy of a `model.recommender.Recommender` (whose seen-sets must be `train`)."""
    return {name: evaluate(_Strategy(rec, name), split, train, full=full) for name in rec.strategies}


class _Strategy:
    """One of a Recommender's strategies, in the protocol `evaluate` reads."""

    def __init__(self, rec, strategy: str):
        self.rec, self.strategy, self.n_items = rec, strategy, rec.n_items

    def score(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        return self.rec.score(users, items, self.strategy)


def _train_lists(train: np.ndarray, users: np.ndarray):
    """For a slice of `users`: (row-in-slice, item) index tensors of their training items."""
    order = np.argsort(train[:, 0], kind="stable")
    t_users, t_items = train[order, 0], train[order, 1]

    def rows_cols(a: int, b: int):
        lo = np.searchsorted(t_users, users[a:b], side="left")
        hi = np.searchsorted(t_users, users[a:b], side="right")
        counts = hi - lo
        rows = np.repeat(np.arange(b - a), counts)
        idx = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        return torch.as_tensor(rows), torch.as_tensor(t_items[idx])

    return rows_cols


class TopPop:
    """Training popularity: the sanity floor every model must clear."""

    def __init__(self, train: np.ndarray, n_items: int):
        self.n_items = n_items
        self.popularity = item_popularity(train, n_items)

    def score(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        if items is None:
            return self.popularity.expand(len(users), -1)
        return self.popularity[items]
