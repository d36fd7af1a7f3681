"""`python -m training {train,evaluate,coldstart,baselines,compare,export,finetune,online-report,retrain,rollback,
compact}`: the offline side of the service. Arguments in, results printed; the work is done by training/train.py,
evaluate.py, coldstart.py, baselines.py, compare.py, export.py, finetune.py, online.py, retrain.py and feedback.py."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields

from training.retrain import RetrainConfig
from training.train import TrainConfig

DEFAULTS = TrainConfig()
RETRAIN = RetrainConfig(feedback="")
TRUST_PICKLE = ("an original-format .npz's test_data is a pickle: by default only plain data (dicts, lists, "
                "numbers, numpy arrays) is rebuilt from it and any other pickle is refused; this flag unpickles it "
                "as it is, which runs whatever code the file holds (only for a file you trust)")


def add_progress_arguments(parser: argparse.ArgumentParser, shown: str) -> None:
    """--progress / --quiet: tqdm bars forced on or off (default None: on a terminal only)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--progress", dest="progress", action="store_const", const=True, default=None, help=shown)
    group.add_argument("--quiet", dest="progress", action="store_const", const=False, help="no progress bars")


def add_train_arguments(t: argparse.ArgumentParser, retrain: bool = False) -> None:
    """The training flags, shared by `train`, `coldstart` (which trains on the warm users) and `retrain` (which
    chooses the output, the holdout and the feedback itself)."""
    t.add_argument("--data", default=DEFAULTS.data,
                   help="'synthetic' (built in, the default), an original-format .npz, or a CSV/TSV of interactions")
    if not retrain:
        t.add_argument("--out", default=DEFAULTS.out, help="checkpoint path; metrics JSON and PNG go next to it")
    for name, kind, text in (
            ("epochs", int, "CMN epochs"),
            ("pretrain-epochs", int, "GMF pretraining epochs (0 skips it; default: auto, 15)"),
            ("hops", int, "memory hops H"), ("embed-size", int, "embedding size d"),
            ("batch-size", int, "triples per batch (see --lr)"),
            ("gmf-batch-size", int, "GMF pretraining's triples per batch (default: --batch-size)"),
            ("neg", int, "negatives per positive per epoch"),
            ("l2", float, "L2 λ on hop maps, output layer and output vector"), ("gmf-l2", float, "GMF L2 λ on v"),
            ("lr", float, "CMN learning rate (default: 1e-3·√(batch-size/128), the paper's 1e-3 at batch 128)"),
            ("gmf-lr", float, "GMF (Adam) learning rate (default: as --lr)"),
            ("clip", float, "per-tensor gradient norm clip"), ("seed", int, "random seed"),
            ("early-stop", int, "stop after N epochs without validation improvement (needs --validation)"),
            ("min-rating", float, "CSV only: keep interactions with rating >= X")):
        default = getattr(DEFAULTS, name.replace("-", "_"))
        t.add_argument(f"--{name}", type=kind, default=default,
                       help=text if default is None else f"{text} (default {default})")
    t.add_argument("--max-neighbours", default=DEFAULTS.max_neighbours, metavar="N|none|auto",
                   help="N(i) holds at most N users, the item's most recent (a fixed seeded sample where the data "
                        "has no timestamps), in training, evaluation and serving alike; stored in the checkpoint. "
                        "none: every user (the paper's); auto (default): none unless a positive's neighbourhood "
                        "averages over 100 users (large, MovieLens-like data), then 200")
    t.add_argument("--optimizer", choices=("rmsprop", "adam"), default=DEFAULTS.optimizer,
                   help="rmsprop = TensorFlow 1 RMSProp semantics (the paper's); adam")
    t.add_argument("--device", default=DEFAULTS.device, help="auto (cuda if available), cpu or cuda[:N]")
    t.add_argument("--step", choices=("eager", "graph"), default=DEFAULTS.step,
                   help="the CMN training step: eager (default), or graph: the same arithmetic with static shapes, "
                        "captured once as a CUDA graph and replayed per batch, for GPUs, where the eager step is "
                        "launch-bound (--optimizer rmsprop only; on a CPU it runs uncaptured, and slower)")
    t.add_argument("--exclude-self", action="store_true",
                   help="leave the user out of its positive item's neighbourhood in training (not the paper's)")
    if not retrain:
        t.add_argument("--holdout", choices=("loo", "none"), default=DEFAULTS.holdout,
                       help="loo: keep the leave-one-out test split for evaluation; none: train on everything")
    t.add_argument("--validation", action="store_true",
                   help="cut a leave-one-out validation split from training; the best validation epoch is kept, and "
                        "the served strategy and its retrieval stage (method, R, blend weight) are chosen on it "
                        "(`train`'s default)")
    t.add_argument("--no-validation", dest="validation", action="store_false",
                   help="train on every training pair, choose nothing (the checkpoint serves full-catalogue CMN)")
    t.add_argument("--no-two-stage", dest="two_stage", action="store_false",
                   help="with --validation: fit no retrieval stage (the checkpoint then serves full-catalogue CMN)")
    if not retrain:
        t.add_argument("--resume", action="store_true", help="continue an interrupted run of the same command")
        t.add_argument("--feedback", metavar="URL",
                       help="fold the server's feedback store (its CMN_FEEDBACK_URL: sqlite:///PATH, "
                            "postgresql://... or a file path) into the data")
    t.add_argument("--feedback-unverified", action="store_true",
                   help="with --feedback: also fold in events the server stored as unverified (their user or item "
                        "was unknown to the serving model); each new id becomes a new embedding row. Without it "
                        "they are left out, and the log says how many")
    t.add_argument("--no-full-eval", dest="full_eval", action="store_false",
                   help="skip the full-catalogue ranking at the end")
    add_progress_arguments(t, "progress bars even when stderr is not a terminal (default: only on a terminal; "
                              "otherwise one line per epoch)")
    t.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train CMN (GMF pretraining first) and write one checkpoint")
    add_train_arguments(t)
    # the served default is what validation chose (the best list measured), so `train` cuts a validation split
    # unless told not to; coldstart trains on everything it does not hold out
    t.set_defaults(validation=True)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint (sampled, full-catalogue, TopPop)")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", help="evaluate on this data's split instead of the one stored in the checkpoint")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)

    c = sub.add_parser("coldstart", help="hold a fraction of users out of training, then rank each one's held-out "
                                         "item from its other items: fold-in, popularity and ItemKNN side by side")
    add_train_arguments(c)
    c.add_argument("--cold-users", type=float, default=0.1, metavar="FRACTION",
                   help="fraction of all users held out of training, drawn with --seed among the users of the data's "
                        "leave-one-out split (default 0.1)")
    c.add_argument("--checkpoint", help="evaluate this model, written by an earlier coldstart with the same --data, "
                                        "--cold-users and --seed, instead of training one")
    c.add_argument("--json", action="store_true", help="print one JSON object (the training log goes to stderr)")

    b = sub.add_parser("baselines", help="TopPop, ItemKNN CF and RP3beta in the same evaluator")
    b.add_argument("--data", default="synthetic")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--dacrema-fit", action="store_true",
                   help="fit on training less one validation item per user, as the reference table's runs did")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)

    x = sub.add_parser("export", help="every user's (or the listed users') top-k, as /recommend answers them, into "
                                      "one Parquet, JSON-lines or CSV file; resumable")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--out", required=True, help="the file written (parts gather in OUT.parts/ until it is complete)")
    x.add_argument("--k", type=int, default=10, help="items per user (default 10, as /recommend)")
    x.add_argument("--strategy", help="full, two_stage or retrieval (default: the checkpoint's, as the server's)")
    x.add_argument("--users", metavar="FILE", help="external user ids, one a line (default: every user the "
                                                     "checkpoint knows); an unknown one gets the popularity list")
    x.add_argument("--format", choices=("parquet", "jsonl", "csv"), default="parquet")
    x.add_argument("--chunk-users", type=int, default=512, help="users ranked and written per part (default 512): "
                                                                 "bounds memory, and what a resume redoes")
    x.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    add_progress_arguments(x, "a progress bar even when stderr is not a terminal")

    k = sub.add_parser("compare", help="EASE, iALS, RP3beta, ItemKNN and TopPop (tuned on validation) next to a "
                                       "checkpoint's strategies, one evaluator, one table")
    k.add_argument("--data", required=True, help="any data `train` reads; its test split is what is ranked")
    k.add_argument("--checkpoint", help="also evaluate this checkpoint's strategies (trained on --data)")
    k.add_argument("--seed", type=int, default=0, help="the data's split and the validation split")
    k.add_argument("--device", default="cpu")
    k.add_argument("--json", action="store_true", help="print one JSON object (the tuning log goes to stderr)")
    k.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)

    n = sub.add_parser("finetune", help="fine-tune a --validation checkpoint's CMN as a re-ranker of its retrieval "
                                        "stage's candidates (hard negatives), then choose the two-stage settings "
                                        "again")
    n.add_argument("--checkpoint", required=True, help="trained with --validation (read, never modified)")
    n.add_argument("--data", required=True, help="the data it was trained on")
    n.add_argument("--out", required=True, help="the checkpoint written; metrics JSON and PNG go next to it")
    n.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default 3: on citeulike-a the blend "
                                                         "stopped improving after 3, docs/results.md); the best "
                                                         "validation epoch is kept, the input's weights if none "
                                                         "beats them")
    n.add_argument("--candidates", type=int, default=200, metavar="R",
                   help="each user's top-R retrieval candidates, the hard negatives' pool (default 200)")
    n.add_argument("--hard", type=float, default=1.0, metavar="F",
                   help="the fraction of negatives drawn from the candidates, the rest uniform (default 1.0)")
    n.add_argument("--lr", type=float, help="learning rate (default: the checkpoint's)")
    n.add_argument("--method", help="the retrieval stage (default: the checkpoint's; needed where it holds none)")
    n.add_argument("--params", type=json.loads, help="with --method: its hyperparameters as JSON, e.g. "
                                                     "'{\"l2\": 10}' (default: the method's)")
    n.add_argument("--methods", help="comma-separated methods the closing two-stage selection tries (default: "
                                     "every one `train` tries, so that it can fuse them and choose the tail order)")
    n.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    add_progress_arguments(n, "progress bars even when stderr is not a terminal")
    n.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)

    r = sub.add_parser("retrain", help="train on the stored events on a schedule; publish a candidate only when it "
                                       "is not worse than the serving model on the newest interactions")
    r.add_argument("--feedback", required=True, metavar="URL",
                   help="the servers' feedback store (CMN_FEEDBACK_URL): events in, rollouts out")
    when = r.add_mutually_exclusive_group(required=True)
    when.add_argument("--every", metavar="DURATION", help="a round every DURATION (90s, 15m, 1h, 1d), until stopped")
    when.add_argument("--once", action="store_true", help="one round, then exit (0: published or waiting, "
                                                          "4: the gate refused the candidate)")
    r.add_argument("--out-dir", default=RETRAIN.out_dir,
                   help="where candidates are trained and published versions kept; the servers load published "
                        f"files only inside their CMN_CHECKPOINT_DIR (default {RETRAIN.out_dir})")
    r.add_argument("--checkpoint", default=os.environ.get("CMN_CHECKPOINT"),
                   help="the model the servers serve while the store has published none (default: $CMN_CHECKPOINT)")
    r.add_argument("--holdout-fraction", dest="holdout_fraction", type=float, default=RETRAIN.holdout,
                   help="the newest fraction of the events new to the serving model, held out to compare the "
                        f"two models on (default {RETRAIN.holdout})")
    r.add_argument("--min-events", type=int, default=RETRAIN.min_events,
                   help=f"new events needed before a round trains (default {RETRAIN.min_events})")
    r.add_argument("--tolerance", type=float, default=RETRAIN.tolerance,
                   help="publish when the candidate ranks the held-out clicks within their lists (NDCG) at least as "
                        f"well as the serving model less this (default {RETRAIN.tolerance})")
    r.add_argument("--list-size", type=int, default=RETRAIN.list_size,
                   help="the length of the served lists the held-out clicks are re-ranked in (default "
                        f"{RETRAIN.list_size}, /recommend's k)")
    r.add_argument("--keep", type=int, default=RETRAIN.keep,
                   help=f"published versions kept in --out-dir, older ones deleted (default {RETRAIN.keep})")
    add_train_arguments(r, retrain=True)
    r.set_defaults(validation=True)

    b = sub.add_parser("rollback", help="publish an earlier version again; every server loads it at its next poll")
    b.add_argument("--feedback", required=True, metavar="URL", help="the servers' feedback store (CMN_FEEDBACK_URL)")
    b.add_argument("--version", help="the model_version to restore (default: the newest published one before "
                                     "the active one)")
    b.add_argument("--checkpoint", default=os.environ.get("CMN_CHECKPOINT"),
                   help="the servers' configured checkpoint, also a version to restore (default: $CMN_CHECKPOINT)")

    o = sub.add_parser("online-report", help="online CTR and hit rate per arm, strategy and model version from the "
                                             "server's impressions and feedback, with intervals; a PNG over time")
    o.add_argument("--feedback", metavar="URL", required=True,
                   help="the server's feedback store (its CMN_FEEDBACK_URL: sqlite:///PATH, postgresql://... or a "
                        "file path), opened read-only")
    o.add_argument("--since", help="only impressions shown since: a duration back from now (24h, 7d), unix "
                                   "seconds or an ISO 8601 time; default: all the store keeps")
    o.add_argument("--control", help="the arm the others are compared with (default: the first by name)")
    o.add_argument("--alpha", type=float, default=0.05, help="significance level and 1 - interval confidence "
                                                             "(default 0.05)")
    o.add_argument("--plot", default="online-report.png", help="the PNG of CTR over time (default %(default)s)")
    o.add_argument("--json", action="store_true", help="print the report as JSON")

    f = sub.add_parser("compact", help="move repeated (key, user, item) events out of the feedback store's log and "
                                       "forget old repeat ids; safe while servers write and follow it")
    f.add_argument("--feedback", required=True, metavar="URL",
                   help="the store: sqlite:///PATH, postgresql://... or a file path (as the server's "
                        "CMN_FEEDBACK_URL)")
    f.add_argument("--forget-ids-after", type=float, metavar="DAYS",
                   help="forget the event ids of repeats received more than DAYS ago (a retry with such an id and "
                        "the same payload is still a duplicate; another payload under it is no longer a conflict); "
                        "default: keep them all")
    f.add_argument("--json", action="store_true", help="print one JSON object")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def neighbour_cap(text: str | None) -> int | str | None:
    """--max-neighbours: a number of users, none or auto (TrainConfig checks that the number is >= 1)."""
    if text is None or text.lower() == "none":
        return None
    if text.lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--max-neighbours must be a number of users, none or auto, got {text!r}") from None


