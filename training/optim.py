"""Optimisers with the semantics of the authors' TensorFlow 1 code.

`torch.optim.RMSprop` differs from TF1's `RMSPropOptimizer` in three ways that matter for CMN: TF's
mean-square accumulator starts at 1 (not 0), its ε sits inside the square root, and gathered embedding
rows get sparse updates (rows outside the batch keep their accumulator and momentum untouched).
Adam lives in model/optim.py (fold-in steps with it too). The eager step here and training/graph_step.py share
`rmsprop_dense_`; clipping is `clip_per_tensor_` eagerly and `clip_norms_`, without a host sync, in the graph step.
"""
from __future__ import annotations

import torch

from model.optim import Adam


class TFRMSProp(torch.optim.Optimizer):
    """ms ← ρ·ms + (1−ρ)·g²;  mom ← μ·mom + lr·g/√(ms+ε);  w ← w − mom.  Sparse gradients update their rows only."""

    def __init__(self, params, lr: float = 1e-3, decay: float = 0.9, momentum: float = 0.9, eps: float = 1e-10,
                 initial_accumulator: float = 1.0):
        super().__init__(params, dict(lr=lr, decay=decay, momentum=momentum, eps=eps,
                                      initial_accumulator=initial_accumulator))

    def state_of(self, p: torch.Tensor, group: dict) -> dict:
        """`p`'s accumulator `ms` and momentum `mom`, created at their initial values on first use."""
        state = self.state[p]
        if not state:
            state["ms"] = torch.full_like(p, group["initial_accumulator"])
            state["mom"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, rho, mu, eps = group["lr"], group["decay"], group["momentum"], group["eps"]
            dense = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state_of(p, group)
                ms, mom, g = state["ms"], state["mom"], p.grad
                if not g.is_sparse:
                    dense.append((p, g, ms, mom))
                    continue
                g = g.coalesce()  # duplicate rows sum first, as TF does before a sparse apply
                rows, g = g.indices()[0], g.values()
                ms_r = ms.index_select(0, rows).mul_(rho).addcmul_(g, g, value=1 - rho)
                mom_r = mom.index_select(0, rows).mul_(mu).addcdiv_(g, (ms_r + eps).sqrt_(), value=lr)
                ms.index_copy_(0, rows, ms_r)
                mom.index_copy_(0, rows, mom_r)
                p.index_copy_(0, rows, p.index_select(0, rows).sub_(mom_r))  # rows are unique
            if dense:
                rmsprop_dense_(*map(list, zip(*dense)), lr=lr, rho=rho, mu=mu, eps=eps)


def rmsprop_dense_(params: list[torch.Tensor], grads: list[torch.Tensor], ms: list[torch.Tensor],
                   mom: list[torch.Tensor], lr: float, rho: float, mu: float, eps: float,
                   rows: list[torch.Tensor] | None = None) -> None:
    """TFRMSProp's update of dense gradients, as multi-tensor ops. `rows`: per tensor a (rows, 1) 0/1 column of the
    rows a sparse gradient would hold; the others keep every value (their decay is 1 and they lose 0·momentum)."""
    torch._foreach_mul_(ms, [torch.where(r > 0, rho, 1.0) for r in rows] if rows else rho)
    torch._foreach_addcmul_(ms, grads, grads, value=1 - rho)
    denom = torch._foreach_add(ms, eps)
    torch._foreach_sqrt_(denom)
    torch._foreach_mul_(mom, [torch.where(r > 0, mu, 1.0) for r in rows] if rows else mu)
    torch._foreach_addcdiv_(mom, grads, denom, value=lr)
    torch._foreach_sub_(params, torch._foreach_mul(mom, rows) if rows else mom)


@torch.no_grad()
def clip_per_tensor_(params, max_norm: float) -> None:
    """TF `clip_by_norm(g, max_norm)` applied to each gradient on its own (not one global norm). The eager step's:
    the branch is taken on the host, so a gradient within the norm costs no multiply
    (tests/training/test_graph_step.py keeps it as the control that reads tensor data)."""
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            values = p.grad.values()
        else:
            values = p.grad
        norm = values.norm()
        if norm > max_norm:
            values.mul_(max_norm / norm)


def clip_norms_(tensors: list[torch.Tensor], max_norm: float) -> None:
    """`clip_per_tensor_` for the graph step, the same scale (max_norm / norm = norm⁻¹·max_norm, as torch divides a
    number by a tensor) chosen by `where` on the device: no host sync, so a CUDA graph can capture it."""
    norms = torch.stack(torch._foreach_norm(tensors))
    scales = torch.where(norms > max_norm, norms.reciprocal() * max_norm, 1.0)
    torch._foreach_mul_(tensors, list(scales.unbind()))


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "rmsprop":
        return TFRMSProp(params, lr=lr)
    if name == "adam":
        return Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose rmsprop or adam")
