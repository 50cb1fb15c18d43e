"""The one error table: every error the service answers is a :class:`ServiceError` subclass
carrying its HTTP status, its code (the REST body's ``error.code``, the metrics' ``outcome``)
and its gRPC status together. The adapters only look these up; :func:`error_body` is the one
JSON body of a REST error (/v1's shape, or the Open Inference Protocol's on ``/v2`` paths),
:data:`OUTCOMES` the outcomes the metrics may record."""

from __future__ import annotations

import grpc
import msgspec


class ServiceError(Exception):
    """A request the service cannot answer. ``message`` names the broken rule."""

    http_status = 400
    code = "INVALID_ARGUMENT"
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT
    # When a retry may succeed (REST Retry-After, gRPC grpc-retry-pushback-ms); None: not said.
    retry_after_s: float | None = None
    # Flow control: why work was refused (one of REFUSAL_REASONS, counted by model in
    # classifier_refusals_total), and the model whose queue refused it; None: not a refusal.
    reason: str | None = None
    model: str | None = None

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(ServiceError):
    pass


class PayloadTooLarge(ServiceError):
    """Over a size limit. gRPC: INVALID_ARGUMENT, since retrying the same request cannot help
    (RESOURCE_EXHAUSTED is kept for a full queue, which a retry can get through)."""

    http_status = 413
    code = "PAYLOAD_TOO_LARGE"
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    http_status = 404
    code = "NOT_FOUND"
    grpc_status = grpc.StatusCode.NOT_FOUND


class Unavailable(ServiceError):
    """``retry_after_s``: when the cause is known to last that long (the TF Serving circuit breaker)."""

    http_status = 503
    code = "UNAVAILABLE"
    grpc_status = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, retry_after_s: float | None = None, reason: str | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason


class Overloaded(ServiceError):
    """Refused at admission; ``retry_after_s`` is when the queue should have room
    (REST ``Retry-After``, gRPC ``grpc-retry-pushback-ms``)."""

    http_status = 429
    code = "RESOURCE_EXHAUSTED"
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float = 1.0, reason: str = "work_ahead", model: str | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason, self.model = reason, model


class Cancelled(ServiceError):
    """The client went away (disconnect, gRPC cancel); nobody reads the answer."""

    http_status = 499
    code = "CANCELLED"
    grpc_status = grpc.StatusCode.CANCELLED


class UnsupportedMediaType(ServiceError):
    http_status = 415
    code = "UNSUPPORTED_MEDIA_TYPE"
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT


class MethodNotAllowed(ServiceError):
    http_status = 405
    code = "METHOD_NOT_ALLOWED"
    grpc_status = grpc.StatusCode.UNIMPLEMENTED


class Unsupported(ServiceError):
    """A protocol feature this gateway does not offer (e.g. V2 unloading a model, or shared-memory
    tensors); the message says what and why. REST 501, gRPC UNIMPLEMENTED."""

    http_status = 501
    code = "UNIMPLEMENTED"
    grpc_status = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(ServiceError):
    """No valid API key (REST 401 with ``WWW-Authenticate: Bearer``; gRPC UNAUTHENTICATED)."""

    http_status = 401
    code = "UNAUTHENTICATED"
    grpc_status = grpc.StatusCode.UNAUTHENTICATED


class DeadlineExceeded(ServiceError):
    http_status = 504
    code = "DEADLINE_EXCEEDED"
    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED


class SlowClient(ServiceError):
    """The connection did not send its request head or body in time (REST only: 408, then closed)."""

    http_status = 408
    code = "DEADLINE_EXCEEDED"
    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED


class RequestTimeout(ServiceError):
    """The request's own deadline (request_timeout_s or the gRPC client's) passed while it
    waited; its queued rows were dropped. REST 503 (retry elsewhere/later), gRPC DEADLINE_EXCEEDED."""

    http_status = 503
    code = "DEADLINE_EXCEEDED"
    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(ServiceError):
    http_status = 500
    code = "INTERNAL"
    grpc_status = grpc.StatusCode.INTERNAL


# Why work is refused (flow control): the estimated work ahead of the model's queue exceeds
# max_queue_wait_s, its waiting rows would exceed max_queue_items, the gateway drains, or the
# backend is known to be down (the TF Serving circuit breaker is open).
REFUSAL_REASONS = ("work_ahead", "queue_rows", "draining", "backend_unavailable")


def _codes(cls: type[ServiceError]) -> set[str]:
    return {cls.code}.union(*(_codes(sub) for sub in cls.__subclasses__()))


# What a request can end as: ok, or the code of one of the errors above.
OUTCOMES = frozenset({"ok"} | _codes(ServiceError))


def is_v2_path(path: str | bytes) -> bool:
    """A path of the Open Inference Protocol (``/v2``, ``/v2/...``): its errors have that protocol's shape."""
    if isinstance(path, bytes):
        path = path.decode("latin-1")
    path = path.split("?", 1)[0]
    return path == "/v2" or path.startswith("/v2/")


def error_body(e: ServiceError, path: str | bytes = "") -> bytes:
    """The JSON body of a REST error: ``{"error": {"code": ..., "message": ...}}`` (/v1 and the
    gateway's own paths), or the Open Inference Protocol's ``{"error": message}`` for a ``/v2``
    ``path`` (what tritonclient and the kserve client read). Same status either way."""
    if is_v2_path(path):
        return _encode({"error": e.message})
    return _encode({"error": {"code": e.code, "message": e.message}})


_encode = msgspec.json.Encoder().encode
