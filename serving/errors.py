"""One error type for the core; the adapters map it to HTTP and gRPC status codes."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A request the service cannot answer. ``message`` names the broken rule."""

    http_status = 400
    code = "INVALID_ARGUMENT"
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT

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
    http_status = 503
    code = "UNAVAILABLE"
    grpc_status = grpc.StatusCode.UNAVAILABLE


class Overloaded(ServiceError):
    http_status = 429
    code = "RESOURCE_EXHAUSTED"
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServiceError):
    http_status = 504
    code = "DEADLINE_EXCEEDED"
    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(ServiceError):
    http_status = 500
    code = "INTERNAL"
    grpc_status = grpc.StatusCode.INTERNAL
