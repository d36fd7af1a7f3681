"""Impressions and experiments through the app in-process (the HTTP contract, the store behind it): every answer
names its impression; sampled ones reach the store off the request path; feedback may name them (validated,
unknown ones stored unjoined); arms serve their strategy, follow the file when it changes, and an arm the model
cannot serve serves nobody. Across real server processes and on PostgreSQL: tests/e2e/test_impressions_http.py."""
from __future__ import annotations

import asyncio
import json
import os

import pytest

from app.experiments import ExperimentFileError, arm_of, read_experiment
from app.impressions import Impressions
from app.models import UNLOADABLE
from app.service import Service
from conftest import read_only, serving, settings_for, staged_checkpoint, synthetic_checkpoint, wait_ready
from model.recommender import Recommender
from model.store.checkpoint import load_checkpoint
from model.store.events import open_store

pytestmark = pytest.mark.anyio


def store_of(tmp_path):
    return open_store(str(tmp_path / "feedback.sqlite3"), readonly=True)


async def until(condition, what: str, timeout: float = 30):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if value := condition():
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {timeout} s: {what}")


def write_experiment(path, arms: list[dict], name: str = "exp") -> str:
    path.write_text(json.dumps({"name": name, "arms": arms}))
    return str(path)


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> str:
    """A model offering every strategy (full, two_stage, retrieval)."""
    return staged_checkpoint(tmp_path_factory.mktemp("staged") / "model.ckpt", n_users=60, n_items=120, seed=2)


async def test_every_answer_names_its_impression_and_the_store_gets_what_was_shown(api_checkpoint, tmp_path):
    async with serving(settings_for(api_checkpoint, tmp_path, impression_flush_s=0.02)) as client:
        await wait_ready(client)
        one = (await client.post("/recommend", json={"user_id": "3", "k": 4})).json()
        batch = (await client.post("/recommend/batch", json={"requests": [
            {"user_id": "4", "k": 2}, {"user_id": "no-such-user", "k": 3}]})).json()["results"]
        answers = [one, *batch]
        ids = [a["impression_id"] for a in answers]
        assert len(set(ids)) == 3 and all("arm" not in a for a in answers)
        store = store_of(tmp_path)
        stored = await until(lambda: len(store.impressions()) == 3 and store.impressions(), "impressions written")
        by_id = {i.impression_id: i for i in stored}
        for a in answers:
            i = by_id[a["impression_id"]]
            assert (i.user_id, i.items, i.model_version, i.arm) == (
                a["user_id"], tuple(x["item_id"] for x in a["items"]), a["model_version"], None)
        assert by_id[ids[0]].strategy == one["strategy"] and by_id[ids[2]].strategy == "popularity"


async def test_feedback_names_impressions_and_positions(api_checkpoint, tmp_path):
    async with serving(settings_for(api_checkpoint, tmp_path, impression_flush_s=0.02)) as client:
        await wait_ready(client)
        shown = (await client.post("/recommend", json={"user_id": "3", "k": 3})).json()
        second = shown["items"][1]["item_id"]
        r = await client.post("/feedback", json={"events": [
            {"user_id": "3", "item_id": second, "impression_id": shown["impression_id"], "position": 2},
            {"user_id": "3", "item_id": shown["items"][0]["item_id"], "impression_id": "never-shown"}]})
        assert r.status_code == 200 and r.json()["stored"] == 2 and r.json()["unjoined"] == 1, r.text
        store = store_of(tmp_path)
        await until(lambda: store.impression_count() == 1, "the impression written")
        assert [(c.impression_id, c.item_id, c.position) for c in store.clicks()] == [
            (shown["impression_id"], second, 2)]
        metrics = (await client.get("/metrics")).text
        assert f'cmn_online_clicks_total{{arm="none",model_version="{shown["model_version"]}",strategy="full"}} 1.0' \
            in metrics
        assert 'cmn_feedback_impressions_total{outcome="unjoined"} 1.0' in metrics
        for bad, field in (({"position": 2}, "position needs the impression_id"),
                           ({"impression_id": "no spaces"}, "impression_id"),
                           ({"impression_id": shown["impression_id"], "position": 0}, "position")):
            r = await client.post("/feedback", json={"events": [{"user_id": "3", "item_id": second, **bad}]})
            assert r.status_code == 422 and field in r.text, r.text


