"""Two-stage serving: `strategy` per request, answered with the strategy used, explanations of the re-ranked lists,
old checkpoints' settings, and the served default lists equal what `python -m training evaluate` ranks (real HTTP,
the full-catalogue protocol)."""
import asyncio
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest

from tests.harness.servers import ROOT, running_server
from conftest import (make_cmn, neighbourhood, numpy_params, reference_forward, rewrite_metadata, serving, settings_for,
                      wait_ready)
from model.store.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from model.recommender import Recommender
from model.retrieval import TwoStage
from test_api import samples, value
from training.data import holdout_validation, synthetic
from training.two_stage import fit_two_stage, stage_for


@pytest.fixture(scope="module")
def two_stage_checkpoint(tmp_path_factory) -> str:
    """A random CMN with a retrieval stage chosen on a validation split. Its seen-sets are the training pairs
    (the held-out positives are unknown to it), so its served lists are what the evaluator ranks."""
    data = synthetic(n_users=150, n_items=300, per_user=12)
    model = make_cmn(data.n_users, data.n_items, d=6, hops=2, seed=1)
    retrieval, stage, _ = fit_two_stage(model, holdout_validation(data, 0), data, log=lambda *_: None)
    ckpt = Checkpoint(model.cfg, model.state_dict(), data.user_ids, data.item_ids, train=data.train, seen=data.train,
                      test_users=data.test.users, test_positives=data.test.positives,
                      test_negatives=data.test.negatives, retrieval=retrieval, two_stage=stage)
    path = tmp_path_factory.mktemp("two-stage") / "model.ckpt"
    save_checkpoint(ckpt, str(path))
    return str(path)


def test_checkpoint_round_trip_keeps_the_retrieval_stage(two_stage_checkpoint):
    ckpt = load_checkpoint(two_stage_checkpoint)
    rec = Recommender.from_checkpoint(ckpt)
    assert rec.default_strategy == "two_stage" and rec.strategies == ("full", "two_stage", "retrieval")
    assert ckpt.two_stage.method in ("rp3beta", "itemknn") and 0 <= ckpt.two_stage.weight <= 1
    assert len(ckpt.retrieval.values) > 0


def test_a_checkpoint_from_before_the_blend_setting_reads_as_zscore(two_stage_checkpoint, tmp_path):
    """Checkpoints written before `blend` existed hold no such key: they keep ranking by the z-score blend."""
    settings = load_checkpoint(two_stage_checkpoint).two_stage.to_dict()
    old = {k: v for k, v in settings.items() if k != "blend"}
    path = rewrite_metadata(two_stage_checkpoint, tmp_path / "old.ckpt", two_stage=json.dumps(old))
    assert load_checkpoint(path).two_stage == TwoStage(**{**old, "blend": "zscore"})
    bad = rewrite_metadata(two_stage_checkpoint, tmp_path / "bad.ckpt", two_stage=json.dumps({**old, "blend": "max"}))
    with pytest.raises(CheckpointError, match="blend must be one of zscore, rrf, got 'max'"):
        load_checkpoint(bad)


def reference_explanation(ckpt: Checkpoint, params: dict, user: int, item: int, top: int = 5):
    """The `top` neighbours of N(item) the last hop of (user, item) attends to most, by the numpy reference."""
    _, p, nbr, _ = reference_forward(params, [user], [item], [neighbourhood(ckpt.train, user, item)])
    order = np.argsort(-p[0], kind="stable")[:top]
    return [(int(nbr[0, j]), float(p[0, j])) for j in order if p[0, j] > 0]


@pytest.mark.anyio
async def test_explanations_follow_the_two_stage_list(two_stage_checkpoint, tmp_path):
    """explain under two_stage (the default) and retrieval: the list is the one served without explain, and each
    item carries the neighbours CMN's last hop attends to most, as the numpy reference computes them; so does
    `Recommender.explain` on the recommender's own two-stage list."""
    ckpt = load_checkpoint(two_stage_checkpoint)
    rec = Recommender.from_checkpoint(ckpt)
    params = numpy_params(ckpt.build_model())
    lengths = []
    async with serving(settings_for(two_stage_checkpoint, tmp_path, allow_explain=True)) as c:
        await wait_ready(c)
        for user, strategy in [(3, None), (60, None), (121, None), (7, "two_stage"), (44, "retrieval")]:
            body = {"user_id": ckpt.user_ids[user], "k": 6, **({"strategy": strategy} if strategy else {})}
            plain = await c.post("/recommend", json=body)
            r = await c.post("/recommend", json={**body, "explain": True})
            assert r.status_code == 200 and plain.status_code == 200, r.text
            answer = r.json()
            assert answer["strategy"] == (strategy or "two_stage")
            assert [(x["item_id"], x["score"]) for x in answer["items"]] == \
                [(x["item_id"], x["score"]) for x in plain.json()["items"]]
            items, _ = rec.recommend([user], k=6, strategy=strategy)
            listed = [i for i in items[0].tolist() if i >= 0]
            assert [x["item_id"] for x in answer["items"]] == [ckpt.item_ids[i] for i in listed]
            for x, item, direct in zip(answer["items"], listed, rec.explain(user, listed)):
                want = reference_explanation(ckpt, params, user, item)
                assert [n["user_id"] for n in x["explanation"]] == [ckpt.user_ids[v] for v, _ in want]
                assert [v for v, _ in direct] == [v for v, _ in want]
                np.testing.assert_allclose([n["weight"] for n in x["explanation"]], [w for _, w in want], atol=1e-5)
                np.testing.assert_allclose([w for _, w in direct], [w for _, w in want], atol=1e-5)
                lengths.append(len(want))
    assert max(lengths) > 1, "explanations of single neighbours check no order"


