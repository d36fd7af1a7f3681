"""POST /recommend and /recommend/batch: validate, resolve ids, queue for the model thread, shape the answer.

What one request may cost is bounded before it is queued: Σk over a batch (CMN_MAX_TOTAL_K) and k with explain
(CMN_MAX_EXPLAIN_K), besides the schema's limits. A large answer is built and serialised on a worker thread, so
the event loop keeps answering other requests (/health among them) meanwhile.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app import metrics
from app.auth import AUTH_RESPONSES
from app.deps import RecommendCaller, ServiceDep
from app.engine import Answer
from app.schemas import (BatchRequest, BatchResponse, InvalidRequest, RecommendRequest, RecommendResponse,
                         UnknownIdsError)
from app.service import Service

router = APIRouter(tags=["recommend"], responses=AUTH_RESPONSES)

# /recommend's 422 has two documented shapes: an invalid body, or unknown candidate/exclude ids (listed)
ERRORS = {403: {"description": "explain requested but disabled"}, 413: {"description": "body too large"},
          422: {"model": InvalidRequest | UnknownIdsError,
                "description": "invalid body, candidate/exclude ids the model does not know, or a strategy it "
                               "does not offer"},
          503: {"description": "not ready, or the request queue is full"}}

# answers with more entries (items, plus neighbours with explain) than this are rendered off the event loop; below
# it the thread hop would cost more than the rendering
INLINE_ENTRIES = 2_000


# the routes return JSONResponse themselves (see `render`); response_model documents the body in the OpenAPI schema
@router.post("/recommend", response_model=RecommendResponse, responses=ERRORS)
async def recommend(req: RecommendRequest, service: ServiceDep, caller: RecommendCaller):
    start = time.perf_counter()
    service.auth.require_history(caller, [req])
    engine = service.engine_or_503()
    check_limits(service, [req], batch=False)
    answer, = await service.batcher.submit(engine, [engine.prepare(req)])
    return await render(lambda: response(req.user_id, answer, engine.version, start), entries([answer]))


@router.post("/recommend/batch", response_model=BatchResponse, responses=ERRORS)
async def recommend_batch(batch: BatchRequest, service: ServiceDep, caller: RecommendCaller):
    start = time.perf_counter()
    service.auth.require_history(caller, batch.requests)
    engine = service.engine_or_503()
    check_limits(service, batch.requests, batch=True)
    answers = await service.batcher.submit(engine, [engine.prepare(r) for r in batch.requests])
    return await render(lambda: {"results": [response(r.user_id, a, engine.version, start)
                                             for r, a in zip(batch.requests, answers)],
                                 "model_version": engine.version, "took_ms": elapsed_ms(start)}, entries(answers))


def check_limits(service: Service, reqs: list[RecommendRequest], batch: bool) -> None:
    """403 for explain while disabled; 422 (the shape of any invalid body) past CMN_MAX_EXPLAIN_K or
    CMN_MAX_TOTAL_K. Checked before anything is queued: the cost of an answer grows with k, far more with
    explanations, and a 7 KB batch could otherwise ask for 256,000 items."""
    settings = service.settings
    if any(r.explain for r in reqs) and not settings.allow_explain:
        raise HTTPException(403, "explanations reveal other users' ids and are disabled on this server "
                                 "(set CMN_ALLOW_EXPLAIN=true to enable)")
    errors = [{"type": "less_than_equal", "loc": ("body", "requests", n, "k") if batch else ("body", "k"),
               "msg": f"k is at most {settings.max_explain_k} when explain is true"}
              for n, r in enumerate(reqs) if r.explain and r.k > settings.max_explain_k]
    total = sum(r.k for r in reqs)
    if total > settings.max_total_k:
        errors.append({"type": "less_than_equal", "loc": ("body", "requests") if batch else ("body", "k"),
                       "msg": f"k adds up to {total} over the request; at most {settings.max_total_k}"})
    if errors:
        raise RequestValidationError(errors)


def entries(answers: list[Answer]) -> int:
    return sum(len(items) + sum(len(e or ()) for _, _, e in items) for items in (a.items for a in answers))


async def render(build: Callable[[], dict], size: int) -> JSONResponse:
    """The answer as a JSONResponse (its bytes are made when it is constructed): inline when small, on a worker
    thread when large, so that building and serialising it never holds the event loop."""
    if size <= INLINE_ENTRIES:
        return JSONResponse(build())
    return await asyncio.to_thread(lambda: JSONResponse(build()))


def elapsed_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def response(user_id: str, answer: Answer, version: str, start: float) -> dict:
    """One RecommendResponse as plain JSON data (absent rather than null where the schema says so): building
    256 pydantic models of 1,000 items each cost more than scoring them."""
    kind = "fallback" if answer.fallback else "personalised"
    metrics.RECOMMENDATIONS.labels(kind, answer.strategy or "popularity").inc()
    if answer.fallback:
        metrics.FALLBACKS.labels(answer.fallback).inc()
    items = [{"item_id": i, "score": s} if e is None else
             {"item_id": i, "score": s, "explanation": [{"user_id": u, "weight": w} for u, w in e]}
             for i, s, e in answer.items]
    body = {"user_id": user_id, "items": items, "model_version": version}
    if answer.fallback:
        body["fallback"] = answer.fallback
    if answer.strategy:
        body["strategy"] = answer.strategy
    body["took_ms"] = elapsed_ms(start)
    return body
