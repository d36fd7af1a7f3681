"""Item-item baselines: ItemKNN CF and RP3beta from Dacrema et al. (RecSys 2019), and EASE (Steck, WWW 2019).

All score a user as `profile @ W`, with W a sparse item-item matrix built once at construction, so they share
one `score`. Formulas follow Dacrema et al.'s ItemKNNCFRecommender (+ Compute_Similarity, IR_feature_weighting)
and RP3betaRecommender; their default hyperparameters here are the reference table's for citeulike-a. The
table's models were fit on the training pairs less one validation item per user (`dacrema_fit`), which puts
its figures about 0.005-0.01 below those of the same models fit on all training pairs.

    python -m training baselines --data ../shared/data/citeulike-a.npz [--dacrema-fit] [--json]
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch

from model.retrieval import ALSRetrieval, EASERetrieval, ItemRetrieval, Retrieval
from training.data import Dataset, holdout_validation
from training.evaluate import TopPop, evaluate

# Dense similarity blocks hold at most this many float64 cells (32 MiB) whatever the catalogue size; larger
# blocks are no faster on citeulike-a.
BLOCK_CELLS = 1 << 22

BM25_K1, BM25_B = 1.2, 0.75


def interaction_matrix(train: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary user x item CSR matrix of the training pairs."""
    ones = np.ones(len(train), dtype=np.float64)
    urm = sp.csr_matrix((ones, (train[:, 0], train[:, 1])), shape=(n_users, n_items))
    urm.data[:] = 1.0  # repeated pairs are summed by the constructor; an interaction is binary
    return urm


