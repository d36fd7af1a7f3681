"""`python -m training {train,evaluate,baselines}`: the offline side of the service."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

import numpy as np

from training.train import TrainConfig

DEFAULTS = TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train CMN (GMF pretraining first) and write one checkpoint")
    t.add_argument("--data", default=DEFAULTS.data,
                   help="'synthetic' (built in, the default), an original-format .npz, or a CSV/TSV of interactions")
    t.add_argument("--out", default=DEFAULTS.out, help="checkpoint path; metrics JSON and PNG go next to it")
    for name, kind, text in (
            ("epochs", int, "CMN epochs"),
            ("pretrain-epochs", int, "GMF pretraining epochs (0 skips it; default: auto, >= 15 epochs and >= 50k steps)"),
            ("hops", int, "memory hops H"), ("embed-size", int, "embedding size d"),
            ("batch-size", int, "triples per batch"), ("neg", int, "negatives per positive per epoch"),
            ("l2", float, "L2 λ on hop maps, output layer and output vector"), ("gmf-l2", float, "GMF L2 λ on v"),
            ("lr", float, "CMN learning rate"), ("gmf-lr", float, "GMF (Adam) learning rate"),
            ("clip", float, "per-tensor gradient norm clip"), ("seed", int, "random seed"),
            ("early-stop", int, "stop after N epochs without validation improvement (needs --validation)"),
            ("min-rating", float, "CSV only: keep interactions with rating >= X")):
        default = getattr(DEFAULTS, name.replace("-", "_"))
        t.add_argument(f"--{name}", type=kind, default=default,
                       help=text if default is None else f"{text} (default {default})")
    t.add_argument("--optimizer", choices=("rmsprop", "adam"), default=DEFAULTS.optimizer,
                   help="rmsprop = TensorFlow 1 RMSProp semantics (the paper's); adam")
    t.add_argument("--device", default=DEFAULTS.device, help="auto (cuda if available), cpu or cuda[:N]")
    t.add_argument("--exclude-self", action="store_true",
                   help="leave the user out of its positive item's neighbourhood in training (not the paper's)")
    t.add_argument("--holdout", choices=("loo", "none"), default=DEFAULTS.holdout,
                   help="loo: keep the leave-one-out test split for evaluation; none: train on everything")
    t.add_argument("--validation", action="store_true",
                   help="cut a leave-one-out validation split from training; the best validation epoch is kept")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run of the same command")
    t.add_argument("--feedback", help="fold a feedback store (the server's CMN_FEEDBACK_PATH) into the data")
    t.add_argument("--no-full-eval", dest="full_eval", action="store_false",
                   help="skip the full-catalogue ranking at the end")
    t.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")

    e = sub.add_parser("evaluate", help="evaluate a checkpoint (sampled, full-catalogue, TopPop)")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", help="evaluate on this data's split instead of the one stored in the checkpoint")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print one JSON object")

    b = sub.add_parser("baselines", help="TopPop, ItemKNN CF and RP3beta in the same evaluator")
    b.add_argument("--data", default="synthetic")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--dacrema-fit", action="store_true",
                   help="fit on training less one validation item per user, as the reference table's runs did")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def cmd_train(args) -> int:
    from training.train import train
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    train(cfg)
    return 0


def cmd_evaluate(args) -> int:
    from model.checkpoint import load_checkpoint
    from model.recommender import Recommender
    from training.data import Split, load
    from training.evaluate import TopPop, evaluate

    ckpt = load_checkpoint(args.checkpoint)
    train_pairs, split = ckpt.train, None
    if args.data:
        train_pairs, split = remap(load(args.data), ckpt)
    elif ckpt.test_users is not None:
        split = Split(ckpt.test_users, ckpt.test_positives, ckpt.test_negatives)
    if split is None or len(split) == 0:
        raise ValueError(f"{args.checkpoint} holds no test split (trained with --holdout none); pass --data")
    result = evaluate(Recommender.from_checkpoint(ckpt, args.device), split, train_pairs)
    result["toppop"] = evaluate(TopPop(train_pairs, ckpt.config.n_items), split, train_pairs)
    result["model_version"] = ckpt.model_version
    if args.json:
        print(json.dumps(result))
    else:
        for name in ("sampled", "sampled_raw", "full"):
            print(f"{name:12s}", "  ".join(f"{k} {v:.4f}" for k, v in result[name].items() if k.endswith("@10")))
        print(f"{'toppop':12s}", "  ".join(f"{k} {v:.4f}" for k, v in result["toppop"]["sampled"].items()
                                            if k.endswith("@10")))
    return 0


def remap(data, ckpt):
    """The data's training pairs and split in the checkpoint's internal ids."""
    from training.data import DataError, Split
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


def cmd_baselines(args) -> int:
    from training.baselines import run_baselines
    from training.data import load
    data = load(args.data, seed=args.seed)
    if data.test is None:
        raise ValueError(f"{args.data}: no test split to evaluate on")
    result = run_baselines(data, dacrema_fit=args.dacrema_fit, seed=args.seed)
    if args.json:
        print(json.dumps(result))
    else:
        for name, r in result.items():
            s = r["metrics"]["sampled"]
            print(f"{name:8s} HR@5 {s['hr@5']:.4f} NDCG@5 {s['ndcg@5']:.4f} HR@10 {s['hr@10']:.4f} "
                  f"NDCG@10 {s['ndcg@10']:.4f}  full NDCG@10 {r['metrics']['full']['ndcg@10']:.4f}  {r['params']}")
    return 0


def main(argv=None) -> int:
    from model.checkpoint import CheckpointError
    from training.data import DataError
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train, "evaluate": cmd_evaluate, "baselines": cmd_baselines}[args.command](args)
    except (DataError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; `--resume` with the same command continues a training run", file=sys.stderr)
        return 130
