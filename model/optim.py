"""Adam, the one implementation that training (`--optimizer adam`, GMF pretraining) and fold-in step with.

Torch's sparse Adam leaves the moments of rows outside a batch untouched; TF1's Adam decays both moments of every
row even for a gathered (sparse) gradient, so a sparse gradient is densified first, which gives its exact semantics.
The arithmetic is `torch.optim.Adam`'s single-tensor step, op for op (so a run is what it was with torch's), without
its dispatch: fold-in takes a couple of steps on one (2, d) tensor, where torch's bookkeeping costs more than the step.
"""
from __future__ import annotations

import torch


class Adam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.to_dense() if p.grad.is_sparse else p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                mean, var = state["exp_avg"], state["exp_avg_sq"]
                mean.lerp_(g, 1 - b1)
                var.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (var.sqrt() / (1 - b2 ** t) ** 0.5).add_(eps)
                p.addcdiv_(mean, denom, value=-lr / (1 - b1 ** t))
