"""POST /recommend and /recommend/batch: validate, resolve ids, queue for the model thread, shape the answer."""
from __future__ import annotations

import time

from fastapi import APIRouter
from starlette.exceptions import HTTPException

from app import metrics
from app.deps import ServiceDep
from app.engine import Answer
from app.schemas import (BatchRequest, BatchResponse, InvalidRequest, Neighbour, RecommendRequest,
                         RecommendResponse, ScoredItem, UnknownIdsError)
from app.service import Service

router = APIRouter(tags=["recommend"])

# /recommend's 422 has two documented shapes: an invalid body, or unknown candidate/exclude ids (listed)
ERRORS = {403: {"description": "explain requested but disabled"}, 413: {"description": "body too large"},
          422: {"model": InvalidRequest | UnknownIdsError,
                "description": "invalid body, or candidate/exclude ids the model does not know"},
          503: {"description": "not ready, or the request queue is full"}}


@router.post("/recommend", response_model=RecommendResponse, response_model_exclude_none=True, responses=ERRORS)
async def recommend(req: RecommendRequest, service: ServiceDep):
    start = time.perf_counter()
    engine = service.engine_or_503()
    check_explain(service, [req])
    answer, = await service.batcher.submit(engine, [engine.prepare(req)])
    return response(req.user_id, answer, engine.version, start)


@router.post("/recommend/batch", response_model=BatchResponse, response_model_exclude_none=True, responses=ERRORS)
async def recommend_batch(batch: BatchRequest, service: ServiceDep):
    start = time.perf_counter()
    engine = service.engine_or_503()
    check_explain(service, batch.requests)
    answers = await service.batcher.submit(engine, [engine.prepare(r) for r in batch.requests])
    return BatchResponse(results=[response(r.user_id, a, engine.version, start)
                                  for r, a in zip(batch.requests, answers)],
                         model_version=engine.version, took_ms=elapsed_ms(start))


def check_explain(service: Service, reqs: list[RecommendRequest]) -> None:
    if any(r.explain for r in reqs) and not service.settings.allow_explain:
        raise HTTPException(403, "explanations reveal other users' ids and are disabled on this server "
                                 "(set CMN_ALLOW_EXPLAIN=true to enable)")


def elapsed_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def response(user_id: str, answer: Answer, version: str, start: float) -> RecommendResponse:
    metrics.RECOMMENDATIONS.labels("fallback" if answer.fallback else "personalised").inc()
    if answer.fallback:
        metrics.FALLBACKS.labels(answer.fallback).inc()
    items = [ScoredItem(item_id=i, score=s,
                        explanation=None if e is None else [Neighbour(user_id=u, weight=w) for u, w in e])
             for i, s, e in answer.items]
    return RecommendResponse(user_id=user_id, items=items, model_version=version, fallback=answer.fallback,
                             took_ms=elapsed_ms(start))
