"""An OTLP trace receiver for tests and benchmarks: a real gRPC server implementing the collector's
``opentelemetry.proto.collector.trace.v1.TraceService`` (the servicer classes of the opentelemetry-proto
package) on loopback. It keeps every span it is sent (:attr:`OtlpReceiver.spans`, as :class:`Span`),
or only counts them (``keep=False``: a sink for benchmarks).

    with OtlpReceiver() as otlp:
        env = otlp.env(service_name="gw")  # OTEL_* variables that send a gateway's spans here
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass
class Span:
    """One received span, ids as lower-case hex (as in a traceparent)."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    kind: int
    service: str
    attributes: dict
    links: list[tuple[str, str, dict]] = field(default_factory=list)  # (trace id, span id, attributes)
    status_code: int = 0  # 0 unset, 1 ok, 2 error
    status_message: str = ""
    start_ns: int = 0
    end_ns: int = 0


def _value(v):
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


def _attributes(kvs) -> dict:
    return {kv.key: _value(kv.value) for kv in kvs}


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, keep: bool = True):
        self.keep = keep
        self.spans: list[Span] = []
        self.count = 0  # spans received
        self.requests = 0  # Export calls received
        self._lock = threading.Lock()
        self.server: grpc.Server | None = None
        self.port = 0

    def Export(self, request, context):
        n, received = 0, []
        for rs in request.resource_spans:
            service = _attributes(rs.resource.attributes).get("service.name", "")
            for ss in rs.scope_spans:
                n += len(ss.spans)
                if not self.keep:
                    continue
                for s in ss.spans:
                    received.append(Span(
                        s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.kind, service,
                        _attributes(s.attributes),
                        [(link.trace_id.hex(), link.span_id.hex(), _attributes(link.attributes)) for link in s.links],
                        s.status.code, s.status.message, s.start_time_unix_nano, s.end_time_unix_nano))
        with self._lock:
            self.spans.extend(received)
            self.count += n
            self.requests += 1
        return trace_service_pb2.ExportTraceServiceResponse()

    def start(self) -> int:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return self.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None).wait()
            self.server = None

    def __enter__(self) -> OtlpReceiver:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, service_name: str = "classifier-gateway", schedule_delay_ms: int | None = 50, **more: str) -> dict[str, str]:
        """The OTEL_* variables that turn a gateway's tracing on and send its spans here, exported
        every ``schedule_delay_ms`` (the batch span processor's delay; None: its default, 5 s)."""
        env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint, "OTEL_SERVICE_NAME": service_name}
        if schedule_delay_ms is not None:
            env["OTEL_BSP_SCHEDULE_DELAY"] = str(schedule_delay_ms)
        return {**env, **more}

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(self, predicate, timeout: float = 10.0) -> list[Span]:
        """The spans kept so far once ``predicate(spans)`` holds; AssertionError with what came after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"spans not as expected within {timeout}s; received: "
                                     f"{[(s.name, s.trace_id, s.span_id, s.parent_span_id) for s in spans]}")
            time.sleep(0.05)
