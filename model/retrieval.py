"""The cheap first stage of two-stage recommendation: retrieval over the catalogue, and how CMN re-ranks what it finds.

A retrieval stage scores every item for a history (the seen-set the Recommender keeps, so online feedback changes it
at once, and a user folded in from a history list is served the same way), fitted at training time
(training/baselines.py) and stored in the checkpoint, bounded in size:
- `ItemRetrieval` (RP3beta, ItemKNN CF, EASE above its exact-storage bound): a sparse item × item matrix `W` with a
  bounded number of entries per row; a history's score for item j is `Σ_{i ∈ history(u)} W[i, j]`. Every method's
  fitted profiles rank as a binary history does (ItemKNN's TF-IDF scales every item of a user by the same idf), so
  one rule serves them all.
- `EASERetrieval`: EASE's exact dense scores, stored in min(users, items)² floats instead of B's items².
- `ALSRetrieval`: iALS item factors; a history's user vector is solved for at request time (`recalculate_user`).

- `FusedRetrieval`: several of the above as one stage (Gorse's multi-recall, fused rather than unioned): each
  member's scores standardised over the user's row of the catalogue, then weighted and summed.

`TwoStage` holds what validation chose: the method, how many candidates R the retrieval proposes, how the two scores
are blended, the weight of CMN in the blend, and the default strategy (`retrieval` where CMN's best weight was 0). The two scales are unrelated, so each score enters either
standardised over the user's candidates (`zscore`, what checkpoints without a `blend` setting use) or by its rank
among them (`rrf`, reciprocal-rank fusion: only the orders count, not how far apart the scores are). Weight 1 is CMN's
order of the retrieved candidates, weight 0 the retrieval's own order, with either blend.

A list of given candidates is ranked as the whole-catalogue list ranks them (`tiered`): the items the retrieval
proposes (a user's top R) first, by the strategy's score, then every other one by the `tail` member's order (the
stage's own order where none was chosen). Beyond its top few hundred a dense model's order is noise over rare items
(EASE ranks a random item above the held-out one far more often than RP3beta does: docs/results.md), so validation
may hand the tail to another member.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from model.cmn import expand_slots, slot_rows

STRATEGIES = ("full", "two_stage", "retrieval")
BLENDS = ("zscore", "rrf")
RRF_K = 60   # Cormack, Clarke & Büttcher (SIGIR 2009): a rank r counts 1 / (60 + r), r from 1


@dataclass
class TwoStage:
    method: str            # a training/baselines.py ITEM_METHODS name: rp3beta, itemknn or ease
    candidates: int        # R, retrieved per user before re-ranking
    weight: float          # CMN's weight in the blend, 0..1
    params: dict           # the retrieval method's hyperparameters (for the record)
    blend: str = "zscore"  # how the two scores are combined (BLENDS)
    strategy: str = "two_stage"   # the default strategy: two_stage, or retrieval (validation gave CMN weight 0)
    fusion: dict | None = None    # a fused stage: member method → weight (`method` is the members joined by "+")
    tail: str | None = None       # the member that orders items the retrieval does not propose; None: the stage

    def __post_init__(self):
        if self.candidates < 1:
            raise ValueError(f"two-stage candidates must be >= 1, got {self.candidates}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"two-stage weight must be within [0, 1], got {self.weight}")
        if self.blend not in BLENDS:
            raise ValueError(f"two-stage blend must be one of {', '.join(BLENDS)}, got {self.blend!r}")
        if self.strategy not in STRATEGIES[1:]:
            raise ValueError(f"a retrieval stage's default strategy must be two_stage or retrieval, "
                             f"got {self.strategy!r}")
        if self.fusion is not None and list(self.fusion) != self.method.split("+"):
            raise ValueError(f"a fused stage's method names its members: {self.method!r} against {list(self.fusion)}")
        if self.tail is not None and self.tail not in (self.fusion or {}):
            raise ValueError(f"the tail order must be one of a fused stage's members, got {self.tail!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class Retrieval:
    """What every retrieval stage shares: scores of histories over the catalogue, and live items.

    An item added after training (a live item, model/online.py) is unknown to the fitted stage. It stands for a mix of
    trained items, those its users interacted with (weights summing to 1): its column is that mix of their columns (a
    user's retrieval score for it is the mix of its scores for them), and in a history it counts as that mix of them.
    Live items are not saved with the stage (`tensors`, `to`): a retrained model has them as trained items. A stage
    implements `trained_scores`, the (U, n_trained) scores of weighted histories of trained items."""

    def __init__(self, n_items: int, device: str | torch.device):
        self.n_items = self.n_trained = n_items
        self.device = torch.device(device)
        self.live: list[tuple[torch.Tensor, torch.Tensor]] = []   # per live item: (trained items, weights)

    def add_item(self, items, weights) -> int:
        """A live item standing for `items` (trained) mixed by `weights`; returns its id (the next item id)."""
        self.live.append(self._mix(items, weights))
        self.n_items += 1
        return self.n_items - 1

    def set_item(self, item: int, items, weights) -> None:
        """A live item's mix, after more users interacted with it."""
        self.live[item - self.n_trained] = self._mix(items, weights)

    def _mix(self, items, weights) -> tuple[torch.Tensor, torch.Tensor]:
        items = torch.as_tensor(items, dtype=torch.long, device=self.device)
        weights = torch.as_tensor(weights, dtype=torch.float32, device=self.device)
        if len(items) and (int(items.min()) < 0 or int(items.max()) >= self.n_trained):
            raise ValueError("a live item's retrieval mix names items that are not trained items")
        return items, weights / weights.sum().clamp(min=1e-12)

    def scores(self, histories: list[list[int]]) -> torch.Tensor:
        """(U, n_items) retrieval scores of each history (a live item in it: its mix of trained items), then live
        items' columns as their mixes of columns."""
        counts = torch.tensor([len(h) for h in histories], dtype=torch.long)
        items = torch.tensor([i for h in histories for i in h], dtype=torch.long, device=self.device)
        rows = slot_rows(counts).to(self.device)
        weight = torch.ones(len(items), device=self.device)
        live = torch.nonzero(items >= self.n_trained).squeeze(1).tolist() if self.live else []
        if live:
            mixes = [self.live[int(items[j]) - self.n_trained] for j in live]
            sizes = torch.tensor([len(m[0]) for m in mixes], device=self.device)
            keep = items < self.n_trained
            rows = torch.cat([rows[keep], rows[live][slot_rows(sizes)]])
            weight = torch.cat([weight[keep]] + [m[1] for m in mixes])
            items = torch.cat([items[keep]] + [m[0] for m in mixes])
        out = self.trained_scores(rows, items, weight, len(histories))
        if not self.live:
            return out
        return torch.cat([out, torch.stack([out[:, mix] @ w for mix, w in self.live], 1)], 1)

    def trained_scores(self, rows: torch.Tensor, items: torch.Tensor, weight: torch.Tensor,
                        n_rows: int) -> torch.Tensor:
        raise NotImplementedError


class ItemRetrieval(Retrieval):
    """`W` as CSR tensors on the scoring device: row i holds the items retrieved by an interaction with i; a history's
    score for j is its items' rows of W summed, gathered slot by slot."""

    def __init__(self, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n_items: int,
                 device: str | torch.device = "cpu"):
        if len(indptr) != n_items + 1 or len(indices) != len(values) or int(indptr[-1]) != len(indices):
            raise ValueError(f"retrieval matrix is not a CSR of {n_items} items "
                             f"({len(indptr)} row pointers, {len(indices)} indices, {len(values)} values)")
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= n_items):
            raise ValueError("retrieval matrix names items outside the catalogue")
        super().__init__(n_items, device)
        self.indptr = indptr.to(self.device, torch.long)
        self.indices = indices.to(self.device, torch.long)
        self.values = values.to(self.device, torch.float32)

    def to(self, device: str | torch.device) -> "ItemRetrieval":
        return ItemRetrieval(self.indptr, self.indices, self.values, self.n_items, device)

    def tensors(self) -> dict[str, torch.Tensor]:
        """For the checkpoint: int32 indices and float32 values (half the bytes of int64)."""
        return {"indptr": self.indptr.cpu(), "indices": self.indices.to(torch.int32).cpu(), "values": self.values.cpu()}

    @staticmethod
    def layout(n_users: int, n_items: int) -> dict[str, tuple[str, list]]:
        return {"indptr": ("I64", [n_items + 1]), "indices": ("I32", [None]), "values": ("F32", [None])}

    def trained_scores(self, rows, items, weight, n_rows):
        start = self.indptr[items]
        owner, slot, _ = expand_slots(start, self.indptr[items + 1] - start)
        out = torch.zeros(n_rows * self.n_trained, device=self.device)
        out.index_add_(0, rows[owner] * self.n_trained + self.indices[slot], self.values[slot] * weight[owner])
        return out.view(n_rows, self.n_trained)


