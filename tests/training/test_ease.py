"""EASE (Steck 2019) as a baseline and a retrieval stage: its W against the closed form computed here with numpy,
on both sides of the solve (items ≤ users: the item Gram matrix; items > users: Woodbury's identity), the top-k kept
per target item, and the refusal above the size whose dense solve does not fit."""
import numpy as np
import pytest
import torch

import training.baselines as baselines
from conftest import make_cmn
from model.retrieval import TwoStage
from model.store.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from training.baselines import EASE, run_baselines
from training.evaluate import evaluate
from training.data import holdout_validation, synthetic
from training.two_stage import select_two_stage


def closed_form(x: np.ndarray, l2: float, dropout: float = 0.0) -> np.ndarray:
    """B = I − P·diag(1/diag(P)), P = (XᵀX + Λ)⁻¹, Λ = λI + p/(1−p)·diagMat(XᵀX) (Steck, WWW 2019, eq. 8; EDLAE,
    NeurIPS 2020, with the zero diagonal): diag(B) = 0."""
    gram = x.T @ x
    p = np.linalg.inv(gram + l2 * np.eye(x.shape[1]) + dropout / (1 - dropout) * np.diag(np.diag(gram)))
    return np.eye(x.shape[1]) - p / np.diag(p)[None, :]


def random_pairs(n_users: int, n_items: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = (np.random.default_rng(seed).random((n_users, n_items)) < 0.25).astype(np.float64)
    return x, np.argwhere(x)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("n_users, n_items", [(40, 25), (20, 35)], ids=["item-side", "user-side"])
def test_ease_is_the_closed_form(n_users, n_items, dropout):
    x, pairs = random_pairs(n_users, n_items)
    expected = closed_form(x, 3.0, dropout)
    ease = EASE(pairs, n_users, n_items, l2=3.0, dropout=dropout, topk=n_items)
    np.testing.assert_allclose(ease.W.toarray(), expected, atol=1e-10)
    assert np.all(ease.W.diagonal() == 0)
    scores = ease.score(torch.arange(n_users)).numpy()
    np.testing.assert_allclose(scores, x @ expected, atol=1e-10)


@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("n_users, n_items", [(40, 25), (20, 35)], ids=["stores P", "stores K and X"])
def test_the_stored_exact_stage_scores_any_history_as_the_dense_closed_form(n_users, n_items, dropout, tmp_path):
    """The stage stored without B (P, or Woodbury's K with X) scores trained users, a history of items nobody fitted
    it with, and a live item's mix exactly as x·B with numpy's dense B, before and after a checkpoint round trip."""
    x, pairs = random_pairs(n_users, n_items, seed=3)
    pairs = np.ascontiguousarray(pairs)
    b = closed_form(x, 4.0, dropout)
    ease = EASE(pairs, n_users, n_items, l2=4.0, dropout=dropout)
    assert ease.params["topk"] is None
    stage = ease.retrieval()
    assert set(stage.tensors()) >= ({"ease.p"} if n_items <= n_users else {"ease.k", "ease.x_indices"})
    histories = [list(np.flatnonzero(row)) for row in x] + [[0, 3, n_items - 1]]
    expected = np.concatenate([x, np.eye(n_items)[[0, 3, n_items - 1]].sum(0)[None]]) @ b
    np.testing.assert_allclose(stage.scores(histories).numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ease.score(torch.arange(n_users)).numpy(), x @ b, rtol=1e-4, atol=1e-5)
    model = make_cmn(n_users, n_items, d=4, hops=1)
    ckpt = Checkpoint(model.cfg, model.state_dict(), [f"u{u}" for u in range(n_users)],
                      [f"i{i}" for i in range(n_items)], train=pairs, seen=pairs,
                      retrieval=stage, two_stage=TwoStage("ease", 10, 0.0, ease.params, strategy="retrieval"))
    save_checkpoint(ckpt, str(tmp_path / "m.ckpt"))
    loaded = load_checkpoint(str(tmp_path / "m.ckpt")).retrieval
    live = loaded.add_item([1, 2], [1.0, 3.0])   # a live item: 1/4 of item 1's column and 3/4 of item 2's
    got = loaded.scores([histories[-1], [live]]).numpy()
    np.testing.assert_allclose(got[0, :n_items], expected[-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[0, live], 0.25 * expected[-1, 1] + 0.75 * expected[-1, 2], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[1, :n_items], (0.25 * np.eye(n_items)[1] + 0.75 * np.eye(n_items)[2]) @ b,
                               rtol=1e-4, atol=1e-5)


def test_ease_keeps_each_items_topk_largest_weights():
    x, pairs = random_pairs(30, 20, seed=1)
    full = closed_form(x, 5.0)
    w = EASE(pairs, 30, 20, l2=5.0, topk=4).W.toarray()
    for j in range(20):   # column j: the weights that score target item j
        kept = np.flatnonzero(w[:, j])
        assert len(kept) == 4 and set(kept) == set(np.argsort(-full[:, j])[:4]), j
        np.testing.assert_allclose(w[kept, j], full[kept, j], atol=1e-10)


def test_ease_refuses_above_its_solve_limit_and_selection_skips_it(monkeypatch):
    data = synthetic(n_users=60, n_items=80, per_user=8)
    monkeypatch.setattr(baselines, "EASE_MAX_SOLVE", 50)
    with pytest.raises(ValueError, match="does not fit in memory: use rp3beta or itemknn"):
        EASE(data.train, data.n_users, data.n_items)
    logged = []
    stage, table = select_two_stage(make_cmn(data.n_users, data.n_items, d=4, hops=1), holdout_validation(data, 0),
                                    methods=("ease", "rp3beta"), candidates=(20,), weights=(0.0, 1.0),
                                    log=logged.append)
    assert stage.method == "rp3beta" and {row["method"] for row in table} == {"rp3beta"}
    assert any("ease: skipped" in line for line in logged)
    assert "ease" not in run_baselines(data, full=False)


def test_selection_chooses_eases_l2_by_its_own_validation_list():
    """λ is the grid value whose EASE list alone ranks the validation split best (training/evaluate.py's full
    protocol); with CMN's weight held at 0 the served default is that list (strategy `retrieval`)."""
    data = synthetic(n_users=80, n_items=120, per_user=8)
    fit = holdout_validation(data, 0)
    own = {l2: evaluate(EASE(fit.train, fit.n_users, fit.n_items, l2=l2), fit.test, fit.train)["full"]["ndcg@10"]
           for l2 in EASE.grid["l2"]}
    assert len(set(own.values())) > 1, "a grid whose settings change nothing checks nothing"
    stage, table = select_two_stage(make_cmn(data.n_users, data.n_items, d=4, hops=1), fit, methods=("ease",),
                                    candidates=(120,), weights=(0.0,), log=lambda *_: None)
    assert stage.params["l2"] == max(own, key=own.get) and stage.strategy == "retrieval"
    assert table[0]["ndcg@10"] == pytest.approx(max(own.values()))
