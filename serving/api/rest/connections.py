"""Connection hygiene for the REST server (uvicorn's httptools protocol, extended).

uvicorn closes idle keep-alive connections, but holds a connection that never
finishes its request head or body for ever, accepts connections without bound, and
buffers a request head of any size (httptools joins a header's pieces until the line
ends). Here, per connection:

- the request head must arrive within ``http_header_timeout_s`` (counted from the
  connection, or from the first byte of a later request) and hold at most
  ``http_max_header_bytes`` in all (request line included), ``http_max_headers`` fields
  and ``http_max_header_line_bytes`` per line; beyond a limit it gets 431 at once, with
  no more of it read into memory than one socket read past the limit;
- the body must keep coming: no gap over ``http_body_timeout_s``, all of it within
  ``http_body_deadline_s`` of the head's end, and after its first ``http_body_rate_grace_s``
  at ``http_min_body_bytes_per_s`` or more on average (0: no rate check); else 408.
  Time during which the server itself does not read (uvicorn's flow control while the
  app has not taken what came, an ``Expect: 100-continue`` not yet answered) does not
  count against the client;
- a refused connection gets the service's JSON error naming the limit and its setting,
  then its write side is shut and whatever it still sends is read and dropped for up to
  ``LINGER_S`` (or ``LINGER_BYTES``) before it is closed, so that a client still writing its
  request reads the answer rather than a reset;

and at most ``max_connections`` are open: more are answered 503 at once and closed, unless a
refused connection is still lingering: the oldest of those is closed to make room.

(gRPC has its own limits: serving/api/grpc/server.py.)

One speed-up rides along: uvicorn writes a response's head and its body with one
``transport.write`` each, i.e. two ``send`` system calls per answer (the largest single
cost in a profile of the gateway over an instant backend). The response cycle here
writes through :class:`CoalescingWriter`, which joins what is written in one turn of the
event loop into one write. Likewise the timers: one is armed when a connection opens (for
its first head) and when a read ends inside a head or a body, never per chunk; a later
request whose head and body come in one read arms none.
"""

from __future__ import annotations

import logging

import httptools
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.errors import PayloadTooLarge, ServiceError, SlowClient, Unavailable, error_body
from serving.settings import Settings

log = logging.getLogger("serving.connections")