class EASERetrieval(Retrieval):
    """EASE's exact scores (Steck, WWW 2019) for any history x: x·B with B = I − P·diag(1/diag(P)),
    P = (XᵀX + Λ)⁻¹, i.e. x − (x·P) / diag(P). B itself (items², dense) is not stored: where there are no more items
    than users, P is (`p`, items²); else P = (D⁻¹ − D⁻¹Xᵀ K X D⁻¹) / λ with K = (XD⁻¹Xᵀ + λI)⁻¹ (Woodbury's
    identity; D = Λ/λ, `scale`, absent for Λ = λI), and the stage holds K (`k`, users²), D and the binary training
    matrix X (`x_indptr`, `x_indices`, users × items CSR). Either way a score is exactly the dense EASE's, for trained
    users and for histories folded in, in min(users, items)² floats (training/baselines.py bounds that side)."""

    def __init__(self, diag: torch.Tensor, l2: torch.Tensor, p: torch.Tensor | None = None,
                 k: torch.Tensor | None = None, x_indptr: torch.Tensor | None = None,
                 x_indices: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                 device: str | torch.device = "cpu"):
        n_items = len(diag)
        if (p is None) == (k is None) or (k is not None and (x_indptr is None or x_indices is None)):
            raise ValueError("an EASE stage holds either P, or K with the training matrix X")
        if p is not None and tuple(p.shape) != (n_items, n_items):
            raise ValueError(f"EASE's P is {tuple(p.shape)}, not {n_items} x {n_items}")
        if k is not None and (tuple(k.shape) != (len(x_indptr) - 1,) * 2 or int(x_indptr[-1]) != len(x_indices)):
            raise ValueError(f"EASE's K ({tuple(k.shape)}) and X ({len(x_indptr) - 1} users) do not match")
        if k is not None and len(x_indices) and (int(x_indices.min()) < 0 or int(x_indices.max()) >= n_items):
            raise ValueError("EASE's training matrix names items outside the catalogue")
        if scale is not None and (k is None or tuple(scale.shape) != (n_items,)):
            raise ValueError(f"EASE's per-item regularisation scale ({tuple(scale.shape)}) goes with K, one per item")
        super().__init__(n_items, device)
        self.diag = diag.to(self.device, torch.float32)
        self.l2 = l2.reshape(1).to(self.device, torch.float32)
        self.p = None if p is None else p.to(self.device, torch.float32)
        self.k = None if k is None else k.to(self.device, torch.float32)
        self.scale = None if scale is None else scale.to(self.device, torch.float32)
        if k is not None:
            self.x_indptr, self.x_indices = x_indptr.to(self.device, torch.long), x_indices.to(self.device, torch.long)
            users = slot_rows(self.x_indptr[1:] - self.x_indptr[:-1])
            ones = torch.ones(len(users), device=self.device)
            self.x = torch.sparse_coo_tensor(torch.stack([users, self.x_indices]), ones, (len(x_indptr) - 1, n_items),
                                             check_invariants=True)
            self.x = self.x.coalesce()
            self.xt = self.x.t().coalesce()

    def to(self, device: str | torch.device) -> "EASERetrieval":
        return EASERetrieval(self.diag, self.l2, self.p, self.k, *(() if self.k is None else
                                                                     (self.x_indptr, self.x_indices, self.scale)),
                             device=device)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"ease.diag": self.diag.cpu(), "ease.l2": self.l2.cpu()}
        if self.p is not None:
            return {**out, "ease.p": self.p.cpu()}
        out = {**out, "ease.k": self.k.cpu(), "ease.x_indptr": self.x_indptr.cpu(),
               "ease.x_indices": self.x_indices.to(torch.int32).cpu()}
        return out if self.scale is None else {**out, "ease.scale": self.scale.cpu()}

    @staticmethod
    def layout(n_users: int, n_items: int, names=()) -> dict[str, tuple[str, list]]:
        """The stored tensors of the form chosen for this size (training/baselines.py's EASE: P where items ≤ users),
        `ease.scale` where `names` has it (EDLAE's per-item regularisation)."""
        out = {"ease.diag": ("F32", [n_items]), "ease.l2": ("F32", [1])}
        if n_items <= n_users:
            return {**out, "ease.p": ("F32", [n_items, n_items])}
        out = {**out, "ease.k": ("F32", [n_users, n_users]), "ease.x_indptr": ("I64", [n_users + 1]),
               "ease.x_indices": ("I32", [None])}
        return {**out, "ease.scale": ("F32", [n_items])} if "ease.scale" in names else out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "EASERetrieval":
        return cls(tensors["ease.diag"], tensors["ease.l2"], tensors.get("ease.p"), tensors.get("ease.k"),
                   tensors.get("ease.x_indptr"), tensors.get("ease.x_indices"), tensors.get("ease.scale"))

    def trained_scores(self, rows, items, weight, n_rows):
        x = torch.zeros(n_rows, self.n_trained, device=self.device)
        x.index_put_((rows, items), weight, accumulate=True)
        return self.dense_scores(x)

    def dense_scores(self, x: torch.Tensor) -> torch.Tensor:
        """x·B for (U, items) histories x (weights, not only 0/1)."""
        if self.p is not None:
            xp = x @ self.p
        else:   # x·P = (x/D − ((x/D·Xᵀ)·K)·X/D) / λ, the products ordered so that nothing items² is formed
            xd = x if self.scale is None else x / self.scale
            xk = (self.xt @ (self.k @ (self.x @ xd.T))).T
            xp = (xd - (xk if self.scale is None else xk / self.scale)) / self.l2
        return x - xp / self.diag


