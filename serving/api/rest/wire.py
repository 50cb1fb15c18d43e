"""What every REST endpoint shares on the wire: the error responses (/v1 and V2 shapes),
decoding JSON (:func:`decode_json`, the one place every REST body is decoded) and its
messages, content types, reading the body, noticing a client that leaves, and the ASGI
middlewares (body limit, request id) that run before any endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping

import msgspec
from fastapi.responses import Response

from serving.logs import RateLimitedLog
from serving.errors import (Cancelled, InvalidInput, PayloadTooLarge, ServiceError, UnsupportedMediaType,
                            error_body)
from serving import tracing
from serving.request import begin_request_id

_json = msgspec.json.Encoder()
log = logging.getLogger("serving.rest")
# Bodies that are not JSON at all (syntax, encoding, nesting): one WARNING line per 10 s at most,
# as for undecodable gRPC messages (serving/api/grpc/common.py).
malformed_log = RateLimitedLog(log)


def retry_headers(e: ServiceError) -> dict | None:
    """``Retry-After`` (whole seconds, at least 1) for an overload, else none."""
    return {"retry-after": str(max(1, math.ceil(e.retry_after_s)))} if e.retry_after_s is not None else None


def error_response(e: ServiceError, headers: dict | None = None, path: str = "") -> Response:
    """The error with its status: ``{"error": {"code": ..., "message": ...}}``, or on a ``/v2``
    ``path`` the Open Inference Protocol's ``{"error": message}`` (serving.errors.error_body)."""
    return Response(error_body(e, path), status_code=e.http_status, media_type="application/json",
                    headers=headers or retry_headers(e))


def v2_error_response(e: ServiceError) -> Response:
    """The Open Inference Protocol's error: ``{"error": message}``, same status as /v1."""
    return error_response(e, path="/v2")


def json_response(body, status: int = 200) -> Response:
    return Response(_json.encode(body), status_code=status, media_type="application/json")


ERROR_DOCS = {
    400: "Invalid input (the message names the field and the rule)",
    401: "Missing or invalid API key (only when API keys are configured)",
    404: "Unknown model or version",
    413: "Over a size limit: body, items per request, text length, image bytes or pixels",
    415: "Body is not application/json, or is compressed",
    429: "Queue full: retry after the Retry-After header's seconds",
    503: "Not ready, shutting down, the request's deadline passed, or the backend is unavailable",
    504: "TF Serving did not answer in time",
}


def validation_message(e: msgspec.MsgspecError, prefix: str = "") -> str:
    """msgspec's "Expected `str`, got `int` - at `$.texts[0]`" -> "texts[0]: expected str, got int".
    ``prefix``: where the decoded JSON sits in the body (``inputs[0].data``), put before its own path."""
    if isinstance(e, msgspec.DecodeError) and not isinstance(e, msgspec.ValidationError):
        return f"{prefix or 'body'} is not valid JSON ({e})"
    text = str(e)
    message, _, where = text.partition(" - at `$")
    message = message.replace("`", "")
    message = message[0].lower() + message[1:] if message else message
    where = where.rstrip("`")
    where = f"{prefix}{where}" if prefix else where.lstrip(".")
    return f"{where}: {message}" if where else f"body: {message}"


# Python's recursion limit (1000) less the frames of the server itself: what msgspec can decode.
DEPTH_LIMIT_DOC = "about 1,000 levels"


def decode_json(decoder: msgspec.json.Decoder, data, prefix: str = ""):
    """``decoder.decode(data)``, the one way REST request JSON is decoded (/v1 on the hot path and
    through FastAPI, V2): whatever the decoder raises is :class:`InvalidInput` (400) naming the
    problem, never a 500 with a traceback. A body that does not match the schema is the client's
    everyday mistake; one that is not JSON at all (bad syntax or UTF-8, nested deeper than the
    decoder's recursion allows, anything else the decoder raises) is also logged, as one
    rate-limited WARNING line. ``prefix``: where ``data`` sits in the body, for the messages."""
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as e:  # the schema's: wrong type, number out of range, missing field, ...
        raise InvalidInput(validation_message(e, prefix)) from None
    except msgspec.DecodeError as e:
        message = validation_message(e, prefix)
    except RecursionError:
        message = (f"{prefix or 'request body'} is nested deeper than the JSON decoder allows "
                   f"({DEPTH_LIMIT_DOC} of arrays and objects)")
    except Exception as e:  # noqa: BLE001 - whatever else a decoder raises on hostile input: the client's error
        message = f"{prefix or 'body'} could not be decoded as JSON ({type(e).__name__}: {str(e)[:200]})"
    malformed_log.warning("undecodable JSON body (%d bytes): %s", len(data), message)
    raise InvalidInput(message)


