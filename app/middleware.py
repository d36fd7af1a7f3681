"""Pure-ASGI middleware: request ids, body-size limit, latency metrics and one JSON log line per request."""
from __future__ import annotations

import json
import logging
import sys
import time
import uuid

from app import metrics

log = logging.getLogger("cmn.access")
ROUTES = {"/recommend", "/recommend/batch", "/feedback", "/health", "/metrics", "/admin/reload", "/docs",
          "/openapi.json"}
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


class RequestContext:
    def __init__(self, app, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope["request_id"] = request_id
        status = 500
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            body = await self._read_body(scope, receive, headers)
            if body is None:
                await self._too_large(send_with_id)
            else:
                await self.app(scope, self._replay(body), send_with_id)
        finally:
            latency = time.perf_counter() - start
            metrics.LATENCY.labels(route, scope["method"], str(status)).observe(latency)
            log.info("request", extra={"request_id": request_id, "route": route, "method": scope["method"],
                                       "status": status, "latency_ms": round(latency * 1000, 3)})

    async def _read_body(self, scope, receive, headers) -> bytes | None:
        """The whole body, or None when it exceeds the limit (checked before and while reading)."""
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
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

    async def _too_large(self, send) -> None:
        payload = json.dumps({"detail": f"request body exceeds {self.max_body_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
