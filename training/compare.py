"""`python -m training compare --data D [--checkpoint C]`: the peers a user would try instead of this service, fitted
on D's training pairs and ranked by the one evaluator (training/evaluate.py), next to the service's strategies.

Each peer with a `grid` (EASE's λ, iALS's factors, regularisation and confidence) is tuned on a validation split cut
from the training pairs (`holdout_validation`, never the test split) by full-catalogue NDCG@10, then refitted on
every training pair. The checkpoint's strategies are evaluated on D's test split in the checkpoint's ids, as
`python -m training evaluate --data` does.
"""
from __future__ import annotations

import itertools
import time

from training.baselines import RETRIEVAL_METHODS
from training.data import Dataset, holdout_validation
from training.evaluate import TopPop, evaluate, evaluate_checkpoint

PEERS = {"toppop": TopPop, **RETRIEVAL_METHODS}


def build(name: str, train, data: Dataset, params: dict):
    if name == "toppop":
        return TopPop(train, data.n_items)
    return PEERS[name](train, data.n_users, data.n_items, **params)


def tuned_params(name: str, data: Dataset, seed: int, log) -> dict:
    """The grid's setting with the best validation full NDCG@10 (the first of equals); {} without a grid."""
    grid = getattr(PEERS[name], "grid", {})
    if not grid:
        return {}
    fit = holdout_validation(data, seed)
    best = None
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values))
        ndcg = evaluate(build(name, fit.train, fit, params), fit.test, fit.train)["full"]["ndcg@10"]
        log(f"{name} {params}: validation full NDCG@10 {ndcg:.4f}")
        if best is None or ndcg > best[0]:
            best = (ndcg, params)
    return best[1]


def run_compare(data: Dataset, checkpoint: str | None = None, data_path: str | None = None, seed: int = 0,
                device: str = "cpu", log=print) -> dict:
    if data.test is None:
        raise ValueError(f"{data.name}: no test split to evaluate on")
    rows = {}
    for name, peer in PEERS.items():
        if not getattr(peer, "fits", lambda *_: True)(data.n_users, data.n_items):
            log(f"{name}: skipped ({data.n_users:,} users x {data.n_items:,} items is above its limit)")
            continue
        start = time.perf_counter()
        params = tuned_params(name, data, seed, log)
        model = build(name, data.train, data, params)
        seconds = time.perf_counter() - start
        rows[name] = {"params": getattr(model, "params", {}), "metrics": evaluate(model, data.test, data.train),
                      "fit_seconds": seconds}
        log(f"{name}: full NDCG@10 {rows[name]['metrics']['full']['ndcg@10']:.4f} ({seconds:.1f} s)")
    if checkpoint:
        served = evaluate_checkpoint(checkpoint, data_path, device)
        for strategy, metrics in served["strategies"].items():
            label = f"service {strategy}{' (default)' if strategy == served['strategy'] else ''}"
            rows[label] = {"params": {}, "metrics": metrics, "fit_seconds": None}
    return rows
