"""ItemKNN and RP3beta against a dense numpy rendering of Dacrema et al.'s formulas, and on citeulike-a."""
import numpy as np
import pytest
import torch

from conftest import CITEULIKE
from training import baselines
from training.baselines import ItemKNN, RP3beta
from training.data import holdout_validation, load
from training.evaluate import evaluate

# User 3 has no training items and item 5 none of its users: both must score 0 rather than nan or inf.
X = np.array([[1, 1, 0, 0, 0, 0, 0, 0],
              [1, 1, 1, 0, 1, 0, 1, 0],
              [1, 0, 0, 1, 0, 0, 0, 0],
              [0, 0, 0, 0, 0, 0, 0, 0],
              [0, 1, 1, 1, 1, 0, 0, 0],
              [1, 0, 1, 0, 1, 0, 0, 1],
              [1, 0, 0, 1, 0, 0, 1, 1],
              [0, 0, 0, 1, 0, 0, 1, 1],
              [1, 0, 0, 1, 0, 0, 1, 0],
              [1, 1, 0, 0, 0, 0, 0, 0]], dtype=np.float64)
N_USERS, N_ITEMS = X.shape
TRAIN = np.argwhere(X).astype(np.int64)
TOPK = 3
ALL_USERS = torch.arange(N_USERS)



@pytest.fixture
def small_blocks(monkeypatch):
    """Three item rows per block, the last one short, so that block offsets are exercised."""
    monkeypatch.setattr(baselines, "BLOCK_CELLS", 3 * N_ITEMS)


def keep_top_k_rows(s: np.ndarray, k: int) -> np.ndarray:
    """Each row's k largest non-zero entries, the rest zeroed; the k-th must not tie with the next."""
    out = np.zeros_like(s)
    for r, row in enumerate(s):
        order = np.argsort(-row, kind="stable")
        if np.count_nonzero(row) > k:
            assert row[order[k - 1]] > row[order[k]], "ambiguous top-k: the test matrix needs changing"
        keep = order[:k][row[order[:k]] != 0]
        out[r, keep] = row[keep]
    return out


def dense_itemknn(shrink: float, weighting: str, normalize: bool) -> np.ndarray:
    item_counts_per_user = X.sum(1)
    idf = np.log(N_ITEMS / (1.0 + item_counts_per_user))[:, None]
    if weighting == "tfidf":
        xw = np.sqrt(X) * idf
    elif weighting == "bm25":
        length = X.sum(0)
        length_norm = 0.25 + 0.75 * length / length.mean()
        xw = X * 2.2 / (1.2 * length_norm[None, :] + X) * idf
    else:
        xw = X
    sim = xw.T @ xw
    if normalize:
        norms = np.sqrt((xw ** 2).sum(0))
        sim = sim / (np.outer(norms, norms) + shrink + 1e-6)
    else:
        sim = sim / shrink
    np.fill_diagonal(sim, 0.0)
    truncated = keep_top_k_rows(sim, TOPK)  # row c: the neighbours of target item c
    assert (truncated != sim).any(), "top-k truncation must bite for the test to check it"
    return xw @ truncated.T


def dense_rp3beta(alpha: float, beta: float, normalize: bool) -> np.ndarray:
    user_degree = np.maximum(X.sum(1, keepdims=True), 1)
    item_degree = X.sum(0)
    p_ui = (X / user_degree) ** alpha
    p_iu = (X / np.maximum(item_degree, 1)).T ** alpha
    penalty = np.where(item_degree > 0, np.maximum(item_degree, 1) ** -beta, 0.0)
    sim = p_iu @ p_ui * penalty[None, :]
    np.fill_diagonal(sim, 0.0)
    w = keep_top_k_rows(sim, TOPK)
    assert (w != sim).any(), "top-k truncation must bite for the test to check it"
    if normalize:
        w = w / np.maximum(w.sum(1, keepdims=True), 1e-300)
    return X @ w


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weighting", ["tfidf", "bm25", "none"])
def test_itemknn_matches_dense_formula(small_blocks, weighting, normalize):
    rec = ItemKNN(TRAIN, N_USERS, N_ITEMS, topk=TOPK, shrink=2, weighting=weighting, normalize=normalize)
    expected = dense_itemknn(shrink=2, weighting=weighting, normalize=normalize)
    np.testing.assert_allclose(rec.score(ALL_USERS).numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
def test_rp3beta_matches_dense_formula(small_blocks, normalize):
    rec = RP3beta(TRAIN, N_USERS, N_ITEMS, alpha=0.7, beta=0.3, topk=TOPK, normalize=normalize)
    expected = dense_rp3beta(alpha=0.7, beta=0.3, normalize=normalize)
    np.testing.assert_allclose(rec.score(ALL_USERS).numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [lambda: ItemKNN(TRAIN, N_USERS, N_ITEMS, topk=TOPK, shrink=2),
                                  lambda: RP3beta(TRAIN, N_USERS, N_ITEMS, topk=TOPK)], ids=["itemknn", "rp3beta"])
def test_candidate_scores_are_the_full_catalogue_scores(small_blocks, make):
    rec = make()
    users = torch.tensor([7, 0, 3, 7, 1])  # unordered, repeated, and one user without training items
    items = torch.tensor(np.random.default_rng(0).integers(0, N_ITEMS, (len(users), 6)))
    full = rec.score(users)
    assert full.shape == (len(users), N_ITEMS)
    assert torch.equal(full, rec.score(ALL_USERS)[users])
    assert torch.equal(rec.score(users, items), full.gather(1, items))
    assert full.abs().sum() > 0


# The reference table (Dacrema et al.) fit its baselines on the training pairs less a leave-one-out validation
# item per user; doing the same here lands within 0.01 of it.
TABLE = {ItemKNN: {"hr@5": 0.8116, "ndcg@5": 0.6939, "hr@10": 0.8878, "ndcg@10": 0.7187},
         RP3beta: {"hr@5": 0.8226, "ndcg@5": 0.7114, "hr@10": 0.8941, "ndcg@10": 0.7347}}


@pytest.fixture(scope="module")
def citeulike_validation_protocol():
    if not CITEULIKE.exists():
        pytest.skip(f"citeulike-a not found at {CITEULIKE}")
    data = load(str(CITEULIKE))
    return data, holdout_validation(data, seed=0)


@pytest.mark.parametrize("cls", [ItemKNN, RP3beta], ids=["itemknn", "rp3beta"])
def test_citeulike_matches_reference_table(citeulike_validation_protocol, cls):
    data, fit_on = citeulike_validation_protocol
    rec = cls(fit_on.train, data.n_users, data.n_items)
    sampled = evaluate(rec, data.test, fit_on.train, full=False)["sampled"]
    for metric, expected in TABLE[cls].items():
        assert sampled[metric] == pytest.approx(expected, abs=0.01), metric
