"""Prometheus metrics of the gateway (one registry per service instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST, ProcessCollector, PlatformCollector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter(
            "classifier_requests", "Requests by endpoint, model and outcome (ok or the error code)",
            ["endpoint", "model", "outcome"], registry=r,
        )
        self.items = Counter("classifier_items", "Texts or images classified", ["model"], registry=r)
        self.request_seconds = Histogram(
            "classifier_request_seconds", "Whole request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.preprocess_seconds = Histogram(
            "classifier_preprocess_seconds", "Validation + preprocessing time per request", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.backend_seconds = Histogram(
            "classifier_backend_seconds", "Backend call time per batch", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "classifier_batch_size", "Rows per backend call (after dynamic batching)", ["model"],
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("classifier_queue_depth", "Rows waiting or in flight, per model", ["model"], registry=r)
        self.unknown_ratio = Histogram(
            "classifier_unknown_token_ratio", "Out-of-vocabulary share of the tokens the model saw, per text (drift signal)",
            ["model"], buckets=(0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0), registry=r,
        )
        self.model_info = Gauge(
            "classifier_model_version_info", "Loaded model versions (1 = AVAILABLE)", ["model", "version", "state"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
