"""Prometheus metrics of the gateway (one registry per service instance).

Names and units follow Prometheus' conventions (base units, ``_total`` for
counters, the unit as suffix). Every label value comes from a known, bounded
set: a model name a client asked for that is not configured is recorded as
``unknown``, endpoints are the service's own routes/RPCs (anything else is
``other``), outcomes are ``ok`` or one of the error codes of serving/errors.py (its ``OUTCOMES``),
versions are those a configured model's request was served by (resolved, so loaded), labels
are the model card's classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector
from prometheus_client import ProcessCollector, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from serving.errors import OUTCOMES, REFUSAL_REASONS

# No `<counter>_created` / `<histogram>_created` series: a sample per series that only restates the
# process start time, which Prometheus stores like any other (process_start_time_seconds says it once).
disable_created_metrics()

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


# The endpoint label's values: the service's own routes and RPCs (anything else is "other").
ENDPOINTS = ("/v1/sentiment:predict", "/v1/digits:predict", "/v1/models", "/healthz", "/readyz", "/metrics",
             "ClassifySentiment", "ClassifyDigits", "StreamClassifySentiment", "/v2/models/{name}/infer", "ModelInfer",
             "ModelStreamInfer")
# Why a payload log record was dropped (classifier_payload_log_dropped_total's reason label).
PAYLOAD_DROP_REASONS = ("queue_full", "write_error")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, models: list[str] | None = None, endpoints: tuple[str, ...] = ENDPOINTS) -> None:
        self.known_models = frozenset(models or ())
        self.known_endpoints = frozenset(endpoints)
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        labels = ["protocol", "endpoint", "model", "version", "outcome"]
        self.requests = Counter(
            "classifier_requests", "Requests by protocol, endpoint, model, the version that served them "
            "(empty when none was chosen) and outcome (ok or the error code)", labels, registry=r,
        )
        self.request_seconds = Histogram(
            "classifier_request_duration_seconds", "Whole request latency by protocol, endpoint, model, version "
            "and outcome", labels, buckets=LATENCY_BUCKETS, registry=r,
        )
        self.predictions = Counter("classifier_predictions", "Labels predicted, by model and version",
                                   ["model", "version", "label"], registry=r)
        # Rollouts (serving/rollout.py, serving/model_config.py).
        self.version_label = Gauge("classifier_model_version_label", "1 per version label of the applied models.config",
                                   ["model", "label", "version"], registry=r)
        self.canary_percent = Gauge("classifier_canary_percent", "Share of default requests sent to the canary (traffic file)",
                                    ["model"], registry=r)
        self.shadow_percent = Gauge("classifier_shadow_percent", "Share of default requests also scored by the canary",
                                    ["model"], registry=r)
        self.config_reloads = Counter(
            "classifier_model_config_reloads", "New contents of models.config or the traffic file, applied or rejected "
            "(invalid: the previous one stays)", ["file", "outcome"], registry=r)
        self.config_applied_at = Gauge(
            "classifier_model_config_last_reload_success_timestamp_seconds", "When the file's applied contents were read",
            ["file"], registry=r)
        self.config_valid = Gauge("classifier_model_config_valid",
                                  "1 when the file on disk is the one applied, 0 while a rejected one is there", ["file"],
                                  registry=r)
        self.shadow_requests = Counter(
            "classifier_shadow_requests", "Default requests sampled for shadow scoring by the canary: scored, skipped "
            "(no spare capacity) or failed", ["model", "outcome"], registry=r)
        self.shadow_items = Counter("classifier_shadow_items", "Items scored by stable and canary: same label or not",
                                    ["model", "agreement"], registry=r)
        self.shadow_abs_diff = Counter(
            "classifier_shadow_probability_abs_diff", "Sum over shadow items of the total-variation distance between "
            "the two versions' probabilities (2 classes: |dp|); / classifier_shadow_items_total = mean", ["model"],
            registry=r)
        self.shadow_labels = Counter("classifier_shadow_labels", "Labels each version predicted on the shadow sample",
                                     ["model", "version", "label"], registry=r)
        self.items = Counter("classifier_items", "Texts or images classified", ["model"], registry=r)
        self.windows = Counter("classifier_whole_text_windows", "Windows scored for whole-text requests", ["model"], registry=r)
        self.preprocess_seconds = Histogram(
            "classifier_preprocess_duration_seconds", "Validation + preprocessing time per request", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.backend_seconds = Histogram(
            "classifier_backend_duration_seconds", "Backend call time per batch", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_rows = Histogram(
            "classifier_batch_rows", "Rows per backend call (after dynamic batching)", ["model"],
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.queue_rows = Gauge("classifier_queue_rows", "Rows waiting or in flight, per model", ["model"], registry=r)
        self.queue_limit = Gauge(
            "classifier_queue_limit_rows", "The queue limit (max_queue_items) per model", ["model"], registry=r
        )
        # Flow control: the signals that lead shedding (FlowCollector, read at each scrape) and the
        # refusals themselves, every (configured model, reason) series present from the start.
        self.refusals = Counter(
            "classifier_refusals", "Requests refused by flow control, by model and reason: work_ahead (estimated "
            "work ahead > max_queue_wait_s), queue_rows (> max_queue_items), draining, backend_unavailable "
            "(circuit breaker open)", ["model", "reason"], registry=r)
        for name in sorted(self.known_models):
            for reason in REFUSAL_REASONS:
                self.refusals.labels(name, reason)
        self.flow: Callable[[], dict[str, FlowStats]] | None = None  # set by serving.flow.Batchers
        r.register(FlowCollector(self))
        self.dropped_rows = Counter(
            "classifier_dropped_rows", "Queued rows dropped before the model saw them: deadline passed or client left",
            ["model", "reason"], registry=r,
        )
        self.unknown_ratio = Histogram(
            "classifier_unknown_token_ratio", "Out-of-vocabulary share of the tokens the model saw, per text (drift signal)",
            ["model"], buckets=(0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0), registry=r,
        )
        self.model_info = Gauge(
            "classifier_model_version_info", "Model versions the backend knows (1 = AVAILABLE)",
            ["model", "version", "state"], registry=r,
        )
        # Payload logging (serving/payload_log.py): requests sampled, records written, records dropped.
        self.payload_sampled = Counter("classifier_payload_log_sampled",
                                       "Requests sampled for the payload log", registry=r)
        self.payload_written = Counter("classifier_payload_log_written",
                                       "Payload log records written to the destination", registry=r)
        self.payload_dropped = Counter(
            "classifier_payload_log_dropped", "Payload log records dropped: queue_full (the writer was behind: "
            "payload_log_queue_records or payload_log_queue_bytes reached) or write_error", ["reason"], registry=r)
        for reason in PAYLOAD_DROP_REASONS:
            self.payload_dropped.labels(reason)
        self._series: dict[tuple, tuple] = {}
        self._models: dict[str, ModelSeries] = {}
        self.ready = Gauge("classifier_ready", "1 when /readyz answers 200, else 0", registry=r)
        self.draining = Gauge("classifier_draining", "1 while the gateway drains before exiting", registry=r)
        self.breaker_open = Gauge("classifier_tfserving_breaker_open",
                                  "1 while the circuit breaker toward TF Serving is open (calls fail fast)", registry=r)

    def model(self, name: str | None) -> str:
        """The label value for a requested model: configured names as they are, anything else ``unknown``."""
        if not name:
            return ""
        return name if name in self.known_models else "unknown"

    def endpoint(self, name: str) -> str:
        return name if name in self.known_endpoints else "other"

    def observe(self, protocol: str, endpoint: str, model: str | None, outcome: str, seconds: float,
                version: int | None = None) -> None:
        """Count and time one finished request (all label values bounded here, so the cache of
        labelled series is bounded too: ``labels()`` costs a few microseconds per call)."""
        model = self.model(model)
        labels = (protocol, self.endpoint(endpoint), model, str(version) if version and model != "unknown" else "",
                  outcome if outcome in OUTCOMES else "INTERNAL")
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = (self.requests.labels(*labels), self.request_seconds.labels(*labels))
        series[0].inc()
        series[1].observe(seconds)

    def of_model(self, name: str) -> ModelSeries:
        """The per-model series of a configured model, labelled once."""
        series = self._models.get(name)
        if series is None:
            series = self._models[name] = ModelSeries(
                self.items.labels(name), self.windows.labels(name), self.preprocess_seconds.labels(name),
                self.unknown_ratio.labels(name))
        return series

    def refused(self, model: str | None, reason: str | None) -> None:
        """Count one request refused by flow control (``reason`` None: not a refusal)."""
        if reason in REFUSAL_REASONS:
            self.refusals.labels(self.model(model), reason).inc()  # "": refused before a model was chosen

    def render(self) -> bytes:
        return generate_latest(self.registry)


class FlowStats(NamedTuple):
    """One model's flow-control state, over its versions' batchers (serving/batching.py)."""

    work_ahead_s: float  # the most estimated work ahead of a new request (what admission compares)
    wait_limit_s: float  # max_queue_wait_s
    busy_s: float  # slot-seconds spent in backend calls since start (retired versions included)
    slots: int  # batch slots (concurrent backend calls) of its live batchers


class FlowCollector:
    """The flow signals, computed when scraped: per model the estimated work ahead (refusals
    start when it passes the wait limit), and the busy seconds and slots of its batch slots
    (rate(busy) / slots = busy fraction: it reaches ~1 before the first refusal, the autoscaling signal)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        flow = self.metrics.flow() if self.metrics.flow else {}
        work = GaugeMetricFamily("classifier_queue_work_ahead_seconds", "Estimated seconds of work ahead of a new "
                                 "request (requests are refused once it exceeds max_queue_wait_s)", labels=["model"])
        limit = GaugeMetricFamily("classifier_queue_wait_limit_seconds", "max_queue_wait_s per model", labels=["model"])
        busy = CounterMetricFamily("classifier_batch_busy_seconds", "Slot-seconds the model's batch slots spent in "
                                   "backend calls; rate / classifier_batch_slots = busy fraction", labels=["model"])
        slots = GaugeMetricFamily("classifier_batch_slots", "Batch slots (backend calls in flight at most) per model",
                                  labels=["model"])
        for name, f in sorted(flow.items()):
            work.add_metric([name], f.work_ahead_s)
            limit.add_metric([name], f.wait_limit_s)
            busy.add_metric([name], f.busy_s)
            slots.add_metric([name], f.slots)
        return [work, limit, busy, slots]


class ModelSeries(NamedTuple):
    items: object
    windows: object
    preprocess_seconds: object
    unknown_ratio: object
