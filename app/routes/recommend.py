"""POST /recommend and /recommend/batch: the body validated by its schema, the caller by its key (app/deps.py),
one Service call (limits, after_seq, ids resolved, queued for the model thread), then the answer shaped.

A large answer is built and serialised on a worker thread, so the event loop keeps answering other requests
(/health among them) meanwhile.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app import metrics
from app.auth import AUTH_RESPONSES
from app.deps import RecommendCaller, ServiceDep
from app.jobs import Answer
from app.service import Shown
from app.schemas import (BatchRequest, BatchResponse, InvalidRequest, RecommendRequest, RecommendResponse,
                         UnknownIdsError)

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
    _, (answer,), (shown,) = await service.recommend([req], caller, batch=False)
    return await render(lambda: response(req.user_id, answer, shown, start), entries([answer]))


@router.post("/recommend/batch", response_model=BatchResponse, responses=ERRORS)
async def recommend_batch(batch: BatchRequest, service: ServiceDep, caller: RecommendCaller):
    start = time.perf_counter()
    engine, answers, shown = await service.recommend(batch.requests, caller, batch=True)
    return await render(lambda: {"results": [response(r.user_id, a, s, start)
                                             for r, a, s in zip(batch.requests, answers, shown)],
                                 "model_version": engine.version, "took_ms": elapsed_ms(start)}, entries(answers))


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


def response(user_id: str | None, answer: Answer, shown: Shown, start: float) -> dict:
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
    body = {"user_id": user_id, "items": items, "model_version": shown.model_version}
    if answer.fallback:
        body["fallback"] = answer.fallback
    if answer.strategy:
        body["strategy"] = answer.strategy
    if answer.cold_start:
        body["cold_start"] = answer.cold_start
    body["impression_id"] = shown.impression_id
    if shown.arm:
        body["arm"] = shown.arm
    body["took_ms"] = elapsed_ms(start)
    return body