class ItemSimilarityRecommender:
    """Scores are `profiles[users] @ W`: `profiles` (users x items) and `W` (items x items) set by subclasses."""

    n_items: int
    params: dict
    profiles: sp.csr_matrix
    W: sp.csr_matrix

    @staticmethod
    def fits(n_users: int, n_items: int) -> bool:
        """Whether the method can be fitted on data of this size (a method with a dense solve says no above it)."""
        return True

    def score(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.profiles[np.asarray(users.cpu(), dtype=np.int64)]
        scores = torch.from_numpy((rows @ self.W).toarray())
        # A candidate's score is its column of the full row: one sparse product serves both cases.
        return scores if items is None else scores.gather(1, items.cpu().long())

    def retrieval(self, device: str | torch.device = "cpu") -> Retrieval:
        """The method as a retrieval stage (model/retrieval.py): W, float32, on `device`."""
        w = sp.csr_matrix(self.W, dtype=np.float32)
        w.sort_indices()
        return ItemRetrieval(torch.from_numpy(w.indptr.astype(np.int64)), torch.from_numpy(w.indices.astype(np.int64)),
                             torch.from_numpy(w.data), self.n_items, device)


class ItemKNN(ItemSimilarityRecommender):
    """ItemKNN CF: shrunk cosine between item columns of the (feature-weighted) interaction matrix, top-k
    neighbours kept per target item."""

    def __init__(self, train: np.ndarray, n_users: int, n_items: int, topk: int = 713, shrink: float = 1000,
                 similarity: str = "cosine", weighting: str = "tfidf", normalize: bool = True):
        if similarity != "cosine":
            raise ValueError(f"similarity {similarity!r} not implemented; only 'cosine' (the reference's)")
        self.n_items = n_items
        self.params = {"topk": topk, "shrink": shrink, "similarity": similarity, "weighting": weighting,
                       "normalize": normalize}
        # Dacrema et al. overwrite URM_train with the weighted matrix, so it is also the profile that scores.
        x = feature_weighting(interaction_matrix(train, n_users, n_items), weighting)
        self.profiles = x
        xt = x.T.tocsr()
        norms = np.sqrt(np.asarray(x.multiply(x).sum(0)).ravel())

        def similarity_rows(a: int, b: int) -> np.ndarray:
            block = (xt[a:b] @ x).toarray()
            if normalize:
                block /= norms[a:b, None] * norms[None, :] + shrink + 1e-6
            elif shrink:
                block /= shrink
            return block

        # Rows of the symmetric similarity are target items; W's columns must be, so that profile @ W sums over
        # each target's own k neighbours (Compute_Similarity keeps top-k per column).
        self.W = top_k_rows(similarity_rows, n_items, topk).T.tocsr()


class RP3beta(ItemSimilarityRecommender):
    """RP3beta: 3-step random-walk item-to-item probabilities raised to alpha, divided by popularity^beta."""

    def __init__(self, train: np.ndarray, n_users: int, n_items: int, alpha: float = 0.7419, beta: float = 0.1262,
                 topk: int = 800, normalize: bool = True):
        self.n_items = n_items
        self.params = {"alpha": alpha, "beta": beta, "topk": topk, "normalize": normalize}
        urm = interaction_matrix(train, n_users, n_items)
        self.profiles = urm
        p_ui = _l1_rows(urm).power(alpha)
        p_iu = _l1_rows(urm.T.tocsr()).power(alpha)
        popularity = np.asarray(urm.sum(0)).ravel()
        # Items nobody trained on keep weight 0 rather than 0^-beta = inf.
        penalty = np.zeros(n_items)
        seen = popularity > 0
        penalty[seen] = popularity[seen] ** -beta

        def similarity_rows(a: int, b: int) -> np.ndarray:
            return (p_iu[a:b] @ p_ui).toarray() * penalty[None, :]

        w = top_k_rows(similarity_rows, n_items, topk)
        self.W = _l1_rows(w) if normalize else w


class IALS:
    """iALS (Hu, Koren & Volinsky, ICDM 2008) from the `implicit` library, the way ML engineers already run it;
    confidences α·w with w BM25 weights (`weighting` "bm25", implicit's bm25_weight) or 1 ("none"). Users are scored
    by the stage (model/retrieval.py's ALSRetrieval): each history's user vector solved as `recalculate_user` does,
    so an evaluated user is scored as a served or folded-in one is."""

    # chosen on validation (training/two_stage.py, training/compare.py)
    grid = {"factors": (128,), "regularization": (0.01, 0.1), "alpha": (1.0, 10.0), "weighting": ("bm25", "none")}

    def __init__(self, train: np.ndarray, n_users: int, n_items: int, factors: int = 128,
                 regularization: float = 0.01, alpha: float = 1.0, weighting: str = "bm25", iterations: int = 15,
                 seed: int = 0):
        from implicit.cpu.als import AlternatingLeastSquares
        from implicit.nearest_neighbours import bm25_weight
        from threadpoolctl import threadpool_limits
        if weighting not in ("bm25", "none"):
            raise ValueError(f"iALS weighting must be 'bm25' or 'none', got {weighting!r}")
        self.n_items = n_items
        self.params = {"factors": factors, "regularization": regularization, "alpha": alpha,
                       "iterations": iterations, "weighting": weighting}
        x = interaction_matrix(train, n_users, n_items)
        self.profiles = x
        with threadpool_limits(1, "blas"):   # implicit's own advice: its threads, not BLAS's, do the work
            als = AlternatingLeastSquares(factors=factors, regularization=regularization, alpha=alpha,
                                          iterations=iterations, random_state=seed)
            als.fit((bm25_weight(x) if weighting == "bm25" else x).tocsr(), show_progress=False)
        # bm25_weight's own constants (K1 100, B 0.8) and statistics, so that a served history is weighted alike
        lengths = np.asarray(x.sum(1)).ravel()
        idf = np.log(n_users) - np.log1p(np.bincount(x.indices, minlength=n_items))
        k1 = 100.0 if weighting == "bm25" else 0.0
        self.stage = ALSRetrieval(torch.from_numpy(np.asarray(als.item_factors)), torch.from_numpy(idf),
                                  torch.tensor([alpha, regularization, k1, 0.8, lengths.mean()]))

    @staticmethod
    def fits(n_users: int, n_items: int) -> bool:
        return True

    def score(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.profiles[np.asarray(users.cpu(), dtype=np.int64)].tocoo()
        row, col = (torch.from_numpy(a.astype(np.int64)) for a in (rows.row, rows.col))
        scores = self.stage.trained_scores(row, col, torch.from_numpy(rows.data.astype(np.float32)), rows.shape[0])
        return scores if items is None else scores.gather(1, items.cpu().long())

    def retrieval(self, device: str | torch.device = "cpu") -> Retrieval:
        return self.stage.to(device)


def feature_weighting(urm: sp.csr_matrix, weighting: str) -> sp.csr_matrix:
    """TF-IDF or BM25 of the user x item matrix as Dacrema et al. apply it to ItemKNN CF: items are the
    documents and users the terms, so a user's idf is log(n_items / (1 + items of the user))."""
    if weighting == "none":
        return urm
    if weighting not in ("tfidf", "bm25"):
        raise ValueError(f"weighting must be 'tfidf', 'bm25' or 'none', got {weighting!r}")
    coo = urm.tocoo()
    n_items = urm.shape[1]
    idf = np.log(n_items / (1.0 + np.bincount(coo.row, minlength=urm.shape[0])))
    if weighting == "tfidf":
        data = np.sqrt(coo.data) * idf[coo.row]
    else:
        length = np.bincount(coo.col, weights=coo.data, minlength=n_items)
        length_norm = (1.0 - BM25_B) + BM25_B * length / length.mean()
        data = coo.data * (BM25_K1 + 1.0) / (BM25_K1 * length_norm[coo.col] + coo.data) * idf[coo.row]
    return sp.csr_matrix((data, (coo.row, coo.col)), shape=urm.shape)


def top_k_rows(similarity_rows: Callable[[int, int], np.ndarray], n: int, k: int) -> sp.csr_matrix:
    """n x n CSR keeping, per row, the k largest non-zero off-diagonal entries of `similarity_rows(a, b)`
    (the dense rows a..b-1), computed a block of rows at a time to bound memory."""
    if k < 1:
        raise ValueError(f"topk must be at least 1, got {k}")
    k = min(k, n)
    step = max(1, BLOCK_CELLS // n)
    blocks = []
    for a in range(0, n, step):
        b = min(a + step, n)
        block = similarity_rows(a, b)
        block[np.arange(b - a), np.arange(a, b)] = 0.0  # an item is not its own neighbour
        cols = np.argpartition(-block, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(block, cols, 1)
        keep = vals != 0
        rows = np.broadcast_to(np.arange(b - a)[:, None], cols.shape)
        blocks.append(sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=(b - a, n)))
    return sp.vstack(blocks, format="csr")


def _l1_rows(m: sp.csr_matrix) -> sp.csr_matrix:
    """Rows scaled to sum to 1 (entries are non-negative); empty rows stay empty."""
    sums = np.asarray(m.sum(1)).ravel()
    sums[sums == 0] = 1.0
    return sp.csr_matrix(sp.diags(1.0 / sums) @ m)


# EASE's one dense solve is of the smaller side of the interaction matrix (users or items, see EASE): at most this
# many rows. Measured at citeulike-a's 5,551 users x 16,980 items (docs/results.md): the user-side solve takes
# seconds; an item-side solve of 16,980 takes minutes on 2 cores and 2.3 GB per float64 copy. 20,000 rows are 3.2 GB
# per copy and about three copies live at once.
EASE_MAX_SOLVE = 20_000
# EASE is stored exactly (model/retrieval.py's EASERetrieval: P or K, min(users, items)² float32) up to this side:
# 256 MiB; above it, up to EASE_MAX_SOLVE, each target item's EASE_TOPK largest weights (W, sparse). On citeulike-a
# (5,551 users, so K is 123 MB) the exact form gives full NDCG@10 0.2283 where the top 1,000 gave 0.2054 (λ 20, test).
EASE_MAX_EXACT = 8_192
EASE_TOPK = 1000


class EASE(ItemSimilarityRecommender):
    """EASE: B = argmin ||X − XB||² + ||Λ^½ B||² with diag(B) = 0, in closed form B = I − P·diag(1/diag(P)),
    P = (XᵀX + Λ)⁻¹. Λ = λI (Steck, WWW 2019), or with `dropout` p > 0 Λ = λI + p/(1−p)·diag(XᵀX), the
    emphasised denoising autoencoder's closed form (EDLAE, Steck, NeurIPS 2020): a popular item's weights are
    shrunk more. Stored exactly (`topk` None, model/retrieval.py's EASERetrieval) while min(users, items) ≤
    EASE_MAX_EXACT, else as W, each target item's (column's) `topk` largest weights, so that a stored stage is bounded
    either way. On citeulike-a (λ 20, test split) the dense B reaches full NDCG@10 0.2283, sampled 0.6975; its top
    1,000 per item 0.2054 and 0.7359.

    Where there are fewer users than items, P comes from the users' side by Woodbury's identity: with D = Λ/λ,
    P = (D⁻¹ − D⁻¹Xᵀ K X D⁻¹) / λ, K = (X D⁻¹ Xᵀ + λI)⁻¹: the dense solve is min(users, items) square, refused
    above EASE_MAX_SOLVE (`EASE.fits` says beforehand, so that selection can skip it)."""

    # λ and p, chosen on validation by training/two_stage.py; p 0.25 was EDLAE's best on citeulike-a's validation
    # split (full NDCG@10 0.2024 against 0.2009 at λ 10, docs/results.md)
    grid = {"l2": (10.0, 20.0, 50.0, 100.0, 200.0, 500.0), "dropout": (0.0, 0.25)}

    def __init__(self, train: np.ndarray, n_users: int, n_items: int, l2: float = 20.0, dropout: float = 0.0,
                 topk: int | None | str = "auto"):
        if not self.fits(n_users, n_items):
            raise ValueError(f"EASE solves a dense {min(n_users, n_items):,}-square system here (the smaller of "
                             f"{n_users:,} users and {n_items:,} items); above {EASE_MAX_SOLVE:,} it does not fit "
                             "in memory: use rp3beta or itemknn")
        if not l2 > 0:
            raise ValueError(f"EASE's l2 must be > 0, got {l2}")
        if not 0 <= dropout < 1:
            raise ValueError(f"EASE's dropout must be within [0, 1), got {dropout}")
        if topk == "auto":
            topk = None if min(n_users, n_items) <= EASE_MAX_EXACT else EASE_TOPK
        self.n_items = n_items
        self.params = {"l2": float(l2), "dropout": float(dropout), "topk": topk}
        x = interaction_matrix(train, n_users, n_items)
        self.profiles = x
        scale = 1.0 + dropout / (1.0 - dropout) * np.asarray(x.sum(0)).ravel() / l2   # D = Λ / λ
        if n_items <= n_users:
            gram = (x.T @ x).toarray()
            gram[np.diag_indices(n_items)] += l2 * scale
            p = np.linalg.inv(gram)
            p_rows = lambda a, b: p[a:b]
            diag = np.diag(p).copy()
        else:
            xs = sp.csr_matrix(x.multiply(1.0 / scale[None, :]))   # X D⁻¹
            gram = (xs @ x.T).toarray()
            gram[np.diag_indices(n_users)] += l2
            k = np.linalg.inv(gram)
            xst = xs.T.tocsr()

            def p_rows(a: int, b: int) -> np.ndarray:   # (D⁻¹ − D⁻¹XᵀKXD⁻¹)[a:b] / λ
                block = -np.asarray(xs.T @ (xst[a:b] @ k).T).T
                block[np.arange(b - a), np.arange(a, b)] += 1.0 / scale[a:b]
                return block / l2

            step = max(1, BLOCK_CELLS // n_users)
            diag = np.concatenate([(1.0 / scale[a:a + step]
                                    - np.asarray(xst[a:a + step].multiply(xst[a:a + step] @ k).sum(1)).ravel()) / l2
                                   for a in range(0, n_items, step)])
        if topk is None:
            factors = {"p": p} if n_items <= n_users else {"k": k, "x_indptr": x.indptr, "x_indices": x.indices,
                                                           "scale": scale}
            self.stage = EASERetrieval(torch.from_numpy(diag), torch.tensor([float(l2)]),
                                       **{name: torch.from_numpy(np.asarray(v)) for name, v in factors.items()})
        else:   # column j of B is −P[:, j] / P[j, j]: row j of Bᵀ, P being symmetric
            self.W = top_k_rows(lambda a, b: -p_rows(a, b) / diag[a:b, None], n_items, topk).T.tocsr()

    @staticmethod
    def fits(n_users: int, n_items: int) -> bool:
        return min(n_users, n_items) <= EASE_MAX_SOLVE

    def score(self, users: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        if self.params["topk"] is not None:
            return super().score(users, items)
        x = torch.from_numpy(self.profiles[np.asarray(users.cpu(), dtype=np.int64)].toarray()).float()
        scores = self.stage.dense_scores(x)
        return scores if items is None else scores.gather(1, items.cpu().long())

    def retrieval(self, device: str | torch.device = "cpu") -> Retrieval:
        return super().retrieval(device) if self.params["topk"] is not None else self.stage.to(device)


# the item-item methods: each is a baseline here and a retrieval stage that two-stage selection may choose
# (training/two_stage.py); a new method is a class above and its name here
ITEM_METHODS = {"rp3beta": RP3beta, "itemknn": ItemKNN, "ease": EASE}
# every retrieval stage: the item-item methods and the factor model (a class with `retrieval()`, `fits`, `grid`)
RETRIEVAL_METHODS = {**ITEM_METHODS, "ials": IALS}


def run_baselines(data: Dataset, full: bool = True, dacrema_fit: bool = False, seed: int = 0) -> dict:
    """Fit TopPop and each of ITEM_METHODS that fits the data on `data.train` and evaluate each on `data.test`.

    `dacrema_fit` fits on the training pairs less one validation item per user, as the reference table's runs
    did; the evaluation still excludes every training item."""
    if data.test is None:
        raise ValueError(f"{data.name}: no test split to evaluate on")
    fit = holdout_validation(data, seed).train if dacrema_fit else data.train
    builders = {"toppop": lambda: TopPop(fit, data.n_items),
                **{name: (lambda m=method: m(fit, data.n_users, data.n_items)) for name, method in ITEM_METHODS.items()
                   if method.fits(data.n_users, data.n_items)}}   # EASE above its solve limit: left out
    out = {}
    for name, build in builders.items():
        start = time.perf_counter()
        rec = build()
        fit_seconds = time.perf_counter() - start
        out[name] = {"params": getattr(rec, "params", {}),
                     "metrics": evaluate(rec, data.test, data.train, full=full), "fit_seconds": fit_seconds}
    return out