def check_content_type(headers: Mapping[str, str], accepted: tuple[str, ...] = ("application/json",),
                       hint: str = "send application/json") -> None:
    """415 unless the body is one of the ``accepted`` media types (none given: JSON), uncompressed.
    ``headers``: the request's, lower-case names (Starlette's ``request.headers``, or a dict)."""
    ctype = headers.get("content-type")
    if ctype is not None and ctype.split(";")[0].strip().lower() not in accepted:
        raise UnsupportedMediaType(f"content-type {ctype.split(';')[0]!r} is not supported; {hint}")
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType(f"content-encoding {encoding!r} is not supported; send the body uncompressed")


async def read_body(receive) -> bytes:
    """The whole request body from an ASGI ``receive``."""
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise Cancelled("client disconnected before sending the whole body")
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def until_done(receive, work):
    """``await work``, unless the client disconnects first (``receive``, the request's ASGI receive,
    after the body was read, only returns on a disconnect): then the request's own task is
    cancelled, its queued rows are dropped, and :class:`Cancelled` is raised. One watcher task
    per request, no second task for the work."""
    me = asyncio.current_task()
    state = {"done": False, "gone": False}

    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass
        if not state["done"]:
            state["gone"] = True
            me.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if state["gone"] and me.uncancel() == 0:
            raise Cancelled("client disconnected; its queued work was dropped") from None
        raise
    finally:
        state["done"] = True
        watcher.cancel()


# -- middlewares ---------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` with 413, before parsing them.

    Not FastAPI's own ``max_body_size``: on some paths that answers a plain-text
    "Content Too Large", and every error here must have the one JSON shape.
    """

    def __init__(self, app, max_bytes: int, on_reject=None):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject or (lambda path: None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope["headers"]:
            if k == b"content-length" and v.isdigit():
                if int(v) > self.max_bytes:
                    return await self._reject(scope, send, int(v))
                return await self.app(scope, receive, send)  # the server enforces Content-Length
        # No Content-Length (chunked): read the body here, up to the limit, then replay it.
        chunks, seen, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return await self.app(scope, _replay([msg]), send)
            chunks.append(msg)
            seen += len(msg.get("body", b""))
            more = msg.get("more_body", False)
            if seen > self.max_bytes:
                return await self._reject(scope, send, None)
        await self.app(scope, _replay(chunks, receive), send)

    async def _reject(self, scope, send, size: int | None):
        self.on_reject(scope["path"])
        if size is None:
            message = f"request body exceeds max_body_bytes={self.max_bytes}"
        else:
            message = f"request body is {size} bytes > max_body_bytes={self.max_bytes}"
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": error_body(PayloadTooLarge(message), scope["path"])})


class RequestId:
    """ASGI middleware: take the client's ``x-request-id`` (or make one), keep it in the
    ``request_id`` context for every log line, and return it on the response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid, key, parent, state = b"", None, None, None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                rid = v
            elif k == b"x-routing-key":
                key = v.decode("latin-1")
            elif k == b"traceparent":  # W3C trace context (serving/tracing.py; ignored when tracing is off)
                parent = v.decode("latin-1")
            elif k == b"tracestate":
                state = v.decode("latin-1")
        rid = begin_request_id(rid.decode("latin-1"), key)
        tracing.incoming(parent, state)
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


def _replay(messages: list, then=None):
    """An ASGI receive that returns ``messages`` first, then defers to ``then``."""
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        return await then() if then else {"type": "http.disconnect"}

    return receive
