"""GET /dashboard: a page for operators (app/dashboard/static: HTML, JS, CSS, and Chart.js, installed from npm at
build time and served from here: no CDN). The page itself holds no data and is open; it polls GET /dashboard/data,
which needs the metrics scope when CMN_AUTH_FILE is set (as /metrics does), and its "try a user" panel asks
POST /recommend with the key the operator typed, so what it shows is exactly what that key may see (explanations
only with the history scope and CMN_ALLOW_EXPLAIN).

Nothing here runs on a request's path: the data is gathered when the page asks for it, the metrics from the
process's own registry (app/metrics.py), the most recommended items from the lists this process served last
(`Service.recent_lists`, a bounded deque), the most fed-back items from the store's last events
(`Feedback.most_fed_back`, read on an I/O thread at most every few seconds).
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client.parser import text_string_to_metric_families
from starlette.exceptions import HTTPException

from app import metrics
from app.auth import AUTH_RESPONSES
from app.deps import ServiceDep, require_metrics

STATIC = Path(__file__).resolve().parents[1] / "dashboard" / "static"
TOP = 10
# the page runs only its own files: no inline script, nothing from another origin
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                      "base-uri 'none'; frame-ancestors 'none'",
           "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter(tags=["dashboard"])


# the page's files, each read when first asked for. Sent as plain responses: the page is small, and FileResponse
# would stop at the disconnect app/middleware.py's replayed receive() reports once the body has been read
FILES = {"index.html": "text/html; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8",
         "dashboard.css": "text/css; charset=utf-8", "vendor/chart.umd.js": "text/javascript; charset=utf-8"}


@lru_cache(maxsize=len(FILES))
def read(name: str) -> bytes | None:
    try:
        return (STATIC / name).read_bytes()
    except FileNotFoundError:   # vendor/: an app built without `npm ci && npm run build` (the page says so)
        return None


def static(name: str) -> Response:
    content = read(name) if name in FILES else None
    if content is None:
        raise HTTPException(404, "no such file")
    return Response(content, media_type=FILES[name], headers=HEADERS)


@router.get("/dashboard", include_in_schema=False)
async def page():
    return static("index.html")


@router.get("/dashboard/static/{name:path}", include_in_schema=False)
async def files(name: str):
    return static(name)


def samples() -> list[dict]:
    """Every sample of the service's metrics (all workers' with CMN_WORKERS > 1), as the page reads them."""
    out = []
    for family in text_string_to_metric_families(metrics.render().decode()):
        if family.name.startswith("cmn_"):
            out += [{"name": s.name, "labels": s.labels, "value": s.value} for s in family.samples
                    if not s.name.endswith("_created")]
    return out


def most_recommended(lists) -> list[list]:
    tally = Counter(item for items in list(lists) for item in items)
    return [[item, n] for item, n in tally.most_common(TOP)]


@router.get("/dashboard/data", dependencies=[Depends(require_metrics)], responses=AUTH_RESPONSES)
async def data(service: ServiceDep):
    """What the page shows: /health's answer, the metrics' samples, the strategies offered, the most recommended
    and most fed-back items."""
    engine = service.models.engine if service.models else None
    rec = engine.recommender if engine else None
    measured, recommended = await asyncio.gather(asyncio.to_thread(samples),
                                                 asyncio.to_thread(most_recommended, service.recent_lists))
    return {"time": time.time(), "health": service.health().model_dump(exclude_none=True), "metrics": measured,
            "strategies": list(rec.strategies) if rec else [],
            "default_strategy": rec.default_strategy if rec else None,
            "explain_allowed": service.settings.allow_explain, "auth": service.auth.enabled,
            "most_recommended": {"items": recommended, "lists": len(service.recent_lists)},
            "most_fed_back": await service.feedback.most_fed_back(TOP)}