class ALSRetrieval(Retrieval):
    """iALS (Hu, Koren & Volinsky, ICDM 2008) as `implicit` fits it: a history's score for item j is u·y_j, the user
    vector u recomputed from the history the way `implicit`'s `recalculate_user` does, for trained and folded-in
    users alike: u = (YᵀY + λI + Σ_i (c_i − 1) y_i y_iᵀ)⁻¹ Σ_i c_i y_i over the history's items i, c_i = α·w_i, with
    w_i its BM25 weight (`implicit.nearest_neighbours.bm25_weight`: idf_i, the history's length against the training
    users' mean) or 1. Stored: the item factors Y (items × factors) and, in `settings`, α, λ, BM25's K1 (0: no
    weighting) and B and the mean history length."""

    def __init__(self, item_factors: torch.Tensor, idf: torch.Tensor, settings: torch.Tensor,
                 device: str | torch.device = "cpu"):
        if item_factors.dim() != 2 or len(idf) != len(item_factors) or settings.shape != (5,):
            raise ValueError(f"iALS stage of inconsistent shapes (factors {tuple(item_factors.shape)}, idf "
                             f"{tuple(idf.shape)}, settings {tuple(settings.shape)})")
        super().__init__(len(item_factors), device)
        self.item_factors = item_factors.to(self.device, torch.float32)
        self.idf = idf.to(self.device, torch.float32)
        self.settings = settings.to(torch.float32).cpu()
        self.alpha, self.l2, self.k1, self.b, self.mean_length = self.settings.tolist()
        self.gram = self.item_factors.T @ self.item_factors

    def to(self, device: str | torch.device) -> "ALSRetrieval":
        return ALSRetrieval(self.item_factors, self.idf, self.settings, device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"ials.item_factors": self.item_factors.cpu(), "ials.idf": self.idf.cpu(),
                "ials.settings": self.settings}

    @staticmethod
    def layout(n_users: int, n_items: int) -> dict[str, tuple[str, list]]:
        return {"ials.item_factors": ("F32", [n_items, None]), "ials.idf": ("F32", [n_items]),
                "ials.settings": ("F32", [5])}

    def user_factors(self, rows: torch.Tensor, items: torch.Tensor, x: torch.Tensor, n_rows: int) -> torch.Tensor:
        """(U, factors): each history's least-squares user vector (`rows`, `items`, `x`: its items and their values)."""
        length = torch.zeros(n_rows, device=self.device).index_add_(0, rows, x)
        if self.k1 > 0:
            norm = (1.0 - self.b) + self.b * length / self.mean_length
            x = x * (self.k1 + 1.0) / (self.k1 * norm[rows] + x) * self.idf[items]
        c = self.alpha * x
        order = torch.argsort(rows, stable=True)
        rows, c, y = rows[order], c[order], self.item_factors[items[order]]
        base = self.gram + self.l2 * torch.eye(len(self.gram), device=self.device)
        counts = torch.bincount(rows, minlength=n_rows).tolist()
        # one factors² matrix per history, not per history item: a batch of long histories stays small
        a = torch.stack([base + ((c_u - 1.0)[:, None] * y_u).T @ y_u
                         for c_u, y_u in zip(c.split(counts), y.split(counts))])
        b = torch.zeros(n_rows, len(self.gram), device=self.device).index_add_(0, rows, c[:, None] * y)
        out = torch.linalg.solve(a, b)
        return torch.where((length > 0)[:, None], out, 0.0)   # implicit leaves an empty history at 0

    def trained_scores(self, rows, items, weight, n_rows):
        return self.user_factors(rows, items, weight, n_rows) @ self.item_factors.T


