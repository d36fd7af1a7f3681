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

from model.quality import below_toppop
from model.recommender import Recommender, item_popularity
from model.retrieval import TwoStage
from model.store.checkpoint import load_checkpoint
from training.data import DataError, Dataset, Split, load, pair_keys
from training.metrics import positive_rank, rank_metrics


class ScoringModel(Protocol):
    n_items: int

    def score(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor: ...


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
            ranks["sampled_raw"].append(positive_rank(scores, scores[:, 0]))
            ranks["sampled"].append(positive_rank(scores, scores[:, 0], torch.as_tensor(valid[sl])))
            if full:
                all_scores = torch.as_tensor(rec.score(users)).double().cpu()
                rows, cols = train_by_user(s, min(s + batch_users, len(split)))
                all_scores[rows, cols] = -torch.inf
                pos_all = all_scores.gather(1, torch.as_tensor(split.positives[sl])[:, None])[:, 0]
                ranks["full"].append(positive_rank(all_scores, pos_all))
    out = {name: rank_metrics(torch.cat(r)) for name, r in ranks.items() if r}
    if full:
        out["full"] = {"hr@10": out["full"]["hr@10"], "recall@10": out["full"]["hr@10"],
                       "ndcg@10": out["full"]["ndcg@10"]}
    return out


def evaluate_strategies(rec, split: Split, train: np.ndarray, full: bool = True,
                        known: dict[str, dict] | None = None) -> dict[str, dict]:
    """`evaluate` for each strategy of a `model.recommender.Recommender` (whose seen-sets must be `train`); `known`:
    figures already measured for some of them (training's final CMN figures are the `full` strategy's)."""
    known = known or {}
    return {name: known[name] if name in known else evaluate(_Strategy(rec, name), split, train, full=full)
            for name in rec.strategies}


def evaluate_members(rec, split: Split, train: np.ndarray, full: bool = True) -> dict[str, dict]:
    """Each member of a fused retrieval stage alone (its own order over the catalogue); {} for any other stage."""
    fusion = rec.two_stage.fusion if rec.two_stage is not None else None
    if not fusion:
        return {}
    out = {}
    for name, member in rec.retrieval.members.items():
        alone = Recommender(rec.scorer, train, retrieval=member,
                            two_stage=TwoStage(name, rec.two_stage.candidates, 0.0, rec.two_stage.params[name],
                                               strategy="retrieval"))
        out[name] = evaluate(_Strategy(alone, "retrieval"), split, train, full=full)
    return out


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


def evaluate_checkpoint(path: str, data: str | None = None, device: str = "auto", trust_pickle: bool = False) -> dict:
    """`python -m training evaluate`: every strategy the checkpoint serves and TopPop, on the test split stored in
    it or on `data`'s (in the checkpoint's ids); `warnings` says when the served default ranks below TopPop."""
    ckpt = load_checkpoint(path)
    train_pairs, split = ckpt.train, None
    if data:
        train_pairs, split = remap(load(data, trust_pickle=trust_pickle), ckpt)
    elif ckpt.test_users is not None:
        split = Split(ckpt.test_users, ckpt.test_positives, ckpt.test_negatives)
    if split is None or len(split) == 0:
        raise ValueError(f"{path} holds no test split (trained with --holdout none); pass --data")
    # the training pairs are the seen-sets here: the evaluator excludes them, and so must retrieval
    rec = Recommender.from_checkpoint(ckpt, device, seen=train_pairs)
    strategies = evaluate_strategies(rec, split, train_pairs)
    result = {**strategies[rec.default_strategy], "strategy": rec.default_strategy, "strategies": strategies,
              "members": evaluate_members(rec, split, train_pairs),
              "toppop": evaluate(TopPop(train_pairs, ckpt.config.n_items), split, train_pairs),
              "model_version": ckpt.model_version}
    warning = below_toppop(result, result["toppop"])
    result["warnings"] = [warning] if warning else []
    return result


def remap(data: Dataset, ckpt) -> tuple[np.ndarray, Split | None]:
    """The data's training pairs and split in the checkpoint's internal ids."""
    users = {u: n for n, u in enumerate(ckpt.user_ids)}
    items = {i: n for n, i in enumerate(ckpt.item_ids)}
    unknown_u = {data.user_ids[u] for u in np.unique(data.train[:, 0])} - users.keys()
    unknown_i = {data.item_ids[i] for i in np.unique(data.train[:, 1])} - items.keys()
    if unknown_u or unknown_i:
        raise DataError(f"--data has {len(unknown_u)} users and {len(unknown_i)} items the checkpoint does not know "
                        f"(e.g. {sorted(unknown_u | unknown_i)[:3]}); evaluate on the data it was trained on")
    u_map = np.array([users.get(u, -1) for u in data.user_ids])
    i_map = np.array([items.get(i, -1) for i in data.item_ids])
    train = np.stack([u_map[data.train[:, 0]], i_map[data.train[:, 1]]], 1)
    t = data.test
    if t is None:
        return train, None
    keep = (u_map[t.users] >= 0) & (i_map[t.positives] >= 0) & (i_map[t.negatives] >= 0).all(1)
    return train, Split(u_map[t.users[keep]], i_map[t.positives[keep]], i_map[t.negatives[keep]])
