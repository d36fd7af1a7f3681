"""Optimisers with the semantics of the authors' TensorFlow 1 code.

`torch.optim.RMSprop` differs from TF1's `RMSPropOptimizer` in three ways that matter for CMN: TF's
mean-square accumulator starts at 1 (not 0), its ε sits inside the square root, and gathered embedding
rows get sparse updates (rows outside the batch keep their accumulator and momentum untouched).
"""
from __future__ import annotations

import torch


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
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state_of(p, group)
                ms, mom, g = state["ms"], state["mom"], p.grad
                if g.is_sparse:
                    g = g.coalesce()  # duplicate rows sum first, as TF does before a sparse apply
                    rows, g = g.indices()[0], g.values()
                    ms_r = ms.index_select(0, rows).mul_(rho).addcmul_(g, g, value=1 - rho)
                    mom_r = mom.index_select(0, rows).mul_(mu).addcdiv_(g, (ms_r + eps).sqrt_(), value=lr)
                    ms.index_copy_(0, rows, ms_r)
                    mom.index_copy_(0, rows, mom_r)
                    p.index_copy_(0, rows, p.index_select(0, rows).sub_(mom_r))  # rows are unique
                else:
                    ms.mul_(rho).addcmul_(g, g, value=1 - rho)
                    mom.mul_(mu).addcdiv_(g, (ms + eps).sqrt(), value=lr)
                    p.sub_(mom)


@torch.no_grad()
def clip_per_tensor_(params, max_norm: float) -> None:
    """TF `clip_by_norm(g, max_norm)` applied to each gradient on its own (not one global norm)."""
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


class DenseAdam(torch.optim.Adam):
    """Adam on sparse or dense gradients. TF1's Adam decays both moments of every row even for a gathered
    (sparse) gradient, so densifying first gives its exact semantics."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    p.grad = p.grad.to_dense()
        return super().step(closure)


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "rmsprop":
        return TFRMSProp(params, lr=lr)
    if name == "adam":
        return DenseAdam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose rmsprop or adam")
