"""/dashboard in a real browser (headless Chromium from Debian's package, over the DevTools protocol): against the
real server with auth on, the page asks for a key, then loads, every chart draws data, the "try a user" panel shows
the list /recommend answers with its explanations, and the page logs no error. Skipped outside CI without
Chromium or the npm-built Chart.js; CI (.ci/run) installs both, and there it fails instead.

CMN_DASHBOARD_SCREENSHOTS=DIR also saves the two screenshots there (docs/dashboard-*.png were made so)."""
import hashlib
import itertools
import os
import shutil
import threading
from pathlib import Path

import httpx
import pytest

from conftest import REPO, synthetic_checkpoint
from model.store.checkpoint import load_checkpoint
from tests.harness.browser import Browser, find_chromium
from tests.harness.servers import running_server

pytestmark = pytest.mark.slow
CHART_JS = REPO / "app" / "dashboard" / "static" / "vendor" / "chart.umd.js"
KEY = "dashboard-test-key-0123456789"
CHARTS = ("chart-rate", "chart-latency", "chart-lag", "chart-strategies", "chart-recommended", "chart-fed-back")


def missing(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"CI must test the dashboard in a browser, but {why}")
    pytest.skip(why)


# per chart: its data points, and how many of its canvas's pixels are painted
CHART_STATE = """Object.fromEntries(Object.values(Chart.instances).map((c) => {
  const pixels = c.canvas.getContext("2d").getImageData(0, 0, c.canvas.width, c.canvas.height).data;
  let painted = 0;
  for (let n = 3; n < pixels.length; n += 4) if (pixels[n] > 0) painted++;
  return [c.canvas.id, {points: c.data.datasets.reduce((a, d) => a + d.data.filter((v) => v !== null).length, 0),
                        painted}];
}))"""


def test_dashboard_in_a_browser(tmp_path):
    if find_chromium() is None:
        missing("chromium is not installed (Debian: apt-get install chromium)")
    if not CHART_JS.exists():
        missing(f"{CHART_JS.relative_to(REPO)} is not built (cd app/dashboard && npm ci && npm run build)")
    ckpt = synthetic_checkpoint(tmp_path / "model.ckpt", n_users=60, n_items=200)
    (tmp_path / "keys").write_text(f"{hashlib.sha256(KEY.encode()).hexdigest()} "
                                   "metrics,recommend,history,feedback operator\n")
    auth = {"Authorization": f"Bearer {KEY}"}
    with running_server(ckpt, tmp_path, device="cpu", auth_file=tmp_path / "keys", allow_explain="true") as (url, _):
        users = list(load_checkpoint(ckpt).user_ids[::3])
        for u in users:  # traffic for the charts: lists, and feedback on a few items
            httpx.post(f"{url}/recommend", json={"user_id": u, "k": 10}, headers=auth, timeout=30).raise_for_status()
        events = [{"user_id": u, "item_id": i} for u, i in zip(users, ["5", "5", "5", "8", "8", "13"])]
        httpx.post(f"{url}/feedback", json={"events": events}, headers=auth, timeout=30).raise_for_status()

        stop = threading.Event()

        def traffic():   # requests while the page polls: its rates and latencies have something to show
            with httpx.Client(headers=auth, timeout=30) as client:
                for u in itertools.cycle(users):
                    if stop.wait(0.05):
                        return
                    client.post(f"{url}/recommend", json={"user_id": u, "k": 10})
        sender = threading.Thread(target=traffic)
        sender.start()
        try:
            check_the_page(url, users, auth, tmp_path)
        finally:
            stop.set()
            sender.join()
    if os.environ.get("CMN_DASHBOARD_SCREENSHOTS"):
        for shot in ("dashboard-overview.png", "dashboard-try-a-user.png"):
            shutil.copy(tmp_path / shot, Path(os.environ["CMN_DASHBOARD_SCREENSHOTS"]) / shot)


def check_the_page(url: str, users: list[str], auth: dict, tmp_path: Path) -> None:
    with Browser(width=1400, height=1000) as b:
        b.goto(f"{url}/dashboard?poll=700")
        b.wait_for("!document.getElementById('key-form').hidden")   # 401: the page asks for a key
        # the browser logs that 401 as a failed load; it must be the only thing logged before the key
        assert b.errors and all("/dashboard/data" in e and "401" in e for e in b.errors), b.errors
        b.errors.clear()
        b.js(f"document.getElementById('key').value = {KEY!r}; "
             "document.getElementById('key-form').requestSubmit()")
        b.wait_for("document.getElementById('status').textContent === 'ok'")
        # a few polls: each line chart has two points (rates and quantiles need a window), each bar chart a bar
        b.wait_for("Object.values(Chart.instances).length === 6 && Object.values(Chart.instances).every((c) => "
                   "c.data.datasets.some((d) => d.data.filter((v) => v !== null).length >= "
                   "(c.config.type === 'line' ? 2 : 1)))", timeout=30)
        state = b.js(CHART_STATE)
        assert sorted(state) == sorted(CHARTS), state
        for chart, s in state.items():
            assert s["points"] > 0 and s["painted"] > 500, (chart, s)
        text = b.js("document.body.innerText")
        assert "ok" in text and httpx.get(f"{url}/health").json()["model_version"] in text
        recommended = b.js("Chart.instances[Object.keys(Chart.instances).find((k) => "
                           "Chart.instances[k].canvas.id === 'chart-fed-back')].data.labels")
        assert recommended[:3] == ["5", "8", "13"]
        b.screenshot(tmp_path / "dashboard-overview.png")

        user = users[4]
        b.js(f"document.getElementById('try-user').value = {user!r}; "
             "document.getElementById('try-k').value = '5'; "
             "document.getElementById('try-explain').checked = true; "
             "document.getElementById('try-form').requestSubmit(); "
             "document.getElementById('try').scrollIntoView()")
        b.wait_for("!document.getElementById('try-result').hidden")
        rows = b.js("[...document.querySelectorAll('#try-result tbody tr')].map((tr) => "
                    "[...tr.cells].map((td) => td.textContent))")
        served = httpx.post(f"{url}/recommend", json={"user_id": user, "k": 5, "explain": True}, headers=auth,
                            timeout=30).json()
        assert [r[1] for r in rows] == [e["item_id"] for e in served["items"]]
        for row, item in zip(rows, served["items"]):
            assert row[3].split(", ")[0] == f"{item['explanation'][0]['user_id']}: " \
                                            f"{item['explanation'][0]['weight']:.3f}"
        b.screenshot(tmp_path / "dashboard-try-a-user.png")
        assert b.errors == [], b.errors
