"""Impressions and experiments through real HTTP, two real server processes sharing one store, on SQLite and on
PostgreSQL (issue 22): a user's arm is the same on both processes (and the one the file's shares give); impressions
recorded by one are joined with feedback sent to the other, in the store and in /metrics per arm; an arm stopped
through one process's /admin stops on both without a restart, and resumes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.experiments import arm_of, read_experiment
from model.store.events import open_store
from tests.harness.servers import ROOT, free_port, running_server, wait_until
from training.online import online_metrics

pytestmark = pytest.mark.slow

DEADLINE_S = 10
ADMIN = {"X-API-Key": "e2e-admin"}


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    return request.getfixturevalue("postgres_url")


def servers(stack: ExitStack, checkpoint: str, tmp_path: Path, **env) -> list[str]:
    urls = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        urls.append(stack.enter_context(running_server(checkpoint, tmp_path / name, **env))[0])
    return urls


def samples(url: str, name: str) -> dict[tuple, float]:
    """The /metrics samples called `name`: label values (sorted by label name) → value."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {tuple(v for _, v in sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if s.name == name}


def recommend(url: str, user: str) -> dict:
    r = httpx.post(f"{url}/recommend", json={"user_id": user, "k": 5}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_impressions_arms_and_stopping_across_two_processes(api_checkpoint, tmp_path, store_url):
    experiment = tmp_path / "experiment.json"
    experiment.write_text(json.dumps({"name": "e2e", "arms": [
        {"name": "control", "strategy": "full", "share": 0.5}, {"name": "treatment", "strategy": "full",
                                                                 "share": 0.5}]}))
    users = [str(u) for u in range(1, 41)]
    expected = {u: arm_of(read_experiment(str(experiment)), u).name for u in users}
    with ExitStack() as stack:
        a, b = servers(stack, api_checkpoint, tmp_path, feedback_url=store_url, experiment_file=experiment,
                       api_key=ADMIN["X-API-Key"], impression_flush_s=0.05, feedback_poll_s=0.05)
        shown = {u: recommend(a, u) for u in users}
        assert {u: s["arm"] for u, s in shown.items()} == expected == {u: recommend(b, u)["arm"] for u in users}
        assert set(expected.values()) == {"control", "treatment"}
        store = open_store(store_url)
        stack.callback(store.close)
        wait_until(lambda: store.impression_count() == 2 * len(users), "both processes' impressions written")

        # feedback sent to B names A's impressions: the item at position 2, for every third user
        clicked = users[::3]
        events = [{"user_id": u, "item_id": shown[u]["items"][1]["item_id"], "impression_id": shown[u]["impression_id"],
                   "position": 2} for u in clicked]
        r = httpx.post(f"{b}/feedback", json={"events": events}, timeout=10)
        assert r.status_code == 200 and r.json()["stored"] == len(clicked) and r.json()["unjoined"] == 0, r.text
        per_arm = {arm: sum(expected[u] == arm for u in clicked) for arm in ("control", "treatment")}
        report = online_metrics(store.impressions(), store.clicks())
        arms = {row["arm"]: row for row in report["arms"]}
        for arm in ("control", "treatment"):
            assert arms[arm]["impressions"] == 2 * sum(v == arm for v in expected.values())
            assert arms[arm]["clicked"] == per_arm[arm] and arms[arm]["hit_rate"]["hr@1"] == 0.0
        # /metrics: A counts the impressions it recorded per arm, B the clicks it joined per arm
        version = shown[users[0]]["model_version"]
        assert samples(a, "cmn_impressions_total") == {
            (arm, version, "full"): float(sum(v == arm for v in expected.values())) for arm in per_arm}
        assert samples(b, "cmn_online_clicks_total") == {(arm, version, "full"): float(n) for arm, n in per_arm.items()}

        # stop the treatment through A: both processes serve its users outside the experiment, without a restart
        treated = [u for u in users if expected[u] == "treatment"]
        r = httpx.post(f"{a}/admin/experiment/arms/treatment/stop", headers=ADMIN, timeout=10)
        assert r.status_code == 200 and {x["name"]: x["stopped"] for x in r.json()["arms"]} == {
            "control": False, "treatment": True}, r.text
        assert all("arm" not in recommend(a, u) for u in treated)
        wait_until(lambda: all("arm" not in recommend(b, u) for u in treated), "B stops the arm")
        assert all(recommend(b, u)["arm"] == "control" for u in users if expected[u] == "control")
        assert httpx.get(f"{b}/admin/experiment", headers=ADMIN).json()["arms"][1]["stopped"]
        r = httpx.post(f"{b}/admin/experiment/arms/treatment/resume", headers=ADMIN, timeout=10)
        assert r.status_code == 200
        wait_until(lambda: all(recommend(a, u).get("arm") == "treatment" for u in treated), "A resumes the arm")
        # the admin routes need the admin key, and name only the experiment's arms
        assert httpx.post(f"{a}/admin/experiment/arms/treatment/stop").status_code == 401
        r = httpx.post(f"{a}/admin/experiment/arms/nope/stop", headers=ADMIN)
        assert r.status_code == 404 and "no arm 'nope'" in r.text


def test_python_m_app_refuses_an_experiment_file_it_cannot_use(api_checkpoint, tmp_path):
    (tmp_path / "experiment.json").write_text(json.dumps({"name": "e", "arms": [
        {"name": "a", "strategy": "full", "share": 0.8}, {"name": "b", "strategy": "full", "share": 0.8}]}))
    proc = subprocess.run([sys.executable, "-m", "app"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CMN_CHECKPOINT": api_checkpoint, "CMN_PORT": str(free_port()),
                               "CMN_EXPERIMENT_FILE": str(tmp_path / "experiment.json"),
                               "CMN_FEEDBACK_PATH": str(tmp_path / "feedback.sqlite3")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: experiment file") and "add up to 1.6, more than 1" in proc.stderr
