"""GMF pretraining → CMN training → evaluation → one checkpoint, with metrics JSON and a PNG of the curves."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from model.checkpoint import Checkpoint, csr, save_checkpoint
from model.cmn import CMN, CMNConfig, gather_neighbourhoods
from model.gmf import GMF
from model.recommender import Recommender
from model.scorer import Scorer, resolve_device
from training import data as data_mod
from training.evaluate import TopPop, evaluate
from training.optim import DenseAdam, clip_per_tensor_, make_optimizer
from training.sampler import TripleSampler

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
    neg: int = 4
    l2: float = 0.1
    gmf_l2: float = 1e-4
    lr: float = 1e-3
    gmf_lr: float = 1e-3
    optimizer: str = "rmsprop"
    clip: float = 5.0
    seed: int = 0
    device: str = "auto"
    exclude_self: bool = False
    holdout: str = "loo"
    validation: bool = False
    early_stop: int = 0
    resume: bool = False
    feedback: str | None = None
    min_rating: float | None = None
    full_eval: bool = True
    progress: bool = True

    def __post_init__(self):
        for name in ("epochs", "pretrain_epochs", "early_stop"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        for name in ("hops", "embed_size", "batch_size", "neg"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.holdout not in ("loo", "none"):
            raise ValueError(f"--holdout must be loo or none, got {self.holdout!r}")
        if self.early_stop and not self.validation:
            raise ValueError("--early-stop needs --validation (a split cut from training; the test split is "
                             "never used for model selection)")
        if self.optimizer not in ("rmsprop", "adam"):
            raise ValueError(f"--optimizer must be rmsprop or adam, got {self.optimizer!r}")


@dataclass
class TrainState:
    """Everything besides the weights and the optimiser that an interrupted run needs to go on (saved after every
    epoch), and what the metrics report."""
    epoch: int = 0                                              # CMN epochs done
    history: list[dict] = field(default_factory=list)           # one row per CMN epoch: loss, speed, metrics
    gmf: list[dict] = field(default_factory=list)               # one row per GMF pretraining epoch
    best: int | None = None                                     # the epoch with the best validation NDCG@10
    best_model: dict[str, torch.Tensor] | None = None           # its weights

    def record(self, row: dict, model: CMN) -> None:
        """Adds a finished epoch; keeps the model's weights when its validation NDCG@10 is the best so far."""
        self.history.append(row)
        self.epoch = row["epoch"]
        if "validation" not in row:
            return
        if self.best is None or row["validation"]["ndcg@10"] > self.history[self.best - 1]["validation"]["ndcg@10"]:
            self.best = self.epoch
            self.best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    return -torch.log(torch.sigmoid(pos - neg) + 1e-12).mean()


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


GMF_STEPS = 50_000


