"""Fit the retrieval stage and choose the two-stage settings on a validation split, never on test.

    retrieval, stage, table = fit_two_stage(model, fit, data)   # what python -m training train --validation does
    table = add_two_stage(ckpt, data)                            # the same for a checkpoint written without it

The grid is every method × R × blend kind × CMN weight, after each method's own hyperparameters (EASE's λ) were
chosen by its list alone. CMN scores each validation user's largest candidate list once, so the whole grid costs one
retrieval per setting and one CMN pass per method; a configuration's validation NDCG@10 is the
full-catalogue protocol of training/evaluate.py (training/metrics.py's rank rule, training items excluded): the
rank of the held-out item among the user's re-ranked R candidates, a miss when retrieval did not propose it. Equal
figures go to the smallest R (the cheapest), then the z-score blend (the older default), then the smallest CMN
weight.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from model.store.checkpoint import Checkpoint
from model.cmn import CMN
from model.recommender import Recommender
from model.retrieval import BLENDS, RRF_K, Retrieval, TwoStage, blend
from training.baselines import RETRIEVAL_METHODS as METHODS
from training.data import Dataset, holdout_validation
from training.metrics import positive_rank, rank_metrics

CANDIDATES = (50, 100, 200, 400)
# finer below 0.1: on citeulike-a every weight from 0.1 up lowered validation NDCG@10 (docs/results.md)
WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def fit_retrieval(method: str, train: np.ndarray, n_users: int, n_items: int, device: str | torch.device = "cpu",
                  **params) -> tuple[Retrieval, dict]:
    """The method as a retrieval stage, with `params` (default: the reference table's hyperparameters), and the
    hyperparameters it was fitted with."""
    if method not in METHODS:
        raise ValueError(f"unknown retrieval method {method!r}; choose {', '.join(METHODS)}")
    baseline = METHODS[method](train, n_users, n_items, **params)
    return baseline.retrieval(device), baseline.params


def method_grid(method: str) -> list[dict]:
    """The hyperparameter settings validation tries for a method (its class's `grid`; none: its defaults only)."""
    grid = getattr(METHODS[method], "grid", {})
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def validation_ndcg(scores: torch.Tensor, items: torch.Tensor, valid: torch.Tensor, positives: torch.Tensor) -> float:
    """Full-protocol NDCG@10 when each user's ranked list is its (valid) candidates by `scores`, the rest unranked."""
    pos = (items == positives[:, None]) & valid
    rank = positive_rank(scores, torch.where(pos, scores, -torch.inf).max(1).values, valid).double()
    return rank_metrics(torch.where(pos.any(1), rank, torch.inf), ks=(10,))["ndcg@10"]


def rrf_reorder_rank(weight: float, candidates: int) -> int:
    """The first retrieval rank r at which CMN, with this rrf weight, can swap the items at r and r + 1 when their
    retrieval scores differ: (1 − w)·(1/(K + r) − 1/(K + 1 + r)) < w·(1/(K + 1) − 1/(K + R)), K = RRF_K. Above
    it, a chosen small weight only breaks the retrieval's ties (what docs/results.md reports of the chosen blend)."""
    reach = weight * (1 / (RRF_K + 1) - 1 / (RRF_K + candidates))
    r = 1
    while r < candidates and (1 - weight) * (1 / (RRF_K + r) - 1 / (RRF_K + r + 1)) >= reach:
        r += 1
    return r


def default_methods(n_users: int, n_items: int) -> tuple[str, ...]:
    """The methods selection tries by default: every one, but iALS only where EASE cannot be fitted. Wherever both
    were measured EASE's list was far ahead on validation and test (citeulike-a full NDCG@10 0.2283 against 0.1564,
    the default synthetic data 0.23 against 0.07, docs/results.md), and iALS's grid would cost more than the rest
    of the selection (the quick start's ≤ 60 s); it stays a peer in `compare` and a stage for `methods=`."""
    return tuple(m for m in METHODS if m != "ials" or not METHODS["ease"].fits(n_users, n_items))


@torch.no_grad()
def select_two_stage(model: CMN, fit: Dataset, methods=None, candidates=CANDIDATES, weights=WEIGHTS,
                     blends=BLENDS, log=print) -> tuple[TwoStage, list[dict]]:
    """The (method, its hyperparameters, R, blend, weight) with the best validation NDCG@10 (`fit.test` is the
    validation split, `fit.train` what the model and the retrieval are fitted on), and every configuration's figure.

    A method's hyperparameters (its `grid`) are chosen first, by its own list's validation NDCG@10; CMN is then
    blended with that list only. Where the best configuration gives CMN weight 0, the retrieval's own order is
    served as it is (strategy `retrieval`): CMN would change no list and cost a pass."""
    methods = default_methods(fit.n_users, fit.n_items) if methods is None else methods
    users = [int(u) for u in fit.test.users]
    positives = torch.as_tensor(fit.test.positives)
    table, params = [], {}
    rec = Recommender.from_model(model, fit.train)
    histories = [sorted(rec.seen(u)) for u in users]
    for method in methods:
        if not METHODS[method].fits(fit.n_users, fit.n_items):
            log(f"two-stage {method}: skipped, {fit.n_users:,} users x {fit.n_items:,} items is too large for it")
            continue
        best_own = None
        for setting in method_grid(method):
            retrieval, fitted = fit_retrieval(method, fit.train, fit.n_users, fit.n_items, **setting)
            rec.retrieval, rec.two_stage = retrieval, TwoStage(method, max(candidates), 1.0, fitted)
            dense = retrieval.scores(histories)
            items, valid = rec.retrieve(users, histories, dense)
            own = validation_ndcg(rec.score_lists(users, items, valid, "retrieval", dense), items, valid, positives)
            if setting:
                log(f"two-stage {method} {setting}: validation full NDCG@10 {own:.4f} alone")
            if best_own is None or own > best_own[0]:
                best_own = (own, fitted, dense, items, valid)
        _, params[method], dense, items, valid = best_own
        cmn, found = (rec.score_lists(users, items, valid, strategy, dense) for strategy in ("full", "retrieval"))
        for r in sorted(candidates):
            for kind in blends:
                for weight in sorted(weights):
                    ndcg = validation_ndcg(blend(cmn[:, :r], found[:, :r], valid[:, :r], float(weight), kind),
                                           items[:, :r], valid[:, :r], positives)
                    table.append({"method": method, "params": params[method], "candidates": r, "blend": kind,
                                  "weight": float(weight), "ndcg@10": ndcg})
        best = max((row for row in table if row["method"] == method), key=lambda row: row["ndcg@10"])
        log(f"two-stage {method}: best validation full NDCG@10 {best['ndcg@10']:.4f} "
            f"(R {best['candidates']}, {best['blend']} blend, CMN weight {best['weight']:g})")
    if not table:
        raise ValueError("no retrieval method fits this data set")
    best = max(table, key=lambda row: row["ndcg@10"])   # the first of equals: the order above
    return TwoStage(best["method"], best["candidates"], best["weight"], params[best["method"]], best["blend"],
                    "retrieval" if best["weight"] == 0 else "two_stage"), table


def fit_two_stage(model: CMN, fit: Dataset, data: Dataset, log=print,
                  methods=None) -> tuple[Retrieval, TwoStage, list[dict]]:
    """Choose on `fit` (validation split, training less validation items), then fit the chosen retrieval on every
    training pair of `data` for serving."""
    stage, table = select_two_stage(model, fit, methods, log=log)
    retrieval, _ = fit_retrieval(stage.method, data.train, data.n_users, data.n_items, **stage.params)
    return retrieval, stage, table


def add_two_stage(ckpt: Checkpoint, data: Dataset, log=print, methods=None) -> list[dict]:
    """Choose and fit the two-stage settings of a checkpoint trained with --validation, as `train` does at its end,
    and set them on `ckpt`; returns the validation table. `data` is what it was trained on: the validation split is
    cut from it again with the checkpoint's seed (the pairs its epoch was chosen on; nothing of the test split)."""
    fit = validation_split(ckpt, data)
    ckpt.retrieval, ckpt.two_stage, table = fit_two_stage(ckpt.build_model(), fit, data, log, methods)
    return table


def validation_split(ckpt: Checkpoint, data: Dataset) -> Dataset:
    """The validation split a checkpoint trained with --validation on `data` chose its epoch on."""
    cfg = ckpt.meta.get("train_config", {})
    if not cfg.get("validation"):
        raise ValueError("the checkpoint was not trained with --validation: there is no held-out split of its "
                         "training pairs to choose the two-stage settings on (retrain with --validation)")
    if (list(ckpt.user_ids) != list(data.user_ids) or list(ckpt.item_ids) != list(data.item_ids)
            or not np.array_equal(np.unique(ckpt.train, axis=0), np.unique(data.train, axis=0))):
        raise ValueError(f"the checkpoint was not trained on {data.name}: its users, items or training pairs differ")
    return holdout_validation(data, cfg["seed"])
