"""Fit the retrieval stage and choose the two-stage settings on a validation split, never on test.

    retrieval, stage, table = fit_two_stage(model, fit, data)   # what python -m training train --validation does

The grid is every method × R × blend weight. CMN scores each validation user's largest candidate list once, so
the whole grid costs one retrieval and one CMN pass per method; a configuration's validation NDCG@10 is the
full-catalogue protocol of training/evaluate.py (ties against the positive, training items excluded): the rank of
the held-out item among the user's re-ranked R candidates, a miss when retrieval did not propose it.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from model.cmn import CMN
from model.recommender import Recommender
from model.retrieval import ItemRetrieval, TwoStage, blend
from training.baselines import ItemKNN, RP3beta
from training.data import Dataset

METHODS = {"rp3beta": RP3beta, "itemknn": ItemKNN}
CANDIDATES = (50, 100, 200, 400)
WEIGHTS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))


def fit_retrieval(method: str, train: np.ndarray, n_users: int, n_items: int,
                  device: str | torch.device = "cpu") -> tuple[ItemRetrieval, dict]:
    """The method's item × item matrix (the reference table's hyperparameters) as a retrieval stage."""
    if method not in METHODS:
        raise ValueError(f"unknown retrieval method {method!r}; choose {', '.join(METHODS)}")
    baseline = METHODS[method](train, n_users, n_items)
    w = sp.csr_matrix(baseline.W, dtype=np.float32)
    w.sort_indices()
    stage = ItemRetrieval(torch.from_numpy(w.indptr.astype(np.int64)), torch.from_numpy(w.indices.astype(np.int64)),
                          torch.from_numpy(w.data), n_items, device)
    return stage, baseline.params


def validation_ndcg(scores: torch.Tensor, items: torch.Tensor, valid: torch.Tensor, positives: torch.Tensor) -> float:
    """Full-protocol NDCG@10 when each user's ranked list is its (valid) candidates by `scores`, the rest unranked."""
    pos = (items == positives[:, None]) & valid
    found = pos.any(1)
    pos_score = torch.where(pos, scores, -torch.inf).max(1).values
    rank = ((scores >= pos_score[:, None]) & valid).sum(1) - 1          # ties count against the positive
    hit = found & (rank < 10)
    return float(torch.where(hit, 1.0 / torch.log2(rank.double() + 2), torch.zeros(len(rank), dtype=torch.double))
                 .mean())


@torch.no_grad()
def select_two_stage(model: CMN, fit: Dataset, methods=tuple(METHODS), candidates=CANDIDATES, weights=WEIGHTS,
                     log=print) -> tuple[TwoStage, list[dict]]:
    """The (method, R, weight) with the best validation NDCG@10 (`fit.test` is the validation split, `fit.train`
    what the model and the retrieval are fitted on), and every configuration's figure."""
    users = [int(u) for u in fit.test.users]
    positives = torch.as_tensor(fit.test.positives)
    table, params = [], {}
    for method in methods:
        retrieval, params[method] = fit_retrieval(method, fit.train, fit.n_users, fit.n_items)
        widest = TwoStage(method, max(candidates), 1.0, params[method])
        rec = Recommender.from_model(model, fit.train, retrieval=retrieval, two_stage=widest)
        dense = retrieval.scores([sorted(rec.seen(u)) for u in users])
        items, valid = rec.retrieve(users, [sorted(rec.seen(u)) for u in users], dense)
        cmn, found = (rec.score_lists(users, items, valid, strategy, dense) for strategy in ("full", "retrieval"))
        for r in candidates:
            for weight in weights:
                ndcg = validation_ndcg(blend(cmn[:, :r], found[:, :r], valid[:, :r], float(weight)), items[:, :r],
                                       valid[:, :r], positives)
                table.append({"method": method, "candidates": r, "weight": float(weight), "ndcg@10": ndcg})
        best = max((row for row in table if row["method"] == method), key=lambda row: row["ndcg@10"])
        log(f"two-stage {method}: best validation full NDCG@10 {best['ndcg@10']:.4f} "
            f"(R {best['candidates']}, CMN weight {best['weight']:.1f})")
    best = max(table, key=lambda row: row["ndcg@10"])
    return TwoStage(best["method"], best["candidates"], best["weight"], params[best["method"]]), table


def fit_two_stage(model: CMN, fit: Dataset, data: Dataset, log=print) -> tuple[ItemRetrieval, TwoStage, list[dict]]:
    """Choose on `fit` (validation split, training less validation items), then fit the chosen retrieval on every
    training pair of `data` for serving."""
    stage, table = select_two_stage(model, fit, log=log)
    retrieval, _ = fit_retrieval(stage.method, data.train, data.n_users, data.n_items)
    return retrieval, stage, table