async def test_the_service_enforces_the_retention(api_checkpoint, tmp_path, monkeypatch):
    """At most CMN_IMPRESSION_MAX_ROWS stay in the store, the newest (pruned here at every flush, not every
    minute)."""
    import app.impressions
    monkeypatch.setattr(app.impressions, "PRUNE_EVERY_S", 0.0)
    async with serving(settings_for(api_checkpoint, tmp_path, impression_flush_s=0.02,
                                    impression_max_rows=3)) as client:
        await wait_ready(client)
        ids = [(await client.post("/recommend", json={"user_id": str(u)})).json()["impression_id"] for u in range(8)]
        store = store_of(tmp_path)
        await until(lambda: [i.impression_id for i in store.impressions()] == ids[-3:], "the newest 3 kept")


async def test_sampling_zero_records_nothing_but_still_names_answers(api_checkpoint, tmp_path):
    async with serving(settings_for(api_checkpoint, tmp_path, impression_sample=0.0,
                                    impression_flush_s=0.02)) as client:
        await wait_ready(client)
        answer = (await client.post("/recommend", json={"user_id": "3"})).json()
        r = await client.post("/feedback", json={"events": [
            {"user_id": "3", "item_id": answer["items"][0]["item_id"], "impression_id": answer["impression_id"]}]})
        assert answer["impression_id"] and r.json()["unjoined"] == 1
        await asyncio.sleep(0.2)
        assert store_of(tmp_path).impression_count() == 0


async def test_arms_serve_their_strategy_and_follow_the_file(staged, tmp_path):
    path = write_experiment(tmp_path / "exp.json", [{"name": "retrieval", "strategy": "retrieval", "share": 1.0}])
    async with serving(settings_for(staged, tmp_path, experiment_file=path, feedback_poll_s=0.02,
                                    impression_flush_s=0.02)) as client:
        await wait_ready(client)
        users = [str(u) for u in range(1, 6)]

        async def served(user: str, **kw) -> dict:
            r = await client.post("/recommend", json={"user_id": user, **kw})
            assert r.status_code == 200, r.text
            return r.json()
        answers = [await served(user) for user in users]
        assert {(a["arm"], a["strategy"]) for a in answers} == {("retrieval", "retrieval")}
        # a request that names its strategy, and an anonymous session, are outside the experiment
        answers.append(await served(users[0], strategy="full"))
        history = [x["item_id"] for x in answers[0]["items"][:2]]
        answers.append((await client.post("/recommend", json={"history": history})).json())
        assert "arm" not in answers[-1] and "arm" not in answers[-2]
        # the file changes: every user moves to the new arm without a restart
        write_experiment(tmp_path / "exp.json", [{"name": "full", "strategy": "full", "share": 1.0}])
        os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10 ** 9))
        for _ in range(1000):
            if (await served(users[0])).get("arm") == "full":
                break
            await asyncio.sleep(0.02)
        answers += [await served(u) for u in users]
        assert [a["arm"] for a in answers[-5:]] == ["full"] * 5
        # a file that cannot be used keeps the experiment running
        (tmp_path / "exp.json").write_text("{not json")
        os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 2 * 10 ** 9))
        await asyncio.sleep(0.3)
        assert (await served(users[1]))["arm"] == "full"
        # each impression stored has the arm and strategy its answer named
        store = store_of(tmp_path)
        stored = await until(lambda: {i.impression_id: i for i in store.impressions()} if store.impression_count()
                             >= len(answers) + 2 else None, "impressions written")
        assert all((stored[a["impression_id"]].arm, stored[a["impression_id"]].strategy) ==
                   (a.get("arm"), a["strategy"]) for a in answers)


