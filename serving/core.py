"""The protocol-independent core: admit -> validate -> preprocess -> batch -> backend -> postprocess.

REST and gRPC adapters call :meth:`Classifier.sentiment` and
:meth:`Classifier.digits` with plain Python values and turn the results (or a
:class:`~serving.errors.ServiceError`) into their own wire format.

Nothing heavy runs on the event loop: large requests are validated and
tokenised, and every encoded image decoded, in a small thread pool (the
model's calls have their own). A request is admitted by its model's batcher
*before* that work, so overload is refused in microseconds; it then has a
deadline after which its queued rows are dropped. While the gateway drains,
readiness fails at once and, after ``drain_settle_s``, new work is refused.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import msgspec
import numpy as np

from serving.backends import Backend
from serving.batching import Batcher
from serving.errors import InvalidInput, NotFound, PayloadTooLarge, RequestTimeout, ServiceError, Unavailable
from serving.images import decode_b64, decode_image, from_raw_bytes, image_pixels
from serving.metrics import Metrics
from serving.model_config import STABLE, ModelsConfig
from contract.repository import ModelVersion
from serving.settings import Settings
from contract.text import OOV_ID, PAD_ID, START_ID
from contract.whole_text import combine_windows, window_rows

log = logging.getLogger("serving.core")
access_log = logging.getLogger("serving.access")

# The request id of the request being handled (REST header / gRPC metadata x-request-id).
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def begin_request_id(client_value: str | None) -> str:
    """The request id of a new request, set for its logs: the client's ``x-request-id`` when it is
    ASCII (cut to 128 characters), else a new random one (32 hex digits)."""
    rid = client_value[:128] if client_value and client_value.isascii() else secrets.token_hex(16)
    request_id.set(rid)
    return rid

ENDPOINTS = ["/v1/sentiment:predict", "/v1/digits:predict", "/v1/models", "/healthz", "/readyz", "/metrics",
             "ClassifySentiment", "ClassifyDigits", "StreamClassifySentiment",
             "/v2/models/{name}/infer", "ModelInfer"]
# What makes a text empty: Python's whitespace plus the byte-order mark, i.e. the same set
# in Python and in the OpenAPI schema's ECMA regex (TEXT_PATTERN), written out so that
# both read it alike (their \s differ).
BLANK = "\t\n\v\f\r \x1c\x1d\x1e\x1f\x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + \
    "\u2028\u2029\u202f\u205f\u3000\ufeff"
TEXT_PATTERN = r"[^\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
# Requests up to these sizes are preprocessed on the event loop (cheaper than a thread hop).
INLINE_TEXTS = 16
INLINE_CHARS = 32_000
INLINE_IMAGES = 8


# -- results (msgspec structs: the REST adapter encodes them as they are) ----------------
SLOT_KINDS = {PAD_ID: "pad", START_ID: "start", OOV_ID: "oov"}  # any other id: "word"


class Slot(msgspec.Struct):
    """One of the ``maxlen`` ids the model saw: the id, its word (out-of-vocabulary words as
    written in the text; ``<pad>``/``<start>`` for those ids) and its kind (pad, start, word, oov)."""

    id: int
    token: str
    kind: str


def slots(pairs: list[tuple[int, str]]) -> list[Slot]:
    return [Slot(i, t, SLOT_KINDS.get(i, "word")) for i, t in pairs]


class WindowScore(msgspec.Struct):
    """Whole-text mode: one window of a text, in reading order, and the model's answer for it."""

    slots: list[Slot]
    label: str
    probabilities: dict[str, float]


class SentimentExplanation(msgspec.Struct, omit_defaults=True):
    slots: list[Slot]  # what the default path scores: the last maxlen tokens
    windows: list[WindowScore] | None = None  # whole-text mode: every window scored


class SentimentPrediction(msgspec.Struct, omit_defaults=True):
    label: str
    score: float
    probabilities: dict[str, float]
    tokens: int
    unknown_tokens: int
    windows: int  # rows scored for this text (1; whole-text mode: its windows)
    explanation: SentimentExplanation | None = None  # only when asked for (omitted otherwise)


