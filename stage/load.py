"""Load for the stage (its tests and bench/stage_capacity.py): REST and gRPC clients in threads,
going through nginx, with every outcome kept."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter, defaultdict

import grpc
import httpx

from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc

# gRPC clients retry UNAVAILABLE as gRPC's own retry policy does (classifier_client retries it too):
# a call a gateway answers UNAVAILABLE in trailers, or resets, cannot be resent by nginx, which
# streams request bodies to the gateway and so resends only what never reached one.
RETRY_UNAVAILABLE = json.dumps({"methodConfig": [{
    "name": [{"service": "classifier.v1.Classifier"}],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]}}]})

REVIEWS = ["a wonderful film with a moving story", "dull, predictable and far too long", "not bad at all",
           "the worst acting I have seen", "a quiet, lovely surprise", "I want my two hours back",
           "great cast, weak script", "funny and warm"]


def texts(n: int) -> list[str]:
    return [REVIEWS[i % len(REVIEWS)] + f" {i}" for i in range(n)]


class Load:
    """Clients through nginx, each sending ``rate`` requests/s (0: back to back) of ``size`` texts
    (REST, request name "sentiment xN") or of 1 text (gRPC, "ClassifySentiment x1"); every outcome
    kept. A failure is anything but a full answer; a 429 / RESOURCE_EXHAUSTED (overload, by design)
    is counted apart, and its client waits Retry-After (x 1.0-1.2) before it sends again."""

    def __init__(self, stage, rest: list[int] = (1, 32), grpc_clients: int = 1, rate: float = 8):
        self.stage, self.rate = stage, rate
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.texts: Counter = Counter()
        self.refused: Counter = Counter()
        self.retry_after: list[str] = []
        self.failures: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._threads = ([threading.Thread(target=self._rest, args=(n,), daemon=True) for n in rest]
                         + [threading.Thread(target=self._grpc, daemon=True) for _ in range(grpc_clients)])

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        self.seconds = time.monotonic() - self.started

    def _paced(self):
        period, due = (1 / self.rate if self.rate else 0.0), time.monotonic()
        while not self._stop.is_set():
            yield
            due = max(due + period, time.monotonic() - 1)
            self._stop.wait(max(0.0, due - time.monotonic()))

    def _ok(self, name: str, n: int, t0: float) -> None:
        self.latency[name].append((time.perf_counter() - t0) * 1000)
        self.texts["all"] += n

    def _fail(self, what: str) -> None:
        self.failures.append((time.time(), what))

    def _backoff(self, seconds: float) -> None:
        self._stop.wait(min(seconds, 2) * random.uniform(1.0, 1.2))

    def _rest(self, size: int) -> None:
        name, body = f"sentiment x{size}", {"texts": texts(size)}
        with httpx.Client(base_url=self.stage.rest, timeout=30) as c:
            for _ in self._paced():
                t0 = time.perf_counter()
                try:
                    r = c.post("/v1/sentiment:predict", json=body)
                    if r.status_code == 200 and len(r.json()["predictions"]) == size:
                        self._ok(name, size, t0)
                    elif r.status_code == 429:
                        self.refused["REST 429"] += 1
                        self.retry_after.append(r.headers.get("retry-after", ""))
                        self._backoff(float(r.headers.get("retry-after") or 1))
                    else:
                        self._fail(f"REST {r.status_code} {r.text[:200]}")
                except httpx.HTTPError as e:
                    self._fail(f"REST {type(e).__name__}: {e}")

    def _grpc(self) -> None:
        request = pb.SentimentRequest(texts=texts(1))
        with grpc.insecure_channel(self.stage.grpc, options=[("grpc.service_config", RETRY_UNAVAILABLE)]) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            for _ in self._paced():
                t0 = time.perf_counter()
                try:
                    r = stub.ClassifySentiment(request, timeout=30)
                    if len(r.predictions) == 1:
                        self._ok("ClassifySentiment x1", 1, t0)
                    else:
                        self._fail(f"gRPC {len(r.predictions)} predictions")
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        self.refused["gRPC RESOURCE_EXHAUSTED"] += 1
                        self._backoff(int(dict(e.trailing_metadata() or ()).get("grpc-retry-pushback-ms", 1000)) / 1000)
                    else:
                        self._fail(f"gRPC {e.code().name}: {e.details()}")

    @property
    def answered(self) -> int:
        return sum(len(v) for v in self.latency.values())

    def stats(self) -> dict[str, dict]:
        """By request name and "Aggregated": requests, failures, p50/p95/p99 in ms (loadtests/slo.py's shape)."""
        def one(values: list[float], failures: int) -> dict:
            v = sorted(values)
            at = lambda q: v[min(len(v) - 1, int(q * len(v)))] if v else None  # noqa: E731
            return {"requests": len(v) + failures, "failures": failures, "p50": at(0.5), "p95": at(0.95), "p99": at(0.99)}

        out = {name: one(values, 0) for name, values in self.latency.items()}
        out["Aggregated"] = one([x for v in self.latency.values() for x in v], len(self.failures))
        return out
