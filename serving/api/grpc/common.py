"""What the gateway's gRPC services share: parsing request bytes, the call's id and deadline,
and the one place a ServiceError becomes a gRPC status (:func:`grpc_errors`)."""

from __future__ import annotations

import functools
import inspect
import logging

from google.protobuf.message import DecodeError

from serving import tracing
from serving.core import Classifier
from serving.errors import InvalidInput, ServiceError
from serving.logs import RateLimitedLog
from serving.request import begin_request_id, request_id

log = logging.getLogger("serving.grpc")


malformed_log = RateLimitedLog(log)


async def parse_message(core: Classifier, cls, data: bytes, method: str):
    """The request message from its bytes (off the event loop when large); INVALID_ARGUMENT
    with one rate-limited WARNING, no traceback, when they do not parse."""
    try:
        return await core.offload(cls.FromString, data, heavy=len(data) > core.settings.inline_parse_bytes)
    except (DecodeError, UnicodeDecodeError, ValueError) as e:
        malformed_log.warning("%s: undecodable %s (%d bytes): %s", method, cls.DESCRIPTOR.name, len(data), e)
        raise InvalidInput(f"request is not a valid {cls.DESCRIPTOR.full_name} message ({e})") from None


def begin_call(context) -> None:
    """The call's request id: taken from ``x-request-id`` metadata or made; returned in the trailing
    metadata. Its routing key (weighted canary): ``x-routing-key`` metadata."""
    metadata = _metadata(context)
    rid = begin_request_id(metadata.get("x-request-id"), metadata.get("x-routing-key"))
    tracing.incoming(metadata.get("traceparent"), metadata.get("tracestate"))  # W3C trace context
    context.set_trailing_metadata((("x-request-id", rid),))


def grpc_errors(method):
    """A servicer method (unary, or a response stream) with its call's request id begun and any
    :class:`ServiceError` ending the call with its status (:func:`set_error`, then return: grpc
    sends the status and discards the response). Not ``context.abort``: its AbortError, raised in
    the ``except`` block, holds this frame, which holds the ServiceError and its traceback: every
    refused call left ~50 objects in reference cycles (at 4 clients sending bad requests, ~25,000
    in 3 s, which the loop's garbage collection then took ~100 ms to free)."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            begin_call(context)
            try:
                async for response in method(self, request, context):
                    yield response
            except ServiceError as e:
                set_error(context, e.with_traceback(None))
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        begin_call(context)
        try:
            return await method(self, request, context)
        except ServiceError as e:
            set_error(context, e.with_traceback(None))
            return None
    return unary


def set_error(context, e: ServiceError) -> None:
    """The error's status and message, set on the call without raising (the request id and, for an
    overload, the time to retry after go in the trailing metadata): a handler that returns next ends
    the call with it (no exception, no traceback: refusals leave no garbage cycles)."""
    context.set_code(e.grpc_status)
    context.set_details(e.message)
    context.set_trailing_metadata(trailers(e))


def trailers(e: ServiceError) -> tuple[tuple[str, str], ...]:
    trailing = [("x-request-id", request_id.get())]
    if e.retry_after_s is not None:
        trailing.append(("grpc-retry-pushback-ms", str(max(1, int(e.retry_after_s * 1000)))))
    return tuple(trailing)


def _metadata(context) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