def train_config(args) -> TrainConfig:
    args.max_neighbours = neighbour_cap(args.max_neighbours)
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})


def cmd_train(args) -> int:
    from training.train import train
    train(train_config(args))
    return 0


def cmd_evaluate(args) -> int:
    from training.evaluate import evaluate_checkpoint
    result = evaluate_checkpoint(args.checkpoint, args.data, args.device, args.trust_pickle)
    for line in result["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'':22s}{'sampled HR@10':>14s}{'NDCG@10':>9s}{'raw HR@10':>11s}{'full HR@10':>12s}{'NDCG@10':>9s}")
    members = [(f"  stage {name} alone", m) for name, m in result["members"].items()]
    for name, m in [*result["strategies"].items(), *members, ("toppop", result["toppop"])]:
        label = f"{name}{' (default)' if name == result['strategy'] else ''}"
        print(f"{label:22s}{m['sampled']['hr@10']:14.4f}{m['sampled']['ndcg@10']:9.4f}"
              f"{m['sampled_raw']['hr@10']:11.4f}{m['full']['hr@10']:12.4f}{m['full']['ndcg@10']:9.4f}")
    return 0


def cmd_coldstart(args) -> int:
    from training.coldstart import run_coldstart
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    result = run_coldstart(train_config(args), args.cold_users, args.checkpoint, log)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['cold_users']:,} cold users of {args.data} (held-out item: {result['held_out']}; history "
          f"{result['history_length']['mean']:.1f} items on average); fold-in {result['fold_in']['steps']} steps, "
          f"p50 {result['fold_in']['ms_p50']:.1f} ms, p99 {result['fold_in']['ms_p99']:.1f} ms per user")
    print(f"{'':20s}{'sampled HR@10':>14s}{'NDCG@10':>9s}{'full HR@10':>12s}{'NDCG@10':>9s}")
    for name, m in result["methods"].items():
        full = m.get("full", {"hr@10": float("nan"), "ndcg@10": float("nan")})
        print(f"{name:20s}{m['sampled']['hr@10']:14.4f}{m['sampled']['ndcg@10']:9.4f}{full['hr@10']:12.4f}"
              f"{full['ndcg@10']:9.4f}")
    return 0


