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
from dataclasses import replace

import numpy as np
import torch

from model.store.checkpoint import Checkpoint
from model.cmn import CMN
from model.recommender import Recommender
from model.retrieval import BLENDS, RRF_K, FusedRetrieval, Retrieval, TwoStage, blend
from training.baselines import RETRIEVAL_METHODS as METHODS
from training.data import Dataset, Split, holdout_validation
from training.evaluate import evaluate
from training.metrics import positive_rank, rank_metrics

CANDIDATES = (50, 100, 200, 400)
# finer below 0.1: on citeulike-a every weight from 0.1 up lowered validation NDCG@10 (docs/results.md)
WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
FUSIONS = (0.1, 0.2, 0.3, 0.5)   # the second method's weight when the best one is fused with it
MAX_SELECTION_CELLS = 200_000_000   # validation users × items scored at once: 800 MB per float32 matrix


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


def blend_grid(cmn: torch.Tensor, found: torch.Tensor, items: torch.Tensor, valid: torch.Tensor,
               positives: torch.Tensor, candidates=CANDIDATES, blends=BLENDS, weights=WEIGHTS) -> list[dict]:
    """Validation NDCG@10 of every (R, blend, CMN weight) on the users' candidate lists (`items`, best retrieval
    first; `cmn` and `found` their CMN and retrieval scores), in the order selection breaks ties: smallest R, then
    the blends' order, then the smallest weight."""
    return [{"candidates": r, "blend": kind, "weight": float(weight),
             "ndcg@10": validation_ndcg(blend(cmn[:, :r], found[:, :r], valid[:, :r], float(weight), kind),
                                        items[:, :r], valid[:, :r], positives)}
            for r in sorted(candidates) for kind in blends for weight in sorted(weights)]


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
                     blends=BLENDS, fusions=FUSIONS, log=print) -> tuple[TwoStage, list[dict]]:
    """The (stage, R, blend, weight, tail) with the best validation figures (`fit.test` is the validation split,
    `fit.train` what the model and the retrieval are fitted on), and every configuration's full NDCG@10.

    A method's hyperparameters (its `grid`) are chosen first, by its own list's validation NDCG@10. The best method
    is then fused with each other one (`fusions`: the other's weight) and the best fused stage, where its own list
    beats the best method's, joins the methods. CMN is blended with each stage's list (R × blend × weight); where
    the best configuration gives CMN weight 0 the retrieval's own order is served as it is (strategy `retrieval`):
    CMN would change no list and cost a pass. Last, the tail (what orders the items the stage does not propose,
    when a request lists them) is chosen by validation sampled NDCG@10 among the stage's order and each method's."""
    methods = default_methods(fit.n_users, fit.n_items) if methods is None else methods
    fit = selection_users(fit)
    users = [int(u) for u in fit.test.users]
    positives = torch.as_tensor(fit.test.positives)
    rec = Recommender.from_model(model, fit.train)
    histories = [sorted(rec.seen(u)) for u in users]

    def own_list(retrieval: Retrieval, settings: TwoStage) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
        rec.retrieval, rec.two_stage = retrieval, settings
        dense = retrieval.scores(histories)
        items, valid = rec.retrieve(users, histories, dense)
        return (validation_ndcg(rec.score_lists(users, items, valid, "retrieval", dense), items, valid, positives),
                dense, items, valid)

    stages = {}   # method (or fused methods) → (its own list's figure, stage, settings, dense, items, valid)
    for method in methods:
        if not METHODS[method].fits(fit.n_users, fit.n_items):
            log(f"two-stage {method}: skipped, {fit.n_users:,} users x {fit.n_items:,} items is too large for it")
            continue
        for setting in method_grid(method):
            retrieval, fitted = fit_retrieval(method, fit.train, fit.n_users, fit.n_items, **setting)
            settings = TwoStage(method, max(candidates), 1.0, fitted)
            own, *lists = own_list(retrieval, settings)
            if setting:
                log(f"two-stage {method} {setting}: validation full NDCG@10 {own:.4f} alone")
            if method not in stages or own > stages[method][0]:
                stages[method] = (own, retrieval, settings, *lists)
    if not stages:
        raise ValueError("no retrieval method fits this data set")
    single, best_fused = dict(stages), None
    first = max(single, key=lambda m: single[m][0])
    for other in (m for m in single if m != first):
        for w in fusions:
            fusion = {first: 1.0 - w, other: w}
            retrieval = FusedRetrieval({m: single[m][1] for m in fusion}, fusion)
            settings = TwoStage(f"{first}+{other}", max(candidates), 1.0,
                                {m: single[m][2].params for m in fusion}, fusion=fusion)
            own, *lists = own_list(retrieval, settings)
            log(f"two-stage {first} fused with {other} at {w:g}: validation full NDCG@10 {own:.4f} alone")
            if own > single[first][0] and (best_fused is None or own > best_fused[0]):
                best_fused = (own, retrieval, settings, *lists)
    if best_fused is not None:
        stages[best_fused[2].method] = best_fused
    table = []
    for method, (_, retrieval, settings, dense, items, valid) in stages.items():
        rec.retrieval, rec.two_stage = retrieval, settings
        cmn, found = (rec.score_lists(users, items, valid, strategy, dense) for strategy in ("full", "retrieval"))
        table += [{"method": method, "params": settings.params, "fusion": settings.fusion, **row}
                  for row in blend_grid(cmn, found, items, valid, positives, candidates, blends, weights)]
        best = max((row for row in table if row["method"] == method), key=lambda row: row["ndcg@10"])
        log(f"two-stage {method}: best validation full NDCG@10 {best['ndcg@10']:.4f} "
            f"(R {best['candidates']}, {best['blend']} blend, CMN weight {best['weight']:g})")
    best = max(table, key=lambda row: row["ndcg@10"])   # the first of equals: the order above
    _, retrieval, settings, *_ = stages[best["method"]]
    chosen = replace(settings, candidates=best["candidates"], weight=best["weight"], blend=best["blend"],
                     strategy="retrieval" if best["weight"] == 0 else "two_stage")
    return choose_tail(rec, fit, chosen, retrieval, {m: single[m][1] for m in single},
                       {m: single[m][2].params for m in single}, log), table