def pretrain_epochs_for(cfg: TrainConfig, sampler: TripleSampler) -> int:
    """Auto: at least 15 epochs (the original pretrain.py default) and at least GMF_STEPS optimiser steps.

    CMN's L2 of 0.1 on the output layer pulls it to zero unless m_u ⊙ e_i starts large enough to carry a
    gradient that outweighs it; GMF embeddings grow with the number of Adam steps, not epochs. Measured on
    the synthetic default (571 steps/epoch): 20 GMF epochs → CMN collapses to constant scores; 100 → it learns.
    """
    if cfg.pretrain_epochs is not None:
        return cfg.pretrain_epochs
    steps = -(-len(sampler) // cfg.batch_size)
    return max(15, -(-GMF_STEPS // steps))


def pretrain_gmf(cfg: TrainConfig, fit: data_mod.Dataset, sampler: TripleSampler, device: torch.device,
                 log) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """The reference's GMF pretraining (BPR, Adam, L2 on v only); returns P, Q and the per-epoch log."""
    gmf = GMF(fit.n_users, fit.n_items, cfg.embed_size, cfg.gmf_l2).to(device)
    optimizer = DenseAdam(gmf.parameters(), lr=cfg.gmf_lr)
    history = []
    epochs = pretrain_epochs_for(cfg, sampler)
    for epoch in range(epochs):
        stats = fit_epoch(gmf, gmf_pair_scores(gmf), optimizer, sampler, 10_000 + epoch, cfg, device,
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
    data = data_mod.load(cfg.data, seed=cfg.seed, min_rating=cfg.min_rating)
    if cfg.feedback:
        from training.feedback import fold_feedback
        data = fold_feedback(data, cfg.feedback)
    if cfg.holdout == "none":
        data = data_mod.Dataset(data.n_users, data.n_items, data.all_pairs(), None, data.user_ids, data.item_ids,
                                name=data.name)
    return data


def train(cfg: TrainConfig, log=print, hooks: TrainHooks = TrainHooks()) -> dict:
    """Runs the whole job; returns the metrics that are also written next to the checkpoint."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if os.path.isdir(cfg.out):
        raise ValueError(f"--out {cfg.out} is a directory; give a file path such as {cfg.out}/model.ckpt")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    data = prepare_data(cfg)
    log(data.summary())
    fit = data_mod.holdout_validation(data, cfg.seed) if cfg.validation else data
    model_cfg = CMNConfig(data.n_users, data.n_items, cfg.embed_size, cfg.hops, cfg.l2, cfg.exclude_self)
    model = CMN(model_cfg).to(device)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    sampler = TripleSampler(fit.train, data.n_items, cfg.neg, cfg.seed)
    indptr, indices = (torch.from_numpy(a).to(device) for a in csr(fit.train[:, 1], fit.train[:, 0], data.n_items))
    resume_path = cfg.out + ".resume"
    state = TrainState()
    if cfg.resume and not os.path.exists(resume_path):
        log(f"--resume: no interrupted run at {resume_path}; starting from scratch")
    if cfg.resume and os.path.exists(resume_path):
        state = load_resume(resume_path, cfg, model, optimizer)
        log(f"resuming from {resume_path} after epoch {state.epoch}")
    elif pretrain_epochs_for(cfg, sampler) > 0:
        P, Q, state.gmf = hooks.pretrain(cfg, fit, sampler, device, log)
        with torch.no_grad():
            model.user_memory.copy_(0.5 * P)
            model.item_memory.copy_(0.5 * Q)
    pair_scores = cmn_pair_scores(model, indptr, indices, cfg.exclude_self)
    for epoch in range(state.epoch, cfg.epochs):
        stats = fit_epoch(model, pair_scores, optimizer, sampler, epoch, cfg, device,
                          desc=f"CMN {epoch + 1}/{cfg.epochs}")
        rec = Recommender(Scorer(model, indptr, indices), fit.train)
        row = {"epoch": epoch + 1, **stats, **evaluate_epoch(rec, cfg, fit, data)}
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
    metrics = final_metrics(cfg, data, model, state)
    metrics["model_version"] = write_checkpoint(cfg, data, model, metrics)
    write_reports(cfg.out, metrics)
    if os.path.exists(resume_path):
        os.remove(resume_path)
    log(summary(cfg, metrics))
    return metrics


def evaluate_epoch(rec: Recommender, cfg: TrainConfig, fit: data_mod.Dataset, data: data_mod.Dataset) -> dict:
    """Sampled metrics after an epoch: validation (which selects the epoch kept) and test (only reported)."""
    row = {}
    if cfg.validation:
        row["validation"] = evaluate(rec, fit.test, fit.train, full=False)["sampled"]
    if data.test is not None:
        row["test"] = evaluate(rec, data.test, data.train, full=False)["sampled"]
    return row


def write_checkpoint(cfg: TrainConfig, data: data_mod.Dataset, model: CMN, metrics: dict) -> str:
    """The served artefact: weights, id maps, the pairs the model reads and the held-out split; returns its version."""
    ckpt = Checkpoint(model.cfg, model.state_dict(), data.user_ids, data.item_ids, train=data.train,
                      seen=data.all_pairs(), metrics=metrics, meta={"train_config": asdict(cfg), "data": data.name},
                      **({} if data.test is None else dict(test_users=data.test.users,
                                                          test_positives=data.test.positives,
                                                          test_negatives=data.test.negatives)))
    return save_checkpoint(ckpt, cfg.out)


def final_metrics(cfg: TrainConfig, data: data_mod.Dataset, model: CMN, state: TrainState) -> dict:
    metrics = {"config": asdict(cfg), "data": data.summary(), "gmf_epochs": state.gmf,
               "epochs": state.history, "best_validation_epoch": state.best}
    if data.test is not None:
        metrics["final"] = evaluate(Recommender.from_model(model, data.train), data.test, data.train,
                                    full=cfg.full_eval, progress=cfg.progress)
        metrics["toppop"] = evaluate(TopPop(data.train, data.n_items), data.test, data.train, full=cfg.full_eval)
        tested = [r for r in state.history if "test" in r]
        if tested:  # what the original code prints: the best test epoch (optimistic; reported for comparison)
            best = max(tested, key=lambda r: r["test"]["ndcg@10"])
            metrics["best_test_epoch"] = {"epoch": best["epoch"], **best["test"]}
    return metrics


def epoch_line(row: dict) -> str:
    parts = [f"epoch {row['epoch']:3d}", f"loss {row['loss']:.4f}", f"{row['triples_per_s']:,.0f} triples/s"]
    for split in ("validation", "test"):
        if split in row:
            parts.append(f"{split} HR@10 {row[split]['hr@10']:.4f} NDCG@10 {row[split]['ndcg@10']:.4f}")
    return "  ".join(parts)


def summary(cfg: TrainConfig, metrics: dict) -> str:
    lines = [f"wrote {cfg.out} (model_version {metrics['model_version']}), "
             f"{cfg.out}.metrics.json and {cfg.out}.curves.png"]
    if "final" in metrics:
        for name, m in (("CMN", metrics["final"]), ("TopPop", metrics["toppop"])):
            s = m["sampled"]
            line = f"{name:7s} sampled HR@10 {s['hr@10']:.4f} NDCG@10 {s['ndcg@10']:.4f}"
            if "full" in m:
                line += f"   full HR@10 {m['full']['hr@10']:.4f} NDCG@10 {m['full']['ndcg@10']:.4f}"
            lines.append(line)
    return "\n".join(lines)


def write_reports(out: str, metrics: dict) -> None:
    with open(out + ".metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    plot_curves(metrics, out + ".curves.png")


def plot_curves(metrics: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics["epochs"]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    if metrics["gmf_epochs"]:
        ax_loss.plot([-len(metrics["gmf_epochs"]) + r["epoch"] for r in metrics["gmf_epochs"]],
                     [r["loss"] for r in metrics["gmf_epochs"]], "o-", color="grey", label="GMF pretraining")
    ax_loss.plot([r["epoch"] for r in rows], [r["loss"] for r in rows], "o-", label="CMN")
    ax_loss.set(xlabel="epoch", ylabel="BPR loss", title="training loss")
    ax_loss.legend()
    for split, style in (("test", "-"), ("validation", "--")):
        tested = [r for r in rows if split in r]
        for key in ("hr@10", "ndcg@10"):
            if tested:
                ax_metric.plot([r["epoch"] for r in tested], [r[split][key] for r in tested], style, marker="o",
                               label=f"{split} {key.upper()}")
    if "toppop" in metrics:
        ax_metric.axhline(metrics["toppop"]["sampled"]["hr@10"], color="grey", ls=":", label="TopPop HR@10")
    ax_metric.set(xlabel="epoch", ylabel="sampled metric", title="leave-one-out, 100 negatives")
    if ax_metric.lines:
        ax_metric.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    fixed = {k: v for k, v in blob["config"].items() if k not in ("epochs", "resume", "early_stop", "progress")}
    changed = [k for k, v in fixed.items() if getattr(cfg, k) != v]
    if changed:
        raise ValueError(f"{path}: was written with different settings ({', '.join(changed)}); "
                         "resume with the same ones or delete it")
    return state
