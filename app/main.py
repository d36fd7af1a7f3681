"""The FastAPI application: thin routes over the Service (model, batcher, feedback store)."""
from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import time
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from app import metrics
from app.batcher import QueueFull
from app.engine import UnknownIds
from app.middleware import RequestContext, configure_logging
from app.schemas import (BatchRequest, BatchResponse, FeedbackRequest, FeedbackResponse, Health, InvalidRequest,
                         RecommendRequest, RecommendResponse, ReloadRequest, ReloadResponse, ScoredItem, Neighbour,
                         UnknownIdsError)
from app.service import NotReady, ReloadFailed, Service
from app.settings import Settings

log = logging.getLogger("cmn.app")


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = getattr(app.state, "settings", None) or Settings()
    configure_logging(settings.log_level)
    service = Service(settings)
    app.state.service = service
    await service.start()
    try:  # SIGHUP = reload the configured checkpoint (only possible in the main thread)
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, service.reload_in_background)
    except (NotImplementedError, RuntimeError, ValueError):
        pass
    try:
        yield
    finally:
        await service.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(title="CMN recommendation service", version="1.0",
                  description="Collaborative Memory Network (SIGIR 2018) recommendations, online feedback and "
                              "hot reload. See docs/api.md.", lifespan=lifespan)
    app.state.settings = settings
    app.add_middleware(RequestContext, max_body_bytes=(settings or Settings()).max_body_bytes)
    register_errors(app)
    register_routes(app)
    return app


async def service_of(request: Request) -> Service:
    # async on purpose: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per request
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service_of)]
# /recommend's 422 has two documented shapes: an invalid body, or unknown candidate/exclude ids (listed)
INVALID_OR_UNKNOWN = {"model": InvalidRequest | UnknownIdsError,
                      "description": "invalid body, or candidate/exclude ids the model does not know"}
RECOMMEND_ERRORS = {403: {"description": "explain requested but disabled"}, 413: {"description": "body too large"},
                    422: INVALID_OR_UNKNOWN, 503: {"description": "not ready, or the request queue is full"}}


def register_routes(app: FastAPI) -> None:
    @app.post("/recommend", response_model=RecommendResponse, response_model_exclude_none=True,
              responses=RECOMMEND_ERRORS)
    async def recommend(req: RecommendRequest, service: ServiceDep):
        start = time.perf_counter()
        engine = service.engine_or_503()
        check_explain(service, [req])
        answer, = await service.batcher.submit(engine, [engine.prepare(req)])
        return response(req.user_id, answer, engine.version, start)

    @app.post("/recommend/batch", response_model=BatchResponse, response_model_exclude_none=True,
              responses=RECOMMEND_ERRORS)
    async def recommend_batch(batch: BatchRequest, service: ServiceDep):
        start = time.perf_counter()
        engine = service.engine_or_503()
        check_explain(service, batch.requests)
        answers = await service.batcher.submit(engine, [engine.prepare(r) for r in batch.requests])
        return BatchResponse(results=[response(r.user_id, a, engine.version, start)
                                      for r, a in zip(batch.requests, answers)],
                             model_version=engine.version, took_ms=elapsed_ms(start))

    @app.post("/feedback", response_model=FeedbackResponse,
              responses={202: {"model": FeedbackResponse, "description": "stored; some events take effect at "
                                                                         "the next training run"},
                         413: {"description": "body too large"}})
    async def feedback(body: FeedbackRequest, service: ServiceDep):
        result = await service.feedback(body.events)
        return JSONResponse(result.model_dump(), status_code=202 if result.deferred else 200)

    @app.get("/health", response_model=Health, response_model_exclude_none=True,
             responses={503: {"model": Health, "description": "loading or failed"}})
    async def health(service: ServiceDep):
        h = service.health()
        return JSONResponse(h.model_dump(exclude_none=True), status_code=200 if h.status == "ok" else 503)

    @app.get("/metrics", response_class=Response)
    async def prometheus():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload", response_model=ReloadResponse,
              responses={401: {"description": "missing or wrong X-API-Key"},
                         404: {"description": "admin routes disabled (no CMN_API_KEY)"},
                         409: {"description": "the new checkpoint was refused; the old model keeps serving"}})
    async def reload(service: ServiceDep, body: ReloadRequest | None = None,
                     x_api_key: Annotated[str | None, Header()] = None):
        check_admin(service, x_api_key)
        return await service.reload(body.checkpoint if body else None)


def check_explain(service: Service, reqs: list[RecommendRequest]) -> None:
    if any(r.explain for r in reqs) and not service.settings.allow_explain:
        raise HTTPException(403, "explanations reveal other users' ids and are disabled on this server "
                                 "(set CMN_ALLOW_EXPLAIN=true to enable)")


def check_admin(service: Service, key: str | None) -> None:
    expected = service.settings.api_key
    if expected is None:
        raise HTTPException(404, "admin routes are disabled: set CMN_API_KEY to enable them")
    if key is None or not secrets.compare_digest(key.encode(), expected.get_secret_value().encode()):
        raise HTTPException(401, "missing or wrong X-API-Key")


def elapsed_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def response(user_id: str, answer, version: str, start: float) -> RecommendResponse:
    metrics.RECOMMENDATIONS.labels("fallback" if answer.fallback else "personalised").inc()
    if answer.fallback:
        metrics.FALLBACKS.labels(answer.fallback).inc()
    items = [ScoredItem(item_id=i, score=s,
                        explanation=None if e is None else [Neighbour(user_id=u, weight=w) for u, w in e])
             for i, s, e in answer.items]
    return RecommendResponse(user_id=user_id, items=items, model_version=version, fallback=answer.fallback,
                             took_ms=elapsed_ms(start))


def register_errors(app: FastAPI) -> None:
    @app.exception_handler(UnknownIds)
    async def unknown_ids(request: Request, e: UnknownIds):
        return JSONResponse({"detail": {"message": str(e), "field": e.field, "unknown": e.ids[:1000]}},
                            status_code=422)

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, e: NotReady):
        return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull):
        return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(ReloadFailed)
    async def reload_failed(request: Request, e: ReloadFailed):
        return JSONResponse({"detail": str(e), "model_version": e.serving}, status_code=409)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        if e.status_code == 400:  # only FastAPI raises 400 here: a body it cannot decode (not UTF-8, too deep)
            return JSONResponse({"detail": [{"type": "json_invalid", "loc": ["body"],
                                             "msg": "body is not valid JSON"}]}, status_code=422)
        return await http_exception_handler(request, e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        # inputs are echoed back only as their type: a 10k-item list or a secret must not be reflected
        errors = [{"type": err["type"], "loc": list(err["loc"]), "msg": err["msg"]} for err in e.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("unhandled error", extra={"request_id": request.scope.get("request_id")})
        return JSONResponse({"detail": "internal error", "request_id": request.scope.get("request_id")},
                            status_code=500)


app = create_app()