async def test_an_arm_the_model_cannot_serve_serves_nobody(api_checkpoint, tmp_path):
    """api_checkpoint has no retrieval stage: the two_stage arm's users get the model's own default, and no arm."""
    path = write_experiment(tmp_path / "exp.json", [{"name": "full", "strategy": "full", "share": 0.5},
                                                    {"name": "staged", "strategy": "two_stage", "share": 0.5}])
    experiment = read_experiment(path)
    users = [str(u) for u in range(40)]
    expected = {u: arm_of(experiment, u).name for u in users}
    assert set(expected.values()) == {"full", "staged"}
    async with serving(settings_for(api_checkpoint, tmp_path, experiment_file=path)) as client:
        await wait_ready(client)
        for u in users:
            a = (await client.post("/recommend", json={"user_id": u})).json()
            assert a.get("arm") == ("full" if expected[u] == "full" else None) and a["strategy"] == "full"


@pytest.mark.parametrize("text, problem", [
    ("{", "not JSON"),
    (json.dumps({"name": "e", "arms": []}), "arms"),
    (json.dumps({"name": "e", "arms": [{"name": "a", "strategy": "full", "share": 0.7},
                                       {"name": "b", "strategy": "full", "share": 0.7}]}), "more than 1"),
    (json.dumps({"name": "e", "arms": [{"name": "a", "strategy": "full", "share": 0.5},
                                       {"name": "a", "strategy": "full", "share": 0.5}]}), "repeat"),
    (json.dumps({"name": "e", "arms": [{"name": "a b", "strategy": "full", "share": 0.5}]}), "arms.0.name"),
    (json.dumps({"name": "e", "arms": [{"name": "a", "strategy": "best", "share": 0.5}]}), "arms.0.strategy"),
])
def test_an_experiment_file_that_cannot_be_used_stops_the_start(api_checkpoint, tmp_path, text, problem):
    (tmp_path / "exp.json").write_text(text)
    with pytest.raises(ExperimentFileError, match=problem):
        Service(settings_for(api_checkpoint, tmp_path, experiment_file=str(tmp_path / "exp.json")))


async def test_the_buffer_is_bounded_while_the_store_cannot_be_written(tmp_path):
    """Impressions wait in memory while the store is read-only, the oldest dropped past CMN_IMPRESSION_BUFFER,
    and the rest reach the store once it is writable again."""
    from concurrent.futures import ThreadPoolExecutor
    from app.settings import Settings
    path = tmp_path / "feedback.sqlite3"
    store = open_store(str(path))
    impressions = Impressions(Settings(impression_buffer=3), store, ThreadPoolExecutor(1))
    ids = [impressions.record("u", ("i",), "full", "v", None) for _ in range(5)]
    assert [i.impression_id for i in impressions.pending] == ids[2:]
    with read_only(path):
        store.close()
        store = impressions.store = open_store(str(path))
        assert await impressions.flush() == 0 and impressions.fault
        ids.append(impressions.record("u", ("i",), "full", "v", None))
        assert [i.impression_id for i in impressions.pending] == ids[3:]
    assert await impressions.flush() == 3 and impressions.fault is None
    assert [i.impression_id for i in store.impressions()] == ids[3:]
    store.close()


async def test_the_admin_routes_without_an_experiment(api_checkpoint, tmp_path):
    async with serving(settings_for(api_checkpoint, tmp_path, api_key="adm")) as client:
        await wait_ready(client)
        r = await client.get("/admin/experiment", headers={"X-API-Key": "adm"})
        assert r.status_code == 200 and r.json() == {"name": None, "arms": []}
        r = await client.post("/admin/experiment/arms/a/stop", headers={"X-API-Key": "adm"})
        assert r.status_code == 404 and "no experiment is running" in r.json()["detail"]
        r = await client.post("/admin/experiment/arms/a/pause", headers={"X-API-Key": "adm"})
        assert r.status_code == 422


