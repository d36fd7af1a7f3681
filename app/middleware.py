"""Pure-ASGI middleware: request ids, header and body limits, latency metrics and one JSON log line per request."""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid

from app import metrics
from app.settings import Settings

log = logging.getLogger("cmn.access")
ROUTES = {"/recommend", "/recommend/batch", "/feedback", "/health", "/livez", "/metrics", "/admin/reload", "/docs",
          "/openapi.json", "/dashboard", "/dashboard/data"}
# labels and log fields take a request's method only from this list ("other" else): a client may send any token
# as its method, and each new label value is a new series in /metrics for the life of the process
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
# never refused for load: a probe must tell a busy server from a dead one, and these cost no model work
PROBES = {"/health", "/livez"}
LOG_FIELDS = ("request_id", "route", "method", "status", "latency_ms", "event", "model_version",
              "previous_version", "path", "device", "feedback_replayed", "seconds")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                "msg": record.getMessage()}
        line.update({k: getattr(record, k) for k in LOG_FIELDS if hasattr(record, k)})
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("cmn")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class ClientGone(Exception):
    """The connection closed before the whole body arrived (the client left, or app/protocol.py made room)."""


class RequestContext:
    """Reads every request body here, whole, before the app sees it: at most `max_body_bytes` (413), within
    `body_timeout_s` seconds from the first read to the last (408; a client trickling its body cannot hold a
    connection and a task open for ever). Then at most `limit_concurrency` requests are in the app at once (503 +
    Retry-After past it; /health and /livez are never refused): a request counts once its body has arrived, so
    neither idle connections nor slow bodies take the places of requests that can be served. Heads larger than
    `max_header_bytes` get 431: app/protocol.py refuses them while they arrive, this catches a server run with
    another protocol (`uvicorn app.main:app`)."""

    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        s = self.settings
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope["request_id"] = request_id
        status = 500
        route = scope["path"] if scope["path"] in ROUTES else "other"
        method = scope["method"] if scope["method"] in METHODS else "other"

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            head = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) + \
                sum(len(k) + len(v) + 4 for k, v in scope["headers"])
            if head > s.max_header_bytes:
                return await self._refuse(send_with_id, 431, f"request headers exceed {s.max_header_bytes} bytes")
            try:
                body = await asyncio.wait_for(self._read_body(scope, receive, headers), s.body_timeout_s)
            except asyncio.TimeoutError:
                return await self._refuse(send_with_id, 408, f"request body not received within "
                                                             f"{s.body_timeout_s:g} s", close=True)
            except ClientGone:   # nothing to answer, and a part of a body is no request (logged as nginx does)
                status = 499
                return
            if body is None:
                return await self._refuse(send_with_id, 413, f"request body exceeds {s.max_body_bytes} bytes")
            if self.in_flight >= s.limit_concurrency and route not in PROBES:
                return await self._refuse(send_with_id, 503, f"{self.in_flight} requests in progress, the most "
                                                             "this server takes: retry shortly", retry_after=1)
            self.in_flight += 1
            try:
                await self.app(scope, self._replay(body), send_with_id)
            finally:
                self.in_flight -= 1
        finally:
            latency = time.perf_counter() - start
            metrics.LATENCY.labels(route, method, str(status)).observe(latency)
            log.info("request", extra={"request_id": request_id, "route": route, "method": method,
                                       "status": status, "latency_ms": round(latency * 1000, 3)})

    async def _read_body(self, scope, receive, headers) -> bytes | None:
        """The whole body, or None when it exceeds the limit (checked before and while reading)."""
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.settings.max_body_bytes:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes):
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}
        return receive

    @staticmethod
    async def _refuse(send, status: int, detail: str, close: bool = False, retry_after: int | None = None) -> None:
        """A JSON error, without calling the app. `close`: end the connection after it (a client too slow to send
        its body). Otherwise the client may go on sending, and read the answer: uvicorn discards the rest of a body
        not read, for at most CMN_HEADER_TIMEOUT_S (app/protocol.py)."""
        payload = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        headers += [(b"connection", b"close")] * close
        if retry_after is not None:
            headers.append((b"retry-after", str(retry_after).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
