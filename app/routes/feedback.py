"""POST /feedback: durable before the answer, visible to the next request."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import ServiceDep
from app.schemas import FeedbackRequest, FeedbackResponse

router = APIRouter(tags=["feedback"])


@router.post("/feedback", response_model=FeedbackResponse,
             responses={202: {"model": FeedbackResponse,
                              "description": "stored; some events take effect at the next training run"},
                        413: {"description": "body too large"}})
async def feedback(body: FeedbackRequest, service: ServiceDep):
    result = await service.feedback(body.events)
    return JSONResponse(result.model_dump(), status_code=202 if result.deferred else 200)