@pytest.mark.anyio
async def test_strategy_is_chosen_per_request_and_reported(two_stage_checkpoint, api_checkpoint, tmp_path):
    ckpt = load_checkpoint(two_stage_checkpoint)
    rec = Recommender.from_checkpoint(ckpt)
    user = ckpt.user_ids[7]
    async with serving(settings_for(two_stage_checkpoint, tmp_path)) as c:
        await wait_ready(c)
        before = samples((await c.get("/metrics")).text)   # the counters are the process's, shared by every test
        for strategy in (None, "full", "two_stage", "retrieval"):
            body = {"user_id": user, "k": 5, **({"strategy": strategy} if strategy else {})}
            r = await c.post("/recommend", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["strategy"] == (strategy or "two_stage")
            items, _ = rec.recommend([7], k=5, strategy=strategy)
            assert [x["item_id"] for x in r.json()["items"]] == [ckpt.item_ids[i] for i in items[0].tolist()]
        r = await c.post("/recommend", json={"user_id": "nobody", "k": 3, "strategy": "retrieval"})
        assert r.status_code == 200 and r.json()["fallback"] == "unknown_user" and "strategy" not in r.json()
        after = samples((await c.get("/metrics")).text)
        for strategy, served in (("two_stage", 2), ("retrieval", 1), ("full", 1)):
            labels = dict(kind="personalised", strategy=strategy)
            assert value(after, "cmn_recommendations_total", **labels) - \
                value(before, "cmn_recommendations_total", **labels) == served, strategy
    async with serving(settings_for(api_checkpoint, tmp_path / "plain")) as c:   # a model without retrieval
        await wait_ready(c)
        r = await c.post("/recommend", json={"user_id": "0", "strategy": "two_stage"})
        assert r.status_code == 422 and "needs a retrieval stage" in r.text
        assert (await c.post("/recommend", json={"user_id": "0"})).json()["strategy"] == "full"


@pytest.mark.slow
def test_served_two_stage_lists_equal_the_evaluators(two_stage_checkpoint, tmp_path):
    ckpt = load_checkpoint(two_stage_checkpoint)
    proc = subprocess.run([sys.executable, "-m", "training", "evaluate", "--checkpoint", two_stage_checkpoint,
                           "--json", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["strategy"] == "two_stage"
    users, positives = ckpt.test_users.tolist(), ckpt.test_positives.tolist()
    with running_server(two_stage_checkpoint, tmp_path, device="cpu") as (url, _):
        async def ask():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                return await asyncio.gather(*(client.post("/recommend", json={"user_id": ckpt.user_ids[u], "k": 10})
                                              for u in users))
        answers = asyncio.run(ask())
    assert all(a.status_code == 200 and a.json()["strategy"] == "two_stage" for a in answers)
    ranks = []
    for p, a in zip(positives, answers):
        listed = [x["item_id"] for x in a.json()["items"]]
        ranks.append(listed.index(ckpt.item_ids[p]) if ckpt.item_ids[p] in listed else None)
    hr = np.mean([r is not None for r in ranks])
    ndcg = np.mean([0.0 if r is None else 1 / np.log2(r + 2) for r in ranks])
    assert 0 < hr < 1, "a vacuous comparison"
    assert hr == pytest.approx(report["full"]["hr@10"]) and ndcg == pytest.approx(report["full"]["ndcg@10"])


@pytest.mark.anyio
async def test_a_fused_stage_ranks_requested_candidates_as_its_whole_list_does(tmp_path):
    """A fused stage whose tail is another member: `/recommend` with candidates answers the order the evaluator's
    sampled protocol ranks (`Recommender.score` over the same candidates), the proposed items first, and the answer
    is the same for every strategy's own rule (`strategy` per request)."""
    data = synthetic(n_users=100, n_items=160, per_user=10)
    model = make_cmn(data.n_users, data.n_items, d=6, hops=2, seed=4)
    stage = TwoStage("rp3beta+itemknn", 15, 0.3, {"rp3beta": {}, "itemknn": {}},
                     fusion={"rp3beta": 0.6, "itemknn": 0.4}, tail="itemknn")
    ckpt = Checkpoint(model.cfg, model.state_dict(), data.user_ids, data.item_ids, train=data.train, seen=data.train,
                      retrieval=stage_for(stage, data), two_stage=stage)
    path = str(tmp_path / "fused.ckpt")
    save_checkpoint(ckpt, path)
    rec = Recommender.from_checkpoint(path)
    async with serving(settings_for(path, tmp_path)) as c:
        await wait_ready(c)
        for n, u in enumerate(data.test.users[:6].tolist()):
            ask = [int(data.test.positives[n]), *data.test.negatives[n].tolist()[:30]]
            for strategy in ("two_stage", "retrieval"):
                r = await c.post("/recommend", json={"user_id": data.user_ids[u], "k": len(ask), "strategy": strategy,
                                                     "candidates": [data.item_ids[i] for i in ask]})
                assert r.status_code == 200, r.text
                scores = dict(zip(ask, rec.score([u], [ask], strategy)[0].tolist()))
                served = [data.item_ids.index(x["item_id"]) for x in r.json()["items"]]
                assert sorted(served) == sorted(set(ask) - rec.seen(u))
                in_order = [scores[i] for i in served]
                assert in_order == pytest.approx(sorted(in_order, reverse=True))
