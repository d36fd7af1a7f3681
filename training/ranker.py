"""A learned ranker over the union of several retrieval stages' top-R (LightGBM lambdarank), trained on the
validation split: an experiment (benchmarks/ranker_citeulike.py), not yet a served strategy.

Features of a (user, candidate) pair: each stage's score and its rank among the user's unseen items (RANK_DEPTH
where below its top RANK_DEPTH), CMN's score (optional: the ablation), the item's training popularity (log) and the
user's history length. The ranker orders the union of the stages' top-R, above every other item (those in the first
stage's order); a positive outside the union is a miss under the full protocol, as two-stage lists are judged
(training/two_stage.py). `Ranker` is a recommender in
training/evaluate.py's protocol, so the one evaluator measures it, sampled and full.
"""
from __future__ import annotations

import numpy as np
import torch

from model.retrieval import Retrieval
from model.scoring import Scorer

RANK_DEPTH = 200
# LightGBM lambdarank settings: small trees, early stopped on a held-out part of the training users
LGB_PARAMS = {"objective": "lambdarank", "metric": "ndcg", "eval_at": [10], "learning_rate": 0.05, "num_leaves": 31,
              "min_data_in_leaf": 50, "feature_fraction": 0.9, "bagging_fraction": 0.8, "bagging_freq": 1,
              "lambdarank_truncation_level": 20, "verbose": -1, "num_threads": 2, "seed": 0}
ROUNDS = 300
FALLBACK = 1e6   # what items outside the union lose against every item in it


