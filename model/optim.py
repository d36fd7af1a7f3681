"""Adam, the one implementation that training (`--optimizer adam`, GMF pretraining) and fold-in step with.

Torch's sparse Adam leaves the moments of rows outside a batch untouched; TF1's Adam decays both moments of every
row even for a gathered (sparse) gradient, so a sparse gradient is densified first, which gives its exact semantics.
`adam_` is `torch.optim.Adam`'s single-tensor arithmetic, op for op (a run is what it was with torch's). Fold-in calls
it directly: it takes a couple of steps on one (2, d) tensor, where an optimiser's bookkeeping (the profiling hook of
every `torch.optim.Optimizer.step`) costs as much as the arithmetic.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def adam_(param: torch.Tensor, grad: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, step: int, lr: float,
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """Adam's `step`-th update (from 1) of `param` in place, with its moments `mean` and `var`."""
    b1, b2 = betas
    mean.lerp_(grad, 1 - b1)
    var.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    denom = (var.sqrt() / (1 - b2 ** step) ** 0.5).add_(eps)
    param.addcdiv_(mean, denom, value=-lr / (1 - b1 ** step))


class Adam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                state["step"] += 1     # a number (torch's Adam keeps a tensor: a resumed run's is one)
                adam_(p, p.grad.to_dense() if p.grad.is_sparse else p.grad, state["exp_avg"], state["exp_avg_sq"],
                      float(state["step"]), group["lr"], group["betas"], group["eps"])
