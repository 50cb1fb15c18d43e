"""Errors and the retry policy shared by every client."""

from __future__ import annotations

import random
import re

import grpc

# Worth retrying (the same request can get through later or elsewhere); anything else is final.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED})
# REST status -> gRPC code (the gateway maps its errors the same way both ways).
HTTP_TO_GRPC = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 413: "INVALID_ARGUMENT",
                415: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


# A stream that broke without its status: grpc.aio replaces the server's status with INTERNAL
# "Internal error from Core" when a write was under way as the call ended. Retried (the chunk is
# sent again on a new stream, where the real answer or status comes back), counted under this name.
STREAM_BROKE = "stream broke (status lost)"
# UNAVAILABLE because no connection could be made (nothing listens, the name does not resolve):
# grpc's and httpx's words for it. A server's own UNAVAILABLE (draining, TF Serving down) differs.
UNREACHED = re.compile(r"Connection refused|Failed to connect|failed to connect to all addresses|"
                       r"connections to all backends failing|DNS resolution failed|All connection attempts failed|"
                       r"Name or service not known|nodename nor servname", re.IGNORECASE)


class ClientError(Exception):
    """A call that failed for good: ``code`` (a grpc.StatusCode) and the server's message.
    ``pushback_s``: when the server said a retry may pass (``grpc-retry-pushback-ms``, ``Retry-After``).
    ``label``: the name it is counted under (the status code's name; :data:`STREAM_BROKE` when grpc
    lost the server's status, so that no status is reported as another)."""

    def __init__(self, code: grpc.StatusCode, message: str, pushback_s: float | None = None, label: str | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.pushback_s = code, message, pushback_s
        self.label = label or code.name

    @property
    def unreached(self) -> bool:
        """No connection to the server could be made (it never saw the request)."""
        return self.code == grpc.StatusCode.UNAVAILABLE and bool(UNREACHED.search(self.message))

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> "ClientError":
        code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
        details = e.details() if callable(getattr(e, "details", None)) else str(e)
        trailing = e.trailing_metadata() if callable(getattr(e, "trailing_metadata", None)) else None
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", pushback_from(trailing))


def pushback_from(metadata) -> float | None:
    """``grpc-retry-pushback-ms`` from trailing metadata, in seconds (None when absent or invalid)."""
    for k, v in metadata or ():
        if k == "grpc-retry-pushback-ms":
            try:
                ms = int(v)
            except (TypeError, ValueError):
                return None
            return ms / 1000 if ms >= 0 else None
    return None


def backoff_s(attempt: int, base: float, cap: float, pushback: float | None = None) -> float:
    """Exponential backoff with full jitter (attempt 1, 2, ...); the server's pushback, when given,
    is the floor (plus up to 20 % jitter so that clients told the same time do not return together)."""
    delay = random.uniform(0, min(cap, base * 2 ** (attempt - 1)))
    if pushback is not None:
        delay = max(delay, pushback * random.uniform(1.0, 1.2))
    return delay


def retry_delay(err: ClientError, failures: int, retries: int, base: float, cap: float) -> float:
    """Seconds to wait before attempt ``failures + 1``; raises ``err`` when it is not retryable or
    ``retries`` consecutive failures have been used up."""
    if not err.retryable or failures > retries:
        raise err from None
    return backoff_s(failures, base, cap, err.pushback_s)
