"""A CMN training step that a GPU runs at its own pace: static shapes, no host sync, one CUDA graph per batch size.

The eager step (`training.train.fit_epoch` with `cmn_pair_scores`) is launch-bound on a GPU: a few hundred small
kernels per step, each issued from Python, and a host sync per tensor in the clipping (`if norm > max_norm`).
`GraphStep` computes the same step (neighbourhood gather, CMN.forward, BPR loss + L2, backward, per-tensor
`clip_by_norm`, TF1 RMSProp with sparse row semantics) with every shape fixed by the batch size, so that on CUDA
the whole step is captured once and replayed per batch (`python -m training train --step graph`, through
`training.train.cmn_step`):

- Neighbourhoods are packed into a fixed number of slots (`slot_budget`, from the data: the largest batch of an
  epoch with a margin). Slots beyond the batch's own belong to one extra dummy pair, a copy of pair 0 that the
  loss leaves out: they get exactly zero gradient. A batch whose neighbourhoods exceed the budget, and a last
  partial batch, run the same step uncaptured at their own size.
- Embedding gradients are dense (`CMN.sparse_grad` off: index_select, whose backward is one index_add), and
  TFRMSProp's sparse update becomes a dense update masked to the rows the batch looked up: an untouched row's
  accumulator and momentum are multiplied by 1 plus a zero gradient term and its weights lose 0·momentum, so all
  three stay bit for bit as the sparse update leaves them.
- `clip_by_norm`'s branch is a `torch.where` on the device; clipping and the update run as multi-tensor
  `torch._foreach_*` kernels (training/optim.py `clip_norms_` and `rmsprop_dense_`, which the eager step runs too).

On a CPU the same step runs without capture (tests/training/test_graph_step.py holds it to the eager step there).
On CUDA the first `WARMUP_STEPS` full batches run uncaptured on a side stream (they are real steps: capture needs the
libraries warmed up on the capturing stream), then the graph is captured and every later full batch replays it.
The optimiser state is the given `TFRMSProp`'s own, updated in place, so `--resume` and checkpoints see one
optimiser whichever step ran. The graph reads the learning rate and decay as they were at capture.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from functools import cached_property

import numpy as np
import torch
from tqdm import tqdm

from model.cmn import CMN, bpr_loss
from training.optim import TFRMSProp, clip_norms_, rmsprop_dense_

WARMUP_STEPS = 3
BUDGET_MARGIN = 1.05   # citeulike-a: the largest batch of epochs 1-3 stays within epoch 0's largest (batch 128..8192)
BUDGET_QUANTUM = 256


def slot_counts(indptr: np.ndarray) -> np.ndarray:
    """Slots an item takes in a training pair: its training users, or 1 for none (N(i) = [u])."""
    return np.maximum(np.diff(np.asarray(indptr)), 1)


def batch_slots(counts: np.ndarray, pos: np.ndarray, neg: np.ndarray, batch_size: int) -> np.ndarray:
    """Neighbour slots of each batch of (positive, negative) items, computed on the host before any step runs.
    With exclude_self a neighbourhood may hold one slot less: the count is an upper bound."""
    per_triple = counts[pos] + counts[neg]
    return np.add.reduceat(per_triple, np.arange(0, len(per_triple), batch_size)) if len(per_triple) else \
        np.zeros(0, dtype=np.int64)


def slot_budget(counts: np.ndarray, pos: np.ndarray, neg: np.ndarray, batch_size: int) -> int:
    """Slots of the captured step: the largest full batch of these triples, BUDGET_MARGIN more, rounded up."""
    full = len(pos) // batch_size * batch_size
    largest = int(batch_slots(counts, pos[:full], neg[:full], batch_size).max(initial=1))
    return -(-int(largest * BUDGET_MARGIN) // BUDGET_QUANTUM) * BUDGET_QUANTUM


@contextmanager
def dense_lookups(model: CMN):
    sparse, model.sparse_grad = model.sparse_grad, False
    try:
        yield
    finally:
        model.sparse_grad = sparse


class GraphStep:
    """Training steps of `batch_size` triples for one (model, TFRMSProp, item → users CSR); see the module doc."""

    def __init__(self, model: CMN, optimizer: TFRMSProp, indptr: torch.Tensor, indices: torch.Tensor,
                 batch_size: int, slot_budget: int, clip: float = 5.0):
        if not isinstance(optimizer, TFRMSProp):
            raise TypeError(f"the graph step implements TF1 RMSProp only, got {type(optimizer).__name__}")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if len(optimizer.param_groups) != 1 or \
                {id(p) for p in optimizer.param_groups[0]["params"]} != {id(p) for p in self.params}:
            raise ValueError("the optimiser must hold the model's trainable parameters in one group")
        self.model, self.group = model, optimizer.param_groups[0]
        self.indptr, self.indices = indptr, indices
        self.device = indptr.device
        self.batch_size, self.slot_budget, self.clip = batch_size, slot_budget, clip
        self.state = [optimizer.state_of(p, self.group) for p in self.params]
        tables = [model.user_memory, model.user_output, model.item_memory]
        self.table_at = [next((k for k, t in enumerate(tables) if t is p), None) for p in self.params]
        self.total = torch.zeros((), device=self.device)   # the epoch's summed BPR loss, read once per epoch
        self.static = tuple(torch.zeros(batch_size, dtype=torch.long, device=self.device) for _ in range(3))
        self.graph: torch.cuda.CUDAGraph | None = None
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.warm = 0
        self.fallback_steps = 0

    @classmethod
    def for_sampler(cls, model: CMN, optimizer: TFRMSProp, indptr: torch.Tensor, indices: torch.Tensor,
                    sampler, batch_size: int, clip: float = 5.0) -> GraphStep:
        """The slot budget taken from the sampler's epoch 0."""
        _, pos, neg = sampler.epoch(0)
        return cls(model, optimizer, indptr, indices, batch_size,
                   slot_budget(slot_counts(indptr.cpu().numpy()), pos, neg, batch_size), clip)

    @cached_property
    def counts(self) -> np.ndarray:   # read by the host loop only: the step itself never reads a tensor's data
        return slot_counts(self.indptr.cpu().numpy())

    # ------------------------------------------------------------------ running

    def fit_epoch(self, sampler, epoch: int, desc: str = "CMN", progress: bool = False) -> dict:
        """One epoch of the sampler's triples, as `training.train.fit_epoch` reports it (plus the fallback count)."""
        self.model.train()
        arrays = sampler.epoch(epoch)
        slots = batch_slots(self.counts, arrays[1], arrays[2], self.batch_size)
        users, pos, neg = (torch.from_numpy(a).to(self.device) for a in arrays)
        self.total.zero_()
        fallbacks = self.fallback_steps
        start = time.perf_counter()
        for k in tqdm(range(len(slots)), desc=desc, unit="batch", leave=False, disable=not progress, mininterval=1.0):
            b = slice(k * self.batch_size, (k + 1) * self.batch_size)
            self.step(users[b], pos[b], neg[b], int(slots[k]))
        loss = self.total.item() / max(len(slots), 1)   # the epoch's one host sync, inside the timing
        seconds = time.perf_counter() - start
        return {"loss": loss, "seconds": seconds, "triples_per_s": len(users) / seconds,
                "fallback_steps": self.fallback_steps - fallbacks}

    def step(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, slots: int) -> None:
        """One optimiser step on a batch whose neighbourhoods take `slots` slots (see `batch_slots`)."""
        if len(users) != self.batch_size or slots > self.slot_budget:
            self.fallback_steps += 1
            self._run(users, pos, neg, slots)
        elif self.stream is None:
            self._run(users, pos, neg, self.slot_budget)
        else:
            self._replay(users, pos, neg)

    def _replay(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> None:
        for buffer, x in zip(self.static, (users, pos, neg)):
            buffer.copy_(x, non_blocking=True)
        if self.graph is None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            if self.warm < WARMUP_STEPS:
                with torch.cuda.stream(self.stream):
                    self._run(*self.static, self.slot_budget)
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
                self.warm += 1
                return
            self.graph = torch.cuda.CUDAGraph()
            # records, nothing runs until replay; thread_local: other threads' CUDA work does not break it
            with torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
                self._run(*self.static, self.slot_budget)
        self.graph.replay()

    # ------------------------------------------------------------------ the step

    def _run(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, n_slots: int) -> None:
        m, n = self.model, len(users)
        pair_users, items = torch.cat([users, users]), torch.cat([pos, neg])
        nbr, seg, real = self._neighbourhoods(pair_users, items, n_slots)
        with dense_lookups(m):   # pair 2n: the dummy that owns the spare slots; the loss leaves it out
            scores = m(torch.cat([pair_users, users[:1]]), torch.cat([items, pos[:1]]), nbr, seg)
            loss = bpr_loss(scores[:n], scores[n:2 * n])
            grads = list(torch.autograd.grad(loss + m.l2_penalty(), self.params))
        with torch.no_grad():
            clip_norms_(grads, self.clip)
            self._rmsprop(grads, self._touched(pair_users, items, nbr, real))
            self.total.add_(loss)

    def _neighbourhoods(self, pair_users: torch.Tensor, items: torch.Tensor,
                        n_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(nbr, seg, real): N(items[b]) of every pair b in exactly `n_slots` slots, as gather_neighbourhoods
        defines it; the slots no pair needs (and the querying user's own slot under exclude_self) are not `real`
        and go to the dummy pair len(items), holding user pair_users[0] (a row the batch touches anyway)."""
        n_pairs, indptr = len(items), self.indptr
        start = indptr.index_select(0, items)
        length = indptr.index_select(0, items + 1) - start
        count = length.clamp(min=1)
        end = torch.cumsum(count, 0)
        slot = torch.arange(n_slots, device=items.device)
        seg = torch.searchsorted(end, slot, right=True)
        pair = seg.clamp(max=n_pairs - 1)
        own, pair_length = pair_users.index_select(0, pair), length.index_select(0, pair)
        at = slot - (end - count).index_select(0, pair) + start.index_select(0, pair)
        nbr = torch.where(pair_length == 0, own, self.indices.index_select(0, at.clamp(max=len(self.indices) - 1)))
        real = seg < n_pairs
        if self.model.cfg.exclude_self:   # u leaves N(i), unless it was all of it: then N(i) = [u] again
            real &= (nbr != own) | (pair_length <= 1)
        return torch.where(real, nbr, pair_users[0]), torch.where(real, seg, n_pairs), real

    def _touched(self, pair_users: torch.Tensor, items: torch.Tensor, nbr: torch.Tensor,
                 real: torch.Tensor) -> list[torch.Tensor]:
        """Per table (M, C, E), a (rows, 1) 0/1 column: the rows a sparse gradient of this batch would hold."""
        dtype = self.model.user_memory.dtype
        real = real.to(dtype)
        looked_up = [(torch.cat([pair_users, nbr]), torch.cat([torch.ones_like(pair_users, dtype=dtype), real])),
                     (nbr, real), (items, torch.ones_like(items, dtype=dtype))]
        tables = [self.model.user_memory, self.model.user_output, self.model.item_memory]
        return [torch.zeros(len(t), dtype=dtype, device=t.device).index_add_(0, ids, w).clamp_(max=1).unsqueeze(1)
                for t, (ids, w) in zip(tables, looked_up)]

    def _rmsprop(self, grads: list[torch.Tensor], touched: list[torch.Tensor]) -> None:
        """TFRMSProp's update; on the tables, rows outside `touched` keep every value."""
        lr, rho, mu, eps = (self.group[k] for k in ("lr", "decay", "momentum", "eps"))
        for table in (False, True):
            k = [i for i, t in enumerate(self.table_at) if (t is not None) == table]
            if k:
                rmsprop_dense_([self.params[i] for i in k], [grads[i] for i in k],
                               [self.state[i]["ms"] for i in k], [self.state[i]["mom"] for i in k], lr, rho, mu, eps,
                               [touched[self.table_at[i]] for i in k] if table else None)