class DigitPrediction(msgspec.Struct, omit_defaults=True):
    label: int
    score: float
    probabilities: list[float]
    image: list[list[float]] | None = None  # explain: the 28x28 pixels the model received


@dataclass
class Result:
    model: str
    version: int
    predictions: list
    probabilities: np.ndarray | None = None  # [n, classes] float32: the predictions' probabilities, as one array
    rows: np.ndarray | None = None  # whole-text mode: every window's probabilities, before combining


@dataclass
class Call:
    """What the access log says about one request; filled in as it is handled."""

    protocol: str
    endpoint: str
    model: str | None = None
    version: int | None = None
    items: int = 0
    outcome: str = "ok"


def top(row: list[float]) -> int:
    """The class of a two-class row of probabilities (a tie goes to the first)."""
    return 0 if row[0] >= row[1] else 1


class Classifier:
    def __init__(self, settings: Settings, backend: Backend, metrics: Metrics | None = None):
        self.settings = settings
        self.backend = backend
        self.metrics = metrics or Metrics(settings.models, ENDPOINTS)
        self.models_config = ModelsConfig(settings.models_config_file)
        self._batchers: dict[tuple[str, int], Batcher] = {}
        # Enough threads for every model's batches in flight: backend calls run off the event loop.
        self._executor = ThreadPoolExecutor(max_workers=max(2, len(settings.models) * settings.concurrent_batches()), thread_name_prefix="backend")
        # Validation, tokenising and image decoding of large requests (kept apart from model calls).
        self._prep = ThreadPoolExecutor(max_workers=2, thread_name_prefix="preprocess")
        self._load_task: asyncio.Task | None = None
        self._load_error: str | None = None
        self.draining = False  # readiness fails (set on SIGTERM)
        self.accepting = True  # new work is taken (cleared drain_settle_s later)
        self.active = 0  # requests being handled now
        self._idle = asyncio.Event()
        self._stopped = False

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
        # What is loaded now (TensorFlow's graphs: ~280k objects) lives as long as the process.
        # Taking it out of the collector's view ends full collections of ~0.12 s on the event
        # loop (measured with sentiment_lstm loaded), a tail of every request's latency.
        gc.collect()
        gc.freeze()

    def _batcher(self, v: ModelVersion) -> Batcher:
        """The batcher of one model version, made on first use (new versions can appear)."""
        key = (v.name, v.version)
        b = self._batchers.get(key)
        if b is None:
            s, m, name = self.settings, self.metrics, v.name
            b = Batcher(
                f"{name}/{v.version}",
                lambda x, tags, ver=v.version: self.backend.predict(name, ver, x, request_ids=tags),
                s.max_batch_size, s.max_batch_wait_us / 1e6, s.max_queue_items, self._executor,
                on_batch=lambda rows, sec, r=m.batch_rows.labels(name), b=m.backend_seconds.labels(name): (
                    r.observe(rows), b.observe(sec)),
                on_depth=m.queue_rows.labels(name).set,
                on_drop=lambda rows, reason: m.dropped_rows.labels(name, reason).inc(rows),
                max_concurrent=s.concurrent_batches(),
                max_queue_wait_s=s.max_queue_wait_s,
                tag=request_id.get,
                wait_when_idle=s.batch_wait_when_idle,
            )
            m.queue_limit.labels(name).set(s.max_queue_items)
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
        self.metrics.ready.set(1 if self.ready()[0] else 0)
        return self.metrics.render()

    def begin_drain(self) -> None:
        """SIGTERM: fail readiness now; work is still taken until :meth:`stop_accepting`."""
        self.draining = True
        self.metrics.draining.set(1)

    def stop_accepting(self) -> None:
        self.accepting = False

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is being handled; False if some still are after ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while self.active:
                    self._idle.clear()
                    await self._idle.wait()
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        """Fail whatever is still queued or computing with 503 (drain timeout passed), release the backend."""
        if self._stopped:
            return
        self._stopped = True
        if self._load_task:
            self._load_task.cancel()
            await asyncio.gather(self._load_task, return_exceptions=True)
        for b in self._batchers.values():
            await b.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._prep.shutdown(wait=False, cancel_futures=True)
        self.backend.close()

    def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining: the gateway is shutting down"
        if self._load_task is None or not self._load_task.done():
            ready, reason = self.backend.status()
            return False, reason if not ready else "loading"
        if self._load_error:
            return False, self._load_error
        return self.backend.status()

    def models(self) -> dict[str, dict[int, ModelVersion]]:
        return self.backend.versions()

    @contextmanager
    def track(self, protocol: str, endpoint: str, model: str | None = None) -> Iterator[Call]:
        """Count, time and log one request, whatever the protocol, by its outcome."""
        t0 = time.perf_counter()
        call = Call(protocol, endpoint, model)
        self.active += 1
        try:
            yield call
        except ServiceError as e:
            call.outcome = e.code
            raise
        except asyncio.CancelledError:
            call.outcome = "CANCELLED"
            raise
        except BaseException:
            call.outcome = "INTERNAL"
            raise
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()
            self.record(protocol, endpoint, call.model, call.outcome, time.perf_counter() - t0, call.version, call.items)

    def record(self, protocol: str, endpoint: str, model: str | None, outcome: str, seconds: float,
               version: int | None = None, items: int = 0) -> None:
        """Metrics and the access log line of one finished request (also those refused before a handler)."""
        self.metrics.observe(protocol, endpoint, model, outcome, seconds)
        if self.settings.access_log:
            access_log.info(
                "%s %s %s", protocol, endpoint[:200], outcome,
                extra={"protocol": protocol, "endpoint": self.metrics.endpoint(endpoint), "outcome": outcome,
                       "model": self.metrics.model(model) or None, "version": version,
                       "items": items, "latency_ms": round(seconds * 1000, 3)},
            )

    # -- admission --------------------------------------------------------------
    def check_accepting(self) -> None:
        if not self.accepting:
            raise Unavailable("the gateway is shutting down; retry on another instance")

    def precheck(self, kind: str) -> None:
        """Before a request body is read: refuse at once when draining, or when every model
        of this kind has a full queue (no request could be admitted whatever it asks)."""
        self.check_accepting()
        batchers = [b for (name, _), b in self._batchers.items()
                    if (v := self.backend.versions().get(name)) and any(x.kind == kind for x in v.values())]
        refusals = [b.refusal(1) for b in batchers]
        if refusals and all(refusals):
            raise min(refusals, key=lambda e: e.retry_after_s)

    def deadline(self, client_timeout: float | None = None) -> float:
        """The event-loop time by which a request must be answered (request_timeout_s, or the
        client's own deadline when that is sooner)."""
        t = self.settings.request_timeout_s
        if client_timeout is not None:
            t = min(t, max(0.0, client_timeout))
        return asyncio.get_running_loop().time() + t

    # -- model selection ------------------------------------------------------
    def default_version(self, name: str, versions: dict[int, ModelVersion]) -> int:
        """The ``stable`` label's version when models.config defines one, else the newest AVAILABLE."""
        stable = self.models_config.labels(name).get(STABLE)
        if stable is not None:
            return stable
        available = [n for n, v in versions.items() if v.state == "AVAILABLE"]
        return max(available or versions)

    def version_number(self, name: str, versions: dict[int, ModelVersion], version: int | None, label: str | None) -> int:
        """The version a request means: its label's (models.config), else its own, else the default
        (0 or None; see :meth:`default_version`). Not checked against the loaded ``versions``."""
        if label:
            labels = self.models_config.labels(name)
            if label not in labels:
                raise NotFound(f"model {name!r} has no version label {label[:100]!r}; labels: {sorted(labels)}")
            return labels[label]
        return version or self.default_version(name, versions)

    def resolve(self, name: str, version: int | None, kind: str, label: str | None = None) -> tuple[ModelVersion, Batcher]:
        self.check_accepting()
        versions = self.backend.versions().get(name)
        if versions is None:
            known = sorted(n for n, vs in self.backend.versions().items() if any(v.kind == kind for v in vs.values()))
            raise NotFound(f"unknown model {name[:100]!r}; {kind} models: {known}")
        if not versions:
            raise Unavailable(f"model {name!r} has no version to serve")
        if label and version:
            raise InvalidInput("give version or version_label, not both")
        number = self.version_number(name, versions, version, label)
        if number not in versions:
            if label:
                raise Unavailable(f"model {name!r} label {label!r} points to version {number}, which is not loaded; "
                                  f"loaded versions: {sorted(versions)}")
            if not version:
                raise Unavailable(f"model {name!r}: the {STABLE!r} label points to version {number}, which is not "
                                  f"loaded; loaded versions: {sorted(versions)}")
            raise NotFound(f"model {name!r} has no version {number}; loaded versions: {sorted(versions)}")
        v = versions[number]
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

    async def offload(self, fn: Callable, *args, heavy: bool = True):
        """``fn(*args)`` in the preprocessing threads, or on the event loop when not ``heavy`` (cheaper
        than a thread hop). The adapters decode large bodies and messages here too."""
        if not heavy:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._prep, fn, *args)

    async def _predict(self, batcher: Batcher, x: np.ndarray, deadline: float | None, what: str) -> np.ndarray:
        deadline = deadline if deadline is not None else self.deadline()
        try:
            async with asyncio.timeout_at(deadline):
                return await batcher.submit(x, deadline, admitted=True)
        except TimeoutError:
            raise RequestTimeout(
                f"{what} not answered within its deadline (request_timeout_s={self.settings.request_timeout_s:g} "
                f"or the client's); its queued work was dropped"
            ) from None

    # -- sentiment ------------------------------------------------------------
    def _check_texts(self, texts: list) -> None:
        limit = self.settings.max_text_chars
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInput(f"texts[{i}] must be a string, got {type(t).__name__}")
            if len(t) > limit:
                raise PayloadTooLarge(f"texts[{i}] is too long: {len(t)} characters > max_text_chars={limit}")
            if not t.strip(BLANK):
                raise InvalidInput(f"texts[{i}] is empty")

    def _encode_texts(self, v: ModelVersion, texts: list) -> list:
        self._check_texts(texts)
        return [v.preprocessor.encode(t) for t in texts]

    def _window_texts(self, v: ModelVersion, texts: list) -> tuple[np.ndarray, list[tuple[int, int]], list[int]]:
        """Whole-text mode: every text's windows as rows, (tokens, unknown tokens) of each whole
        text, and how many windows each has (stride from the version's card, else maxlen)."""
        self._check_texts(texts)
        prep, cap, stride = v.preprocessor, self.settings.max_windows_per_text, v.whole_text_stride
        ids = [prep.token_ids(t) for t in texts]
        rows, sizes = window_rows(prep, ids, stride, cap)
        return rows, [(len(i) - 1, i.count(OOV_ID)) for i in ids], sizes

    async def sentiment(self, texts: list[str], model: str | None = None, version: int | None = None,
                        deadline: float | None = None, call: Call | None = None, label: str | None = None,
                        whole_text: bool = False, explain: bool = False) -> Result:
        """``whole_text``: score every window of each text (see :meth:`_window_texts`) and combine
        them by mean log-probability; the default scores the last ``maxlen`` tokens, as in training.
        ``explain``: each prediction also says which tokens filled the slots (and, whole-text, how
        each window scored); see :meth:`_explain`."""
        name = model or self.settings.default_sentiment_model
        v, batcher = self.resolve(name, version, "text", label)
        if call:
            call.version, call.items = v.version, len(texts)
        self._check_count(len(texts), "texts")
        batcher.admit(len(texts))
        reserved = len(texts)
        try:
            t0 = time.perf_counter()
            heavy = whole_text or len(texts) > INLINE_TEXTS or sum(map(len, texts)) > INLINE_CHARS
            if whole_text:
                ids, counts, sizes = await self.offload(self._window_texts, v, texts, heavy=heavy)
                limit = self.settings.max_windows_per_request
                if len(ids) > limit:
                    raise PayloadTooLarge(f"too many windows: {len(texts)} texts make {len(ids)} windows > "
                                          f"max_windows_per_request={limit}; send fewer or shorter texts")
                batcher.admit(len(ids) - reserved)
                reserved = len(ids)
            else:
                encoded = await self.offload(self._encode_texts, v, texts, heavy=heavy)
                ids = np.array([e.ids for e in encoded], dtype=np.int32)
                counts, sizes = [(e.tokens, e.unknown_tokens) for e in encoded], None
        except BaseException:
            batcher.release(reserved)
            raise
        m = self.metrics.of_model(name)
        m.preprocess_seconds.observe(time.perf_counter() - t0)
        ratio = m.unknown_ratio
        for tokens, unknown in counts:
            if tokens:
                ratio.observe(unknown / tokens)
        if sizes is not None:
            m.windows.inc(len(ids))
        r = await self._classify_ids(v, batcher, ids, counts, deadline, sizes)
        if explain:
            await self.offload(self._explain, v, texts, r, sizes, heavy=heavy)
        return r

    def _explain(self, v: ModelVersion, texts: list[str], r: Result, windows: list[int] | None) -> None:
        """Attach to each prediction the slots the model saw, from the version's own preprocessor
        (the same code that made the ids); whole-text: every window's slots and probabilities."""
        prep, labels = v.preprocessor, v.labels
        if windows is None:
            for p, t in zip(r.predictions, texts):
                p.explanation = SentimentExplanation(slots(prep.explain(t)))
            return
        stride, cap = v.whole_text_stride, self.settings.max_windows_per_text
        rows, start = r.rows.tolist(), 0
        for p, t, n in zip(r.predictions, texts, windows):
            scored = []
            for pairs, row in zip(prep.explain_windows(t, stride, cap), rows[start:start + n]):
                scored.append(WindowScore(slots(pairs), labels[top(row)], dict(zip(labels, row))))
            start += n
            p.explanation = SentimentExplanation(scored[-1].slots, scored)

    async def sentiment_ids(self, ids: np.ndarray, model: str | None = None, version: int | None = None,
                            deadline: float | None = None, call: Call | None = None, label: str | None = None) -> Result:
        """Token ids a client made itself ([n, maxlen], the model's vocabulary): checked, not tokenised."""
        name = model or self.settings.default_sentiment_model
        v, batcher = self.resolve(name, version, "text", label)
        n = len(ids)
        if call:
            call.version, call.items = v.version, n
        self._check_count(n, "token id rows")
        vocab, maxlen = len(v.preprocessor.vocab), v.preprocessor.maxlen
        if ids.ndim != 2 or ids.shape[1] != maxlen:
            raise InvalidInput(f"token ids have shape {list(ids.shape)}; {v.name}/{v.version} takes [n, {maxlen}]")
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise InvalidInput(f"token ids must be in 0..{vocab - 1} (the vocabulary of {v.name}/{v.version})")
        batcher.admit(n)
        ids = ids.astype(np.int32, copy=False)
        counts = [(int(t), int(u)) for t, u in zip(np.count_nonzero(ids > START_ID, axis=1), np.count_nonzero(ids == OOV_ID, axis=1))]
        return await self._classify_ids(v, batcher, ids, counts, deadline)

    async def _classify_ids(self, v: ModelVersion, batcher: Batcher, ids: np.ndarray, counts: list[tuple[int, int]],
                            deadline: float | None, windows: list[int] | None = None) -> Result:
        """The model's probabilities for admitted rows of ids; ``counts``: (tokens, unknown tokens)
        per text; ``windows``: rows per text, combined by mean log-probability (None: one each)."""
        n = len(counts)
        probs = rows = await self._predict(batcher, ids, deadline, f"{n} texts for {v.name}/{v.version}")
        self.metrics.of_model(v.name).items.inc(n)
        if windows is not None:
            probs = combine_windows(rows, windows)
        labels = v.labels
        preds = []
        for (tokens, unknown), row, w in zip(counts, probs.tolist(), windows or [1] * n):
            k = top(row)
            preds.append(SentimentPrediction(labels[k], row[k], dict(zip(labels, row)), tokens, unknown, w))
        return Result(v.name, v.version, preds, probs, rows if windows is not None else None)

    # -- digits -----------------------------------------------------------------
    def _check_encoded(self, images: list[bytes], where: str) -> None:
        """Per-image and per-request budgets, from the images' headers, before anything is decoded."""
        s, total = self.settings, 0
        for i, data in enumerate(images):
            if len(data) > s.max_image_bytes:
                raise PayloadTooLarge(f"{where}[{i}] is {len(data)} bytes > max_image_bytes={s.max_image_bytes}")
            total += image_pixels(data, f"{where}[{i}]", s.max_image_pixels)
            if total > s.max_request_pixels:
                raise PayloadTooLarge(
                    f"{where}[0..{i}] add up to {total} pixels > max_request_pixels={s.max_request_pixels}"
                )

    def images_from_b64(self, images_b64: list[str]) -> np.ndarray:
        return self.images_from_encoded(decode_b64(images_b64, "images_b64", self.settings.max_image_bytes), "images_b64")

    def images_from_encoded(self, images: list[bytes], where: str) -> np.ndarray:
        """PNG/JPEG bytes, checked against the budgets from their headers, then decoded."""
        self._check_encoded(images, where)
        return np.stack([decode_image(d, f"{where}[{i}]", self.settings.max_image_pixels) for i, d in enumerate(images)])

    def images_from_proto(self, images: list[tuple[str, bytes]]) -> np.ndarray:
        """(kind, bytes) pairs from gRPC: kind 'raw' (784 bytes) or 'encoded' (PNG/JPEG)."""
        for i, (kind, _) in enumerate(images):
            if kind not in ("raw", "encoded"):
                raise InvalidInput(f"images[{i}] has no data (set raw or encoded)")
        self._check_encoded([d for k, d in images if k == "encoded"], "images")
        out = []
        for i, (kind, data) in enumerate(images):
            if kind == "raw":
                out.append(from_raw_bytes(data, f"images[{i}]"))
            else:
                out.append(decode_image(data, f"images[{i}]", self.settings.max_image_pixels))
        return np.stack(out)

    async def digits(self, n: int, build: Callable[[], np.ndarray], model: str | None = None,
                     version: int | None = None, heavy: bool = True, deadline: float | None = None,
                     call: Call | None = None, label: str | None = None, explain: bool = False) -> Result:
        """``build()`` makes the [n, 28, 28] array (validation and decoding included); it runs
        only for a resolvable model with room in its queue, off the event loop when ``heavy``.
        ``explain``: each prediction also carries the 28x28 pixels the model received."""
        name = model or "digits"
        v, batcher = self.resolve(name, version, "image", label)
        if call:
            call.version, call.items = v.version, n
        self._check_count(n, "images")
        batcher.admit(n)
        try:
            t0 = time.perf_counter()
            pixels = await self.offload(build, heavy=heavy)
        except BaseException:
            batcher.release(n)
            raise
        m = self.metrics.of_model(name)
        m.preprocess_seconds.observe(time.perf_counter() - t0)
        probs = await self._predict(batcher, pixels, deadline, f"{n} images for {v.name}/{v.version}")
        m.items.inc(len(pixels))
        preds = []
        for k, row in zip(probs.argmax(1).tolist(), probs.tolist()):
            preds.append(DigitPrediction(k, row[k], row))
        if explain:
            for p, img in zip(preds, pixels.tolist()):
                p.image = img
        return Result(name, v.version, preds, probs)
