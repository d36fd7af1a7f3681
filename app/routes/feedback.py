"""POST /feedback: needs the feedback scope; durable (all events or none) before the answer, visible to the next
request."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.auth import AUTH_RESPONSES
from app.deps import FeedbackCaller, ServiceDep
from app.schemas import FeedbackConflict, FeedbackRequest, FeedbackResponse
from model.store.events import CONFLICTS_LISTED, EventIdConflict, StoreUnavailable

router = APIRouter(tags=["feedback"], responses=AUTH_RESPONSES)

STORE_RETRY_S = 5


@router.post("/feedback", response_model=FeedbackResponse,
             responses={202: {"model": FeedbackResponse,
                              "description": "stored; some events take effect at the next training run"},
                        409: {"model": FeedbackConflict,
                              "description": "an event_id this key already used for another event; nothing stored"},
                        413: {"description": "body too large, or more events in one request than the key's quota "
                                             "allows a minute"},
                        503: {"description": "no model loaded yet, or the feedback store cannot be written (disk "
                                             "full, read-only); nothing stored: retry after Retry-After"}})
async def feedback(body: FeedbackRequest, service: ServiceDep, caller: FeedbackCaller):
    try:
        result = await service.write_feedback(body.events, caller)
    except EventIdConflict as e:
        raise HTTPException(409, {"message": f"{e}; nothing of this request was stored",
                                  "event_ids": e.ids[:CONFLICTS_LISTED], "count": len(e.ids)}) from None
    except StoreUnavailable as e:
        raise HTTPException(503, f"the feedback store cannot be written now ({e}); nothing of this request was "
                                 "stored: retry with the same event_ids", headers={"Retry-After": str(STORE_RETRY_S)}
                            ) from None
    return JSONResponse(result.model_dump(), status_code=202 if result.deferred else 200)
