"""The FastAPI application: settings, the Service opened in the lifespan, the routers, and the error contract.

`app` is built from the environment at import, as FastAPI's templates do, so `uvicorn app.main:app` and
`fastapi run app/main.py` serve it; nothing is loaded or opened before the lifespan starts (the checkpoint, the
feedback store and the model thread belong to the Service it starts). `python -m app` runs the same `app` with
the server options of app/protocol.py.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.batcher import QueueFull
from app.jobs import UnknownIds, UnsupportedStrategy
from app.middleware import RequestContext, configure_logging
from app.routes import ROUTERS
from app.models import NotReady, ReloadFailed
from app.service import Service
from app.settings import Settings, from_environment

log = logging.getLogger("cmn.app")


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    configure_logging(settings.log_level)
    service = Service(settings)
    app.state.service = service
    await service.start()
    try:  # SIGHUP = reload the configured checkpoint (only possible in the main thread)
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, service.reload_in_background)
    except (NotImplementedError, RuntimeError, ValueError):
        pass
    try:
        yield
    finally:
        await service.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or from_environment()
    app = FastAPI(title="CMN recommendation service", version="1.0",
                  description="Collaborative Memory Network (SIGIR 2018) recommendations, online feedback and "
                              "hot reload. See docs/api.md.", lifespan=lifespan,
                  redoc_url=None)  # one interactive page (/docs) is enough; docs/security.md lists what is open
    app.state.settings = settings
    app.add_middleware(RequestContext, settings=settings)
    register_errors(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


def register_errors(app: FastAPI) -> None:
    @app.exception_handler(UnknownIds)
    async def unknown_ids(request: Request, e: UnknownIds):
        return JSONResponse({"detail": {"message": str(e), "field": e.field, "unknown": e.ids,
                                        "unknown_count": e.count}}, status_code=422)

    @app.exception_handler(UnsupportedStrategy)
    async def unsupported_strategy(request: Request, e: UnsupportedStrategy):
        return JSONResponse({"detail": [{"type": "strategy", "loc": ["body", "strategy"], "msg": str(e)}]},
                            status_code=422)

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, e: NotReady):
        return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull):
        return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(ReloadFailed)
    async def reload_failed(request: Request, e: ReloadFailed):
        return JSONResponse({"detail": str(e), "model_version": e.serving}, status_code=409)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        if e.status_code == 400:  # only FastAPI raises 400 here: a body it cannot decode (not UTF-8, too deep)
            return JSONResponse({"detail": [{"type": "json_invalid", "loc": ["body"],
                                             "msg": "body is not valid JSON"}]}, status_code=422)
        return await http_exception_handler(request, e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        # inputs are echoed back only as their type: a 10k-item list or a secret must not be reflected
        errors = [{"type": err["type"], "loc": list(err["loc"]), "msg": err["msg"]} for err in e.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        log.exception("unhandled error", extra={"request_id": request.scope.get("request_id")})
        return JSONResponse({"detail": "internal error", "request_id": request.scope.get("request_id")},
                            status_code=500)


app = create_app()
