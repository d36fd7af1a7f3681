"""Dependencies shared by the routers: the running Service, and who is calling (app/auth.py).

The key checks are dependencies, so they run before the body is validated: a client without the right key learns
nothing about the body it sent. The security schemes document the headers in the OpenAPI schema.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.auth import Caller
from app.service import Service

BEARER = HTTPBearer(auto_error=False, description="an API key of CMN_AUTH_FILE (needed only when it is set)")
ADMIN_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="CMN_API_KEY, or an admin-scoped key")


async def service_of(request: Request) -> Service:
    # async on purpose: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per request
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service_of)]
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]


def address(request: Request) -> str:
    return request.client.host if request.client else ""


def caller(scope: str):
    async def authenticate(request: Request, service: ServiceDep, bearer: Bearer) -> Caller:
        return service.auth.authenticate(bearer.credentials if bearer else None, address(request), scope)
    return authenticate


RecommendCaller = Annotated[Caller, Depends(caller("recommend"))]
FeedbackCaller = Annotated[Caller, Depends(caller("feedback"))]
require_metrics = caller("metrics")


async def require_admin(request: Request, service: ServiceDep, bearer: Bearer,
                        x_api_key: Annotated[str | None, Depends(ADMIN_KEY)]) -> None:
    service.auth.authenticate_admin(x_api_key or (bearer.credentials if bearer else None), address(request))
