"""Served = exported: for every strategy a checkpoint offers, `python -m training export`'s lists are the lists the
real server (`python -m app`, over HTTP) answers to /recommend for the same users."""
import json
import random

import httpx
import numpy as np
import pytest

from conftest import staged_checkpoint
from tests.harness.servers import running_server
from training.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return staged_checkpoint(tmp_path_factory.mktemp("served") / "model.ckpt", n_users=120, n_items=250, seed=5)


def test_exported_lists_are_the_served_lists(checkpoint, tmp_path):
    exported = {}
    for strategy in ("full", "two_stage", "retrieval"):
        out = tmp_path / f"{strategy}.jsonl"
        # the command's own entry point, in-process (training/test_export.py runs it as a real process once)
        assert main(["export", "--checkpoint", checkpoint, "--out", str(out), "--strategy", strategy, "--k", "10",
                     "--format", "jsonl", "--chunk-users", "50", "--device", "cpu"]) == 0
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
