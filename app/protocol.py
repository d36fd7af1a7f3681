"""The HTTP server's connection limits: uvicorn's httptools protocol with a deadline and a size limit on every
request head and a cap on open connections, and the uvicorn options `python -m app` runs with.

uvicorn bounds neither the time a client may take to send a request head (its keep-alive timer is re-armed by
every byte received, and there is none before the first request) nor, with httptools, the head's size (the C
parser buffers a header value of any length), and its `limit_concurrency` counts open connections together with
requests: a few hundred idle connections made every route answer 503. Here:

- `ServerProtocol` gives each head a deadline that bytes do not extend, refuses a head longer than
  CMN_MAX_HEADER_BYTES before the parser has buffered more than that (431, connection closed), and keeps at most
  CMN_MAX_CONNECTIONS connections open: past it, the connection that has waited longest for a request head is
  closed to make room, else the one that has been sending its body longest (idle connections and trickling
  bodies are what an attacker can hold cheaply; a connection whose request is being answered is never closed for
  another).
- Requests in progress are bounded by CMN_LIMIT_CONCURRENCY in `app.middleware.RequestContext`, which also times
  body reads; idle connections do not count, and /health and /livez are never refused.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.settings import Settings, from_environment


class ServerProtocol(HttpToolsProtocol):
    """A connection is *waiting* from its start, and again from the end of each answer, until a complete request
    head has arrived: it is closed once it has waited `header_timeout_s`, and may be closed earlier to make room
    for a new one. While waiting, the head's bytes are counted before they reach the parser.

    The waiting connections of a server are one ordered dict, longest waiting first, swept a few times per
    timeout by one timer: a request costs a dict insert and a removal, not a timer of its own. Connections
    receiving a request body are a second one, in the order their heads arrived."""

    # set per server by `server_options`; None (worker processes, which uvicorn hands the class by reference):
    # the settings of the process's environment, read once
    settings: Settings | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.settings is None:
            type(self).settings = from_environment()
        self._head_bytes: int | None = 0      # bytes of the head arriving now; None while no head is arriving
        self._heads = 0                       # heads completed on this connection
        super().connection_made(transport)
        self._waiting = waiting_of(self.server_state, self.loop, self.settings.header_timeout_s)
        self._receiving = receiving_of(self.server_state)
        self._make_room()
        if not transport.is_closing():
            self._wait_for_head()

    # ---------------------------------------------------------------- bytes in, before the parser

    def data_received(self, data: bytes) -> None:
        if self._head_bytes is None:          # a body, or bytes after a request the server is answering
            return super().data_received(data)
        room = self.settings.max_header_bytes - self._head_bytes
        heads, fed = self._heads, data if len(data) <= room else data[:room]
        super().data_received(fed)
        if self.transport.is_closing():
            return
        if self._heads == heads and self._head_bytes is not None:   # still the same head
            if len(fed) < len(data):
                return self._refuse_head()
            self._head_bytes += len(data)
        elif len(fed) < len(data):            # the head ended within the limit: the rest is body or another head
            self.data_received(data[len(fed):])

    def on_headers_complete(self) -> None:
        self._heads += 1
        self._head_bytes = None
        self._stop_waiting()
        self._receiving[self] = None          # until its body has arrived (at once, for a request without one)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._receiving.pop(self, None)
        self._head_bytes = 0                  # what follows is the next request's head

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._serving():   # not already serving a pipelined request
            self._wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        self._receiving.pop(self, None)
        super().connection_lost(exc)

    def _serving(self) -> bool:
        """A request head has arrived and its answer is not complete."""
        return self.cycle is not None and not self.cycle.response_complete

    def _refuse_head(self) -> None:
        limit = self.settings.max_header_bytes
        if self._serving():   # a pipelined head behind an answer still being written: no room for another answer
            self.transport.close()
            return
        body = f'{{"detail": "request line and headers exceed {limit} bytes"}}'.encode()
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()

    # ---------------------------------------------------------------- waiting connections: deadline, room

    def _wait_for_head(self) -> None:
        self._waiting.pop(self, None)
        self._waiting[self] = self.loop.time()

    def _stop_waiting(self) -> None:
        self._waiting.pop(self, None)

    def _head_timed_out(self) -> None:
        if not self._serving() and not self.transport.is_closing():
            self.logger.info("closing a connection that sent no complete request head in %g s",
                             self.settings.header_timeout_s)
            self.transport.close()

    def _make_room(self) -> None:
        """Past CMN_MAX_CONNECTIONS, close the connection that has waited longest for a head, else the one that
        has been receiving its body longest; when every other connection has a request being answered, this new
        one is closed instead."""
        if len(self.connections) <= self.settings.max_connections:
            return
        for held in (self._waiting, self._receiving):
            if held:
                oldest, _ = held.popitem(last=False)
                oldest.transport.close()
                return
        self.transport.close()


def receiving_of(state) -> OrderedDict:
    """The server's connections receiving a request body (connection → None), oldest head first."""
    if not hasattr(state, "cmn_receiving"):
        state.cmn_receiving = OrderedDict()
    return state.cmn_receiving


def waiting_of(state, loop: asyncio.AbstractEventLoop, timeout: float) -> OrderedDict:
    """The server's waiting connections (connection → when it began waiting), and the timer that closes those
    that waited `timeout`: it runs every quarter of the timeout (at most every second), so a connection is
    closed between `timeout` and 1.25 × `timeout` after it began to wait."""
    waiting = getattr(state, "cmn_waiting", None)
    if waiting is None:
        waiting = state.cmn_waiting = OrderedDict()
        every = min(1.0, timeout / 4)

        def sweep() -> None:
            deadline = loop.time() - timeout
            while waiting:
                connection, since = next(iter(waiting.items()))
                if since > deadline:
                    break
                del waiting[connection]
                connection._head_timed_out()
            loop.call_later(every, sweep)
        loop.call_later(every, sweep)
    return waiting


def server_options(settings: Settings) -> dict:
    """Keyword arguments for `uvicorn.run` / `uvicorn.Config` (besides the app). Several workers get the protocol
    class itself: a class made here could not be sent to their processes.

    Forwarded headers (X-Forwarded-For, -Proto) are believed only from CMN_FORWARDED_ALLOW_IPS: uvicorn's own
    default trusts loopback, so any local process (or a proxy on the host that appends rather than replaces the
    header) could choose the client address the wrong-key throttle counts."""
    protocol = ServerProtocol if settings.workers > 1 else type(
        "ServerProtocol", (ServerProtocol,), {"settings": settings})
    return {"host": settings.host, "port": settings.port, "http": protocol,
            "limit_concurrency": None, "timeout_keep_alive": settings.keep_alive_s,
            "proxy_headers": bool(settings.forwarded_allow_ips),
            "forwarded_allow_ips": settings.forwarded_allow_ips or None,
            "log_config": None, "access_log": False, "timeout_graceful_shutdown": 30}