class FusedRetrieval(Retrieval):
    """Members' scores fused: Σ_m w_m · z_m, z_m member m's scores standardised over the user's row (the whole
    catalogue, live items included), so that the fused order does not depend on which items are asked about. A member
    of weight 0 is kept for its order alone (`TwoStage.tail`). Live items are the members' (each mixes its own
    columns)."""

    def __init__(self, members: dict[str, Retrieval], weights: dict[str, float]):
        if list(members) != list(weights) or len(members) < 2:
            raise ValueError(f"a fused stage needs two members or more, each with a weight "
                             f"({list(members)} against {list(weights)})")
        first = next(iter(members.values()))
        super().__init__(first.n_items, first.device)
        self.members, self.weights = members, {name: float(w) for name, w in weights.items()}

    def add_item(self, items, weights) -> int:
        for member in self.members.values():
            member.add_item(items, weights)
        self.n_items += 1
        return self.n_items - 1

    def set_item(self, item: int, items, weights) -> None:
        for member in self.members.values():
            member.set_item(item, items, weights)

    def member_scores(self, histories: list[list[int]]) -> dict[str, torch.Tensor]:
        return {name: member.scores(histories) for name, member in self.members.items()}

    def fuse(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        every = torch.ones_like(next(iter(scores.values())), dtype=torch.bool)
        return sum(w * standardise(scores[name], every) for name, w in self.weights.items() if w)

    def scores(self, histories: list[list[int]]) -> torch.Tensor:
        return self.fuse(self.member_scores(histories))

    def to(self, device: str | torch.device) -> "FusedRetrieval":
        return FusedRetrieval({name: m.to(device) for name, m in self.members.items()}, self.weights)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"fused.{name}.{k}": v for name, m in self.members.items() for k, v in m.tensors().items()}


