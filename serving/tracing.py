"""OpenTelemetry tracing of predict requests: off unless ``OTEL_TRACES_EXPORTER=otlp``.

Configured by the standard ``OTEL_*`` environment variables, read by the OpenTelemetry SDK itself
(the ``tracing`` extra): ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``; the OTLP/gRPC
exporter), ``OTEL_SERVICE_NAME`` (default ``classifier-gateway``), ``OTEL_TRACES_SAMPLER`` /
``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_BSP_*`` (the batch span processor). Off, nothing of
OpenTelemetry is imported and each hook below is a function call that returns at once.

The spans (one trace per request, under the client's W3C ``traceparent`` when it sends one; the
adapters only hand that header / metadata to :func:`incoming`):

- ``<protocol> <endpoint>`` (SERVER; e.g. ``rest /v1/sentiment:predict``, ``grpc ModelInfer``): the
  request in :meth:`serving.core.Classifier.handle`, with ``classifier.request_id`` (x-request-id),
  model, version, items and outcome; its children (:func:`span`, the core; :class:`Batch`, the batcher):
- ``admission``: the rows estimated and reserved in the model's queue (a refusal ends it in error);
- ``preprocess``: validating and tokenising / decoding images;
- ``queue``: from the rows queued to their batch's start (one per chunk of a request cut into
  several batches; ended in error when the rows were dropped: deadline or caller gone);
- ``predict``: the model call as this request saw it, linked to its batch's span;
- ``batch`` (serving/batching.py): the model call itself (embedded) or the TF Serving Predict, for
  every request in the batch: a child of the first request's server span, *linked* to the server
  span of each request it served (several requests, one call); its ``traceparent`` goes to TF
  Serving with the call (:func:`traceparent`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from contextvars import ContextVar

from serving.request import request_id

EXPORTERS = ("otlp", "none")
SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
            "parentbased_traceidratio")
DEFAULT_SERVICE_NAME = "classifier-gateway"

_on: _Tracing | None = None  # set by configure(): tracing is on
# The client's W3C trace context (traceparent, tracestate), set by the adapter for the request it begins.
_incoming: ContextVar[tuple[str, str | None] | None] = ContextVar("trace_incoming", default=None)
# The request being handled (its server span); None when tracing is off or the request is not sampled.
_current: ContextVar[_Server | None] = ContextVar("trace_request", default=None)
_thread = threading.local()  # in a backend thread: .traceparent of the batch it computes


class _Tracing:
    """The SDK's pieces, imported when tracing is configured."""

    def __init__(self, provider, tracer):
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider, self.tracer = provider, tracer
        self.propagator = TraceContextTextMapPropagator()
        self.in_context = trace.set_span_in_context
        self.Link, self.SpanKind = trace.Link, trace.SpanKind
        self.Status, self.ERROR = trace.Status, trace.StatusCode.ERROR


