"""Fold-in: a user or an item the model was never trained on, fitted against the frozen model (cold start).

A new user's rows of the user memory `M` and the output memory `C` are fitted by a fixed number of BPR steps on its
own triples (each of its items against sampled negatives), every other parameter frozen; while it is fitted the
user sits in N(i) of its items, as a trained user does (not under the model's `exclude_self`). A new item's row of
the item memory `E` is fitted the same way from its users: their triples with the item as the positive, and as
many triples of other users with it as the negative, which is where an item meets its gradient in training.

Nothing here runs autograd over the model. A step scores one small batch of pairs by CMN.forward's equations: its
neighbourhoods packed once, as the scorer's pair route packs them, and read from the model's frozen tables (and the
scorer's `U_2 C[v] + b`), so autograd sees the fitted rows and a few dozen ops. tests/model/test_foldin.py holds the
scores to CMN.forward and the gradients to autograd on the whole model with the user (item) added. The defaults in
`FoldInConfig` are measured in benchmarks/foldin.py: quality of cold users against steps and milliseconds
(docs/model.md#fold-in-cold-start).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from model.cmn import EXP_FLOOR, bpr_loss, expand_slots, pack, slot_rows
from model.optim import adam_

if TYPE_CHECKING:
    from model.scoring import Scorer

INITS = ("neighbours", "zero")


@dataclass(frozen=True)
class FoldInConfig:
    """How a user (item) is fitted: `steps` full-batch Adam steps on triples drawn once (each of at most
    `max_positives` positives with `neg` negatives). `init`: `neighbours` starts the rows at the mean of the rows of
    the users who share an item with it (for an item: of the items its users share), `zero` at zero. The defaults are
    the best validation NDCG@10 of cold users on citeulike-a and on the synthetic default, and the cheapest among
    equals (benchmarks/foldin.py, docs/model.md#fold-in-cold-start): quality peaks after 2-4 steps at this rate and
    falls after, as the rows overfit the few triples."""
    steps: int = 2
    lr: float = 1.0              # Adam: its normalised steps make one rate serve short and long histories
    neg: int = 8                 # negatives drawn per positive
    max_positives: int = 64      # positives: a longer history contributes a seeded sample (bounds the cost)
    init: str = "neighbours"

    def __post_init__(self):
        for name in ("steps", "neg", "max_positives"):
            if getattr(self, name) < (0 if name == "steps" else 1):
                raise ValueError(f"fold-in {name} must be >= {0 if name == 'steps' else 1}, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"fold-in lr must be > 0, got {self.lr}")
        if self.init not in INITS:
            raise ValueError(f"fold-in init must be one of {', '.join(INITS)}, got {self.init!r}")


@dataclass
class FoldedUser:
    """A user's fitted rows, stored nowhere: `Online.add_user` stores them, `Recommender.recommend(histories=...)` uses them once."""
    memory: torch.Tensor    # (d,) its row of M (keys, and m_u)
    output: torch.Tensor    # (d,) its row of C (values)
    items: list[int]        # the history it was fitted on: distinct, in the order given
    loss: float             # the BPR loss of the last step (nan with 0 steps)


@contextmanager
def one_thread():
    """Fit on the calling thread alone. A step is a few dozen ops on a few thousand slots, and an op that wakes a
    second (passive) OpenMP thread waits for it: measured, `index_add_` of 50 rows took 6 µs on one thread, 31 µs on
    two, and 400-480 µs on two inside a fit on this shared machine (load ~1), a step 3x slower; the server's model
    thread runs on every CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Frozen:
    """What fold-in reads of a scorer's model and neighbourhoods, detached."""

    def __init__(self, scorer: Scorer):
        m = scorer.model
        d = m.cfg.embed_size
        self.model, self.d, self.hops = m, d, m.cfg.hops
        self.exclude_self = m.cfg.exclude_self
        self.M, self.C, self.E = m.user_memory.detach(), m.user_output.detach(), m.item_memory.detach()
        self.out_values = scorer.tables.out_values                 # U_2 C[v] + b
        weight = m.output.weight.detach()
        self.U1, self.U2, self.b = weight[:, :d], weight[:, d:], m.output.bias.detach()
        self.hop_maps = [(h.weight.detach(), h.bias.detach()) for h in m.hop_maps]
        self.v = m.v.weight[0].detach()
        self.indptr, self.indices = scorer.indptr, scorer.indices
        self.n_users, self.n_items, self.device = scorer.n_users, scorer.n_items, scorer.device

    def lengths(self) -> torch.Tensor:
        return self.indptr[1:] - self.indptr[:-1]

    def generator(self, seed: int | None) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(0 if seed is None else int(seed))

    def sample(self, pool: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
        if not len(pool):
            raise ValueError("nothing is left to draw negatives from (the history holds every item with users)")
        return pool[torch.randint(len(pool), (n,), generator=g, device=self.device)]


# --------------------------------------------------------------------------- users

class Attend(torch.autograd.Function):
    """One hop's memory read for the pairs of a user being fitted: logits `z[row]·K[v]` over each pair's packed
    neighbours (the pair route's `sampled_addmm`) and `z·m` for u's own slots, a softmax by pair (floored at
    `cmn.EXP_FLOOR`: floored slots get no gradient), and the weighted sum of the neighbours' rows of `values` (`embedding_bag`) and of `own` for u's
    slots. One autograd node with its backward written out, where the same ops recorded one by one make ~17 (a step,
    forward and backward, then took 2.5 ms instead of 2.0 on a 50-item history of citeulike-a's model). Forward and
    backward read the tables where they are rather than (slots × d) copies of their rows."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, m: torch.Tensor, own: torch.Tensor, pairs: UserPairs, keys: torch.Tensor,
                values: torch.Tensor) -> torch.Tensor:
        packed, mine, segments, n = pairs.packed, pairs.mine, pairs.segments, pairs.n
        logits = torch.cat([torch.sparse.sampled_addmm(packed.pattern, z, keys.T, beta=0).values(),
                            z.index_select(0, mine) @ m])
        peak = torch.full((n,), -torch.inf, device=z.device).scatter_reduce(0, segments, logits, "amax")
        shifted = logits - peak.index_select(0, segments)
        floored = shifted < EXP_FLOOR
        w = shifted.clamp_(min=EXP_FLOOR).exp_()
        p = w.div_(torch.zeros(n, device=z.device).index_add_(0, segments, w).index_select(0, segments))
        slots = len(packed.users)
        o = F.embedding_bag(packed.users, values, packed.offsets, mode="sum", per_sample_weights=p[:slots])
        o.index_add_(0, mine, p[slots:, None] * own)
        ctx.pairs, ctx.keys, ctx.values = pairs, keys, values
        ctx.save_for_backward(z, m, own, p, floored)
        return o

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, m, own, p, floored = ctx.saved_tensors
        pairs = ctx.pairs
        packed, mine, segments, n = pairs.packed, pairs.mine, pairs.segments, pairs.n
        slots = len(packed.users)
        mine_grad = grad.index_select(0, mine)
        weighted = p * torch.cat([torch.sparse.sampled_addmm(packed.pattern, grad, ctx.values.T, beta=0).values(),
                                  mine_grad @ own])                           # p·∂L/∂p
        total = torch.zeros(n, device=z.device).index_add_(0, segments, weighted)
        g = weighted.sub_(p * total.index_select(0, segments)).masked_fill_(floored, 0.0)   # ∂L/∂logits
        grad_z = F.embedding_bag(packed.users, ctx.keys, packed.offsets, mode="sum", per_sample_weights=g[:slots])
        grad_z.index_add_(0, mine, g[slots:, None] * m)
        return grad_z, g[slots:] @ z.index_select(0, mine), p[slots:] @ mine_grad, None, None, None


class UserPairs:
    """The pairs (u, items[b]) of a user being fitted, less what depends on its rows: N(items[b]) without u
    (`user`: its current id, whose slots are left out) packed as the scorer's pair route packs it, and one slot of
    u's own per pair whose neighbourhood holds it (`member`: u's items, not under exclude_self; and any empty
    neighbourhood, [u] by the original code's rule). Each hop reads them through `Attend`."""

    def __init__(self, fz: Frozen, items: torch.Tensor, member: torch.Tensor, user: int | None = None):
        self.n = len(items)
        nbr, seg = neighbours(fz, items, user)
        self.packed = pack(seg, nbr, self.n, len(fz.M))
        self.mine = torch.nonzero(self.packed.lengths == 0 if fz.exclude_self else
                                  member | (self.packed.lengths == 0)).squeeze(1)
        self.segments = torch.cat([seg, self.mine])       # u's own slots last
        self.e = fz.E[items]

    def scores(self, fz: Frozen, m: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(n,) CMN scores of the pairs for a user whose rows of M and C are `m` and `c` (d-vectors)."""
        z, o = m + self.e, None
        for hop in range(fz.hops):
            last = hop == fz.hops - 1
            if hop > 0:
                w, b = fz.hop_maps[hop - 1]
                z = F.relu(F.linear(z, w, b) + o)
            if last:    # U_2 C[v] + b as the values (the scorer's tables), so U_2 c + b for u's own slots
                o = Attend.apply(z, m, F.linear(c, fz.U2, fz.b), self, fz.M, fz.out_values)
            else:
                o = Attend.apply(z, m, c, self, fz.M, fz.C)
        # o is U_2 o^H + b: the last hop summed U_2 C[v] + b, and attention weights sum to 1
        return F.relu(o + F.linear(m * self.e, fz.U1)) @ fz.v


def neighbours(fz: Frozen, items: torch.Tensor, user: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(users, pair) of every slot of N(items[b]), pair after pair, `user`'s own slots left out."""
    start = fz.indptr[items]
    seg, at, _ = expand_slots(start, fz.indptr[items + 1] - start)
    nbr = fz.indices[at]
    if user is None:
        return nbr, seg
    keep = nbr != user
    return nbr[keep], seg[keep]


def start_user(fz: Frozen, items: torch.Tensor, init: str,
               user: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows fitting starts from: the mean rows of the users in N(i) of the history (each slot once)."""
    if init == "zero":
        return torch.zeros(fz.d, device=fz.device), torch.zeros(fz.d, device=fz.device)
    nbr, _ = neighbours(fz, items, user)
    if not len(nbr):
        return torch.zeros(fz.d, device=fz.device), torch.zeros(fz.d, device=fz.device)
    return fz.M[nbr].mean(0), fz.C[nbr].mean(0)


def history_tensor(items, n_items: int, device) -> tuple[list[int], torch.Tensor]:
    """Distinct items in the order given, checked against the catalogue."""
    listed = list(dict.fromkeys(int(i) for i in items))
    if not listed:
        raise ValueError("an empty history has nothing to fold in")
    bad = [i for i in listed if not 0 <= i < n_items]
    if bad:
        raise ValueError(f"history items {bad[:5]} are not in the catalogue (0..{n_items - 1})")
    return listed, torch.tensor(listed, dtype=torch.long, device=device)


@one_thread()
def fold_in_user(scorer: Scorer, items, cfg: FoldInConfig, seed: int | None = None, user: int | None = None,
                 on_step: Callable[[int, torch.Tensor, float], None] | None = None) -> FoldedUser:
    """Fit a user's rows of M and C to `items` by `cfg.steps` BPR steps (Adam), the rest of the model frozen.
    `user`: a user the scorer already holds (a refit): its own slots in N(i) are the rows being fitted.
    `on_step(step, rows, seconds)`: after the start (step 0) and each step, the (2, d) rows so far and the seconds
    fitting took up to there (benchmarks/foldin.py draws the quality-against-steps curve from one run)."""
    clock = time.perf_counter()
    fz = Frozen(scorer)
    listed, history = history_tensor(items, fz.n_items, fz.device)
    pool = torch.nonzero(fz.lengths() > 0).squeeze(1)            # the sampler's rule: items with users ...
    pool = pool[~torch.isin(pool, history)]                      # ... that the user has not interacted with
    g = fz.generator(seed)
    rows = torch.stack(start_user(fz, history, cfg.init, user)).requires_grad_(True)     # m, c
    mean, var = torch.zeros_like(rows), torch.zeros_like(rows)     # Adam's moments
    # the triples are drawn once and every step takes all of them (the fit is a few full-batch steps; packing a
    # fresh batch per step would cost a third of a step each time)
    positives = history[torch.randperm(len(history), generator=g, device=fz.device)[:cfg.max_positives]]
    n_pos = len(positives)
    items = torch.cat([positives, fz.sample(pool, n_pos * cfg.neg, g)])
    pairs = UserPairs(fz, items, torch.arange(len(items), device=fz.device) < n_pos, user)
    loss = torch.tensor(float("nan"))
    if on_step is not None:
        on_step(0, rows.detach(), time.perf_counter() - clock)
    with torch.enable_grad():
        for step in range(1, cfg.steps + 1):
            scores = pairs.scores(fz, rows[0], rows[1])
            loss = bpr_loss(scores[:n_pos], scores[n_pos:].view(n_pos, cfg.neg))
            loss.backward()
            adam_(rows, rows.grad, mean, var, step, cfg.lr)
            rows.grad = None
            if on_step is not None:
                elapsed = time.perf_counter() - clock
                on_step(step, rows.detach(), elapsed)
                clock = time.perf_counter() - elapsed     # the callback's own time is not fitting time
    rows = rows.detach()
    return FoldedUser(rows[0], rows[1], listed, float(loss.detach()))


# --------------------------------------------------------------------------- items

class ItemNeighbours:
    """N(x) of an item being fitted: its users' keys and values, for any querying users."""

    def __init__(self, fz: Frozen, users: torch.Tensor):
        self.users = users
        self.keys, self.values, self.out_values = fz.M[users], fz.C[users], fz.out_values[users]

    def scores(self, fz: Frozen, e: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """(Q,) CMN scores of (queries[q], x) for the item row `e`: N(x) is the same for every query, so the
        attention is a dense (Q, |N(x)|) softmax; under exclude_self a query's own slot is masked, and a query
        left with no neighbour attends to itself alone."""
        m_q = fz.M[queries]
        z, o = m_q + e, None
        own = queries[:, None] == self.users[None, :] if fz.exclude_self else None
        alone = own.all(1) if own is not None else torch.zeros(len(queries), dtype=torch.bool, device=fz.device)
        for hop in range(fz.hops):
            last = hop == fz.hops - 1
            if hop > 0:
                w, b = fz.hop_maps[hop - 1]
                z = F.relu(F.linear(z, w, b) + o)
            logits = z @ self.keys.T
            if own is not None:
                logits = logits.masked_fill(own, -torch.inf).masked_fill(alone[:, None], 0.0)
            peak = logits.detach().max(1, keepdim=True).values
            w = (logits - peak).clamp(min=EXP_FLOOR).exp()
            if own is not None:
                w = w.masked_fill(own, 0.0)
            o = (w / w.sum(1, keepdim=True).clamp(min=1e-30)) @ (self.out_values if last else self.values)
            if bool(alone.any()):
                o = torch.where(alone[:, None], (fz.out_values if last else fz.C)[queries], o)
        return F.relu(o + F.linear(m_q * e, fz.U1)) @ fz.v


@one_thread()
def fold_in_item(scorer: Scorer, users, cfg: FoldInConfig, seed: int | None = None,
                 item: int | None = None) -> torch.Tensor:
    """Fit a new item's row of E (d,) to the users who interacted with it by `cfg.steps` BPR steps (Adam): up to
    `cfg.max_positives` of them with the item as the positive against `cfg.neg` sampled items each, and as many random
    training pairs of the scorer's N(i) with the item as the negative; the rest of the model frozen. `item`: an item
    the scorer already holds (a refit), left out of the negatives."""
    fz = Frozen(scorer)
    listed = list(dict.fromkeys(int(u) for u in users))
    if not listed:
        raise ValueError("an item with no users has nothing to fold in")
    bad = [u for u in listed if not 0 <= u < fz.n_users]
    if bad:
        raise ValueError(f"users {bad[:5]} are not known to the model (0..{fz.n_users - 1})")
    cap = scorer.neighbours.new_item_cap
    members = torch.tensor(listed[-cap:] if cap else listed, dtype=torch.long, device=fz.device)
    nbrs = ItemNeighbours(fz, members)
    g = fz.generator(seed)
    lengths = fz.lengths()
    pool = torch.nonzero(lengths > 0).squeeze(1)
    if item is not None:
        pool = pool[pool != item]
    slot_item = slot_rows(lengths, len(fz.indices))
    e = start_item(fz, members, cfg.init, slot_item).clone().requires_grad_(True)
    mean, var = torch.zeros_like(e), torch.zeros_like(e)           # Adam's moments
    everyone = torch.tensor(listed, dtype=torch.long, device=fz.device)
    # drawn once, as for a user: its users (at most max_positives) against `neg` items each, and as many training
    # pairs of other users against it; the other side of each triple does not depend on e (the scorer's pair route)
    positives = everyone[torch.randperm(len(everyone), generator=g, device=fz.device)[:cfg.max_positives]]
    negatives = fz.sample(pool, len(positives) * cfg.neg, g)
    rival = scorer.score_pairs(positives.repeat_interleave(cfg.neg), negatives).view(len(positives), cfg.neg)
    strangers = torch.nonzero(~torch.isin(fz.indices, everyone)).squeeze(1)
    slots = fz.sample(strangers, len(negatives), g)
    others = fz.indices[slots]
    beaten = scorer.score_pairs(others, slot_item[slots])
    with torch.enable_grad():
        for step in range(1, cfg.steps + 1):
            loss = (bpr_loss(nbrs.scores(fz, e, positives), rival) + bpr_loss(beaten, nbrs.scores(fz, e, others))) / 2
            loss.backward()
            adam_(e, e.grad, mean, var, step, cfg.lr)
            e.grad = None
    return e.detach()


def start_item(fz: Frozen, users: torch.Tensor, init: str, slot_item: torch.Tensor) -> torch.Tensor:
    """The row fitting starts from: the mean row of E over the items its users share (each slot once)."""
    if init == "zero" or not len(fz.indices):
        return torch.zeros(fz.d, device=fz.device)
    shared = slot_item[torch.isin(fz.indices, users)]
    return fz.E[shared].mean(0) if len(shared) else torch.zeros(fz.d, device=fz.device)
