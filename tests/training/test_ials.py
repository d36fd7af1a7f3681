"""iALS as a retrieval stage: the user vector it solves for a history is `implicit`'s own `recalculate_user` (BM25
or no weighting), its scores are that vector times the item factors, and the stage survives a checkpoint."""
import numpy as np
import pytest
import torch
from implicit.cpu.als import AlternatingLeastSquares
from implicit.nearest_neighbours import bm25_weight

from conftest import make_cmn
from model.retrieval import TwoStage
from model.store.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from training.baselines import IALS, interaction_matrix


@pytest.mark.parametrize("weighting, alpha", [("bm25", 2.0), ("none", 10.0)])
def test_user_vectors_are_implicits_recalculate_user(weighting, alpha, tmp_path):
    rng = np.random.default_rng(0)
    n_users, n_items = 50, 40
    pairs = np.ascontiguousarray(np.argwhere(rng.random((n_users, n_items)) < 0.2))
    ials = IALS(pairs, n_users, n_items, factors=8, regularization=0.1, alpha=alpha, weighting=weighting, iterations=3)
    x = interaction_matrix(pairs, n_users, n_items)
    reference = AlternatingLeastSquares(factors=8, regularization=0.1, alpha=alpha)
    reference.item_factors = ials.stage.item_factors.numpy()
    weighted = (bm25_weight(x) if weighting == "bm25" else x).tocsr().astype(np.float32)
    users = np.arange(n_users)
    expected = reference.recalculate_user(users, weighted[users]) @ reference.item_factors.T
    histories = [list(np.flatnonzero(row)) for row in x.toarray()]
    np.testing.assert_allclose(ials.stage.scores(histories).numpy(), expected, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(ials.score(torch.arange(n_users)).numpy(), expected, rtol=1e-3, atol=1e-4)
    model = make_cmn(n_users, n_items, d=4, hops=1)
    save_checkpoint(Checkpoint(model.cfg, model.state_dict(), [f"u{u}" for u in users],
                               [f"i{i}" for i in range(n_items)], train=pairs, seen=pairs, retrieval=ials.retrieval(),
                               two_stage=TwoStage("ials", 10, 0.0, ials.params, strategy="retrieval")),
                    str(tmp_path / "m.ckpt"))
    loaded = load_checkpoint(str(tmp_path / "m.ckpt")).retrieval
    np.testing.assert_allclose(loaded.scores(histories[:5] + [[]]).numpy(),
                               np.concatenate([expected[:5], np.zeros((1, n_items))]), rtol=1e-3, atol=1e-4)
