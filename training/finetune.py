"""CMN fine-tuned as a re-ranker: BPR on hard negatives, drawn from the retrieval stage's candidates.

    python -m training finetune --checkpoint IN --data D --out OUT [--epochs N] [--candidates R] [--hard F]

IN was trained with --validation. Its validation split is cut again from D (training/two_stage.py's
`validation_split`); the retrieval stage (IN's, or --method/--params) is fitted on that split's training pairs and
proposes each user's top-R items, the user's training items left out. CMN then goes on training from IN's weights
with the paper's BPR loss and optimiser settings, a fraction F of each epoch's negatives drawn from the user's
candidates (training/sampler.py). After every epoch (and before the first: epoch 0 is IN) it re-ranks the
validation users' candidates: CMN alone (weight 1) and the best blend over two_stage.py's R × blend × weight grid,
full-protocol NDCG@10 (`validation_ndcg`). The epoch with the best blend is kept, IN's weights where no epoch beats
them, and the two-stage settings are chosen again on the kept model (`add_two_stage`) before OUT is written.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from model.cmn import CMN
from model.device import resolve_device
from model.neighbours import neighbour_csr
from model.recommender import Recommender
from model.retrieval import TwoStage
from model.store.checkpoint import load_checkpoint, save_checkpoint
from training import data as data_mod
from training.optim import make_optimizer
from training.sampler import TripleSampler
from training.train import TrainConfig, cmn_pair_scores, fit_epoch, prepare_data, scaled_lr
from training.two_stage import CANDIDATES, add_two_stage, blend_grid, stage_for, validation_split

EPOCH_OFFSET = 20_000   # sampler epochs of their own: training used 0.., GMF pretraining 10_000..
CHUNK_USERS = 1024      # users whose dense retrieval scores are held at once


@dataclass
class FinetuneConfig:
    checkpoint: str
    data: str
    out: str
    epochs: int = 3
    candidates: int = 200      # R: each user's retrieval candidates, the hard negatives' pool
    hard: float = 1.0          # the fraction of negatives drawn from the candidates
    lr: float | None = None    # None: the checkpoint's
    method: str | None = None  # None: the checkpoint's retrieval stage
    params: dict | None = None
    methods: tuple[str, ...] | None = None   # what the closing selection tries; None: what `train` tries
    device: str = "auto"
    progress: bool = False
    trust_pickle: bool = False

    def __post_init__(self):
        if self.epochs < 0:
            raise ValueError(f"--epochs must be >= 0, got {self.epochs}")
        if self.candidates < 1:
            raise ValueError(f"--candidates must be >= 1, got {self.candidates}")
        if not 0.0 <= self.hard <= 1.0:
            raise ValueError(f"--hard must be within [0, 1], got {self.hard}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.params is not None and not isinstance(self.params, dict):
            raise ValueError(f"--params must be a JSON object such as {{\"l2\": 10}}, got {self.params!r}")
        if os.path.abspath(self.out) == os.path.abspath(self.checkpoint):
            raise ValueError("--out must not be --checkpoint: the input model is read, never overwritten")
        if os.path.isdir(self.out):
            raise ValueError(f"--out {self.out} is a directory; give a file path such as {self.out}/model.ckpt")


def stage_of(ckpt, cfg: FinetuneConfig) -> TwoStage:
    """The retrieval stage whose top-R the fine-tune draws from and re-ranks: --method/--params, else the
    checkpoint's (a fused one too)."""
    if cfg.method is not None:
        return TwoStage(cfg.method, cfg.candidates, 1.0, dict(cfg.params or {}))
    if cfg.params is not None:
        raise ValueError("--params goes with --method (without it the checkpoint's stage is used as it is)")
    if ckpt.two_stage is None:
        raise ValueError(f"{cfg.checkpoint} holds no retrieval stage (trained with --no-two-stage): name one with "
                         "--method (and --params), e.g. --method ease --params '{\"l2\": 10}'")
    return replace(ckpt.two_stage, candidates=cfg.candidates, weight=1.0, strategy="two_stage")


