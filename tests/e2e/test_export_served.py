"""Served = exported: for every strategy a checkpoint offers, `python -m training export`'s lists are the lists the
real server (`python -m app`, over HTTP) answers to /recommend for the same users."""
import json
import random

import httpx
import numpy as np
import pytest

from conftest import make_cmn, run_cli
from model.store.checkpoint import Checkpoint, save_checkpoint
from tests.harness.servers import running_server
from training.data import holdout_validation, synthetic
from training.two_stage import fit_two_stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A random CMN with a retrieval stage (three strategies); seen-sets hold every pair, as the server's do."""
    data = synthetic(n_users=120, n_items=250, per_user=10, seed=5)
    model = make_cmn(data.n_users, data.n_items, d=6, hops=2, seed=5)
    retrieval, stage, _ = fit_two_stage(model, holdout_validation(data, 0), data, log=lambda *_: None)
    path = tmp_path_factory.mktemp("served") / "model.ckpt"
    save_checkpoint(Checkpoint(model.cfg, model.state_dict(), data.user_ids, data.item_ids, train=data.train,
                               seen=data.all_pairs(), retrieval=retrieval, two_stage=stage), str(path))
    return str(path)


def test_exported_lists_are_the_served_lists(checkpoint, tmp_path):
    exported = {}
    for strategy in ("full", "two_stage", "retrieval"):
        out = tmp_path / f"{strategy}.jsonl"
        proc = run_cli("export", "--checkpoint", checkpoint, "--out", str(out), "--strategy", strategy, "--k", "10",
                       "--format", "jsonl", "--chunk-users", "50", "--device", "cpu")
        assert proc.returncode == 0, proc.stderr
        exported[strategy] = {r["user_id"]: r for r in map(json.loads, open(out))}
    users = random.Random(0).sample(sorted(exported["full"]), 25)
    compared = 0
    with running_server(checkpoint, tmp_path, device="cpu") as (url, _):
        for strategy, rows in exported.items():
            for user in users:
                r = httpx.post(f"{url}/recommend", json={"user_id": user, "k": 10, "strategy": strategy}, timeout=30)
                assert r.status_code == 200, r.text
                served, row = r.json(), rows[user]
                assert served["strategy"] == row["strategy"] and served["model_version"] == row["model_version"]
                assert [e["item_id"] for e in row["items"]] == [e["item_id"] for e in served["items"]], (strategy, user)
                np.testing.assert_allclose([e["score"] for e in row["items"]], [e["score"] for e in served["items"]],
                                           rtol=1e-5, atol=1e-6)
                compared += 1
    assert compared == 75
