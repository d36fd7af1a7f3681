"""GET /health (orchestration's readiness probe) and GET /metrics (Prometheus)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import ServiceDep
from app.schemas import Health

router = APIRouter(tags=["ops"])


@router.get("/health", response_model=Health, response_model_exclude_none=True,
            responses={503: {"model": Health, "description": "loading or failed"}})
async def health(service: ServiceDep):
    h = service.health()
    return JSONResponse(h.model_dump(exclude_none=True), status_code=200 if h.status == "ok" else 503)


@router.get("/metrics", response_class=Response)
async def prometheus():
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
