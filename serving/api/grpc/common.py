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
    :class:`ServiceError` ending the call with its status (:func:`abort`)."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            begin_call(context)
            try:
                async for response in method(self, request, context):
                    yield response
            except ServiceError as e:
                await abort(context, e)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        begin_call(context)
        try:
            return await method(self, request, context)
        except ServiceError as e:
            await abort(context, e)
    return unary


async def abort(context, e: ServiceError):
    """End the call with the error's status and message; the request id and, for an overload,
    the time to retry after go in the trailing metadata."""
    await context.abort(e.grpc_status, e.message, trailing_metadata=trailers(e))


def set_error(context, e: ServiceError) -> None:
    """What :func:`abort` sends, set on the call without raising: a handler that returns next ends the
    call with it (no exception, no traceback: refusals at high overload leave no garbage cycles)."""
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