def fused_members(names) -> dict[str, list[str]]:
    """A fused stage's tensor names (`fused.<member>.<name>`) by member, in order; {} for a single stage."""
    out: dict[str, list[str]] = {}
    for name in names:
        if name.startswith("fused."):
            member, _, rest = name[len("fused."):].partition(".")
            out.setdefault(member, []).append(rest)
    return out


def retrieval_layout(names, n_users: int, n_items: int) -> dict[str, tuple[str, list]]:
    """The checkpoint tensors (without their `retrieval.` prefix) a stage stored under `names` must have."""
    members = fused_members(names)
    if members:
        return {f"fused.{m}.{k}": v for m, rest in members.items()
                for k, v in retrieval_layout(rest, n_users, n_items).items()}
    if any(n.startswith("ease.") for n in names):
        return EASERetrieval.layout(n_users, n_items, names)
    if any(n.startswith("ials.") for n in names):
        return ALSRetrieval.layout(n_users, n_items)
    return ItemRetrieval.layout(n_users, n_items)


def retrieval_from_tensors(tensors: dict[str, torch.Tensor], n_items: int, stage: TwoStage) -> Retrieval:
    """A stage as `tensors()` stored it (the `retrieval.` prefix removed), with the settings it was stored with."""
    if fused_members(tensors):
        if stage.fusion is None or set(stage.fusion) != set(fused_members(tensors)):
            raise ValueError(f"the fused stage's members {list(fused_members(tensors))} are not its settings' "
                             f"{list(stage.fusion or {})}")
        return FusedRetrieval({m: retrieval_from_tensors({k[len(f"fused.{m}."):]: v for k, v in tensors.items()
                                                           if k.startswith(f"fused.{m}.")}, n_items, None)
                               for m in stage.fusion}, stage.fusion)
    if "ease.diag" in tensors:
        return EASERetrieval.from_tensors(tensors)
    if "ials.item_factors" in tensors:
        return ALSRetrieval(tensors["ials.item_factors"], tensors["ials.idf"], tensors["ials.settings"])
    return ItemRetrieval(tensors["indptr"], tensors["indices"], tensors["values"], n_items)


