"""GET /health (readiness), GET /livez (liveness), both open; GET /metrics (Prometheus; the metrics scope when
CMN_AUTH_FILE is set, unless CMN_METRICS_OPEN)."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app import metrics
from app.auth import AUTH_RESPONSES
from app.deps import ServiceDep, require_metrics
from app.schemas import Health, Liveness

router = APIRouter(tags=["ops"])


@router.get("/health", response_model=Health, response_model_exclude_none=True,
            responses={503: {"model": Health, "description": "loading or failed"}})
async def health(service: ServiceDep):
    h = service.health()
    return JSONResponse(h.model_dump(exclude_none=True), status_code=503 if h.status in ("loading", "failed") else 200)


@router.get("/livez", response_model=Liveness)
async def livez():
    """The process answers: for a liveness probe, which must not restart a server that is loading or degraded."""
    return Liveness(status="alive")


@router.get("/metrics", response_class=Response, dependencies=[Depends(require_metrics)], responses=AUTH_RESPONSES)
async def prometheus():
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
