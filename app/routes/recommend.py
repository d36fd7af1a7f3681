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
    service.engine_or_503()
    check_limits(service, [req], batch=False)
    await caught_up(service, [req], batch=False)
    engine = service.engine_or_503()
    answer, = await service.batcher.submit(engine, [engine.prepare(req)])
    return await render(lambda: response(req.user_id, answer, engine.version, start), entries([answer]))


@router.post("/recommend/batch", response_model=BatchResponse, responses=ERRORS)
async def recommend_batch(batch: BatchRequest, service: ServiceDep, caller: RecommendCaller):
    start = time.perf_counter()
    service.auth.require_history(caller, batch.requests)
    service.engine_or_503()
    check_limits(service, batch.requests, batch=True)
    await caught_up(service, batch.requests, batch=True)
    engine = service.engine_or_503()
    answers = await service.batcher.submit(engine, [engine.prepare(r) for r in batch.requests])
    return await render(lambda: {"results": [response(r.user_id, a, engine.version, start)
                                             for r, a in zip(batch.requests, answers)],
                                 "model_version": engine.version, "took_ms": elapsed_ms(start)}, entries(answers))


def check_limits(service: Service, reqs: list[RecommendRequest], batch: bool) -> None:
    """403 for explain while disabled; 422 (the shape of any invalid body) past CMN_MAX_EXPLAIN_K,
    CMN_MAX_TOTAL_K or CMN_MAX_HISTORY. Checked before anything is queued: the cost of an answer grows with k, far more with
    explanations, and a 7 KB batch could otherwise ask for 256,000 items."""
    settings = service.settings
    if any(r.explain for r in reqs) and not settings.allow_explain:
        raise HTTPException(403, "explanations reveal other users' ids and are disabled on this server "
                                 "(set CMN_ALLOW_EXPLAIN=true to enable)")
    where = (lambda n, field: ("body", "requests", n, field)) if batch else (lambda n, field: ("body", field))
    errors = [{"type": "less_than_equal", "loc": where(n, "k"),
               "msg": f"k is at most {settings.max_explain_k} when explain is true"}
              for n, r in enumerate(reqs) if r.explain and r.k > settings.max_explain_k]
    errors += [{"type": "too_long", "loc": where(n, "history"),
                "msg": f"history holds {len(r.history)} items; at most {settings.max_history}"}
               for n, r in enumerate(reqs) if r.history and len(r.history) > settings.max_history]
    total = sum(r.k for r in reqs)
    if total > settings.max_total_k:
        errors.append({"type": "less_than_equal", "loc": ("body", "requests") if batch else ("body", "k"),
                       "msg": f"k adds up to {total} over the request; at most {settings.max_total_k}"})
    if errors:
        raise RequestValidationError(errors)


async def caught_up(service: Service, reqs: list[RecommendRequest], batch: bool) -> None:
    """Wait until this process has applied the largest `after_seq` asked for (503 while the store cannot be read);
    422 for a seq the store does not hold."""
    seq = max((r.after_seq for r in reqs if r.after_seq is not None), default=None)
    if not await service.caught_up(seq):
        raise RequestValidationError([{"type": "less_than_equal", "loc": ("body", "requests") if batch else
                                       ("body", "after_seq"), "msg": f"after_seq {seq} is beyond the last event of "
                                       f"the feedback store ({service.engine.feedback_seq})"}])


def entries(answers: list[Answer]) -> int:
    return sum(len(items) + sum(len(e or ()) for *_, e in items) for items in (a.items for a in answers))


async def render(build: Callable[[], dict], size: int) -> JSONResponse:
    """The answer as a JSONResponse (its bytes are made when it is constructed): inline when small, on a worker
    thread when large, so that building and serialising it never holds the event loop."""
    if size <= INLINE_ENTRIES:
        return JSONResponse(build())
    return await asyncio.to_thread(lambda: JSONResponse(build()))


def elapsed_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def response(user_id: str | None, answer: Answer, version: str, start: float) -> dict:
    """One RecommendResponse as plain JSON data (absent rather than null where the schema says so): building
    256 pydantic models of 1,000 items each cost more than scoring them."""
    kind = "fallback" if answer.fallback else answer.cold_start or "personalised"
    metrics.RECOMMENDATIONS.labels(kind, answer.strategy or "popularity").inc()
    if answer.fallback:
        metrics.FALLBACKS.labels(answer.fallback).inc()
    items = []
    for i, s, live, e in answer.items:
        item = {"item_id": i, "score": s}
        if live:
            item["live"] = True
        if e is not None:
            item["explanation"] = [{"user_id": u, "weight": w, "live": True} if live_user else
                                   {"user_id": u, "weight": w} for u, w, live_user in e]
        items.append(item)
    body = {"user_id": user_id, "items": items, "model_version": version}
    if answer.fallback:
        body["fallback"] = answer.fallback
    if answer.strategy:
        body["strategy"] = answer.strategy
    if answer.cold_start:
        body["cold_start"] = answer.cold_start
    body["took_ms"] = elapsed_ms(start)
    return body
