"""/admin: reload a checkpoint, see the experiment, stop or resume one of its arms; needs the admin key
(X-API-Key)."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends
from starlette.exceptions import HTTPException

from app.auth import AUTH_RESPONSES
from app.deps import ServiceDep, require_admin
from app.routes.feedback import STORE_RETRY_S
from app.schemas import ExperimentStatus, ReloadRequest, ReloadResponse
from model.store.events import StoreUnavailable

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)], responses=AUTH_RESPONSES)

ADMIN = {401: {"description": "missing or wrong X-API-Key"},
         404: {"description": "admin routes disabled (no CMN_API_KEY)"}}


@router.post("/reload", response_model=ReloadResponse,
             responses={**ADMIN, 409: {"description": "the checkpoint was refused (one message whatever the reason, "
                                                      "which the server log names); the old model keeps serving. Or "
                                                      "the key file (CMN_AUTH_FILE) has errors: the keys are those of "
                                                      "its lines that parse (none when it cannot be read), and the "
                                                      "checkpoint was not reloaded"}})
async def reload(service: ServiceDep, body: ReloadRequest | None = None):
    return await service.reload(body.checkpoint if body else None)


@router.get("/experiment", response_model=ExperimentStatus, responses=ADMIN)
async def experiment(service: ServiceDep):
    return service.experiments.status()


@router.post("/experiment/arms/{arm}/{action}", response_model=ExperimentStatus,
             responses={**ADMIN, 404: {"description": "admin routes disabled, or no such arm in the experiment"},
                        503: {"description": "the feedback store cannot be written: nothing changed"}})
async def stop_arm(arm: str, action: Literal["stop", "resume"], service: ServiceDep):
    """Stop an arm (its users are served as if there were no experiment) or resume it, in every process sharing
    the feedback store: this one at once, the others within CMN_FEEDBACK_POLL_S. No restart, no file edit."""
    try:
        return await service.stop_arm(arm, action == "stop")
    except KeyError:
        running = service.experiments.experiment
        raise HTTPException(404, f"no arm {arm!r} in the experiment {running.name!r}" if running else
                                 "no experiment is running (CMN_EXPERIMENT_FILE unset)") from None
    except StoreUnavailable as e:
        raise HTTPException(503, f"the feedback store cannot be written now ({e}); the arm is unchanged",
                            headers={"Retry-After": str(STORE_RETRY_S)}) from None