def cmd_baselines(args) -> int:
    from training.baselines import run_baselines
    from training.data import load
    result = run_baselines(load(args.data, seed=args.seed, trust_pickle=args.trust_pickle),
                           dacrema_fit=args.dacrema_fit, seed=args.seed)
    if args.json:
        print(json.dumps(result))
        return 0
    for name, r in result.items():
        s = r["metrics"]["sampled"]
        print(f"{name:8s} HR@5 {s['hr@5']:.4f} NDCG@5 {s['ndcg@5']:.4f} HR@10 {s['hr@10']:.4f} "
              f"NDCG@10 {s['ndcg@10']:.4f}  full NDCG@10 {r['metrics']['full']['ndcg@10']:.4f}  {r['params']}")
    return 0


def cmd_export(args) -> int:
    from training.export import ExportError, export, read_users
    users = read_users(args.users) if args.users else None
    try:
        r = export(args.checkpoint, args.out, args.k, args.strategy, users, args.format, args.chunk_users,
                   args.device, args.progress)
    except OSError as e:  # the output's directory cannot be written (permissions, a full disk)
        raise ExportError(f"cannot write {args.out} or its parts: {e.strerror or e}") from None
    resumed = (f"; {r.resumed_chunks} of {r.chunks} parts were left by an earlier run, {r.ranked:,} users ranked now"
               if r.resumed_chunks else "")
    unknown = f" ({r.fallback_users:,} unknown to the checkpoint: popularity)" if r.fallback_users else ""
    print(f"exported {r.users:,} users{unknown} to {r.path} in {r.seconds:.1f} s ({r.users_per_s:,.0f} users/s"
          f"{resumed})")
    return 0