def offline_lists(path: str, users: list[str], k: int, exclude: dict[str, list[str]] | None = None) -> dict:
    """Each user's top-k item ids by `Recommender` over the checkpoint itself (optionally excluding items)."""
    ckpt = load_checkpoint(path)
    rec = Recommender.from_checkpoint(ckpt)
    user_index = {u: n for n, u in enumerate(ckpt.user_ids)}
    item_index = {i: n for n, i in enumerate(ckpt.item_ids)}
    exclude = exclude or {}
    items, _ = rec.recommend([user_index[u] for u in users], k=k, strategy="full",
                             exclude=[[item_index[i] for i in exclude.get(u, [])] for u in users])
    return {u: [ckpt.item_ids[j] for j in row] for u, row in zip(users, items.tolist())}


async def test_an_arm_serves_its_own_model_version_beside_the_served_one(tmp_path):
    """Two checkpoints: A is served, arm "b" names B's version and file. Each user's list comes from its arm's model
    (as `Recommender` over that checkpoint ranks it), answer and impression name that version, feedback reaches B's
    engine too; stopping the arm returns its users to A, removing it unloads B, and a version that cannot be loaded
    serves nobody (and /health says so without a path)."""
    models = tmp_path / "models"
    models.mkdir()
    a = synthetic_checkpoint(models / "a.ckpt", n_users=60, n_items=300, seed=0)
    b = synthetic_checkpoint(models / "b.ckpt", n_users=60, n_items=300, seed=1)
    va, vb = load_checkpoint(a).model_version, load_checkpoint(b).model_version
    assert va != vb
    arms = [{"name": "a", "strategy": "full", "share": 0.5},
            {"name": "b", "strategy": "full", "share": 0.5, "model_version": vb, "checkpoint": "b.ckpt"}]
    path = write_experiment(tmp_path / "exp.json", arms)
    users = [u for u in load_checkpoint(a).user_ids if u in set(load_checkpoint(b).user_ids)][:24]
    experiment = read_experiment(path)
    expected = {u: arm_of(experiment, u).name for u in users}
    assert set(expected.values()) == {"a", "b"}
    by_a, by_b = offline_lists(a, users, 5), offline_lists(b, users, 5)

    def rewrite(arms: list[dict], bump: int) -> None:
        write_experiment(tmp_path / "exp.json", arms)
        os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + bump * 10 ** 9))

    async with serving(settings_for(a, tmp_path, experiment_file=path, feedback_poll_s=0.02,
                                    impression_flush_s=0.02)) as client:
        await wait_ready(client)

        async def health() -> dict:
            return (await client.get("/health")).json()

        async def served(user: str) -> dict:
            r = await client.post("/recommend", json={"user_id": user, "k": 5})
            assert r.status_code == 200, r.text
            return r.json()

        async def arm_models(want: list[dict]) -> None:
            for _ in range(1500):
                if (await health())["arm_models"] == want:
                    return
                await asyncio.sleep(0.02)
            raise AssertionError(f"arm_models never became {want}: {(await health())['arm_models']}")

        await arm_models([{"model_version": vb, "status": "ok"}])
        answers = [await served(u) for u in users]
        for u, ans in zip(users, answers):
            arm, version, lists = ("b", vb, by_b) if expected[u] == "b" else ("a", va, by_a)
            assert (ans["arm"], ans["model_version"]) == (arm, version)
            assert [x["item_id"] for x in ans["items"]] == lists[u]
        # a batch mixing both arms is answered by both models
        batch = (await client.post("/recommend/batch", json={"requests": [{"user_id": u, "k": 5} for u in users]})
                 ).json()
        assert [(r["arm"], r["model_version"], [x["item_id"] for x in r["items"]]) for r in batch["results"]] == \
            [(x["arm"], x["model_version"], [i["item_id"] for i in x["items"]]) for x in answers]
        assert batch["model_version"] == va
        # each impression names the version that gave its list
        store = store_of(tmp_path)
        stored = await until(lambda: {i.impression_id: i for i in store.impressions()}
                             if store.impression_count() >= 2 * len(users) else None, "impressions written")
        assert all((stored[x["impression_id"]].arm, stored[x["impression_id"]].model_version) ==
                   (x["arm"], x["model_version"]) for x in answers)
        # feedback reaches B's engine: a b-user's clicked item leaves its list, as B ranks it without that item
        user_b = next(u for u in users if expected[u] == "b")
        clicked = by_b[user_b][0]
        r = await client.post("/feedback", json={"events": [{"user_id": user_b, "item_id": clicked}]})
        assert r.status_code == 200, r.text
        after = await served(user_b)
        assert [x["item_id"] for x in after["items"]] == offline_lists(b, [user_b], 5, {user_b: [clicked]})[user_b]
        # stopping the arm returns its users to A, and B is dropped
        rewrite([arms[0], {**arms[1], "stopped": True}], 1)
        await arm_models([])
        for u in users:
            if expected[u] == "b" and u != user_b:
                ans = await served(u)
                assert ("arm" not in ans, ans["model_version"], [x["item_id"] for x in ans["items"]]) == \
                    (True, va, by_a[u])
        # resumed it loads again; removed from the file, its model is unloaded
        rewrite(arms, 2)
        await arm_models([{"model_version": vb, "status": "ok"}])
        rewrite(arms[:1], 3)
        await arm_models([])
        # a version that cannot be loaded serves nobody, and /health says so without naming a path
        rewrite([arms[0], {"name": "c", "strategy": "full", "share": 0.5, "model_version": "v-none"}], 4)
        for _ in range(1500):
            if (await health())["arm_models"]:
                break
            await asyncio.sleep(0.02)
        (fault,) = (await health())["arm_models"]
        assert fault["model_version"] == "v-none" and fault["status"] == "failed" and str(tmp_path) not in \
            fault["detail"]
        ans = await served(next(u for u in users if expected[u] == "b"))
        assert "arm" not in ans and ans["model_version"] == va


