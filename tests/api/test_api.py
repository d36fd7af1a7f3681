"""The HTTP contract (docs/api.md) in-process: the real FastAPI app over httpx's ASGI transport, lifespan run.

Every answer is checked against ground truth computed here from the checkpoint itself (its seen pairs, its
training popularity, its neighbourhoods, and the offline scorer), not against the server's own helpers.
"""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import app.models as models_module
from app.engine import Engine
from app.settings import Settings
from model.store.checkpoint import load_checkpoint
from model.scoring import Scorer
from conftest import serving, settings_for, wait_ready
from bad_inputs import BAD_INPUTS, assert_rejected, request_for
from bad_inputs import IDS as BAD_INPUT_IDS

pytestmark = pytest.mark.anyio

TOL = 1e-4           # served vs offline scores (float32 arithmetic in different batch shapes)
UNKNOWN_USER = "no-such-user-\u00e9"
ADMIN_KEY = "adm-test-key-0123456789abcdef"


# --------------------------------------------------------------------------- ground truth

class Truth:
    """What the checkpoint says, in external ids."""

    def __init__(self, path: str):
        ckpt = load_checkpoint(path)
        self.ckpt = ckpt
        self.version = ckpt.model_version
        self.user_ids, self.item_ids = ckpt.user_ids, ckpt.item_ids
        self.user_index = {u: n for n, u in enumerate(self.user_ids)}
        self.item_index = {i: n for n, i in enumerate(self.item_ids)}
        self.seen = [set() for _ in self.user_ids]
        for u, i in ckpt.seen.tolist():
            self.seen[u].add(self.item_ids[i])
        self.popularity = np.bincount(ckpt.train[:, 1], minlength=len(self.item_ids))
        indptr, indices = ckpt.item_users()
        self.neighbours = [[self.user_ids[v] for v in indices[indptr[j]:indptr[j + 1]]]
                           for j in range(len(self.item_ids))]
        self.scorer = Scorer(ckpt.build_model("cpu"), indptr, indices, device="cpu")
        self.full = torch.cat([self.scorer.score(torch.arange(s, min(s + 100, len(self.user_ids))))
                               for s in range(0, len(self.user_ids), 100)]).numpy()

    def score(self, user: str, item: str) -> float:
        return float(self.full[self.user_index[user], self.item_index[item]])

    def sample_users(self, n: int, seed: int = 0) -> list[str]:
        """`n` users, always including the one with the most seen items (the hardest exclude_seen case)."""
        rng = np.random.default_rng(seed)
        busiest = int(np.argmax([len(s) for s in self.seen]))
        others = rng.choice(len(self.user_ids), size=n - 1, replace=False)
        return [self.user_ids[busiest]] + [self.user_ids[u] for u in others if u != busiest][:n - 1]


@pytest.fixture(scope="module")
def ckpt_path(api_checkpoint) -> str:
    """A random CMN over a small synthetic data set (conftest.synthetic_checkpoint): every answer is checked
    against ground truth computed from the checkpoint itself, so what training learns does not matter here."""
    return api_checkpoint


@pytest.fixture(scope="module")
def truth(ckpt_path) -> Truth:
    return Truth(ckpt_path)


# --------------------------------------------------------------------------- app under test

@pytest.fixture(scope="module")
async def client(ckpt_path, tmp_path_factory):
    async with serving(settings_for(ckpt_path, tmp_path_factory.mktemp("api"))) as c:
        await wait_ready(c)
        yield c


@pytest.fixture(scope="module")
async def explain_client(ckpt_path, tmp_path_factory):
    async with serving(settings_for(ckpt_path, tmp_path_factory.mktemp("api-explain"), allow_explain=True)) as c:
        await wait_ready(c)
        yield c