def standardise(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per row, (x - mean) / std over the `valid` entries (std 1 where a row has no spread); 0 elsewhere."""
    n = valid.sum(1, keepdim=True).clamp(min=1)
    x = torch.where(valid, scores, 0.0)
    mean = x.sum(1, keepdim=True) / n
    std = ((torch.where(valid, scores - mean, 0.0) ** 2).sum(1, keepdim=True) / n).sqrt()
    return torch.where(valid, (scores - mean) / torch.where(std > 0, std, 1.0), 0.0)


def reciprocal_rank(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per row, 1 / (RRF_K + r) with r the 1-based rank among the `valid` entries by score, descending; tied scores
    share their best rank, so the result does not depend on the candidates' order. 0 elsewhere."""
    x = scores.masked_fill(~valid, -torch.inf)
    ascending = x.sort(1).values
    above = x.shape[1] - torch.searchsorted(ascending, x.contiguous(), right=True)
    return torch.where(valid, 1.0 / (RRF_K + 1.0 + above), 0.0)


def tiered(proposed: torch.Tensor, found: torch.Tensor, scores: torch.Tensor, items: torch.Tensor,
           valid: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """(U, W) scores of `items` (where `valid`; -inf elsewhere) that rank as the whole-catalogue list does: an item
    among the user's `proposed` (U, R; `found` marks real entries) has its `scores` entry; any other scores below every
    proposed one, by its rank r (0-based, ties sharing the best) in the user's `tail` row (U, n_items):
    min(proposed scores) − 1 − r / n_items."""
    n_rows, n_items = tail.shape
    rows = torch.arange(n_rows, device=tail.device)[:, None]
    lookup = torch.full((n_rows, n_items), torch.nan, device=tail.device)
    lookup[rows.expand_as(proposed)[found], proposed[found]] = scores[found]
    floor = scores.masked_fill(~found, torch.inf).min(1).values
    floor = torch.where(torch.isfinite(floor), floor, 0.0)
    ascending = tail.sort(1).values
    picked = items.clamp(min=0)
    above = n_items - torch.searchsorted(ascending, tail.gather(1, picked).contiguous(), right=True)
    own = lookup.gather(1, picked)
    out = torch.where(torch.isnan(own), floor[:, None] - 1.0 - above / n_items, own)
    return out.masked_fill(~valid, -torch.inf)


def blend(cmn: torch.Tensor, retrieval: torch.Tensor, valid: torch.Tensor, weight: float,
          kind: str = "zscore") -> torch.Tensor:
    """The two-stage score of (U, W) candidate matrices (`kind`: one of BLENDS); -inf where not `valid`."""
    if kind not in BLENDS:
        raise ValueError(f"unknown blend {kind!r}; choose {', '.join(BLENDS)}")
    scale = standardise if kind == "zscore" else reciprocal_rank
    mixed = weight * scale(cmn, valid) + (1.0 - weight) * scale(retrieval, valid)
    return mixed.masked_fill(~valid, -torch.inf)