def _response(e: ServiceError, reason: str, path: bytes = b"") -> bytes:
    body = error_body(e, path)
    head = (f"HTTP/1.1 {e.http_status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


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


IDLE, HEAD, BODY = 0, 1, 2  # where a connection is: between requests, in a request head, in a body
# After a refusal, what the client still sends is read and dropped for up to LINGER_S seconds or
# LINGER_BYTES bytes (it may be writing the rest of its request, and read the answer only then).
LINGER_S, LINGER_BYTES = 1.0, 1 << 20


class HeadersTooLarge(PayloadTooLarge):
    """A request head over a limit (http_max_header_bytes, http_max_headers,
    http_max_header_line_bytes): 431, then the connection is closed."""

    http_status = 431


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a request that broke a limit."""


class TimedFlowControl(FlowControl):
    """uvicorn's read flow control, also counting how long reading has been paused (by the
    server: the app has not taken the body that came) so that the body limits leave it out."""

    def __init__(self, transport, clock):
        super().__init__(transport)
        self._clock, self._held, self._since = clock, 0.0, 0.0

    def pause_reading(self) -> None:
        if not self.read_paused:
            self._since = self._clock()
        super().pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self._held += self._clock() - self._since
        super().resume_reading()

    def held(self, now: float) -> float:
        """Seconds reading has been paused so far (the current pause included)."""
        return self._held + (now - self._since if self.read_paused else 0.0)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the head and body limits and the connection cap;
    :func:`guarded_protocol` makes one with the settings' values."""

    header_s, body_s, body_deadline_s = 10.0, 30.0, 60.0
    min_body_rate, body_rate_grace_s = 1024.0, 5.0
    max_head_bytes, max_headers, max_line_bytes = 64 * 1024, 100, 16 * 1024
    limit = 2048
    busy = b""
    lingering: dict = {}  # the server's refused connections still lingering, oldest first (per class)
    _timer = None
    _timed = IDLE  # what the armed timer watches: HEAD or BODY (IDLE: none armed)
    _refused = False  # over the connection cap: never served
    _writer: CoalescingWriter | None = None
    _phase = IDLE
    _begun = 0  # requests begun on this connection
    _pending: bytes | None = None  # a refusal: sent once the responses before it are out
    _dropping = False  # refused: what still comes is dropped
    _drop_budget = 1 << 62  # what may still be dropped: LINGER_BYTES once the refusal is answered
    # per request: bytes read while in its head (exact while no read spans a body and a head),
    # the length of its unfinished line, what the parser has handed over (URL, header fields);
    # its body's start, last chunk and bytes, in "client time" (loop time less reading paused)
    _head_bytes = _line = _seen = _fields = 0
    _body_start = _body_last = 0.0
    _body_bytes = 0

    def connection_made(self, transport):
        if len(self.connections) >= self.limit and not self._evict_lingering():
            self._refused = True
            transport.write(self.busy)
            transport.close()
            return
        super().connection_made(transport)
        self.flow = TimedFlowControl(transport, self.loop.time)
        self._arm(HEAD, self.header_s)

    def connection_lost(self, exc):
        if self._refused:
            return
        self._disarm()
        if self._dropping:
            self.lingering.pop(self, None)
        super().connection_lost(exc)

    def _evict_lingering(self) -> bool:
        """At the cap: close the oldest connection that was refused and is only lingering (its
        answer written), so that a new client gets its slot at once rather than a 503."""
        if not self.lingering:
            return False
        oldest = next(iter(self.lingering))
        del self.lingering[oldest]
        self.connections.discard(oldest)
        oldest.transport.abort()
        return True

    # -- reading: the parser is fed here; the head's limits are checked after each read ------
    def data_received(self, data: bytes) -> None:
        if self._dropping:
            self._drop_budget -= len(data)
            if self._drop_budget < 0:
                self.transport.close()
            return
        self._unset_keepalive_if_required()
        phase, begun = self._phase, self._begun
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self._disarm()
                self.handle_websocket_upgrade()
                return
            self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            if self._pending is not None:  # a callback refused the request (a limit)
                self._refuse_head()
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        if self._phase == HEAD:
            self._check_head(data, phase, begun)
        elif self._phase == BODY and self._timed != BODY:
            self._arm_body()

    def _check_head(self, data: bytes, phase: int, begun: int) -> None:
        """After a read that ended inside a request head: its size so far, its unfinished line."""
        if self._begun - begun > (phase == IDLE) or phase == BODY:
            # the head began after other bytes of this read (the end of an earlier request):
            # count what the parser has handed over of it (a little less than was read)
            self._head_bytes, self._line = self._seen + len(self.url), 0
        else:
            self._head_bytes += len(data)
            end = data.rfind(b"\n")
            self._line = self._line + len(data) if end < 0 else len(data) - end - 1
        if self._line > self.max_line_bytes:
            self._too_large(f"a request line or header line longer than "
                            f"http_max_header_line_bytes={self.max_line_bytes}")
        elif self._head_bytes > self.max_head_bytes:
            self._too_large(f"request headers larger than http_max_header_bytes={self.max_head_bytes}")
        elif self._timed != HEAD:
            self._arm(HEAD, self.header_s)
        if self._pending is not None:
            self._refuse_head()

    # -- parser callbacks ----------------------------------------------------------------------
    def on_message_begin(self):
        super().on_message_begin()
        self._phase, self._begun = HEAD, self._begun + 1
        self._head_bytes = self._line = self._seen = self._fields = 0

    def on_url(self, url: bytes):
        super().on_url(url)
        if len(self.url) > self.max_line_bytes:
            self._too_large(f"a request line longer than http_max_header_line_bytes={self.max_line_bytes}")
            raise _Refused

    def on_header(self, name: bytes, value: bytes):
        line = len(name) + len(value) + 2  # "name: value"
        self._fields += 1
        self._seen += line + 2
        if self._fields > self.max_headers:
            self._too_large(f"more than http_max_headers={self.max_headers} header fields")
        elif line > self.max_line_bytes:
            self._too_large(f"a header line longer than http_max_header_line_bytes={self.max_line_bytes}")
        elif self._seen + len(self.url) > self.max_head_bytes:
            self._too_large(f"request headers larger than http_max_header_bytes={self.max_head_bytes}")
        if self._pending is not None:
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self):
        super().on_headers_complete()
        if self.cycle is not None and self.closing:  # draining: no connection is reused after its answer
            self.cycle.keep_alive = False
        if self.cycle is not None:
            if self._writer is None:
                self._writer = CoalescingWriter(self.transport, self.loop)
            self.cycle.transport = self._writer
        self._phase = BODY
        self._body_start = self._body_last = self._client_time()
        self._body_bytes = 0
        if self._timed == HEAD:
            self._disarm()

    def on_body(self, body: bytes):
        super().on_body(body)
        self._body_bytes += len(body)
        self._body_last = self._client_time()

    def on_message_complete(self):
        self._phase = IDLE
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self):
        if self._pending is None or self.pipeline:
            super().on_response_complete()
        else:  # a refused request head waited for the responses before it
            self.server_state.total_requests += 1
            self._answer_and_close(self._pending)

    # -- timers ----------------------------------------------------------------------------------
    def _client_time(self) -> float:
        now = self.loop.time()
        return now - self.flow.held(now)

    def _arm(self, timed: int, seconds: float):
        self._disarm()
        self._timed = timed
        self._timer = self.loop.call_later(seconds, self._head_expired if timed == HEAD else self._check_body)

    def _disarm(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timed = IDLE

    def _head_expired(self):
        self._timer, self._timed = None, IDLE
        error = SlowClient(f"request head not received within http_header_timeout_s={self.header_s:g}")
        self._pending = _response(error, "Request Timeout")
        self._refuse_head()

    def _arm_body(self):
        """Arm the body timer for the earliest moment one of the body limits could be broken."""
        now = self._client_time()
        due = min(self._body_last + self.body_s, self._body_start + self.body_deadline_s)
        if self.min_body_rate > 0:
            due = min(due, self._body_start + max(self.body_rate_grace_s, self._body_bytes / self.min_body_rate))
        self._arm(BODY, max(due - now, 0.01))

    def _check_body(self):
        self._timer, self._timed = None, IDLE
        cycle = self.cycle
        if cycle is not None and cycle.waiting_for_100_continue:  # the client waits for us: the clock starts later
            self._body_start = self._body_last = self._client_time()
            return self._arm_body()
        now = self._client_time()
        took = now - self._body_start
        if took >= self.body_deadline_s:
            error = f"request body not received within http_body_deadline_s={self.body_deadline_s:g}"
        elif now - self._body_last >= self.body_s:
            error = f"request body not received within http_body_timeout_s={self.body_s:g}"
        elif self.min_body_rate > 0 and took >= self.body_rate_grace_s and self._body_bytes < self.min_body_rate * took:
            error = (f"request body arriving at {self._body_bytes / took:.0f} bytes/s, below "
                     f"http_min_body_bytes_per_s={self.min_body_rate:g} (after http_body_rate_grace_s="
                     f"{self.body_rate_grace_s:g})")
        else:
            return self._arm_body()
        self._refuse_body(_response(SlowClient(error), "Request Timeout", self.url))

    # -- refusing --------------------------------------------------------------------------------
    def _too_large(self, message: str) -> None:
        if self._pending is None:
            self._pending = _response(HeadersTooLarge(message), "Request Header Fields Too Large")

    def _refuse_head(self) -> None:
        """Refuse the request whose head is being read (self._pending): at once, or, while an
        earlier request's response is not out yet, right after it."""
        self._dropping = True
        self._disarm()
        if self.pipeline or (self.cycle is not None and not self.cycle.response_complete):
            self.flow.pause_reading()
            return  # on_response_complete answers
        self._answer_and_close(self._pending)

    def _refuse_body(self, answer: bytes) -> None:
        """Refuse the request whose body is being read: its app sees a disconnect."""
        self._dropping = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:  # its response is on the way: it cannot be answered, only cut
                cycle.keep_alive = False
                self.transport.close()
                return
            cycle.disconnected = True
            cycle.message_event.set()
        self._answer_and_close(answer)

    def _answer_and_close(self, answer: bytes) -> None:
        if self._writer is not None:
            self._writer.flush()
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(answer)
        self._drop_budget = LINGER_BYTES
        self.flow.resume_reading()  # read (and drop) what the client still sends
        if transport.can_write_eof():
            transport.write_eof()
            self._disarm()
            self._timer = self.loop.call_later(LINGER_S, transport.close)
            self.lingering[self] = None
        else:
            transport.close()


def guarded_protocol(settings: Settings) -> type[HttpToolsProtocol]:
    """The REST server's protocol class with the settings' limits and connection cap."""
    s = settings
    limit = s.max_connections  # fitted to the fd limit with the gRPC cap (serving.__main__.fit_connection_caps)
    busy = _response(Unavailable(f"too many open connections (max_connections={limit}); retry later"),
                     "Service Unavailable")
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {
        "header_s": s.http_header_timeout_s, "body_s": s.http_body_timeout_s, "body_deadline_s": s.http_body_deadline_s,
        "min_body_rate": s.http_min_body_bytes_per_s, "body_rate_grace_s": s.http_body_rate_grace_s,
        "max_head_bytes": s.http_max_header_bytes, "max_headers": s.http_max_headers,
        "max_line_bytes": s.http_max_header_line_bytes, "limit": limit, "busy": busy, "lingering": {},
        "closing": False})