@torch.no_grad()
def retrieve_all(rec: Recommender, n_users: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every user's top-R candidates (training items left out): (items, valid, retrieval scores), (n_users, R)."""
    items, valid, found = [], [], []
    for start in range(0, n_users, CHUNK_USERS):
        users = list(range(start, min(start + CHUNK_USERS, n_users)))
        dense = rec.retrieval.scores([sorted(rec.seen(u)) for u in users])
        chunk, mask = rec.retrieve(users, [sorted(rec.seen(u)) for u in users], dense)
        items.append(chunk)
        valid.append(mask)
        found.append(dense.gather(1, chunk.clamp(min=0)).masked_fill(~mask, -torch.inf))
    return torch.cat(items), torch.cat(valid), torch.cat(found)


@torch.no_grad()
def rerank_figures(model: CMN, train: np.ndarray, users: list[int], items: torch.Tensor, valid: torch.Tensor,
                   found: torch.Tensor, positives: torch.Tensor) -> dict:
    """Validation full NDCG@10 of the users' candidate lists re-ranked by CMN alone (weight 1; also of their first
    R for two_stage.py's shorter R), by the retrieval alone (weight 0), and by the best blend over two_stage.py's
    grid (R up to the lists' length, blend, weight)."""
    model.eval()
    cmn = Recommender.from_model(model, train).score_lists(users, items, valid, "full")
    width = items.shape[1]
    grid = blend_grid(cmn, found, items, valid, positives, {c for c in CANDIDATES if c < width} | {width})
    alone = lambda weight: {g["candidates"]: g["ndcg@10"] for g in grid
                            if g["weight"] == weight and g["blend"] == "zscore"}
    return {"cmn": alone(1.0)[width], "retrieval": alone(0.0)[width], "cmn_by_candidates": alone(1.0),
            "best": max(grid, key=lambda g: g["ndcg@10"])}   # the first of equals: smallest R, zscore, weight


def figures_line(epoch: int, row: dict) -> str:
    best = row["best"]
    return (f"epoch {epoch}: validation full NDCG@10 CMN re-ranking {row['cmn']:.4f}, best blend {best['ndcg@10']:.4f} "
            f"(R {best['candidates']}, {best['blend']}, CMN weight {best['weight']:g}); retrieval alone "
            f"{row['retrieval']:.4f}")


def finetune(cfg: FinetuneConfig, log=print) -> dict:
    """Fine-tunes, chooses the epoch and the two-stage settings on validation, writes `cfg.out`; returns its
    metrics (also written next to it)."""
    started = time.perf_counter()
    ckpt = load_checkpoint(cfg.checkpoint)
    train_cfg = TrainConfig(**{**ckpt.meta.get("train_config", {}), "data": cfg.data, "resume": False,
                               "progress": cfg.progress, "trust_pickle": cfg.trust_pickle})
    data = prepare_data(train_cfg)
    fit = validation_split(ckpt, data)   # refuses a checkpoint trained without --validation, or on other data
    stage = stage_of(ckpt, cfg)
    device = resolve_device(cfg.device)
    log(f"{data.summary()}; fine-tuning {cfg.checkpoint} (model_version {ckpt.model_version})")

    try:
        retrieval = stage_for(stage, fit, device)
    except TypeError as e:   # a hyperparameter the method does not take
        raise ValueError(f"{stage.method} does not take the hyperparameters {stage.params}: {e}") from None
    rec = Recommender.from_model(ckpt.build_model(device), fit.train, retrieval=retrieval, two_stage=stage)
    items, valid, found = retrieve_all(rec, fit.n_users)
    log(f"retrieval {stage.method} {stage.params}: top {cfg.candidates} candidates for {fit.n_users:,} users, "
        f"{int(valid.sum()):,} in all")
    users = [int(u) for u in fit.test.users]
    rows = torch.as_tensor(fit.test.users, device=items.device)
    measure = lambda model: rerank_figures(model, fit.train, users, items[rows], valid[rows], found[rows],
                                           torch.as_tensor(fit.test.positives))

    model = ckpt.build_model(device)
    history = [{"epoch": 0, **measure(model)}]
    log(figures_line(0, history[0]))
    best, best_state = 0, {k: v.detach().clone() for k, v in model.state_dict().items()}
    sampler = TripleSampler(fit.train, fit.n_items, train_cfg.neg, train_cfg.seed,
                            hard_items=items.masked_fill(~valid, -1).cpu().numpy(), hard=cfg.hard)
    indptr, indices = (torch.from_numpy(a).to(device) for a in
                       neighbour_csr(data_mod.by_recency(fit, fit.train, train_cfg.seed), fit.n_items,
                                     model.cfg.max_neighbours)[:2])
    lr = scaled_lr(cfg.lr if cfg.lr is not None else train_cfg.lr, train_cfg.batch_size)
    optimizer = make_optimizer(train_cfg.optimizer, model.parameters(), lr)
    pair_scores = cmn_pair_scores(model, indptr, indices, model.cfg.exclude_self)
    for epoch in tqdm(range(1, cfg.epochs + 1), desc="fine-tune", unit="epoch", disable=not cfg.progress):
        stats = fit_epoch(model, pair_scores, optimizer, sampler, EPOCH_OFFSET + epoch, train_cfg, device,
                          desc=f"fine-tune {epoch}/{cfg.epochs}")
        history.append({"epoch": epoch, **stats, **measure(model)})
        log(f"{figures_line(epoch, history[-1])}; loss {stats['loss']:.4f}, {stats['triples_per_s']:,.0f} triples/s")
        if history[-1]["best"]["ndcg@10"] > history[best]["best"]["ndcg@10"]:
            best, best_state = epoch, {k: v.detach().clone() for k, v in model.state_dict().items()}
    log(f"kept epoch {best}" + ("" if best else ": fine-tuning did not improve the best blend's validation NDCG@10 "
                                                "of the input model; its weights are written unchanged"))

    base_version, ckpt.state, ckpt.model_version = ckpt.model_version, best_state, ""
    # every method, as training's selection: the fused stage and the tail order need the others fitted
    table = add_two_stage(ckpt, data, log, cfg.methods)
    record = {"from": cfg.checkpoint, "from_model_version": base_version, "method": stage.method,
              "params": stage.params, "candidates": cfg.candidates, "hard": cfg.hard,
              "epochs": cfg.epochs, "kept_epoch": best, "lr": lr, "validation": history}
    ckpt.meta = {**ckpt.meta, "finetune": record}
    metrics = {"config": asdict(cfg), "finetune": record,
               "two_stage": {"chosen": ckpt.two_stage.to_dict(), "validation": table},
               "seconds": time.perf_counter() - started}
    ckpt.metrics = metrics
    metrics["model_version"] = save_checkpoint(ckpt, cfg.out)
    with open(cfg.out + ".metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    plot(history, cfg.out + ".curves.png")
    log(summary(cfg.out, metrics))
    return metrics


def summary(out: str, metrics: dict) -> str:
    record, chosen = metrics["finetune"], metrics["two_stage"]["chosen"]
    first, kept = record["validation"][0], record["validation"][record["kept_epoch"]]
    return "\n".join([
        f"wrote {out} (model_version {metrics['model_version']}), {out}.metrics.json and {out}.curves.png "
        f"in {metrics['seconds']:.0f} s",
        f"kept epoch {record['kept_epoch']} of {record['epochs']} (R {record['candidates']}, hard {record['hard']:g}): "
        f"validation full NDCG@10 CMN re-ranking {first['cmn']:.4f} → {kept['cmn']:.4f}, best blend "
        f"{first['best']['ndcg@10']:.4f} → {kept['best']['ndcg@10']:.4f}, retrieval alone {first['retrieval']:.4f}",
        f"chosen on validation: default strategy {chosen['strategy']}; retrieval {chosen['method']} "
        f"{chosen['params']}, R {chosen['candidates']}, {chosen['blend']} blend, CMN weight {chosen['weight']}"])


def plot(history: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    trained = [r for r in history if "loss" in r]
    ax_loss.plot([r["epoch"] for r in trained], [r["loss"] for r in trained], "o-", label="CMN (hard negatives)")
    ax_loss.set(xlabel="fine-tuning epoch", ylabel="BPR loss", title="training loss")
    ax_loss.legend()
    ax_metric.plot(epochs, [r["cmn"] for r in history], "o-", label="CMN re-ranking the candidates (weight 1)")
    ax_metric.plot(epochs, [r["best"]["ndcg@10"] for r in history], "o-", label="best blend")
    ax_metric.plot(epochs, [r["retrieval"] for r in history], ":", color="grey", label="retrieval alone")
    ax_metric.set(xlabel="fine-tuning epoch (0: the input model)", ylabel="validation full NDCG@10",
                  title="re-ranking the retrieval's top-R")
    ax_metric.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