async def recommend(client, **body) -> dict:
    r = await client.post("/recommend", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def ids(answer: dict) -> list[str]:
    return [x["item_id"] for x in answer["items"]]


def scores(answer: dict) -> list[float]:
    return [x["score"] for x in answer["items"]]


def assert_sorted(answer: dict) -> None:
    s = scores(answer)
    assert all(a >= b for a, b in zip(s, s[1:])), f"scores not descending: {s}"
    assert len(set(ids(answer))) == len(answer["items"]), "an item is listed twice"


# --------------------------------------------------------------------------- health and readiness

async def test_health_before_and_after_load(ckpt_path, truth, tmp_path, held_loading):
    """Loading is held on a gate, so 'before' is deterministic: /health 503 loading, /recommend 503 + Retry-After."""
    gate = held_loading
    async with serving(settings_for(ckpt_path, tmp_path)) as c:
        try:
            r = await c.get("/health")
            assert r.status_code == 503
            body = r.json()
            assert body["status"] == "loading"
            assert "model_version" not in body and "users" not in body
            for path, payload in (("/recommend", {"user_id": truth.user_ids[0]}),
                                  ("/recommend/batch", {"requests": [{"user_id": truth.user_ids[0]}]})):
                r = await c.post(path, json=payload)
                assert r.status_code == 503, r.text
                assert int(r.headers["retry-after"]) > 0
                assert "loading" in r.json()["detail"]
            # validation still answers 422 (not 503, not 500) while loading
            assert (await c.post("/recommend", json={"user_id": "1", "k": 0})).status_code == 422
        finally:
            gate.set()
        r = await wait_ready(c)
    body = r.json()
    assert body["status"] == "ok"
    assert body["model_version"] == truth.version
    assert body["device"] == "cpu"
    assert body["users"] == len(truth.user_ids) and body["items"] == len(truth.item_ids)
    assert isinstance(body["uptime_s"], (int, float)) and body["uptime_s"] >= 0


async def test_a_full_queue_sheds_load_with_503_and_loses_nothing_queued(ckpt_path, truth, tmp_path, monkeypatch):
    """The model thread is held on a gate: one 4-user batch being scored, one queued, which fills the queue (its
    limit counts scored pairs: 4 whole-catalogue requests), so the next request cannot be queued: 503 +
    Retry-After at once, and both earlier requests are still answered in full."""
    holding, entered, gate = threading.Event(), threading.Event(), threading.Event()

    class GatedEngine(Engine):
        def recommend(self, jobs):
            if holding.is_set():
                entered.set()
                gate.wait(60)
            return super().recommend(jobs)

    monkeypatch.setattr(models_module, "Engine", GatedEngine)
    users = truth.sample_users(8, seed=5)
    batch = [{"requests": [{"user_id": u, "k": 3} for u in users[n:n + 4]]} for n in (0, 4)]
    async with serving(settings_for(ckpt_path, tmp_path, max_queue_pairs=4 * len(truth.item_ids))) as c:
        await wait_ready(c)
        holding.set()
        try:
            scoring = asyncio.create_task(c.post("/recommend/batch", json=batch[0]))
            assert await asyncio.to_thread(entered.wait, 30)
            queued = asyncio.create_task(c.post("/recommend/batch", json=batch[1]))
            for _ in range(600):
                depth = [s.value for f in text_string_to_metric_families((await c.get("/metrics")).text)
                         if f.name == "cmn_queue_depth" for s in f.samples]
                if depth == [4]:
                    break
                await asyncio.sleep(0.05)
            assert depth == [4]
            r = await c.post("/recommend", json={"user_id": users[0], "k": 3})
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert "queue is full" in r.json()["detail"]
        finally:
            gate.set()
        for task, sent in ((scoring, batch[0]), (queued, batch[1])):
            r = await task
            assert r.status_code == 200, r.text
            assert [a["user_id"] for a in r.json()["results"]] == [q["user_id"] for q in sent["requests"]]
        holding.clear()
        assert (await c.post("/recommend", json={"user_id": users[0], "k": 3})).status_code == 200


async def test_concurrent_requests_are_scored_together(ckpt_path, truth, tmp_path, monkeypatch):
    """The micro-batcher, deterministically: one request holds the model thread on a gate while 6 more queue
    behind it; when the gate opens the 6 are scored in ONE model call, and each gets the answer it gets alone."""
    holding, entered, gate = threading.Event(), threading.Event(), threading.Event()
    calls: list[int] = []

    class GatedEngine(Engine):
        def recommend(self, jobs):
            if holding.is_set():
                calls.append(len(jobs))
                entered.set()
                gate.wait(60)
            return super().recommend(jobs)

    monkeypatch.setattr(models_module, "Engine", GatedEngine)
    users = truth.sample_users(7, seed=9)
    async with serving(settings_for(ckpt_path, tmp_path)) as c:
        await wait_ready(c)
        alone = [await recommend(c, user_id=u, k=5) for u in users]
        holding.set()
        try:
            first = asyncio.create_task(c.post("/recommend", json={"user_id": users[0], "k": 5}))
            assert await asyncio.to_thread(entered.wait, 30)
            rest = [asyncio.create_task(c.post("/recommend", json={"user_id": u, "k": 5})) for u in users[1:]]
            for _ in range(600):
                depth = [s.value for f in text_string_to_metric_families((await c.get("/metrics")).text)
                         if f.name == "cmn_queue_depth" for s in f.samples]
                if depth == [6]:
                    break
                await asyncio.sleep(0.05)
            assert depth == [6]
        finally:
            gate.set()
        answers = [r.json() for r in await asyncio.gather(first, *rest)]
    assert calls == [1, 6]
    for single, batched in zip(alone, answers):
        assert batched["user_id"] == single["user_id"] and ids(batched) == ids(single)
        assert np.allclose(scores(batched), scores(single), rtol=0, atol=1e-5)


async def test_health_when_the_checkpoint_cannot_load(tmp_path):
    async with serving(settings_for(str(tmp_path / "missing.ckpt"), tmp_path)) as c:
        deadline = asyncio.get_running_loop().time() + 120   # a bound for a busy machine, not a speed expectation
        while (r := await c.get("/health")).json()["status"] == "loading" and \
                asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert r.status_code == 503
        # the open /health says why only in general: the path, and what is or is not there, is the log's business
        assert r.json()["status"] == "failed" and "server log" in r.json()["detail"]
        assert str(tmp_path) not in r.text and "missing.ckpt" not in r.text
        r = await c.post("/recommend", json={"user_id": "1"})
        assert r.status_code == 503 and "retry-after" in r.headers


async def test_health_ok(client, truth):
    r = await client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model_version"] == truth.version and body["device"] == "cpu"
    assert (body["users"], body["items"]) == (len(truth.user_ids), len(truth.item_ids))
    assert body["uptime_s"] >= 0


# --------------------------------------------------------------------------- /recommend

async def test_full_catalogue_is_the_true_top_k_of_unseen_items(client, truth):
    for user in truth.sample_users(6):
        a = await recommend(client, user_id=user, k=25)
        assert a["user_id"] == user and a["model_version"] == truth.version
        assert a.get("fallback") is None
        assert isinstance(a["took_ms"], (int, float)) and a["took_ms"] >= 0
        assert len(a["items"]) == 25
        assert_sorted(a)
        assert not set(ids(a)) & truth.seen[truth.user_index[user]], "exclude_seen returned a seen item"
        for item, s in zip(ids(a), scores(a)):
            assert abs(s - truth.score(user, item)) <= TOL
        # nothing left out scores higher than the last item served
        row = truth.full[truth.user_index[user]].copy()
        banned = [truth.item_index[i] for i in truth.seen[truth.user_index[user]] | set(ids(a))]
        row[banned] = -np.inf
        assert row.max() <= scores(a)[-1] + TOL


async def test_k_defaults_to_10_and_is_honoured(client, truth):
    user = truth.user_ids[3]
    assert len((await recommend(client, user_id=user))["items"]) == 10
    for k in (1, 7, 1000):
        assert len((await recommend(client, user_id=user, k=k))["items"]) == k


async def test_exclude_seen_false_returns_seen_items(client, truth):
    user = truth.sample_users(1)[0]
    seen = sorted(truth.seen[truth.user_index[user]])
    a = await recommend(client, user_id=user, candidates=seen, exclude_seen=False, k=1000)
    assert sorted(ids(a)) == seen
    # by default every one of them is removed: nothing remains, and that is not an error
    a = await recommend(client, user_id=user, candidates=seen, k=1000)
    assert a["items"] == []


async def test_k_larger_than_what_remains_returns_what_remains(client, truth):
    user = truth.sample_users(1, seed=1)[0]
    seen = sorted(truth.seen[truth.user_index[user]])[:3]
    unseen = [i for i in truth.item_ids if i not in truth.seen[truth.user_index[user]]][:4]
    a = await recommend(client, user_id=user, candidates=seen + unseen, k=10)
    assert sorted(ids(a)) == sorted(unseen)
    assert_sorted(a)
    a = await recommend(client, user_id=user, candidates=seen + unseen, exclude=unseen[:1], k=10)
    assert sorted(ids(a)) == sorted(unseen[1:])


async def test_exclude_removes_items(client, truth):
    user = truth.user_ids[10]
    top = ids(await recommend(client, user_id=user, k=10))
    a = await recommend(client, user_id=user, k=10, exclude=top[:3])
    assert not set(top[:3]) & set(ids(a))
    assert ids(a)[:7] == top[3:]
    a = await recommend(client, user_id=user, k=10, exclude=top[:3], exclude_seen=False)
    assert not set(top[:3]) & set(ids(a))


async def test_candidates_restrict_the_answer(client, truth):
    rng = np.random.default_rng(7)
    user = truth.user_ids[int(rng.integers(len(truth.user_ids)))]
    candidates = [truth.item_ids[j] for j in rng.choice(len(truth.item_ids), size=40, replace=False)]
    a = await recommend(client, user_id=user, candidates=candidates, exclude_seen=False, k=1000)
    assert sorted(ids(a)) == sorted(candidates)
    assert_sorted(a)
    for item, s in zip(ids(a), scores(a)):  # the candidate route agrees with the full-catalogue scores
        assert abs(s - truth.score(user, item)) <= TOL
    a = await recommend(client, user_id=user, candidates=candidates, exclude_seen=False, k=5)
    assert len(a["items"]) == 5 and set(ids(a)) <= set(candidates)


async def test_integer_and_string_ids_are_the_same(client, truth):
    user = next((u for u in truth.user_ids if u.isdigit() and not u.startswith("0")), None)
    assert user is not None, "the checkpoint has no integer-like user ids (conftest.synthetic_checkpoint has)"
    as_str = await recommend(client, user_id=user, k=20)
    as_int = await recommend(client, user_id=int(user), k=20)
    assert as_int["user_id"] == user and as_int.get("fallback") is None
    assert as_int["items"] == as_str["items"]
    items = [i for i in truth.item_ids if i.isdigit() and not i.startswith("0")][:30]
    by_str = await recommend(client, user_id=user, candidates=items, exclude_seen=False, k=30)
    by_int = await recommend(client, user_id=int(user), candidates=[int(i) for i in items], exclude_seen=False,
                             k=30)
    assert by_int["items"] == by_str["items"] and len(by_int["items"]) == 30


async def test_unknown_user_gets_popularity(client, truth):
    for user in (UNKNOWN_USER, 10 ** 12):
        a = await recommend(client, user_id=user, k=20)
        assert a["fallback"] == "unknown_user" and a["user_id"] == str(user)
        assert a["model_version"] == truth.version and a["took_ms"] >= 0
        assert_sorted(a)
        assert scores(a) == [float(truth.popularity[truth.item_index[i]]) for i in ids(a)]
        assert scores(a) == sorted(truth.popularity.tolist(), reverse=True)[:20]
    # candidates and exclusions still apply
    candidates = truth.item_ids[:50]
    a = await recommend(client, user_id=UNKNOWN_USER, candidates=candidates, exclude=candidates[:5], k=1000)
    assert sorted(ids(a)) == sorted(candidates[5:])
    assert scores(a) == sorted((float(truth.popularity[truth.item_index[i]]) for i in candidates[5:]), reverse=True)


async def test_request_id_is_echoed_or_generated(client, truth):
    r = await client.post("/recommend", json={"user_id": truth.user_ids[0]}, headers={"X-Request-ID": "req-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
    r = await client.post("/recommend", json={"user_id": truth.user_ids[0], "k": 0},
                          headers={"X-Request-ID": "req-43"})
    assert r.status_code == 422 and r.headers["x-request-id"] == "req-43"
    first = (await client.post("/recommend", json={"user_id": truth.user_ids[0]})).headers.get("x-request-id")
    second = (await client.get("/health")).headers.get("x-request-id")
    assert first and second and first != second


# --------------------------------------------------------------------------- explain

async def test_explain_is_refused_unless_enabled(client, truth):
    for path, body in (("/recommend", {"user_id": truth.user_ids[0], "explain": True}),
                       ("/recommend/batch", {"requests": [{"user_id": truth.user_ids[0]},
                                                          {"user_id": truth.user_ids[1], "explain": True}]})):
        r = await client.post(path, json=body)
        assert r.status_code == 403, r.text
        assert "CMN_ALLOW_EXPLAIN" in r.json()["detail"]


async def test_explain_lists_attended_neighbours(explain_client, truth):
    # the whole catalogue, and the 10 most popular items as candidates: the items a model ranks first need not
    # have many users, and the popular ones have neighbourhoods longer than the 5 neighbours listed
    popular = [truth.item_ids[j] for j in np.argsort(-truth.popularity, kind="stable")[:10]]
    assert sum(len(truth.neighbours[truth.item_index[i]]) > 5 for i in popular) >= 5
    for user, extra in [(u, {}) for u in truth.sample_users(4, seed=3)] + \
                       [(u, {"candidates": popular, "exclude_seen": False}) for u in truth.sample_users(2, seed=4)]:
        plain = await recommend(explain_client, user_id=user, k=10, **extra)
        assert all("explanation" not in x for x in plain["items"])
        a = await recommend(explain_client, user_id=user, k=10, explain=True, **extra)
        assert [(x["item_id"], x["score"]) for x in a["items"]] == [(x["item_id"], x["score"]) for x in plain["items"]]
        expected = truth.scorer.attention(truth.user_index[user],
                                          torch.tensor([truth.item_index[i] for i in ids(a)]), top=5)
        for x, want in zip(a["items"], expected):
            expl = x["explanation"]
            neighbourhood = truth.neighbours[truth.item_index[x["item_id"]]] or [user]
            users = [n["user_id"] for n in expl]
            weights = [n["weight"] for n in expl]
            assert 1 <= len(expl) <= 5 and len(set(users)) == len(users)
            assert set(users) <= set(neighbourhood), "explanation names a user outside the item's neighbourhood"
            assert all(0 < w <= 1 for w in weights)
            assert weights == sorted(weights, reverse=True)
            if len(neighbourhood) <= 5:  # all the last-hop attention is shown (zero weights left out): it sums to 1
                assert len(expl) <= len(neighbourhood) and abs(sum(weights) - 1) < 1e-4
            assert users == [truth.user_ids[v] for v, _ in want]
            assert np.allclose(weights, [w for _, w in want], atol=1e-5)
    a = await recommend(explain_client, user_id=UNKNOWN_USER, k=3, explain=True)  # popularity: nothing to explain
    assert a["fallback"] == "unknown_user" and all("explanation" not in x for x in a["items"])


# --------------------------------------------------------------------------- /recommend/batch

async def test_batch_answers_each_request_as_recommend_would(client, truth):
    users = truth.sample_users(5, seed=5)
    candidates = truth.item_ids[100:160]
    requests = [{"user_id": users[0], "k": 15},
                {"user_id": users[1], "k": 3, "exclude_seen": False},
                {"user_id": users[2], "candidates": candidates, "k": 1000},
                {"user_id": UNKNOWN_USER, "k": 5},
                {"user_id": users[3], "k": 8, "exclude": truth.item_ids[:200]},
                {"user_id": int(users[4]) if users[4].isdigit() else users[4], "candidates": candidates,
                 "exclude_seen": False, "k": 7},
                {"user_id": users[0], "k": 15}]
    r = await client.post("/recommend/batch", json={"requests": requests})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == truth.version and body["took_ms"] >= 0
    assert len(body["results"]) == len(requests)
    for req, got in zip(requests, body["results"]):
        single = await recommend(client, **req)
        assert got["user_id"] == single["user_id"] == str(req["user_id"])
        assert got.get("fallback") == single.get("fallback")
        assert ids(got) == ids(single)
        assert np.allclose(scores(got), scores(single), rtol=0, atol=1e-5)
    assert body["results"][3]["fallback"] == "unknown_user"


# --------------------------------------------------------------------------- errors

async def test_unknown_candidate_and_exclude_ids(client, truth):
    user, known = truth.user_ids[0], truth.item_ids[:3]
    for field in ("candidates", "exclude"):
        r = await client.post("/recommend", json={"user_id": user, field: known + ["nope-1", 404404]})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert detail["field"] == field and detail["unknown"] == ["nope-1", "404404"]
    r = await client.post("/recommend/batch", json={"requests": [{"user_id": user},
                                                                 {"user_id": user, "candidates": ["nope-1"]}]})
    assert r.status_code == 422 and r.json()["detail"]["unknown"] == ["nope-1"]
    a = await recommend(client, user_id=user, candidates=known + ["nope-1"], exclude=["nope-2", known[0]],
                        exclude_seen=False, ignore_unknown=True, k=10)
    assert sorted(ids(a)) == sorted(known[1:])
    a = await recommend(client, user_id=user, candidates=["nope-1", "nope-3"], ignore_unknown=True)
    assert a["items"] == []


@pytest.fixture(scope="module")
async def keyed_client(ckpt_path, tmp_path_factory):
    """A server with an admin key (so /admin/reload answers 401/409/422 rather than 404), explain disabled."""
    async with serving(settings_for(ckpt_path, tmp_path_factory.mktemp("api-keyed"), api_key=ADMIN_KEY)) as c:
        await wait_ready(c)
        yield c


@pytest.mark.parametrize("name,path,body,headers,expected", BAD_INPUTS, ids=BAD_INPUT_IDS)
async def test_bad_input_gets_its_4xx(keyed_client, truth, name, path, body, headers, expected):
    """The shared table (tests/bad_inputs.py), in-process; e2e/test_reliability.py sends it over real HTTP."""
    content, headers = request_for(body, headers, user=truth.user_ids[0], key=ADMIN_KEY)
    r = await keyed_client.post(path, content=content, headers=headers)
    assert_rejected(name, expected, content, r.status_code, r.headers.get("content-type", ""), r.content)


async def test_body_size_limit(client, truth):
    limit = Settings().max_body_bytes
    head, tail = b'{"user_id": "%s", "k": 3' % truth.user_ids[0].encode(), b"}"
    under = head + b" " * (limit - len(head) - len(tail)) + tail   # exactly at the limit: accepted
    r = await client.post("/recommend", content=under, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    over = head + b" " * (limit + 1 - len(head) - len(tail)) + tail
    r = await client.post("/recommend", content=over, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "exceeds" in r.json()["detail"]

    async def chunks():  # no Content-Length: the limit is enforced while reading
        yield head
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536
        yield tail
    r = await client.post("/recommend/batch", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.headers["content-type"].startswith("application/json")


async def test_unknown_routes_and_methods(client):
    for method, path in (("GET", "/nope"), ("POST", "/recommend/nope"), ("PUT", "/v2/recommend")):
        r = await client.request(method, path)
        assert r.status_code == 404, (method, path, r.status_code)
        assert r.headers["content-type"].startswith("application/json") and r.json()["detail"]
    r = await client.get("/recommend")
    assert r.status_code == 405 and r.json()["detail"]
    assert "POST" in r.headers.get("allow", "")
    r = await client.delete("/recommend/batch")
    assert r.status_code == 405


# --------------------------------------------------------------------------- /metrics

def samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics(client, truth):
    before = samples((await client.get("/metrics")).text)
    await recommend(client, user_id=UNKNOWN_USER, k=2)
    await recommend(client, user_id=truth.user_ids[0], k=2)
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("cmn_request_seconds", "cmn_batch_size", "cmn_queue_wait_seconds", "cmn_queue_depth",
                 "cmn_fallbacks_total", "cmn_model_info"):
        assert f"# TYPE {name} " in text, f"{name} missing from /metrics"
    after = samples(text)
    assert value(after, "cmn_fallbacks_total", reason="unknown_user") - \
        value(before, "cmn_fallbacks_total", reason="unknown_user") == 1
    ok = dict(route="/recommend", method="POST", status="200")
    assert value(after, "cmn_request_seconds_count", **ok) - value(before, "cmn_request_seconds_count", **ok) == 2
    assert value(after, "cmn_batch_size_count") - value(before, "cmn_batch_size_count") == 2
    assert value(after, "cmn_queue_wait_seconds_count") - value(before, "cmn_queue_wait_seconds_count") == 2
    assert value(after, "cmn_queue_depth") == 0
    info = [labels for (name, labels), v in after.items() if name == "cmn_model_info" and v == 1]
    assert any(dict(labels).get("model_version") == truth.version for labels in info), info