def configure(environ: Mapping[str, str] | None = None) -> bool:
    """Tracing on when ``OTEL_TRACES_EXPORTER=otlp`` (and not ``OTEL_SDK_DISABLED=true``): an SDK tracer
    provider (sampler, resource, limits from the environment) with a BatchSpanProcessor over the OTLP/gRPC
    exporter. Raises ValueError naming the variable when the configuration cannot be served."""
    global _on
    env = os.environ if environ is None else environ
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "none"
    if exporter not in EXPORTERS:
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter!r} is not supported: one of {', '.join(EXPORTERS)}")
    if exporter == "none" or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler and sampler not in SAMPLERS:
        raise ValueError(f"OTEL_TRACES_SAMPLER={sampler!r} is not supported: one of {', '.join(SAMPLERS)}")
    if sampler.endswith("traceidratio"):
        arg = env.get("OTEL_TRACES_SAMPLER_ARG", "1")
        try:
            ratio = float(arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={arg!r}: {sampler} needs a ratio from 0 to 1")
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as e:
        raise ValueError(f"OTEL_TRACES_EXPORTER=otlp needs the 'tracing' extra "
                         f"(pip install 'classifier-service[tracing]'): {type(e).__name__}: {e}") from None
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # flushed by flush(), bounded
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _on = _Tracing(provider, provider.get_tracer("serving"))
    return True


def enabled() -> bool:
    return _on is not None


def flush(timeout_s: float = 2.0) -> None:
    """Export what is still buffered (at shutdown), waiting at most ``timeout_s``."""
    if _on is not None:
        _on.provider.force_flush(int(timeout_s * 1000))


def incoming(traceparent: str | None, tracestate: str | None = None) -> None:
    """The adapters: the W3C trace context the client sent with the request being begun."""
    if _on is not None:
        _incoming.set((traceparent, tracestate) if traceparent else None)


def traceparent() -> str | None:
    """In a backend call (its thread): the ``traceparent`` of the batch being computed, for the backend
    to pass on (TF Serving's gRPC metadata); None when tracing is off or the batch is not traced."""
    return getattr(_thread, "traceparent", None)


class _Noop:
    __slots__ = ()

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NOOP = _Noop()


def _failed(span, e: BaseException | None) -> None:
    if e is not None:
        code = getattr(e, "code", None) if hasattr(e, "http_status") else None
        span.set_attribute("classifier.outcome", code or ("CANCELLED" if type(e).__name__ == "CancelledError" else "INTERNAL"))
        span.set_status(_on.Status(_on.ERROR, str(getattr(e, "message", e))[:500] or type(e).__name__))


class _Server:
    """The server span of one request (:func:`request`)."""

    __slots__ = ("name", "call", "span", "context", "rid", "token")

    def __init__(self, name: str, call):
        self.name, self.call, self.span = name, call, None

    def __enter__(self):
        t = _on
        carrier = _incoming.get()
        parent = t.propagator.extract({"traceparent": carrier[0], "tracestate": carrier[1] or ""}) if carrier else None
        self.rid = request_id.get()
        span = t.tracer.start_span(self.name, parent, t.SpanKind.SERVER, {"classifier.request_id": self.rid})
        if not span.is_recording():  # not sampled: nothing below is traced
            return None
        self.span, self.context = span, t.in_context(span)
        self.token = _current.set(self)
        return self

    def __exit__(self, typ, e, tb):
        if self.span is None:
            return False
        _current.reset(self.token)
        call, span = self.call, self.span
        if call is not None:
            span.set_attributes({k: v for k, v in (("classifier.model", call.model), ("classifier.version", call.version),
                                                   ("classifier.items", call.items)) if v is not None})
        if e is None:
            span.set_attribute("classifier.outcome", "ok")
        _failed(span, e)
        span.end()
        return False


def request(protocol: str, endpoint: str, call=None):
    """The core: a context manager around one request, its server span (``call``: the
    :class:`serving.request.Call` whose model, version and items it records at the end)."""
    if _on is None:
        return _NOOP
    return _Server(f"{protocol} {endpoint}", call)


class _Child:
    __slots__ = ("parent", "name", "attributes", "span")

    def __init__(self, parent: _Server, name: str, attributes: dict | None):
        self.parent, self.name, self.attributes = parent, name, attributes

    def __enter__(self):
        self.span = _on.tracer.start_span(self.name, self.parent.context, attributes=self.attributes)
        return self.span

    def __exit__(self, typ, e, tb):
        _failed(self.span, e)
        self.span.end()
        return False


def span(name: str, attributes: dict | None = None):
    """The core: a context manager around one step of the request being handled (a child of its server span)."""
    if _on is None:
        return _NOOP
    parent = _current.get()
    return _NOOP if parent is None else _Child(parent, name, attributes)


def queued() -> tuple[_Server, int] | None:
    """The batcher, as rows are queued: the request's server span and the time (None: not traced)."""
    if _on is None:
        return None
    parent = _current.get()
    return None if parent is None else (parent, time.time_ns())


def dropped(queued_at: tuple[_Server, int] | None, reason: str) -> None:
    """The batcher: queued rows dropped before any batch took them (their ``queue`` span, in error)."""
    if queued_at is None or _on is None:
        return
    r, t0 = queued_at
    s = _on.tracer.start_span("queue", r.context, attributes={"classifier.dropped": reason}, start_time=t0)
    s.set_status(_on.Status(_on.ERROR, f"rows dropped from the queue: {reason}"))
    s.end()


class Batch:
    """The batcher: one model call's ``batch`` span, the ``queue`` span of each traced request in it (ended
    now) and, at :meth:`end`, each one's ``predict`` span. :meth:`run` runs the call with its traceparent."""

    def __init__(self, name: str, queued_at: list[tuple[_Server, int]], rows: int):
        t = _on
        self.start = now = time.time_ns()
        self.requests: list[_Server] = []
        seen = set()
        for r, t0 in queued_at:
            t.tracer.start_span("queue", r.context, attributes={"classifier.batcher": name}, start_time=t0).end(now)
            if id(r) not in seen:
                seen.add(id(r))
                self.requests.append(r)
        links = [t.Link(r.span.get_span_context(), {"classifier.request_id": r.rid}) for r in self.requests]
        self.attributes = {"classifier.batcher": name, "classifier.batch.rows": rows,
                           "classifier.batch.requests": len(self.requests)}
        first = self.requests[0]
        self.span = t.tracer.start_span("batch", first.context, t.SpanKind.CLIENT, self.attributes, links, start_time=now)
        carrier: dict[str, str] = {}
        t.propagator.inject(carrier, t.in_context(self.span))
        self.traceparent = carrier.get("traceparent")

    def run(self, fn, *args):
        """``fn(*args)`` (in the backend's thread) with :func:`traceparent` set to this batch's."""
        _thread.traceparent = self.traceparent
        try:
            return fn(*args)
        finally:
            _thread.traceparent = None

    def end(self, error: BaseException | None = None) -> None:
        t, now = _on, time.time_ns()
        link = [t.Link(self.span.get_span_context())]
        for r in self.requests:
            s = t.tracer.start_span("predict", r.context, attributes=self.attributes, links=link, start_time=self.start)
            _failed(s, error)
            s.end(now)
        _failed(self.span, error)
        self.span.end(now)


def batch(name: str, queued_at: list, rows: int) -> Batch | None:
    """The batcher, as a batch starts: its spans, when tracing is on and a request in it is traced."""
    if _on is None:
        return None
    traced = [q for q in queued_at if q is not None]
    return Batch(name, traced, rows) if traced else None
