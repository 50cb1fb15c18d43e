"""Connection hygiene for the REST server (uvicorn's httptools protocol, extended).

uvicorn closes idle keep-alive connections, but holds a connection that never
finishes its request head or body for ever, and accepts connections without
bound. Here every connection must send its request head within
``http_header_timeout_s`` (counted from the connection or from the previous
response) and each part of its body within ``http_body_timeout_s``, else it
gets 408 and is closed; and at most ``max_connections`` are open: more are
answered 503 at once and closed. (gRPC has its own limits: serving/api/grpc/server.py.)

One speed-up rides along: uvicorn writes a response's head and its body with one
``transport.write`` each, i.e. two ``send`` system calls per answer (the largest single
cost in a profile of the gateway over an instant backend). The response cycle here
writes through :class:`CoalescingWriter`, which joins what is written in one turn of the
event loop into one write.
"""

from __future__ import annotations

import logging
import resource

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.errors import ServiceError, SlowClient, Unavailable, error_body
from serving.settings import Settings

log = logging.getLogger("serving.connections")


def _response(e: ServiceError, reason: str) -> bytes:
    body = error_body(e)
    head = (f"HTTP/1.1 {e.http_status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


def max_open_connections(wanted: int) -> int:
    """``wanted``, lowered to what the process' file descriptor limit allows (raised to its hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    allowed = max(16, soft - 256)  # room for gRPC connections, model files, logs
    if wanted > allowed:
        log.warning("max_connections=%d lowered to %d (file descriptor limit %d)", wanted, allowed, soft)
    return min(wanted, allowed)


class CoalescingWriter:
    """A transport as a response cycle sees it (write, close, is_closing): writes made in one
    turn of the event loop go out as one ``transport.write`` at the end of that turn."""

    __slots__ = ("transport", "loop", "pending")

    def __init__(self, transport, loop):
        self.transport, self.loop, self.pending = transport, loop, []

    def write(self, data: bytes) -> None:
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.append(data)

    def flush(self) -> None:
        if self.pending:
            data = self.pending[0] if len(self.pending) == 1 else b"".join(self.pending)
            self.pending = []
            if not self.transport.is_closing():
                self.transport.write(data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the header/body deadlines and the connection cap;
    :func:`guarded_protocol` makes one with the settings' values."""

    header_s = body_s = 10.0
    limit = 2048
    busy = b""
    _timer = None
    _refused = False
    _writer: CoalescingWriter | None = None

    def connection_made(self, transport):
        if len(self.connections) >= self.limit:
            self._refused = True
            transport.write(self.busy)
            transport.close()
            return
        super().connection_made(transport)
        self._arm(self.header_s, "request head", "http_header_timeout_s")

    def connection_lost(self, exc):
        if self._refused:
            return
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self):
        super().on_message_begin()
        self._arm(self.header_s, "request head", "http_header_timeout_s")

    def on_headers_complete(self):
        super().on_headers_complete()
        if self.cycle is not None:
            if self._writer is None:
                self._writer = CoalescingWriter(self.transport, self.loop)
            self.cycle.transport = self._writer
        self._arm(self.body_s, "request body", "http_body_timeout_s")

    def on_body(self, body: bytes):
        super().on_body(body)
        self._arm(self.body_s, "request body", "http_body_timeout_s")

    def on_message_complete(self):
        self._disarm()
        super().on_message_complete()

    def _arm(self, seconds: float, what: str, setting: str):
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired, what, setting, seconds)

    def _disarm(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, what: str, setting: str, seconds: float):
        self._timer = None
        if self._writer is not None:
            self._writer.flush()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
            self.transport.write(_response(SlowClient(f"{what} not received within {setting}={seconds:g}"),
                                           "Request Timeout"))
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        self.transport.close()


def guarded_protocol(settings: Settings) -> type[HttpToolsProtocol]:
    """The REST server's protocol class with the settings' deadlines and connection cap."""
    limit = max_open_connections(settings.max_connections)
    busy = _response(Unavailable(f"too many open connections (max_connections={limit}); retry later"),
                     "Service Unavailable")
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {
        "header_s": settings.http_header_timeout_s, "body_s": settings.http_body_timeout_s, "limit": limit, "busy": busy})
