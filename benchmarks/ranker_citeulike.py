"""Every retrieval stage alone, and a LightGBM lambdarank ranker over their union with and without CMN's score (the
CMN ablation), everything chosen and trained on the validation split, then measured on test (sampled and full).

    PYTHONPATH=. python benchmarks/ranker_citeulike.py --checkpoint /tmp/wte_cite/val.ckpt \
        --data ../shared/data/citeulike-a.npz --params '{"ease": {"l2": 50}}' --out /tmp/quality/ranker.json

The CMN checkpoint must have been trained with --validation (its validation split is cut again here with its seed).
A stage's hyperparameters are its class's grid chosen on validation (training/compare.py's `tuned_params`) unless
--params gives them (e.g. taken from a selection run's log). The ranker's validation figure is 2-fold
cross-validation over the validation users (a ranker never scores the users it was trained on); the test figure is
the ranker trained on every validation user, applied with the stages refitted on all training pairs. The validation
figure is full NDCG@10 only (the union's lists, as two-stage selection measures them).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.recommender import Recommender  # noqa: E402
from model.store.checkpoint import load_checkpoint  # noqa: E402
from training.compare import tuned_params  # noqa: E402
from training.data import Split, holdout_validation, load  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.ranker import Ranker  # noqa: E402
from training.two_stage import fit_retrieval  # noqa: E402


class StageAlone:
    """A retrieval stage's own list, in training/evaluate.py's protocol."""

    def __init__(self, stage, ranker: Ranker, name: str):
        self.stage, self.ranker, self.name, self.n_items = stage, ranker, name, ranker.n_items

    def score(self, users, items=None):
        dense = self.ranker._dense([int(u) for u in users])[self.name]   # the ranker built with this stage only
        return dense if items is None else dense.gather(1, items.long())


def subset(split: Split, mask: np.ndarray) -> Split:
    return Split(split.users[mask], split.positives[mask], split.negatives[mask])


def brief(m: dict) -> dict:
    return {"sampled_hr@10": m["sampled"]["hr@10"], "sampled_ndcg@10": m["sampled"]["ndcg@10"],
            "full_hr@10": m["full"]["hr@10"], "full_ndcg@10": m["full"]["ndcg@10"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default="../shared/data/citeulike-a.npz")
    p.add_argument("--methods", default="ease,rp3beta,itemknn,ials")
    p.add_argument("--params", default="{}", help="JSON: method → hyperparameters (skips its validation grid)")
    p.add_argument("--candidates", type=int, default=50, help="R: each stage's top-R enter the union")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    start = time.perf_counter()
    log = lambda msg: print(f"[ranker {time.perf_counter() - start:7.0f} s] {msg}", flush=True)
    ckpt = load_checkpoint(args.checkpoint)
    seed = ckpt.meta["train_config"]["seed"]
    data = load(args.data, seed=seed)
    fit = holdout_validation(data, seed)
    given = json.loads(args.params)
    methods = args.methods.split(",")
    params = {m: given[m] if m in given else tuned_params(m, data, seed, log) for m in methods}
    log(f"stage hyperparameters: {params}")
    stages, seconds = {"validation": {}, "test": {}}, {}
    for m in methods:
        t = time.perf_counter()
        stages["validation"][m], _ = fit_retrieval(m, fit.train, fit.n_users, fit.n_items, **params[m])
        stages["test"][m], _ = fit_retrieval(m, data.train, data.n_users, data.n_items, **params[m])
        seconds[m] = (time.perf_counter() - t) / 2
        log(f"{m}: fitted ({seconds[m]:.0f} s per fit)")
    model = ckpt.build_model()
    scorers = {"validation": Recommender.from_model(model, fit.train).scorer,
               "test": Recommender.from_checkpoint(ckpt, seen=ckpt.train).scorer}
    where = {"validation": (fit.train, fit.test), "test": (data.train, data.test)}
    result = {"params": params, "fit_seconds": seconds, "candidates": args.candidates, "rows": {}}

    def ranker(split: str, cmn: bool, booster=None) -> Ranker:
        return Ranker(stages[split], where[split][0], data.n_items, args.candidates,
                      scorers[split] if cmn else None, booster)

    for m in methods:
        row = {}
        for split in ("validation", "test"):
            train, held = where[split]
            alone = Ranker({m: stages[split][m]}, train, data.n_items, args.candidates)
            row[split] = brief(evaluate(StageAlone(stages[split][m], alone, m), held, train))
        result["rows"][f"{m} alone"] = row
        log(f"{m} alone: {row}")
    val_users, val_pos = fit.test.users.tolist(), fit.test.positives
    lists = ranker("validation", True).lists(val_users, val_pos)
    found = np.mean([y.any() for _, y in lists])
    log(f"validation lists: {len(lists):,}, the positive among the candidates in {found:.3f}")
    cmn_column = 2 * len(methods)
    fold = np.random.default_rng(0).random(len(lists)) < 0.5
    for cmn in (True, False):
        label = "ranker with CMN" if cmn else "ranker without CMN"
        own = lists if cmn else [(np.delete(x, cmn_column, 1), y) for x, y in lists]
        parts = []
        for held_out in (fold, ~fold):
            r = ranker("validation", cmn).fit([own[i] for i in np.flatnonzero(~held_out)], log)
            parts.append((held_out.sum(), r.list_ndcg([own[i] for i in np.flatnonzero(held_out)])))
        val = sum(k * v for k, v in parts) / sum(k for k, _ in parts)
        final = ranker("validation", cmn).fit(own, log)
        test = brief(evaluate(ranker("test", cmn, final.booster), data.test, data.train))
        importance = dict(zip(final.feature_names, final.booster.feature_importance("gain").round(1).tolist()))
        result["rows"][label] = {"validation": {"full_ndcg@10": val}, "test": test,
                                 "rounds": final.booster.best_iteration, "gain": importance}
        log(f"{label}: validation full NDCG@10 (2-fold) {val:.4f}; test {test}; gain {importance}")
        Path(args.out).write_text(json.dumps(result, indent=1))
    result["wall_seconds"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(result, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
