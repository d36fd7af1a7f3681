"""A checkpoint whose validation chose the retrieval stage's own list (CMN weight 0) serves it by default: the answer
says `"strategy": "retrieval"`, the list is numpy's dense EASE (history × B, computed here), fold-in histories get
the same rule, and a live item created by feedback (which EASE has no row or column for until the next training run)
is scored as the mix of the trained items its users interacted with. Real HTTP."""
import httpx
import numpy as np
import pytest

from conftest import make_cmn
from model.online import Online
from model.recommender import Recommender
from model.store.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from tests.harness.servers import running_server
from training.baselines import EASE
from training.data import holdout_validation, synthetic
from training.two_stage import fit_retrieval, select_two_stage


@pytest.fixture(scope="module")
def ease_default(tmp_path_factory):
    """(data, checkpoint path): EASE chosen on validation with CMN's weight held at 0."""
    data = synthetic(n_users=120, n_items=200, per_user=10)
    model = make_cmn(data.n_users, data.n_items, d=6, hops=2, seed=2)
    stage, table = select_two_stage(model, holdout_validation(data, 0), methods=("ease",), candidates=(50,),
                                    weights=(0.0,), log=lambda *_: None)
    retrieval, _ = fit_retrieval("ease", data.train, data.n_users, data.n_items, **stage.params)
    ckpt = Checkpoint(model.cfg, model.state_dict(), data.user_ids, data.item_ids, train=data.train, seen=data.train,
                      retrieval=retrieval, two_stage=stage)
    path = tmp_path_factory.mktemp("ease-default") / "model.ckpt"
    save_checkpoint(ckpt, str(path))
    return data, stage, str(path)


def ease_top(data, stage, history, k):
    """The top-k unseen items of a history by numpy's dense EASE: B = I − P·diag(1/diag(P)), P = (XᵀX + Λ)⁻¹,
    Λ = λI + p/(1−p)·diagMat(XᵀX) (p: EDLAE's dropout, chosen on validation too)."""
    x = np.zeros((data.n_users, data.n_items))
    x[data.train[:, 0], data.train[:, 1]] = 1.0
    gram, dropout = x.T @ x, stage.params["dropout"]
    reg = stage.params["l2"] + dropout / (1 - dropout) * np.diag(gram)
    p = np.linalg.inv(gram + np.diag(reg))
    scores = np.eye(data.n_items)[list(history)].sum(0) @ (np.eye(data.n_items) - p / np.diag(p)[None, :])
    scores[list(history)] = -np.inf
    return [int(i) for i in np.argsort(-scores, kind="stable")[:k]], scores


def test_selection_with_cmn_weight_0_serves_the_retrieval_list(ease_default):
    data, stage, path = ease_default
    assert stage.strategy == "retrieval" and stage.weight == 0 and stage.params["l2"] in EASE.grid["l2"]
    rec = Recommender.from_checkpoint(path)
    assert rec.default_strategy == "retrieval"
    history = sorted(rec.seen(4))
    expected, scores = ease_top(data, stage, history, 10)
    items, served = rec.recommend([4], k=10)
    assert sorted(scores[items[0].numpy()]) == pytest.approx(sorted(scores[expected]), rel=1e-5)
    np.testing.assert_allclose(served[0].numpy(), scores[items[0].numpy()], rtol=1e-5)


def test_a_live_item_is_retrieved_as_the_mix_of_its_users_items(ease_default):
    """Until the next training run fits EASE on it, a new item's score for a user is the mean of that user's scores
    for the trained items its users interacted with, each counted once per user."""
    _, _, path = ease_default
    online = Online(Recommender.from_checkpoint(path))
    rec = online.recommender
    item = online.add_item([1, 2])
    before = rec.score([7], strategy="retrieval")[0]
    counts = {}
    for u in (1, 2):
        for i in rec.seen(u) - {item}:
            counts[i] = counts.get(i, 0) + 1
    mix = sum(c * before[i] for i, c in counts.items()) / sum(counts.values())
    assert float(before[item]) == pytest.approx(float(mix), rel=1e-5)
    assert float(before[item]) != 0.0, "a live item nobody's items point to checks nothing"


@pytest.mark.slow
def test_served_default_fold_in_and_metrics_through_http(ease_default, tmp_path):
    data, stage, path = ease_default
    ckpt = load_checkpoint(path)
    history = [3, 17, 40, 41, 90]
    expected, _ = ease_top(data, stage, history, 8)
    user = 9
    own, _ = ease_top(data, stage, sorted(set(data.train[data.train[:, 0] == user, 1].tolist())), 8)
    with running_server(path, tmp_path, device="cpu") as (url, _):
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/recommend", json={"user_id": ckpt.user_ids[user], "k": 8})
            assert r.status_code == 200 and r.json()["strategy"] == "retrieval", r.text
            assert [x["item_id"] for x in r.json()["items"]] == [ckpt.item_ids[i] for i in own]
            r = c.post("/recommend", json={"history": [ckpt.item_ids[i] for i in history], "k": 8})
            assert r.status_code == 200 and r.json()["strategy"] == "retrieval", r.text
            assert r.json()["cold_start"] == "fold_in"
            assert [x["item_id"] for x in r.json()["items"]] == [ckpt.item_ids[i] for i in expected]
            r = c.post("/recommend", json={"user_id": ckpt.user_ids[user], "k": 8, "strategy": "two_stage"})
            assert r.status_code == 200 and r.json()["strategy"] == "two_stage"
            metrics = c.get("/metrics").text
    assert 'strategy="retrieval"' in metrics and 'strategy="two_stage"' in metrics