def cmd_compare(args) -> int:
    from training.compare import run_compare
    from training.data import load
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    rows = run_compare(load(args.data, seed=args.seed, trust_pickle=args.trust_pickle), args.checkpoint, args.data,
                       args.seed, args.device, log)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'':28s}{'sampled HR@10':>14s}{'NDCG@10':>9s}{'full HR@10':>12s}{'NDCG@10':>9s}  settings")
    for name, r in rows.items():
        s, f = r["metrics"]["sampled"], r["metrics"]["full"]
        print(f"{name:28s}{s['hr@10']:14.4f}{s['ndcg@10']:9.4f}{f['hr@10']:12.4f}{f['ndcg@10']:9.4f}  {r['params']}")
    return 0


def cmd_finetune(args) -> int:
    from training.finetune import FinetuneConfig, finetune
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else None
    finetune(FinetuneConfig(args.checkpoint, args.data, args.out, args.epochs, args.candidates, args.hard, args.lr,
                            args.method, args.params, methods, args.device,
                            sys.stderr.isatty() if args.progress is None else args.progress, args.trust_pickle))
    return 0


def cmd_retrain(args) -> int:
    from model.device import resolve_device
    from training.retrain import Retrainer, duration, stop_on_sigterm, summary
    every = None if args.once else duration(args.every)
    cfg = RetrainConfig(args.feedback, args.out_dir, args.checkpoint, args.holdout_fraction, args.min_events,
                        args.tolerance, args.list_size, args.keep, str(resolve_device(args.device)), train_config(args))
    retrainer = Retrainer(cfg)
    try:
        if args.once:
            done = retrainer.run_once()
            print(summary([done]))
            return 4 if done.status == "refused" else 0
        retrainer.run(every, stop=stop_on_sigterm())
        print("retrain: stopped")
        return 0
    finally:
        retrainer.close()


