"""/dashboard (in process): the page is open and runs only its own files; its data needs the metrics scope when
auth is on and holds what the service did: the lists it served (most recommended items, counted from the answers
here), the events stored (most fed-back items), the strategies the model offers, /health's answer."""
import asyncio
import hashlib
from collections import Counter

import httpx
import pytest

from app.main import create_app
from app.settings import Settings
from conftest import synthetic_checkpoint
from model.store.checkpoint import load_checkpoint

pytestmark = pytest.mark.anyio
KEYS = {"ops": ("metrics,recommend,feedback", "k-ops-0123456789"), "client": ("recommend", "k-client-0123456789")}


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_dashboard_page_and_data(tmp_path):
    ckpt = synthetic_checkpoint(tmp_path / "model.ckpt", n_users=40, n_items=120)
    (tmp_path / "keys").write_text("".join(f"{hashlib.sha256(key.encode()).hexdigest()} {scopes} {name}\n"
                                           for name, (scopes, key) in KEYS.items()))
    settings = Settings(checkpoint=ckpt, feedback_path=str(tmp_path / "fb.sqlite3"), device="cpu", warmup_calls=0,
                        auth_file=str(tmp_path / "keys"))
    app = create_app(settings)
    bearer = {name: {"Authorization": f"Bearer {key}"} for name, (_, key) in KEYS.items()}
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://cmn.test", timeout=60) as c:
        while (await c.get("/health")).status_code != 200:
            await asyncio.sleep(0.05)
        page = await c.get("/dashboard")
        assert page.status_code == 200 and "unsafe-inline" not in page.headers["content-security-policy"]
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert '<script src="/dashboard/static/dashboard.js"' in page.text and "<script>" not in page.text
        assert (await c.get("/dashboard/static/dashboard.js")).status_code == 200

        assert (await c.get("/dashboard/data")).status_code == 401
        assert (await c.get("/dashboard/data", headers=bearer["client"])).status_code == 403

        users = load_checkpoint(ckpt).user_ids
        served = Counter()
        for u in users[:12]:
            r = await c.post("/recommend", json={"user_id": u, "k": 5}, headers=bearer["client"])
            served.update(e["item_id"] for e in r.json()["items"])
        events = [{"user_id": users[n], "item_id": item} for n, item in enumerate(["7", "7", "7", "9", "9", "11"])]
        assert (await c.post("/feedback", json={"events": events}, headers=bearer["ops"])).status_code in (200, 202)

        data = (await c.get("/dashboard/data", headers=bearer["ops"])).json()
    assert data["health"]["status"] == "ok" and data["health"]["model_version"]
    assert data["strategies"] == ["full"] and data["default_strategy"] == "full" and data["auth"] is True
    top = dict(data["most_recommended"]["items"])
    assert data["most_recommended"]["lists"] >= 12
    assert all(top[i] >= served[i] for i in top) and max(top.values()) == max(served.values())
    assert data["most_fed_back"]["items"][:3] == [["7", 3], ["9", 2], ["11", 1]]
    names = {s["name"] for s in data["metrics"]}
    assert {"cmn_request_seconds_bucket", "cmn_recommendations_total", "cmn_feedback_store_up"} <= names
