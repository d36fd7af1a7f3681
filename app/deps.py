"""Dependencies shared by the routers: the running Service, and the admin-key check."""
from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, Request
from starlette.exceptions import HTTPException

from app.service import Service


async def service_of(request: Request) -> Service:
    # async on purpose: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per request
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service_of)]


async def require_admin(service: ServiceDep, x_api_key: Annotated[str | None, Header()] = None) -> None:
    expected = service.settings.api_key
    if expected is None:
        raise HTTPException(404, "admin routes are disabled: set CMN_API_KEY to enable them")
    if x_api_key is None or not secrets.compare_digest(x_api_key.encode(), expected.get_secret_value().encode()):
        raise HTTPException(401, "missing or wrong X-API-Key")
