"""Cold start: users held out of training entirely, each ranked on its held-out item from the rest of its items by
fold-in, popularity and ItemKNN side by side (`python -m training coldstart`, docs/coldstart.md).

    warm, cold = hold_out_users(data, 0.1, seed)     # the data less 10 % of its users, and those users
    result = run_coldstart(cfg, 0.1)                 # train on `warm` as `train` would, then evaluate `cold`
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from model.recommender import Recommender
from model.store.checkpoint import load_checkpoint
from training.data import Dataset, Split, load, pair_keys
from training.evaluate import TopPop, evaluate
from training.train import TrainConfig, train
from training.two_stage import fit_retrieval


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


def run_coldstart(cfg: TrainConfig, fraction: float, checkpoint: str | None = None, log=print) -> dict:
    """The data less a `fraction` of its users is written next to `cfg.out` in the .npz format and trained on as
    `train` would (unless `checkpoint`, a model an earlier run trained so), then each cold user's held-out item is
    ranked from its other items (`evaluate_cold_start`)."""
    if cfg.feedback:
        raise ValueError("coldstart trains on the data alone: --feedback has no cold users to hold out")
    data = load(cfg.data, seed=cfg.seed, min_rating=cfg.min_rating, trust_pickle=cfg.trust_pickle)
    warm, cold = hold_out_users(data, fraction, cfg.seed)
    path = checkpoint
    if path is None:
        warm_path = cfg.out + ".warm.npz"
        os.makedirs(os.path.dirname(os.path.abspath(warm_path)), exist_ok=True)
        write_npz(warm, warm_path)
        log(f"cold start: {len(cold.ids):,} cold users held out; training on {warm.summary()} ({warm_path})")
        train(replace(cfg, data=warm_path), log=log)
        path = cfg.out
    ckpt = load_checkpoint(path)
    # the model must be the warm users' (an .npz's ids are its indices: user k is warm user k, item j data item j)
    try:
        users = np.array([int(u) for u in ckpt.user_ids])[ckpt.train[:, 0]]
        items = np.array([int(i) for i in ckpt.item_ids])[ckpt.train[:, 1]]
        trained = np.unique(pair_keys(users, items, data.n_items))
    except ValueError:      # ids that are not indices: not a model of the warm .npz
        trained = None
    if trained is None or not np.array_equal(trained, np.unique(pair_keys(warm.train[:, 0], warm.train[:, 1],
                                                                          data.n_items))):
        raise ValueError(f"{path} was not trained on {cfg.data} less its {len(cold.ids):,} cold users of "
                         f"--cold-users {fraction} --seed {cfg.seed}; run coldstart without --checkpoint")
    cold, left_out = cold_users_in(cold, [str(i) for i in range(data.n_items)], ckpt.item_ids)
    rec = Recommender.from_checkpoint(ckpt, cfg.device, seen=ckpt.train)
    return {"data": cfg.data, "fraction": fraction, "seed": cfg.seed, "checkpoint": path, "left_out": left_out,
            **evaluate_cold_start(rec, cold, ckpt.train, cfg.seed, full=cfg.full_eval, progress=cfg.progress)}
