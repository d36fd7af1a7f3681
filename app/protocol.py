"""The HTTP server's connection limits: uvicorn's h11 protocol with a deadline on every request head, and the
uvicorn options `python -m app` runs with.

uvicorn bounds what a connection may hold (`h11_max_incomplete_event_size`: the head's size; `limit_concurrency`:
connections and requests in progress, 503 past it) and how long it may idle between requests
(`timeout_keep_alive`), but not how long a client may take to send a request head: its keep-alive timer is
re-armed by every byte received, so a client sending one header byte a second holds its connection for ever.
`HeadTimeoutProtocol` gives each head a deadline that bytes do not extend. Body reads are timed in
`app.middleware.RequestContext`, which reads every body before the app does.
"""
from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.settings import Settings, from_environment


class HeadTimeoutProtocol(H11Protocol):
    """Closes the connection when a request head has not arrived in full within `head_timeout` seconds: counted
    from the connection's start, and again from the end of each response (that also bounds how long the rest of a
    body refused with 413 is read and discarded after the answer)."""

    # set per server by `server_options`; None (worker processes, which uvicorn hands the class by reference):
    # CMN_HEADER_TIMEOUT_S of the process's environment, read once
    head_timeout: float | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._serving():
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._serving():  # not already serving a pipelined request
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _serving(self) -> bool:
        """A request head has arrived and its answer is not complete (h11: the server owes a response)."""
        return self.conn.our_state is h11.SEND_RESPONSE

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        if self.head_timeout is None:
            type(self).head_timeout = from_environment().header_timeout_s
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._serving() and not self.transport.is_closing():
            self.logger.info("closing a connection that sent no complete request head in %g s", self.head_timeout)
            self.transport.close()


def server_options(settings: Settings) -> dict:
    """Keyword arguments for `uvicorn.run` / `uvicorn.Config` (besides the app). Several workers get the protocol
    class itself: a class made here could not be sent to their processes."""
    protocol = HeadTimeoutProtocol if settings.workers > 1 else type(
        "HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"head_timeout": settings.header_timeout_s})
    return {"host": settings.host, "port": settings.port, "http": protocol,
            "h11_max_incomplete_event_size": settings.max_header_bytes,
            "limit_concurrency": settings.limit_concurrency, "timeout_keep_alive": settings.keep_alive_s,
            "log_config": None, "access_log": False, "timeout_graceful_shutdown": 30}