async def test_an_arm_without_a_checkpoint_serves_the_newest_published_with_its_version(tmp_path):
    """B was rolled out, then A again (a rollback): an arm naming B's version alone is served by B's file; an arm
    whose checkpoint holds another version than it names serves nobody."""
    models = tmp_path / "models"
    models.mkdir()
    a = synthetic_checkpoint(models / "a.ckpt", n_users=60, n_items=300, seed=0)
    b = synthetic_checkpoint(models / "b.ckpt", n_users=60, n_items=300, seed=1)
    va, vb = load_checkpoint(a).model_version, load_checkpoint(b).model_version
    store = open_store(str(tmp_path / "feedback.sqlite3"))
    store.publish_checkpoint(b, vb)
    store.publish_checkpoint(a, va)
    store.close()
    path = write_experiment(tmp_path / "exp.json", [
        {"name": "b", "strategy": "full", "share": 0.5, "model_version": vb},
        {"name": "wrong", "strategy": "full", "share": 0.5, "model_version": "v-other", "checkpoint": "b.ckpt"}])
    users = load_checkpoint(a).user_ids[:30]
    expected = {u: arm_of(read_experiment(path), u).name for u in users}
    assert set(expected.values()) == {"b", "wrong"}
    by_b = offline_lists(b, users, 5)
    async with serving(settings_for(a, tmp_path, experiment_file=path, feedback_poll_s=0.02)) as client:
        await wait_ready(client)
        want = [{"model_version": vb, "status": "ok"},
                {"model_version": "v-other", "status": "failed", "detail": UNLOADABLE}]
        for _ in range(1500):
            if (health := (await client.get("/health")).json())["arm_models"] == want:
                break
            await asyncio.sleep(0.02)
        assert health["model_version"] == va and health["arm_models"] == want
        for u in users:
            ans = (await client.post("/recommend", json={"user_id": u, "k": 5})).json()
            if expected[u] == "b":
                assert (ans["arm"], ans["model_version"], [x["item_id"] for x in ans["items"]]) == ("b", vb, by_b[u])
            else:
                assert "arm" not in ans and ans["model_version"] == va