def choose_tail(rec: Recommender, fit: Dataset, chosen: TwoStage, retrieval: Retrieval, fitted: dict[str, Retrieval],
                params: dict[str, dict], log=print) -> TwoStage:
    """`chosen` with the tail order of the best validation sampled NDCG@10: the stage's own, or a method's (kept in
    the stage at fusion weight 0 where it is not a member). The full-catalogue figures do not move: the tail only
    orders items past the R proposed."""
    options = [(chosen, retrieval)]
    for method in (m for m in fitted if m != chosen.method):
        fusion = dict(chosen.fusion or {chosen.method: 1.0})
        if method not in fusion:
            fusion[method] = 0.0
        members = {m: retrieval.members[m] if m in (chosen.fusion or {}) else fitted[m] for m in fusion}
        stage_params = dict(chosen.params) if chosen.fusion else {chosen.method: chosen.params}
        options.append((replace(chosen, method="+".join(fusion), fusion=fusion, tail=method,
                                params={m: stage_params.get(m, params[m]) for m in fusion}),
                        FusedRetrieval(members, fusion)))
    best = None
    for settings, stage in options:
        rec.retrieval, rec.two_stage = stage, settings
        sampled = evaluate(rec, fit.test, fit.train, full=False)["sampled"]["ndcg@10"]
        log(f"two-stage tail {settings.tail or 'the stage itself'}: validation sampled NDCG@10 {sampled:.4f}")
        if best is None or sampled > best[0]:
            best = (sampled, settings)
    return best[1]


def selection_users(fit: Dataset, max_cells: int = MAX_SELECTION_CELLS) -> Dataset:
    """`fit` with its validation split cut to a seeded sample of users where users × items would exceed
    `max_cells`: selection holds a few (users, items) score matrices at once."""
    keep = max(1, max_cells // fit.n_items)
    if len(fit.test) <= keep:
        return fit
    rows = np.sort(np.random.default_rng(0).choice(len(fit.test), keep, replace=False))
    split = Split(fit.test.users[rows], fit.test.positives[rows], fit.test.negatives[rows])
    return replace(fit, test=split)


def fit_two_stage(model: CMN, fit: Dataset, data: Dataset, log=print,
                  methods=None) -> tuple[Retrieval, TwoStage, list[dict]]:
    """Choose on `fit` (validation split, training less validation items), then fit the chosen retrieval on every
    training pair of `data` for serving."""
    stage, table = select_two_stage(model, fit, methods, log=log)
    return stage_for(stage, data), stage, table


def stage_for(stage: TwoStage, data: Dataset, device: str | torch.device = "cpu") -> Retrieval:
    """The retrieval stage `stage` describes, fitted on `data`'s training pairs (each member of a fused one)."""
    if stage.fusion is None:
        return fit_retrieval(stage.method, data.train, data.n_users, data.n_items, device, **stage.params)[0]
    return FusedRetrieval({m: fit_retrieval(m, data.train, data.n_users, data.n_items, device, **stage.params[m])[0]
                           for m in stage.fusion}, stage.fusion)


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
