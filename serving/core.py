"""The protocol-independent core: validate -> preprocess -> batch -> backend -> postprocess.

REST and gRPC adapters call :meth:`Classifier.sentiment` and
:meth:`Classifier.digits` with plain Python values and turn the results (or a
:class:`~serving.errors.ServiceError`) into their own wire format.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from serving.backend import Backend
from serving.batching import Batcher
from serving.errors import InvalidInput, NotFound, PayloadTooLarge, ServiceError, Unavailable
from serving.images import check_pixels, decode_image, from_raw_bytes
from serving.metrics import Metrics
from serving.repository import ModelVersion
from serving.settings import Settings

log = logging.getLogger("serving.core")


@dataclass
class SentimentPrediction:
    label: str
    score: float
    probabilities: dict[str, float]
    tokens: int
    unknown_tokens: int


@dataclass
class DigitPrediction:
    label: int
    score: float
    probabilities: list[float]


@dataclass
class Result:
    model: str
    version: int
    predictions: list


class Classifier:
    def __init__(self, settings: Settings, backend: Backend, metrics: Metrics | None = None):
        self.settings = settings
        self.backend = backend
        self.metrics = metrics or Metrics()
        self._batchers: dict[tuple[str, int], Batcher] = {}
        # Enough threads for every model's batches in flight: backend calls run off the event loop.
        self._executor = ThreadPoolExecutor(max_workers=max(2, len(settings.models) * settings.concurrent_batches()), thread_name_prefix="backend")
        self._load_task: asyncio.Task | None = None
        self._load_error: str | None = None

    # -- life cycle -----------------------------------------------------------
    async def start(self) -> None:
        """Start loading in the background; readiness flips once loaded and warmed."""
        self._load_task = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        try:
            await asyncio.to_thread(self.backend.load)
        except Exception as e:  # noqa: BLE001 - the process stays up and /readyz says why
            log.exception("loading the models failed")
            self._load_error = f"loading the models failed: {e}"

    def _batcher(self, v: ModelVersion) -> Batcher:
        """The batcher of one model version, made on first use (new versions can appear)."""
        key = (v.name, v.version)
        b = self._batchers.get(key)
        if b is None:
            s, m, name = self.settings, self.metrics, v.name
            b = Batcher(
                f"{name}/{v.version}",
                lambda x, ver=v.version: self.backend.predict(name, ver, x),
                s.max_batch_size, s.max_batch_wait_us / 1e6, s.max_queue_items, self._executor,
                on_batch=lambda rows, sec: (m.batch_size.labels(name).observe(rows), m.backend_seconds.labels(name).observe(sec)),
                on_depth=lambda d: m.queue_depth.labels(name).set(d),
                max_concurrent=s.concurrent_batches(),
            )
            b.start()
            self._batchers[key] = b
        return b

    def render_metrics(self) -> bytes:
        """Prometheus text, with the model versions as the backend knows them right now."""
        info = self.metrics.model_info
        info.clear()
        for name, versions in self.backend.versions().items():
            for v in versions.values():
                info.labels(name, str(v.version), v.state).set(1 if v.state == "AVAILABLE" else 0)
        return self.metrics.render()

    async def stop(self) -> None:
        if self._load_task:
            await asyncio.gather(self._load_task, return_exceptions=True)
        for b in self._batchers.values():
            await b.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.backend.close()

    def ready(self) -> tuple[bool, str]:
        if self._load_task is None or not self._load_task.done():
            ready, reason = self.backend.status()
            return False, reason if not ready else "loading"
        if self._load_error:
            return False, self._load_error
        return self.backend.status()

    def models(self) -> dict[str, dict[int, ModelVersion]]:
        return self.backend.versions()

    @contextmanager
    def track(self, endpoint: str, model: str | None) -> Iterator[None]:
        """Count and time one request, whatever the protocol, by its outcome."""
        t0 = time.perf_counter()
        outcome = "INTERNAL"
        try:
            yield
            outcome = "ok"
        except ServiceError as e:
            outcome = e.code
            raise
        finally:
            self.metrics.requests.labels(endpoint, model or "", outcome).inc()
            self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - t0)

    # -- model selection ------------------------------------------------------
    def resolve(self, name: str, version: int | None, kind: str) -> tuple[ModelVersion, Batcher]:
        versions = self.backend.versions().get(name)
        if versions is None:
            known = sorted(n for n, vs in self.backend.versions().items() if any(v.kind == kind for v in vs.values()))
            raise NotFound(f"unknown model {name!r}; {kind} models: {known}")
        if not versions:
            raise Unavailable(f"model {name!r} has no version to serve")
        if version is None or version == 0:
            available = [n for n, v in versions.items() if v.state == "AVAILABLE"]
            v = versions[max(available or versions)]
        elif version not in versions:
            raise NotFound(f"model {name!r} has no version {version}; loaded versions: {sorted(versions)}")
        else:
            v = versions[version]
        if v.kind != kind:
            raise InvalidInput(f"model {name!r} classifies {'texts' if v.kind == 'text' else 'images'}, not {kind}s")
        if v.state != "AVAILABLE" or not self._load_task or not self._load_task.done():
            raise Unavailable(f"model {name!r} version {v.version} is not ready ({v.state})")
        return v, self._batcher(v)

    def _check_count(self, n: int, what: str) -> None:
        if n == 0:
            raise InvalidInput(f"{what} must not be empty")
        if n > self.settings.max_items_per_request:
            raise PayloadTooLarge(
                f"too many {what}: {n} > max_items_per_request={self.settings.max_items_per_request}"
            )

    # -- sentiment ------------------------------------------------------------
    async def sentiment(self, texts: list[str], model: str | None = None, version: int | None = None) -> Result:
        name = model or self.settings.default_sentiment_model
        v, batcher = self.resolve(name, version, "text")
        self._check_count(len(texts), "texts")
        t0 = time.perf_counter()
        limit = self.settings.max_text_chars
        encoded = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInput(f"texts[{i}] must be a string, got {type(t).__name__}")
            if len(t) > limit:
                raise PayloadTooLarge(f"texts[{i}] is too long: {len(t)} characters > max_text_chars={limit}")
            if not t.strip():
                raise InvalidInput(f"texts[{i}] is empty")
            encoded.append(v.preprocessor.encode(t))
        ids = np.array([e.ids for e in encoded], dtype=np.int32)
        m = self.metrics
        m.preprocess_seconds.labels(name).observe(time.perf_counter() - t0)
        ratio = m.unknown_ratio.labels(name)
        for e in encoded:
            if e.tokens:
                ratio.observe(e.unknown_tokens / e.tokens)
        probs = await batcher.submit(ids)
        m.items.labels(name).inc(len(texts))
        labels = v.labels
        preds = []
        for e, row in zip(encoded, probs.tolist()):
            k = 0 if row[0] >= row[1] else 1
            preds.append(SentimentPrediction(labels[k], row[k], dict(zip(labels, row)), e.tokens, e.unknown_tokens))
        return Result(name, v.version, preds)

    # -- digits -----------------------------------------------------------------
    def images_from_pixels(self, images: list) -> np.ndarray:
        self._check_count(len(images), "images")
        return np.stack([check_pixels(img, f"images[{i}]") for i, img in enumerate(images)])

    def images_from_b64(self, images_b64: list[str]) -> np.ndarray:
        self._check_count(len(images_b64), "images")
        limit = self.settings.max_image_bytes
        out = []
        for i, s in enumerate(images_b64):
            if len(s) > limit * 4 // 3 + 4:
                raise PayloadTooLarge(f"images_b64[{i}] is over max_image_bytes={limit}")
            try:
                data = base64.b64decode(s, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInput(f"images_b64[{i}] is not valid base64") from None
            out.append(decode_image(data, f"images_b64[{i}]"))
        return np.stack(out)

    def images_from_proto(self, images: list[tuple[str, bytes]]) -> np.ndarray:
        """(kind, bytes) pairs from gRPC: kind 'raw' (784 bytes) or 'encoded' (PNG/JPEG)."""
        self._check_count(len(images), "images")
        out = []
        for i, (kind, data) in enumerate(images):
            if kind == "raw":
                out.append(from_raw_bytes(data, f"images[{i}]"))
            elif kind == "encoded":
                if len(data) > self.settings.max_image_bytes:
                    raise PayloadTooLarge(f"images[{i}] is over max_image_bytes={self.settings.max_image_bytes}")
                out.append(decode_image(data, f"images[{i}]"))
            else:
                raise InvalidInput(f"images[{i}] has no data (set raw or encoded)")
        return np.stack(out)

    async def digits(self, pixels_fn, model: str | None = None, version: int | None = None) -> Result:
        """``pixels_fn()`` builds the [n, 28, 28] array (validation included), so that
        decoding is timed as preprocessing and runs only for a resolvable model."""
        name = model or "digits"
        v, batcher = self.resolve(name, version, "image")
        t0 = time.perf_counter()
        pixels = pixels_fn()
        self.metrics.preprocess_seconds.labels(name).observe(time.perf_counter() - t0)
        probs = await batcher.submit(pixels)
        self.metrics.items.labels(name).inc(len(pixels))
        preds = []
        for row in probs.tolist():
            k = int(np.argmax(row))
            preds.append(DigitPrediction(k, row[k], row))
        return Result(name, v.version, preds)