def cmd_rollback(args) -> int:
    from training.retrain import rollback
    rollback(args.feedback, args.version, args.checkpoint)
    return 0


def cmd_online_report(args) -> int:
    from training.online import online_metrics, parse_since, plot, read_store, table
    if not 0 < args.alpha < 1:
        raise ValueError(f"--alpha {args.alpha}: between 0 and 1")
    impressions, clicks = read_store(args.feedback, parse_since(args.since) if args.since else 0.0)
    report = online_metrics(impressions, clicks, args.control, args.alpha)
    if impressions:
        plot(report, args.plot)
    print(json.dumps(report) if args.json else table(report))
    if not args.json:
        print(f"wrote {args.plot}" if impressions else "no impressions: no plot written")
    return 0


def cmd_compact(args) -> int:
    from dataclasses import asdict
    from model.store.events import masked
    from training.feedback import compact_store
    start = time.perf_counter()
    r = compact_store(args.feedback, args.forget_ids_after, progress=not args.quiet)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps(asdict(r) | {"seconds": round(seconds, 3)}))
        return 0
    print(f"compacted {masked(args.feedback)} in {seconds:.1f} s: {r.events_before:,} → {r.events_after:,} events in "
          f"the log ({r.moved:,} repeats moved out, {r.ids_kept:,} of them keep their event id); "
          f"{r.ids_forgotten:,} repeat ids forgotten")
    return 0


def main(argv=None) -> int:
    from model.store.checkpoint import CheckpointError
    from model.store.events import StoreUnavailable
    from training.data import DataError
    from training.export import ExportError
    from training.train import TrainingCollapsed
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train, "evaluate": cmd_evaluate, "coldstart": cmd_coldstart,
                "baselines": cmd_baselines, "compare": cmd_compare, "export": cmd_export, "finetune": cmd_finetune,
                "online-report": cmd_online_report, "retrain": cmd_retrain,
                "rollback": cmd_rollback, "compact": cmd_compact}[args.command](args)
    except (DataError, CheckpointError, ExportError, ValueError, StoreUnavailable, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingCollapsed as e:  # the settings were valid; the run failed
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print({"export": "interrupted; the same command continues the export from its last complete part",
               "retrain": "interrupted; the unfinished round published nothing"}.get(
            args.command, "interrupted; `--resume` with the same command continues a training run"), file=sys.stderr)
        return 130
