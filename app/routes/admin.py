"""POST /admin/reload: load, warm and swap a checkpoint; needs the admin key (X-API-Key)."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from app.auth import AUTH_RESPONSES
from app.deps import ServiceDep, require_admin
from app.schemas import ReloadRequest, ReloadResponse

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)], responses=AUTH_RESPONSES)


@router.post("/reload", response_model=ReloadResponse,
             responses={401: {"description": "missing or wrong X-API-Key"},
                        404: {"description": "admin routes disabled (no CMN_API_KEY)"},
                        409: {"description": "the checkpoint was refused (one message whatever the reason, which "
                                              "the server log names); the old model keeps serving"}})
async def reload(service: ServiceDep, body: ReloadRequest | None = None):
    return await service.reload(body.checkpoint if body else None)
