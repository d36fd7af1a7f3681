"""Cold start through real HTTP (issue 11): an anonymous session's history is folded in; feedback creates users and
items live (bounded), they survive a restart (replay) and a training run + reload replaces them with trained rows.
The model side (fold-in's gradient, determinism) is tests/model/test_foldin.py, quality against popularity
tests/training/test_coldstart.py."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.harness.scenarios import known_ids, tiny_train_args, write_tiny_csv
from tests.harness.servers import ROOT, running_server
from model.store.checkpoint import load_checkpoint
from model.store.events import open_store
from training.train import TrainConfig, train

pytestmark = pytest.mark.slow


@dataclass
class Tiny:
    data: Path
    checkpoint: Path
    users: list[str]
    items: list[str]
    histories: dict[str, list[str]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    d = tmp_path_factory.mktemp("foldin-api")
    data = write_tiny_csv(d / "interactions.csv")
    train(TrainConfig(**tiny_train_args(data, d / "model.ckpt", seed=0)), log=lambda *a, **k: None)
    ckpt = load_checkpoint(str(d / "model.ckpt"))
    histories: dict[str, list[str]] = {}
    for u, i in ckpt.seen.tolist():
        histories.setdefault(ckpt.user_ids[u], []).append(ckpt.item_ids[i])
    return Tiny(data, d / "model.ckpt", ckpt.user_ids, ckpt.item_ids, histories)


def post(url: str, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=30, **kw)


def listed(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return [x["item_id"] for x in r.json()["items"]]


def test_an_anonymous_history_is_personalised_by_fold_in_and_stores_nothing(tiny, tmp_path):
    history = tiny.histories[tiny.users[0]][:6]
    with running_server(tiny.checkpoint, tmp_path, max_history=8) as (url, _):
        before = httpx.get(f"{url}/health").json()
        r = post(url, "/recommend", {"history": history, "k": 10})
        body = r.json()
        assert r.status_code == 200 and body["user_id"] is None and body["cold_start"] == "fold_in", body
        assert "fallback" not in body and body["strategy"] and len(body["items"]) == 10
        assert not set(history) & set(listed(r))
        assert listed(post(url, "/recommend", {"history": history, "k": 10})) == listed(r)  # deterministic
        # an unknown user_id with a history is folded in the same way, and its id is echoed
        named = post(url, "/recommend", {"user_id": "someone-new", "history": history, "k": 10})
        assert named.json()["user_id"] == "someone-new" and listed(named) == listed(r)
        # a history is not a list of popular items: two users' histories give two lists
        other = post(url, "/recommend", {"history": tiny.histories[tiny.users[1]][:6], "k": 10})
        assert listed(other) != listed(r)
        after = httpx.get(f"{url}/health").json()
        assert (after["users"], after["interactions"], after["live_users"]) == \
            (before["users"], before["interactions"], 0)
        # unknown history ids follow ignore_unknown; a history past CMN_MAX_HISTORY is refused
        r = post(url, "/recommend", {"history": history + ["no-such-item"]})
        assert r.status_code == 422 and r.json()["detail"]["field"] == "history"
        r = post(url, "/recommend", {"history": history + ["no-such-item"], "ignore_unknown": True, "k": 10})
        assert listed(r) == listed(named)
        r = post(url, "/recommend", {"history": tiny.items[:9]})
        assert r.status_code == 422 and "at most 8" in r.text
        assert post(url, "/recommend", {"k": 3}).status_code == 422  # neither a user nor a history
        # a known user's history is folded into its seen-set for this call: those items are left out
        user = tiny.users[2]
        fresh = [i for i in tiny.items if i not in tiny.histories[user]][:5]
        r = post(url, "/recommend", {"user_id": user, "history": fresh[:2], "candidates": fresh, "k": 5})
        assert r.json().get("cold_start") is None and listed(r) and not set(fresh[:2]) & set(listed(r))


def test_feedback_creates_a_user_live_and_a_restart_replays_it(tiny, tmp_path):
    fed = tiny.histories[tiny.users[3]][:5]
    events = {"events": [{"user_id": "newcomer", "item_id": i, "event_id": f"n-{i}"} for i in fed]}
    with running_server(tiny.checkpoint, tmp_path) as (url, _):
        assert post(url, "/recommend", {"user_id": "newcomer"}).json()["fallback"] == "unknown_user"
        r = post(url, "/feedback", events)
        assert r.status_code == 200 and (r.json()["applied"], r.json()["deferred"]) == (5, 0), r.text
        r = post(url, "/recommend", {"user_id": "newcomer", "k": 20})
        assert r.json()["cold_start"] == "live_user" and "fallback" not in r.json()
        first = listed(r)
        assert len(first) == 20 and not set(fed) & set(first)
        health = httpx.get(f"{url}/health").json()
        assert health["live_users"] == 1 and health["users"] == len(tiny.users) + 1
    with running_server(tiny.checkpoint, tmp_path) as (url, _):  # same store: replayed at start-up
        r = post(url, "/recommend", {"user_id": "newcomer", "k": 20})
        assert r.json()["cold_start"] == "live_user" and listed(r) == first


def test_a_new_item_becomes_a_candidate_and_joins_its_users_neighbourhood(tiny, tmp_path):
    fans = tiny.users[:3]
    with running_server(tiny.checkpoint, tmp_path, allow_explain="true") as (url, _):
        r = post(url, "/recommend", {"user_id": tiny.users[5], "candidates": ["brand-new"]})
        assert r.status_code == 422  # unknown until someone interacts with it
        r = post(url, "/feedback", {"events": [{"user_id": u, "item_id": "brand-new"} for u in fans]})
        assert r.status_code == 200 and r.json()["applied"] == 3, r.text
        r = post(url, "/recommend", {"user_id": tiny.users[5], "candidates": ["brand-new", tiny.items[0]], "k": 2,
                                     "explain": True})
        item = next(x for x in r.json()["items"] if x["item_id"] == "brand-new")
        assert item["live"] is True
        # N(brand-new) holds exactly its three users: the attention explains it by them
        assert {n["user_id"] for n in item["explanation"]} == set(fans)
        # and the whole catalogue holds it
        r = post(url, "/recommend", {"user_id": tiny.users[5], "k": 1000, "strategy": "full"})
        assert "brand-new" in listed(r)
        assert "brand-new" not in listed(post(url, "/recommend", {"user_id": fans[0], "k": 1000}))  # seen
        assert httpx.get(f"{url}/health").json()["live_items"] == 1


def test_past_the_live_user_bound_events_are_stored_and_deferred(tiny, tmp_path):
    with running_server(tiny.checkpoint, tmp_path, max_live_users=1) as (url, _):
        item = tiny.items[0]
        assert post(url, "/feedback", {"events": [{"user_id": "first", "item_id": item}]}).json()["applied"] == 1
        r = post(url, "/feedback", {"events": [{"user_id": "second", "item_id": item, "event_id": "s"}]})
        assert r.status_code == 202 and r.json()["deferred"] == 1 and "CMN_MAX_LIVE_USERS" in r.json()["note"]
        assert post(url, "/recommend", {"user_id": "second"}).json()["fallback"] == "unknown_user"
        assert post(url, "/recommend", {"user_id": "first"}).json()["cold_start"] == "live_user"
    store = open_store(str(tmp_path / "feedback.sqlite3"), readonly=True)
    verified = {e.user_id: e.verified for _, e in store.events()}
    store.close()
    assert verified == {"first": True, "second": False}


def test_a_training_run_absorbs_live_users_and_a_reload_replaces_their_rows(tiny, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    serving = models / "model.ckpt"
    serving.write_bytes(tiny.checkpoint.read_bytes())
    fed = tiny.histories[tiny.users[4]][:5]
    store = tmp_path / "feedback.sqlite3"
    with running_server(serving, tmp_path, api_key="k") as (url, _):
        post(url, "/feedback", {"events": [{"user_id": "newcomer", "item_id": i} for i in fed]}).raise_for_status()
        assert post(url, "/recommend", {"user_id": "newcomer"}).json()["cold_start"] == "live_user"
        args = tiny_train_args(tiny.data, models / "next.ckpt", seed=0)
        proc = subprocess.run([sys.executable, "-m", "training", "train", "--data", args["data"], "--out",
                               args["out"], "--epochs", "1", "--pretrain-epochs", "1", "--neg", "1", "--embed-size",
                               "16", "--hops", "2", "--device", "cpu", "--holdout", "none", "--no-validation",
                               "--no-full-eval", "--quiet", "--feedback", f"sqlite:///{store}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "MPLBACKEND": "Agg"}, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr
        assert "newcomer" in known_ids(models / "next.ckpt")[0]
        r = post(url, "/admin/reload", {"checkpoint": "next.ckpt"}, headers={"X-API-Key": "k"})
        assert r.status_code == 200, r.text
        health = httpx.get(f"{url}/health").json()
        assert (health["live_users"], health["users"]) == (0, len(tiny.users) + 1)
        r = post(url, "/recommend", {"user_id": "newcomer", "k": 20})
        assert "cold_start" not in r.json() and "fallback" not in r.json() and not set(fed) & set(listed(r))
