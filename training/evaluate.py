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

import time
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch

from model.recommender import item_popularity
from training.data import Dataset, Split, pair_keys

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


# --------------------------------------------------------------------------- cold start (issue 11)

@dataclass
class ColdUsers:
    """Users held out of training entirely: each is ranked on its held-out item from the rest of its items."""
    ids: list[str]                  # external ids
    histories: list[list[int]]      # each user's items less the held-out one, in the full data's item ids
    split: Split                    # users 0..n-1 (index into `histories`), the held-out positives and negatives
    last: str                       # how the held-out item was chosen


def hold_out_users(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, ColdUsers]:
    """(the data less a seeded `fraction` of its users, those users). Cold users are drawn among the users of the
    data's leave-one-out split, so each keeps that split's held-out item and negatives: the item is the latest by
    timestamp where the data has timestamps, else the data's own random one (training/data.py; an .npz's is its
    authors'). The rest keep their training pairs and test rows, users renumbered 0..n-1 in order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--cold-users must be a fraction within (0, 1), got {fraction}")
    if data.test is None or len(data.test) == 0:
        raise ValueError(f"{data.name}: no leave-one-out split to take cold users' held-out items from")
    per_user = np.bincount(data.train[:, 0], minlength=data.n_users)
    eligible = data.test.users[per_user[data.test.users] > 0]
    n_cold = int(round(fraction * data.n_users))
    if not 0 < n_cold <= len(eligible):
        raise ValueError(f"--cold-users {fraction}: {n_cold} of {data.n_users:,} users, but {len(eligible):,} users "
                         "have both training items and a held-out one")
    cold = np.sort(np.random.default_rng([seed, 11]).choice(eligible, n_cold, replace=False))
    is_cold = np.zeros(data.n_users, dtype=bool)
    is_cold[cold] = True
    renumber = np.cumsum(~is_cold) - 1
    warm_pairs = data.train[~is_cold[data.train[:, 0]]]
    t = data.test
    warm_rows = ~is_cold[t.users]
    warm = Dataset(int((~is_cold).sum()), data.n_items, np.stack([renumber[warm_pairs[:, 0]], warm_pairs[:, 1]], 1),
                   Split(renumber[t.users[warm_rows]], t.positives[warm_rows], t.negatives[warm_rows]),
                   [u for u, c in zip(data.user_ids, is_cold) if not c], data.item_ids,
                   name=f"{data.name} less {n_cold} cold users")
    row_of = {int(u): r for r, u in enumerate(t.users)}
    rows = np.array([row_of[int(u)] for u in cold])
    order = np.argsort(data.train[:, 0], kind="stable")
    starts = np.searchsorted(data.train[order, 0], cold)
    ends = np.searchsorted(data.train[order, 0], cold, side="right")
    histories = [data.train[order[a:b], 1].tolist() for a, b in zip(starts, ends)]
    last = "latest by timestamp" if data.timeline is not None else "random (the data's own held-out item)"
    return warm, ColdUsers([data.user_ids[u] for u in cold], histories,
                           Split(np.arange(n_cold), t.positives[rows], t.negatives[rows]), last)


def write_npz(data: Dataset, path: str) -> None:
    """`data` in the original CMN .npz format (what `training.data.load_npz` reads back, ids as their indices)."""
    test = {} if data.test is None else {int(u): (int(p), [int(x) for x in n]) for u, p, n in
                                         zip(data.test.users, data.test.positives, data.test.negatives)}
    with open(path, "wb") as f:
        np.savez(f, train_data=data.train, test_data=np.array(test, dtype=object))


def cold_users_in(cold: ColdUsers, data_item_ids: list[str], item_ids: list[str]) -> tuple[ColdUsers, int]:
    """`cold` in a model's item ids (`item_ids`, from the data's `data_item_ids`): history items the model lacks are
    dropped, and users whose held-out item or a negative it lacks are left out; returns how many were."""
    index = {i: n for n, i in enumerate(item_ids)}
    to_model = np.array([index.get(i, -1) for i in data_item_ids])
    s = cold.split
    keep = (to_model[s.positives] >= 0) & (to_model[s.negatives] >= 0).all(1)
    histories = [[int(to_model[i]) for i in h if to_model[i] >= 0] for h in cold.histories]
    keep &= np.array([len(h) > 0 for h in histories])
    rows = np.flatnonzero(keep)
    return ColdUsers([cold.ids[r] for r in rows], [histories[r] for r in rows],
                     Split(np.arange(len(rows)), to_model[s.positives[rows]], to_model[s.negatives[rows]]),
                     cold.last), int((~keep).sum())


class HistoryScores:
    """Scores of history lists in the protocol `evaluate` reads: user b is the b-th history."""

    def __init__(self, n_items: int, score):
        self.n_items, self._score = n_items, score

    def score(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        return self._score([int(u) for u in users], items)


def evaluate_cold_start(rec, cold: ColdUsers, train: np.ndarray, seed: int = 0, full: bool = True,
                        progress: bool = False) -> dict:
    """Cold users (in `rec`'s item ids) ranked by fold-in (each strategy of the `model.recommender.Recommender`
    `rec`), by popularity and by ItemKNN CF fitted on `train` (the model's training pairs), all from the same
    histories and by `evaluate`'s protocols (a user's history items are its training items there)."""
    from training.two_stage import fit_retrieval   # here: training.two_stage imports this module
    starts = range(len(cold.histories))
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="fold-in", unit="user", leave=False)
    folded, ms = [], []
    for b in starts:
        t0 = time.perf_counter()
        folded.append(rec.fold_in(cold.histories[b], seed))
        ms.append(1000 * (time.perf_counter() - t0))
    pairs = np.array([(b, i) for b, h in enumerate(cold.histories) for i in h], dtype=np.int64).reshape(-1, 2)
    n_items = rec.n_items
    itemknn, _ = fit_retrieval("itemknn", train, int(train[:, 0].max()) + 1, n_items)

    def knn(users, items):
        dense = itemknn.scores([cold.histories[u] for u in users])
        return dense if items is None else dense.gather(1, items.long())

    def folded_in(strategy):
        return lambda users, items: rec.score(items=items, strategy=strategy, histories=[folded[u] for u in users])

    methods = {f"fold_in:{s}": HistoryScores(n_items, folded_in(s)) for s in rec.strategies}
    methods.update(toppop=TopPop(train, n_items), itemknn=HistoryScores(n_items, knn))
    lengths = np.array([len(h) for h in cold.histories])
    return {"cold_users": len(cold.histories), "held_out": cold.last,
            "history_length": {"mean": float(lengths.mean()), "median": float(np.median(lengths)),
                               "max": int(lengths.max())},
            "fold_in": {**asdict(rec.foldin), "seed": seed, "ms_p50": float(np.percentile(ms, 50)),
                        "ms_p99": float(np.percentile(ms, 99))},
            "methods": {name: evaluate(m, cold.split, pairs, full=full) for name, m in methods.items()}}
