"""Where CMN's training signal dies after a short GMF pretraining: the first steps, instrumented.

    python -m benchmarks.collapse_probe --data synthetic --pretrain-epochs 5 --steps 400
    python -m benchmarks.collapse_probe --data ../shared/data/citeulike-a.npz --pretrain-epochs 3 --paper-scale

GMF pretraining as `python -m training train` runs it (same seed, same RNG draws), then the memories initialised
by `training.train.init_memories` (or the paper's M ← 0.5·P, E ← 0.5·Q with --paper-scale), then CMN steps with the
paper's settings. Every --every steps, over 512 fixed (user, item) pairs: the norms of the output layer's two
halves U₁ (on m_u ⊙ e_i) and U₂ (on o), of its bias b and of the output vector v; the mean norms of the two
inputs m_u ⊙ e_i and o; the mean pre-activation, the share of active ReLU units and the units never active;
the spread (std) of the scores; and the mean BPR loss of the steps since the last line.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from model.cmn import CMN, CMNConfig, bpr_loss, gather_neighbourhoods, segment_softmax
from model.neighbours import neighbour_csr
from training import data as data_mod
from training.optim import clip_per_tensor_, make_optimizer
from training.sampler import TripleSampler
from training.train import (PROBE_EPOCH, PROBE_TRIPLES, TrainConfig, cmn_pair_scores, init_memories,
                            output_signal, pretrain_gmf, scaled_lr)


def inside(model: CMN, indptr, indices, users, items) -> dict:
    """The output layer's inputs, activations and scores for the pairs, by CMN.forward's equations."""
    nbr, seg = gather_neighbourhoods(indptr, indices, users, items)
    m_u, e_i = model.user_memory[users], model.item_memory[items]
    keys, values = model.user_memory[nbr], model.user_output[nbr]
    z, o = m_u + e_i, None
    for hop in range(model.cfg.hops):
        if hop > 0:
            z = F.relu(model.hop_maps[hop - 1](z) + o)
        p = segment_softmax((keys * z[seg]).sum(-1), seg, len(users))
        o = torch.zeros_like(z).index_add(0, seg, p[:, None] * values)
    pre = model.output(torch.cat([m_u * e_i, o], -1))
    d, U = model.cfg.embed_size, model.output.weight
    return {"|U1|": U[:, :d].norm(), "|U2|": U[:, d:].norm(), "|b|": model.output.bias.norm(),
            "|v|": model.v.weight.norm(), "|mu*ei|": (m_u * e_i).norm(dim=1).mean(), "|o|": o.norm(dim=1).mean(),
            "pre": pre.mean(), "active": (pre > 0).float().mean(), "dead": ((pre > 0).sum(0) == 0).sum(),
            "score std": model.v(F.relu(pre)).std()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--pretrain-epochs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--paper-scale", action="store_true", help="M ← 0.5·P, E ← 0.5·Q whatever the signal")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = TrainConfig(data=args.data, pretrain_epochs=args.pretrain_epochs, progress=False)
    torch.manual_seed(cfg.seed)
    data = data_mod.load(args.data, seed=cfg.seed)
    model = CMN(CMNConfig(data.n_users, data.n_items, cfg.embed_size, cfg.hops, cfg.l2))
    sampler = TripleSampler(data.train, data.n_items, cfg.neg, cfg.seed)
    probe = tuple(torch.from_numpy(a[:PROBE_TRIPLES]) for a in sampler.epoch(PROBE_EPOCH))
    if args.pretrain_epochs:
        P, Q, _ = pretrain_gmf(cfg, data, sampler, torch.device("cpu"), log=lambda line: None)
        if args.paper_scale:
            with torch.no_grad():
                model.user_memory.copy_(0.5 * P)
                model.item_memory.copy_(0.5 * Q)
            print(f"M, E ← 0.5·P, 0.5·Q; output-layer signal {output_signal(0.5 * P, 0.5 * Q, probe):.4f} "
                  f"(the collapsed point is stable below 2·l2 = {2 * cfg.l2:.2f})")
        else:
            print(init_memories(model, P, Q, cfg, probe, log=print))
    indptr, indices = (torch.from_numpy(a) for a in neighbour_csr(data.train, data.n_items, None)[:2])
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), scaled_lr(cfg.lr, cfg.batch_size))
    pair_scores = cmn_pair_scores(model, indptr, indices, False)
    rng = np.random.default_rng(1)
    pairs = (torch.from_numpy(rng.integers(0, data.n_users, 512)), torch.from_numpy(rng.integers(0, data.n_items, 512)))
    users, pos, neg = (torch.from_numpy(a) for a in sampler.epoch(0))
    params, losses = list(model.parameters()), []
    header = None
    for step in range(args.steps + 1):
        if step % args.every == 0:
            with torch.no_grad():
                row = inside(model, indptr, indices, *pairs)
            if header is None:
                header = "step   loss   " + "  ".join(f"{k:>9s}" for k in row)
                print(header)
            loss = f"{np.mean(losses):.4f}" if losses else "   -  "
            print(f"{step:4d}  {loss}  " + "  ".join(f"{float(v):9.4g}" for v in row.values()), flush=True)
            losses = []
        if step == args.steps:
            break
        b = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
        loss = bpr_loss(*pair_scores(users[b], pos[b], neg[b]))
        optimizer.zero_grad(set_to_none=True)
        (loss + model.l2_penalty()).backward()
        clip_per_tensor_(params, cfg.clip)
        optimizer.step()
        losses.append(loss.item())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