class Ranker:
    """`stages`: name → retrieval stage fitted on `train`; `cmn`: CMN's scorer or None (the ranker without CMN)."""

    def __init__(self, stages: dict[str, Retrieval], train: np.ndarray, n_items: int, candidates: int = 50,
                 cmn: Scorer | None = None, booster=None):
        self.stages, self.cmn, self.booster = stages, cmn, booster
        self.n_items, self.candidates = n_items, candidates
        self.histories: dict[int, list[int]] = {}
        for u, i in np.asarray(train, dtype=np.int64).tolist():
            self.histories.setdefault(u, []).append(i)
        pop = np.bincount(train[:, 1], minlength=n_items).astype(np.float32)
        self.log_popularity = torch.from_numpy(np.log1p(pop))

    @property
    def feature_names(self) -> list[str]:
        names = [f"{name}_{what}" for name in self.stages for what in ("score", "rank")]
        return names + (["cmn_score"] if self.cmn is not None else []) + ["log_popularity", "history_length"]

    def _dense(self, users: list[int]) -> dict[str, torch.Tensor]:
        """Each stage's (U, n_items) scores, the users' training items at -inf (the last batch's kept: the evaluator
        asks for a batch's candidates, then for its whole catalogue)."""
        if getattr(self, "_last", (None,))[0] == users:
            return self._last[1]
        histories = [self.histories.get(u, []) for u in users]
        rows = torch.tensor([r for r, h in enumerate(histories) for _ in h], dtype=torch.long)
        cols = torch.tensor([i for h in histories for i in h], dtype=torch.long)
        out = {}
        for name, stage in self.stages.items():
            dense = stage.scores(histories)[:, :self.n_items].float()
            dense[rows, cols] = -torch.inf
            out[name] = dense
        self._last = (users, out)
        return out

    def union(self, dense: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, C) the union of the stages' top-R (duplicates and -inf entries masked out) and its mask."""
        tops = [d.topk(self.candidates, 1) for d in dense.values()]
        items = torch.cat([t.indices for t in tops], 1)
        finite = torch.cat([torch.isfinite(t.values) for t in tops], 1)
        items, order = items.sort(1)
        finite = finite.gather(1, order)
        first = torch.ones_like(finite)
        first[:, 1:] = items[:, 1:] != items[:, :-1]
        return items, first & finite

    def features(self, users: list[int], items: torch.Tensor, dense: dict[str, torch.Tensor]) -> np.ndarray:
        """(U·C, F) features of every (user, items[u, c]) pair, row-major."""
        columns = []
        for d in dense.values():
            score = d.gather(1, items)
            top = d.topk(min(RANK_DEPTH, d.shape[1]), 1).values
            rank = (top[:, None, :] > score[:, :, None]).sum(-1).float()
            columns += [torch.where(torch.isfinite(score), score, -1e6), rank]
        if self.cmn is not None:
            pair_users = torch.tensor(users)[:, None].expand_as(items)
            columns.append(self.cmn.score_pairs(pair_users.reshape(-1), items.reshape(-1)).reshape(items.shape).cpu())
        columns.append(self.log_popularity[items])
        lengths = torch.tensor([float(len(self.histories.get(u, []))) for u in users])
        columns.append(lengths[:, None].expand_as(items))
        return torch.stack([c.float() for c in columns], -1).reshape(-1, len(columns)).numpy()

    def lists(self, users: list[int], positives: np.ndarray, batch: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per user, (features (C, F), labels (C,)) of its union candidates: label 1 for its held-out positive."""
        out = []
        for s in range(0, len(users), batch):
            chunk = users[s:s + batch]
            dense = self._dense(chunk)
            items, valid = self.union(dense)
            x = self.features(chunk, items, dense).reshape(len(chunk), items.shape[1], -1)
            label = ((items == torch.as_tensor(positives[s:s + batch])[:, None]) & valid).numpy()
            out += [(x[r][keep], label[r][keep].astype(np.float32)) for r, keep in enumerate(valid.numpy())]
        return out

    def fit(self, lists: list[tuple[np.ndarray, np.ndarray]], log=print) -> "Ranker":
        """Train on `lists` (10% of them held out for early stopping); lists without a positive are left out
        (lambdarank learns nothing from them)."""
        import lightgbm as lgb
        lists = [(x, y) for x, y in lists if y.any()]
        held = np.random.default_rng(0).random(len(lists)) < 0.1

        def dataset(mask, reference=None):
            chosen = [lists[i] for i in np.flatnonzero(mask)]
            return lgb.Dataset(np.concatenate([x for x, _ in chosen]), np.concatenate([y for _, y in chosen]),
                               group=[len(y) for _, y in chosen], feature_name=self.feature_names,
                               reference=reference)

        train = dataset(~held)
        log(f"ranker: {int((~held).sum()):,} training lists, {int(held.sum()):,} for early stopping; "
            f"features {', '.join(self.feature_names)}")
        self.booster = lgb.train(LGB_PARAMS, train, ROUNDS, valid_sets=[dataset(held, train)],
                                 callbacks=[lgb.early_stopping(30, verbose=False)])
        log(f"ranker: {self.booster.best_iteration} rounds")
        return self

    def list_ndcg(self, lists: list[tuple[np.ndarray, np.ndarray]]) -> float:
        """Full-protocol NDCG@10 of the ranked lists (training/metrics.py's rank rule; a miss where the positive is
        not a candidate), what training/two_stage.py's `validation_ndcg` measures."""
        gains = []
        for x, y in lists:
            if not y.any():
                gains.append(0.0)
                continue
            s = self.booster.predict(x, num_iteration=self.booster.best_iteration)
            rank = int((s >= s[y.argmax()]).sum()) - 1
            gains.append(1.0 / np.log2(rank + 2.0) if rank < 10 else 0.0)
        return float(np.mean(gains))

    def score(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """The union by the ranker's score, above every other item, those in the first stage's order (so that the
        sampled protocol's far negatives, which the ranker never learned to order, rank as retrieval ranks them)."""
        chunk = [int(u) for u in users]
        dense = self._dense(chunk)
        found, valid = self.union(dense)
        ranked = torch.from_numpy(self._predict(self.features(chunk, found, dense))).reshape(found.shape)
        out = next(iter(dense.values())).double() - FALLBACK
        rows = torch.arange(len(chunk))[:, None].expand_as(found)
        out[rows[valid], found[valid]] = ranked[valid]
        return out if items is None else out.gather(1, items.long())

    def _predict(self, x: np.ndarray) -> np.ndarray:
        return self.booster.predict(x, num_iteration=self.booster.best_iteration or None)
