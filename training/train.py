"""GMF pretraining → CMN training → evaluation → one checkpoint, with metrics JSON and a PNG of the curves."""
from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from tqdm import tqdm

from model import threads
from model.store.checkpoint import Checkpoint, save_checkpoint
from model.cmn import CMN, CMNConfig, bpr_loss, gather_neighbourhoods
from model.device import resolve_device
from model.gmf import GMF
from model.neighbours import neighbour_csr
from model.optim import Adam
from model.recommender import Recommender
from model.scoring import Scorer
from training import data as data_mod
from training.evaluate import TopPop, evaluate, evaluate_strategies
from training.graph_step import GraphStep
from training.optim import clip_per_tensor_, make_optimizer
from training.report import epoch_line, summary, write_reports
from training.sampler import TripleSampler
from training.two_stage import fit_two_stage

RESUME_FORMAT = 1


@dataclass
class TrainConfig:
    data: str = "synthetic"
    out: str = "artifacts/model.ckpt"
    epochs: int = 10
    pretrain_epochs: int | None = None  # None: auto, see pretrain_epochs_for()
    hops: int = 3
    embed_size: int = 50
    batch_size: int = 128
    gmf_batch_size: int | None = None  # None: batch_size (the paper's GMF used 128 too)
    neg: int = 4
    l2: float = 0.1
    gmf_l2: float = 1e-4
    lr: float | None = None       # None: the paper's 1e-3 at batch 128, scaled to the batch (scaled_lr)
    gmf_lr: float | None = None
    optimizer: str = "rmsprop"
    clip: float = 5.0
    seed: int = 0
    device: str = "auto"
    step: str = "eager"               # the CMN training step: eager, or graph (training/graph_step.py)
    exclude_self: bool = False
    holdout: str = "loo"
    validation: bool = False
    two_stage: bool = True           # with --validation: fit a retrieval stage and choose the two-stage settings
    early_stop: int = 0
    resume: bool = False
    feedback: str | None = None
    feedback_unverified: bool = False
    min_rating: float | None = None
    trust_pickle: bool = False        # unpickle an .npz's test_data as it is (training.data.read_npz)
    # N(i): at most this many users, the item's newest; None: all (the paper's); "auto": neighbour_cap_for()
    max_neighbours: int | str | None = "auto"
    full_eval: bool = True
    progress: bool | None = None  # progress bars; None: only when stderr is a terminal (log files get epoch lines)

    def __post_init__(self):
        if self.progress is None:
            self.progress = sys.stderr.isatty()
        for name in ("epochs", "pretrain_epochs", "early_stop"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        if isinstance(self.max_neighbours, str) and self.max_neighbours != "auto" or \
                isinstance(self.max_neighbours, int) and self.max_neighbours < 1:
            raise ValueError(f"--max-neighbours must be >= 1, none or auto, got {self.max_neighbours!r}")
        for name in ("lr", "gmf_lr"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        for name in ("hops", "embed_size", "batch_size", "neg", "gmf_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.holdout not in ("loo", "none"):
            raise ValueError(f"--holdout must be loo or none, got {self.holdout!r}")
        if self.early_stop and not self.validation:
            raise ValueError("--early-stop needs --validation (a split cut from training; the test split is "
                             "never used for model selection)")
        if self.optimizer not in ("rmsprop", "adam"):
            raise ValueError(f"--optimizer must be rmsprop or adam, got {self.optimizer!r}")
        if self.step not in ("eager", "graph"):
            raise ValueError(f"--step must be eager or graph, got {self.step!r}")
        if self.step == "graph" and self.optimizer != "rmsprop":
            raise ValueError("--step graph implements TF1 RMSProp only: use --optimizer rmsprop, or --step eager")


@dataclass
class TrainState:
    """Everything besides the weights and the optimiser that an interrupted run needs to go on (saved after every
    epoch), and what the metrics report."""
    epoch: int = 0                                              # CMN epochs done
    history: list[dict] = field(default_factory=list)           # one row per CMN epoch: loss, speed, metrics
    gmf: list[dict] = field(default_factory=list)               # one row per GMF pretraining epoch
    best: int | None = None                                     # the epoch with the best validation NDCG@10
    best_model: dict[str, torch.Tensor] | None = None           # its weights
    memory_init: dict | None = None                             # init_memories: GMF's signal and the scale used

    def record(self, row: dict, model: CMN) -> None:
        """Adds a finished epoch; keeps the model's weights when its validation NDCG@10 is the best so far."""
        self.history.append(row)
        self.epoch = row["epoch"]
        if "validation" not in row:
            return
        if self.best is None or row["validation"]["ndcg@10"] > self.history[self.best - 1]["validation"]["ndcg@10"]:
            self.best = self.epoch
            self.best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit_epoch(model, pair_scores, optimizer, sampler: TripleSampler, epoch: int, cfg: TrainConfig,
              device: torch.device, desc: str) -> dict:
    """One epoch of BPR. `pair_scores(users, positives, negatives)` returns both score vectors."""
    model.train()
    users, pos, neg = (torch.from_numpy(a).to(device) for a in sampler.epoch(epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros((), device=device)
    start = time.perf_counter()
    steps = range(0, len(users), cfg.batch_size)
    bar = tqdm(steps, desc=desc, unit="batch", leave=False, disable=not cfg.progress, mininterval=1.0)
    for s in bar:
        b = slice(s, s + cfg.batch_size)
        pos_scores, neg_scores = pair_scores(users[b], pos[b], neg[b])
        loss = bpr_loss(pos_scores, neg_scores)
        optimizer.zero_grad(set_to_none=True)
        (loss + model.l2_penalty()).backward()
        clip_per_tensor_(params, cfg.clip)
        optimizer.step()
        total += loss.detach()
    seconds = time.perf_counter() - start
    return {"loss": total.item() / len(steps), "seconds": seconds, "triples_per_s": len(users) / seconds}


def cmn_pair_scores(model: CMN, indptr: torch.Tensor, indices: torch.Tensor, exclude_self: bool):
    def scores(users, pos, neg):
        both_users, items = torch.cat([users, users]), torch.cat([pos, neg])
        nbr, seg = gather_neighbourhoods(indptr, indices, both_users, items, exclude_self)
        return model(both_users, items, nbr, seg).split(len(users))
    return scores


def gmf_pair_scores(gmf: GMF):
    return lambda users, pos, neg: (gmf(users, pos), gmf(users, neg))


AUTO_PRETRAIN_EPOCHS = 15  # the original pretrain.py default


def pretrain_epochs_for(cfg: TrainConfig) -> int:
    """Auto: 15 epochs. Their embeddings may be too small for the paper's M ← 0.5·P to start CMN learning;
    `init_memories` scales them up where so (it used to take ≥ 50,000 GMF steps to grow them instead)."""
    return AUTO_PRETRAIN_EPOCHS if cfg.pretrain_epochs is None else cfg.pretrain_epochs


BASE_BATCH = 128      # the paper's batch, at which lr 1e-3 is the paper's
BASE_LR = 1e-3


def scaled_lr(lr: float | None, batch_size: int) -> float:
    """An explicit lr as given; else 1e-3·√(batch/128): the rule measured for large batches (docs/results.md)."""
    return lr if lr is not None else BASE_LR * math.sqrt(batch_size / BASE_BATCH)


# --------------------------------------------------------------------------- collapse

# At the start of CMN training the output layer sees x = [m_u ⊙ e_i ; o]. With U and v near zero the loss is
# ln 2 − ½·vᵀ D U g + λ/2·(‖U‖² + ‖v‖²), g = E[x⁺ − x⁻] over training triples (D: the units whose bias is
# positive): U = v = 0 is a stable point, constant scores that no gradient leaves, exactly when ‖g‖ < 2λ.
# TF-RMSProp's normalised steps take U and v there within ~100 steps from their init (docs/model.md). o's
# half of g is ≈ 0 at C's init, so ‖g‖ is the GMF half, which is quadratic in the memories' scale.
SIGNAL_MARGIN = 2.0   # aim for ‖g‖ ≥ 2·(2λ): measured, 1.35·2λ learns on both data sets and 0.82·2λ collapses
MAX_SCALE = 2.0       # never more than M ← 2·P: if that is not enough the GMF learned next to nothing
PROBE_EPOCH = 1_000_000  # the sampler "epoch" whose triples probe the signal and the score spread
PROBE_TRIPLES = 8192
LN2_EPS, SPREAD_EPS = 0.005, 1e-4  # collapsed runs measured 1e-6 … 6e-10; live ones ≥ 0.06 from the start


class TrainingCollapsed(RuntimeError):
    """CMN ended its first epoch at constant scores: the message says why and what to change."""


def output_signal(user_memory: torch.Tensor, item_memory: torch.Tensor, probe) -> float:
    """‖E[m_u ⊙ (e_i⁺ − e_i⁻)]‖ over the probe triples: what pulls the output layer away from zero."""
    users, pos, neg = probe
    return float((user_memory[users] * (item_memory[pos] - item_memory[neg])).mean(0).norm())


def init_memories(model: CMN, P: torch.Tensor, Q: torch.Tensor, cfg: TrainConfig, probe, log) -> dict:
    """M ← s·P, E ← s·Q with the paper's s = 0.5 unless that leaves the output-layer signal below
    SIGNAL_MARGIN·2λ; then s grows (up to MAX_SCALE) until it does not. Scaling both by s scales every GMF score
    by s², so the pretrained ranking is the same; only the start of CMN training changes, and only where the
    paper's would collapse (the paper's citeulike-a setting is far above the line, docs/model.md)."""
    target = SIGNAL_MARGIN * 2 * model.cfg.l2
    signal = output_signal(0.5 * P, 0.5 * Q, probe)
    scale = 0.5
    if signal < target:
        scale = min(MAX_SCALE, 0.5 * math.sqrt(target / max(signal, 1e-12)))
        log(f"GMF → CMN: output-layer signal {signal:.3f} < {target:.3f}, {SIGNAL_MARGIN:g}× the {2 * model.cfg.l2:.3f} "
            f"below which the L2 on U and v wins and CMN collapses to constant scores (docs/model.md): "
            f"M, E ← {scale:.3f}·P, {scale:.3f}·Q instead of the paper's 0.5 (the same GMF ranking; signal "
            f"{signal * (scale / 0.5) ** 2:.3f})")
    else:
        log(f"GMF → CMN: output-layer signal {signal:.3f} >= {target:.3f}: M, E ← 0.5·P, 0.5·Q (the paper's)")
    with torch.no_grad():
        model.user_memory.copy_(scale * P)
        model.item_memory.copy_(scale * Q)
    return {"signal": signal, "target": target, "scale": scale}


def check_collapse(row: dict, pair_scores, probe, init: dict | None, l2: float) -> None:
    """After a CMN epoch: a BPR loss at ln 2 and (nearly) equal scores over the probe triples mean every item
    scores the same, and no gradient will leave that point: stop before a checkpoint is written. The probe's loss,
    not the epoch's mean: on small data the collapse takes a good part of the first epoch (its mean loss can end
    0.006 below ln 2 while the model ends flat)."""
    with torch.no_grad():
        pos, neg = pair_scores(*probe)
        loss, spread = float(bpr_loss(pos, neg)), float(torch.cat([pos, neg]).std())
    if abs(loss - math.log(2)) > LN2_EPS or spread > SPREAD_EPS:
        return
    why = ("without GMF pretraining" if init is None else
           f"after GMF pretraining (output-layer signal {init['signal']:.3f}, scaled to "
           f"{init['signal'] * (init['scale'] / 0.5) ** 2:.3f}; it needs > {2 * l2:.3f})")
    raise TrainingCollapsed(
        f"CMN collapsed in epoch {row['epoch']}: loss {loss:.4f} (ln 2 = {math.log(2):.4f}) and score spread "
        f"{spread:.1e} over {len(probe[0]) * 2:,} probe pairs: every item scores the same. Cause: the L2 of {l2:g} on "
        f"the output layer outweighs the data's pull on it {why}. Remedy: pretrain GMF longer (--pretrain-epochs, "
        f"auto by default) or lower --l2. No checkpoint was written.")


def pretrain_gmf(cfg: TrainConfig, fit: data_mod.Dataset, sampler: TripleSampler, device: torch.device,
                 log) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """The reference's GMF pretraining (BPR, Adam, L2 on v only); returns P, Q and the per-epoch log."""
    gmf = GMF(fit.n_users, fit.n_items, cfg.embed_size, cfg.gmf_l2).to(device)
    gmf_cfg = replace(cfg, batch_size=cfg.gmf_batch_size or cfg.batch_size)
    optimizer = Adam(gmf.parameters(), lr=scaled_lr(cfg.gmf_lr, gmf_cfg.batch_size))
    history = []
    epochs = pretrain_epochs_for(cfg)
    for epoch in range(epochs):
        stats = fit_epoch(gmf, gmf_pair_scores(gmf), optimizer, sampler, 10_000 + epoch, gmf_cfg, device,
                          desc=f"GMF {epoch + 1}/{epochs}")
        history.append({"epoch": epoch + 1, **stats})
        log(f"GMF epoch {epoch + 1:3d}  loss {stats['loss']:.4f}  {stats['triples_per_s']:,.0f} triples/s")
    return gmf.user_embedding.detach(), gmf.item_embedding.detach(), history


Pretrain = Callable[[TrainConfig, data_mod.Dataset, TripleSampler, torch.device, Callable[[str], None]],
                    tuple[torch.Tensor, torch.Tensor, list[dict]]]


@dataclass(frozen=True)
class TrainHooks:
    """What a caller such as benchmarks/reproduce_citeulike.py may swap in or add to `train()`."""
    pretrain: Pretrain = pretrain_gmf                           # returns P, Q (→ 0.5·P, 0.5·Q) and its epoch rows
    on_epoch: Callable[[TrainState, dict], None] | None = None  # after each epoch's row is recorded and saved


def prepare_data(cfg: TrainConfig) -> data_mod.Dataset:
    data = data_mod.load(cfg.data, seed=cfg.seed, min_rating=cfg.min_rating, trust_pickle=cfg.trust_pickle)
    if cfg.feedback:
        from training.feedback import fold_feedback
        data = fold_feedback(data, cfg.feedback, unverified=cfg.feedback_unverified, progress=cfg.progress)
    if cfg.holdout == "none":
        data = data_mod.Dataset(data.n_users, data.n_items, data.all_pairs(), None, data.user_ids, data.item_ids,
                                name=data.name, timeline=data.timeline)
    return data


def train(cfg: TrainConfig, log=print, hooks: TrainHooks = TrainHooks(),
          data: data_mod.Dataset | None = None) -> dict:
    """Runs the whole job; returns the metrics that are also written next to the checkpoint. `data`: train on this
    data set instead of the one `cfg` names (retraining builds its own, training/retrain.py)."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if os.path.isdir(cfg.out):
        raise ValueError(f"--out {cfg.out} is a directory; give a file path such as {cfg.out}/model.ckpt")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    data = prepare_data(cfg) if data is None else data
    log(f"{data.summary()}; {threads.describe()}")
    fit = data_mod.holdout_validation(data, cfg.seed) if cfg.validation else data
    cap = neighbour_cap_for(cfg, data, log)
    model_cfg = CMNConfig(data.n_users, data.n_items, cfg.embed_size, cfg.hops, cfg.l2, cfg.exclude_self, cap)
    model = CMN(model_cfg).to(device)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), scaled_lr(cfg.lr, cfg.batch_size))
    sampler = TripleSampler(fit.train, data.n_items, cfg.neg, cfg.seed)
    # N(i) as the checkpoint will serve it: each item's newest `cap` training users (model/neighbours.py)
    indptr, indices = (torch.from_numpy(a).to(device)
                       for a in neighbour_csr(data_mod.by_recency(fit, fit.train, cfg.seed), data.n_items, cap)[:2])
    probe = tuple(torch.from_numpy(a[:PROBE_TRIPLES]).to(device) for a in sampler.epoch(PROBE_EPOCH))
    resume_path = cfg.out + ".resume"
    state = TrainState()
    if cfg.resume and not os.path.exists(resume_path):
        log(f"--resume: no interrupted run at {resume_path}; starting from scratch")
    if cfg.resume and os.path.exists(resume_path):
        state = load_resume(resume_path, cfg, model, optimizer)
        log(f"resuming from {resume_path} after epoch {state.epoch}")
    elif pretrain_epochs_for(cfg) > 0:
        P, Q, state.gmf = hooks.pretrain(cfg, fit, sampler, device, log)
        state.memory_init = init_memories(model, P, Q, cfg, probe, log)
    pair_scores = cmn_pair_scores(model, indptr, indices, cfg.exclude_self)
    cmn_epoch = cmn_step(cfg, model, optimizer, sampler, pair_scores, indptr, indices, log)
    for epoch in range(state.epoch, cfg.epochs):
        row = {"epoch": epoch + 1, **cmn_epoch(epoch)}
        try:
            check_collapse(row, pair_scores, probe, state.memory_init, cfg.l2)
        except TrainingCollapsed:
            if os.path.exists(resume_path):  # earlier epochs' state: nothing worth resuming
                os.remove(resume_path)
            raise
        rec = Recommender(Scorer(model, indptr, indices), fit.train)
        row.update(evaluate_epoch(rec, cfg, fit, data))
        state.record(row, model)
        log(epoch_line(row))
        save_resume(resume_path, cfg, model, optimizer, state)
        if hooks.on_epoch is not None:
            hooks.on_epoch(state, row)
        if cfg.early_stop and state.epoch - state.best >= cfg.early_stop:
            log(f"early stop: validation NDCG@10 has not improved for {cfg.early_stop} epochs")
            break
    if state.best_model is not None:
        model.load_state_dict(state.best_model)
        log(f"restored the epoch with the best validation NDCG@10: {state.best}")
    two_stage = fit_two_stage(model, fit, data, log) if cfg.validation and cfg.two_stage else None
    metrics = final_metrics(cfg, data, model, state, two_stage)
    metrics["model_version"] = write_checkpoint(cfg, data, model, metrics, two_stage)
    write_reports(cfg.out, metrics)
    if os.path.exists(resume_path):
        os.remove(resume_path)
    log(summary(cfg.out, metrics))
    return metrics


def cmn_step(cfg: TrainConfig, model: CMN, optimizer, sampler: TripleSampler, pair_scores, indptr: torch.Tensor,
             indices: torch.Tensor, log) -> Callable[[int], dict]:
    """epoch → its stats, by the step --step names: eager (`fit_epoch`), or graph (training/graph_step.py: static
    shapes, captured once and replayed per batch on CUDA; the same step, uncaptured, elsewhere). Both update the
    one optimiser, so checkpoints and --resume do not depend on the step."""
    desc = lambda epoch: f"CMN {epoch + 1}/{cfg.epochs}"
    if cfg.step == "eager":
        log("CMN step: eager")
        return lambda epoch: fit_epoch(model, pair_scores, optimizer, sampler, epoch, cfg, indptr.device,
                                       desc=desc(epoch))
    graph = GraphStep.for_sampler(model, optimizer, indptr, indices, sampler, cfg.batch_size, cfg.clip)
    how = "captured as a CUDA graph, replayed per batch" if indptr.device.type == "cuda" else \
        f"uncaptured on {indptr.device.type}: CUDA graphs need a GPU"
    log(f"CMN step: graph ({how}; {graph.slot_budget:,} neighbour slots per batch)")
    return lambda epoch: graph.fit_epoch(sampler, epoch, desc(epoch), cfg.progress)


AUTO_CAP = 200          # docs/results.md: the measured cost and quality of caps
AUTO_CAP_ABOVE = 100    # users in a training positive's neighbourhood, on average: citeulike-a 23, synthetic 69


def neighbour_cap_for(cfg: TrainConfig, data: data_mod.Dataset, log=lambda line: None) -> int | None:
    """--max-neighbours as given; `auto`: none (the paper's model) unless a training positive's neighbourhood
    holds more than AUTO_CAP_ABOVE users on average (popularity-weighted mean popularity: what a triple costs),
    then AUTO_CAP."""
    if cfg.max_neighbours != "auto":
        return cfg.max_neighbours
    pop = np.bincount(data.train[:, 1], minlength=data.n_items).astype(np.float64)
    weighted = float((pop ** 2).sum() / pop.sum())
    cap = AUTO_CAP if weighted > AUTO_CAP_ABOVE else None
    log(f"--max-neighbours auto: {cap or 'none'} (a positive's neighbourhood averages {weighted:,.0f} users; "
        f"capped above {AUTO_CAP_ABOVE})")
    return cap


def evaluate_epoch(rec: Recommender, cfg: TrainConfig, fit: data_mod.Dataset, data: data_mod.Dataset) -> dict:
    """Sampled metrics after an epoch: validation (which selects the epoch kept) and test (only reported)."""
    row = {}
    if cfg.validation:
        row["validation"] = evaluate(rec, fit.test, fit.train, full=False)["sampled"]
    if data.test is not None:
        row["test"] = evaluate(rec, data.test, data.train, full=False)["sampled"]
    return row


def write_checkpoint(cfg: TrainConfig, data: data_mod.Dataset, model: CMN, metrics: dict, two_stage=None) -> str:
    """The served artefact: weights, id maps, the pairs the model reads and the held-out split; returns its version."""
    # oldest first: the order a neighbourhood cap reads (model/neighbours.py)
    ckpt = Checkpoint(model.cfg, model.state_dict(), data.user_ids, data.item_ids,
                      train=data_mod.by_recency(data, data.train, cfg.seed),
                      seen=data.all_pairs(), metrics=metrics, meta={"train_config": asdict(cfg), "data": data.name,
                                                                  "feedback_seq": data.feedback_seq},
                      **({} if data.test is None else dict(test_users=data.test.users,
                                                          test_positives=data.test.positives,
                                                          test_negatives=data.test.negatives)))
    if two_stage is not None:
        ckpt.retrieval, ckpt.two_stage, _ = two_stage
    return save_checkpoint(ckpt, cfg.out)


def final_metrics(cfg: TrainConfig, data: data_mod.Dataset, model: CMN, state: TrainState, two_stage=None) -> dict:
    """`two_stage`: (retrieval, settings, validation table) from training/two_stage.py, or None."""
    metrics = {"config": asdict(cfg), "data": data.summary(), "gmf_epochs": state.gmf,
               "memory_init": state.memory_init, "epochs": state.history, "best_validation_epoch": state.best}
    if two_stage is not None:
        metrics["two_stage"] = {"chosen": two_stage[1].to_dict(), "validation": two_stage[2]}
    if data.test is not None:
        rec = Recommender.from_model(model, data_mod.by_recency(data, data.train, cfg.seed))
        metrics["final"] = evaluate(rec, data.test, data.train, full=cfg.full_eval, progress=cfg.progress)
        if two_stage is not None:   # every strategy the checkpoint serves, side by side (full = "final")
            rec = Recommender(rec.scorer, data.train, retrieval=two_stage[0], two_stage=two_stage[1])
            metrics["strategies"] = evaluate_strategies(rec, data.test, data.train, full=cfg.full_eval,
                                                        known={"full": metrics["final"]})
        metrics["toppop"] = evaluate(TopPop(data.train, data.n_items), data.test, data.train, full=cfg.full_eval)
        tested = [r for r in state.history if "test" in r]
        if tested:  # what the original code prints: the best test epoch (optimistic; reported for comparison)
            best = max(tested, key=lambda r: r["test"]["ndcg@10"])
            metrics["best_test_epoch"] = {"epoch": best["epoch"], **best["test"]}
    return metrics


def save_resume(path: str, cfg: TrainConfig, model: CMN, optimizer, state: TrainState) -> None:
    """Plain dicts, lists and tensors only, so that it loads with weights_only=True."""
    tmp = path + ".tmp"
    torch.save({"format": RESUME_FORMAT, "config": asdict(cfg), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "state": asdict(state)}, tmp)
    os.replace(tmp, path)


def load_resume(path: str, cfg: TrainConfig, model: CMN, optimizer) -> TrainState:
    try:
        blob = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
        if blob.get("format") != RESUME_FORMAT:
            raise ValueError(f"resume format {blob.get('format')} is not {RESUME_FORMAT}")
        model.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        state = TrainState(**blob["state"])
    except Exception as e:
        raise ValueError(f"{path}: cannot resume ({type(e).__name__}: {e}); delete it to start over") from None
    fixed = {k: v for k, v in blob["config"].items()
             if k not in ("epochs", "resume", "early_stop", "progress", "trust_pickle", "step")}
    changed = [k for k, v in fixed.items() if getattr(cfg, k) != v]
    if changed:
        raise ValueError(f"{path}: was written with different settings ({', '.join(changed)}); "
                         "resume with the same ones or delete it")
    return state
