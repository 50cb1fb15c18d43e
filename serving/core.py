"""The protocol-independent core: the one request lifecycle, admission, version resolution,
the model's batchers, and the gateway's own life cycle (load, readiness, drain).

Every adapter (REST /v1 and its hot path, REST V2, gRPC classifier.v1, gRPC V2) hands a
request to :meth:`Classifier.handle` with its own ``parse`` (wire -> :class:`Predict`)
and ``render`` (:class:`Result` -> wire); that one method is where deadlines, admission,
metrics, the access log and the payload log happen. :meth:`Classifier.predict` runs the request through
its model kind's pipeline (serving/kinds/): count -> rows -> admit -> prepare -> batch -> result.

Nothing heavy runs on the event loop: large requests are validated and tokenised, and
every encoded image decoded, in a small thread pool (the model's calls have their own).
A request is admitted by its model's batcher *before* that work, so overload is refused
in microseconds; it then has a deadline after which its queued rows are dropped. While
the gateway drains, readiness fails at once and, after ``drain_settle_s``, new work is refused.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from contract.repository import ModelVersion
from serving import kinds
from serving.backends import Backend
from serving.batching import Batcher
from serving.errors import InvalidInput, NotFound, PayloadTooLarge, RequestTimeout, ServiceError, Unavailable
from serving.flow import Batchers
from serving.metrics import Metrics
from serving.model_config import MODELS_CONFIG, STABLE, TRAFFIC
from serving.payload_log import PayloadLog
from serving.priority import collect_garbage, lower_this_thread, lower_threads_named
from serving.request import Call, Predict, Result
from serving.rollout import Rollout
from serving.settings import Limits, Settings
from serving.statistics import Statistics
from serving import tracing

log = logging.getLogger("serving.core")
access_log = logging.getLogger("serving.access")

class Classifier:
    def __init__(self, settings: Settings, backend: Backend, metrics: Metrics | None = None):
        self.settings = settings
        self.backend = backend
        self.metrics = metrics or Metrics(settings.models)
        self.rollout = Rollout(self)
        self.models_config = self.rollout.config
        self._limits: dict[str, Limits] = {}
        # Enough threads for every model's batches in flight: backend calls run off the event loop.
        threads = sum(settings.batching(m).max_concurrent_batches for m in settings.models)
        nice = (lower_this_thread, (settings.worker_nice,))  # serving/priority.py: the loop runs first
        self._executor = ThreadPoolExecutor(max(2, threads), "backend", *nice)
        # Validation, tokenising and image decoding of large requests (kept apart from model calls).
        self._prep = ThreadPoolExecutor(2, "preprocess", *nice)
        self.statistics = Statistics()  # per model version, as the V2 statistics extension reports them
        self.batchers = Batchers(settings, backend, self.metrics, self._executor, self.statistics)
        self.payloads = PayloadLog(settings, self.metrics) if settings.payload_log else None
        self._load_task: asyncio.Task | None = None
        self._follow_task: asyncio.Task | None = None
        self._gc_task: asyncio.Task | None = None
        self._load_error: str | None = None
        self.draining = False  # readiness fails (set on SIGTERM)
        self.accepting = True  # new work is taken (cleared drain_settle_s later)
        self.active = 0  # requests being handled now
        self._idle = asyncio.Event()
        self._stopped = False

    # -- life cycle -----------------------------------------------------------
    async def start(self) -> None:
        """Start loading in the background; readiness flips once loaded and warmed. Then follow
        models.config and the traffic file (serving/rollout.py)."""
        loop = asyncio.get_running_loop()
        self._load_task = loop.create_task(self._load())
        self._follow_task = loop.create_task(self.rollout.follow(self._load_task))

    async def _load(self) -> None:
        try:
            await asyncio.to_thread(self.backend.load, self.models_config)
        except Exception as e:  # noqa: BLE001 - the process stays up and /readyz says why
            log.exception("loading the models failed")
            self._load_error = f"loading the models failed: {e}"
        lower_threads_named(("tf_",), self.settings.worker_nice)  # TensorFlow's own pools
        # What is loaded now (TensorFlow's graphs: ~280k objects) lives as long as the process.
        # Taking it out of the collector's view ends full collections of ~0.12 s on the event
        # loop (measured with sentiment_lstm loaded), a tail of every request's latency.
        gc.collect()
        gc.freeze()
        if self.settings.gc_interval_s:  # collections on the loop, not in a worker holding the GIL
            self._gc_task = asyncio.get_running_loop().create_task(collect_garbage(self.settings.gc_interval_s))

    def render_metrics(self) -> bytes:
        """Prometheus text, with the model versions as the backend knows them right now."""
        info = self.metrics.model_info
        info.clear()
        for name, versions in self.backend.versions().items():
            for v in versions.values():
                info.labels(name, str(v.version), v.state).set(1 if v.state == "AVAILABLE" else 0)
        self.metrics.ready.set(1 if self.ready()[0] else 0)
        breaker = getattr(self.backend, "breaker", None)
        self.metrics.breaker_open.set(1 if breaker is not None and breaker.state() == "open" else 0)
        for file in (MODELS_CONFIG, TRAFFIC):
            self.metrics.config_valid.labels(file).set(1 if self.models_config.valid(file) else 0)
        self.rollout.export()
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
        for task in (self._load_task, self._follow_task, self._gc_task):
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.rollout.stop()
        for b in self.batchers:
            await b.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._prep.shutdown(wait=False, cancel_futures=True)
        if self.payloads:
            await asyncio.to_thread(self.payloads.close)
        self.backend.close()

    def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining: the gateway is shutting down"
        if self._load_task is None or not self._load_task.done():
            ready, reason = self.backend.status()
            return False, reason if not ready else "loading"
        if self._load_error:
            return False, self._load_error
        if not self.models_config.applied:
            return False, f"models_config_file is invalid: {self.models_config.error}"
        ready, reason = self.backend.status()
        if not ready:
            return ready, reason
        for name, versions in self.backend.versions().items():
            n = self.default_version(name, versions)
            v = versions.get(n)
            if v is None or v.state != "AVAILABLE":
                which = f"the {STABLE!r} label's version {n}" if STABLE in self.models_config.labels(name) else f"version {n}"
                state = f"is {v.state}" + (f" ({v.error})" if v.error else "") if v else f"is not loaded (loaded: {sorted(versions)})"
                return False, f"model {name!r}: its default version, {which}, {state}"
        return True, reason

    @property
    def stopped(self) -> bool:
        return self._stopped or not self.accepting

    def models(self) -> dict[str, dict[int, ModelVersion]]:
        return self.backend.versions()

    @contextmanager
    def track(self, protocol: str, endpoint: str, model: str | None = None) -> Iterator[Call]:
        """Count, time and log one request, whatever the protocol, by its outcome; add it to its model
        version's statistics (serving/statistics.py) once one was chosen."""
        t0 = time.perf_counter()
        call = Call(protocol, endpoint, model)
        self.active += 1
        try:
            yield call
        except ServiceError as e:
            call.outcome = e.code
            self.metrics.refused(e.model or call.model, e.reason)
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
            seconds = time.perf_counter() - t0
            self.record(protocol, endpoint, call.model, call.outcome, seconds, call.version, call.items)
            self.statistics.request(call, seconds)
            if self.payloads:
                self.payloads.log(call, seconds)

    def record(self, protocol: str, endpoint: str, model: str | None, outcome: str, seconds: float,
               version: int | None = None, items: int = 0) -> None:
        """Metrics and the access log line of one finished request (also those refused before a handler)."""
        self.metrics.observe(protocol, endpoint, model, outcome, seconds, version)
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
            raise Unavailable("the gateway is shutting down; retry on another instance", reason="draining")

    def precheck(self, kind: str) -> None:
        """Before a request body is read: refuse at once when draining, or when every model
        of this kind has a full queue (no request could be admitted whatever it asks)."""
        self.check_accepting()
        self.batchers.precheck(kind)

    def deadline(self, client_timeout: float | None = None) -> float:
        """The event-loop time by which a request must be answered (request_timeout_s, or the
        client's own deadline when that is sooner)."""
        t = self.settings.request_timeout_s
        if client_timeout is not None:
            t = min(t, max(0.0, client_timeout))
        return asyncio.get_running_loop().time() + t

    # -- the one request lifecycle -----------------------------------------------
    async def handle(self, protocol: str, endpoint: str, parse: Callable[[], Awaitable[Predict]],
                     render: Callable[[Predict, Result], Awaitable], *, kind: str | Callable[[], str] | None = None,
                     model: str | None = None, client_timeout: float | None = None,
                     watch: Callable[[Awaitable[Result]], Awaitable[Result]] | None = None):
        """One request, from any adapter: its deadline (``request_timeout_s``, or the client's own
        when sooner: ``client_timeout``, or the request's ``timeout_s``), counted, timed and logged
        by outcome (:meth:`track`); refused before its body is read when its ``kind`` of model cannot
        take work (:meth:`precheck`); then ``parse`` (the adapter reads and decodes), the model
        (:meth:`predict`, admission included), ``render`` (the adapter encodes). ``watch`` wraps the
        model's work (REST: the client's disconnect cancels it). Errors are raised as ServiceError."""
        deadline = self.deadline(client_timeout)
        with self.track(protocol, endpoint, model) as call, tracing.request(protocol, endpoint, call):
            if kind is not None:
                self.precheck(kind if isinstance(kind, str) else kind())
            req = call.request = await parse()
            if req.timeout_s is not None:
                deadline = min(deadline, self.deadline(req.timeout_s))
            work = self.predict(req, call, deadline)
            result = call.result = await (watch(work) if watch else work)
            t0 = time.perf_counter()
            try:
                return await render(req, result)
            finally:
                call.output_s += time.perf_counter() - t0

    async def predict(self, req: Predict, call: Call | None = None, deadline: float | None = None) -> Result:
        """The request's model version and batcher; its items counted and admitted, prepared by its
        kind (off the event loop when large), batched, scored, and turned into answers."""
        name = req.model or self.default_model(req.kind)
        if call:
            call.model = name
        kind = kinds.get(req.kind)
        v, batcher = self.resolve(name, req.version, req.kind, req.label)
        n, what = kind.count(req.inputs)
        if call:
            call.version, call.items = v.version, n
        limits = self.limits(name)
        self._check_count(n, what, limits)
        # The rows it will make (whole text: its windows), estimated before any work; a request
        # certainly over a limit is refused here. Reserved now, corrected once prepared.
        with tracing.span("admission"):
            reserved = await self.offload(kind.rows, v, req.inputs, limits,
                                          heavy=kind.rows_heavy(v, req.inputs, limits))
            batcher.admit(reserved)
        heavy = kind.heavy(req.inputs)
        try:
            t0 = time.perf_counter()
            with tracing.span("preprocess"):
                prepared = await self.offload(kind.prepare, v, req.inputs, limits, heavy=heavy)
            if len(prepared.rows) > reserved:
                batcher.grow(len(prepared.rows) - reserved)
            elif len(prepared.rows) < reserved:
                batcher.release(reserved - len(prepared.rows))
            reserved = len(prepared.rows)
            if call:
                call.rows = prepared.rows
        except BaseException:
            batcher.release(reserved)
            raise
        m = self.metrics.of_model(name)
        t1 = time.perf_counter()
        m.preprocess_seconds.observe(t1 - t0)
        kind.observe(m, prepared)
        probs = await self._predict(batcher, prepared.rows, deadline, f"{n} {kind.items} for {v.name}/{v.version}", call)
        t2 = time.perf_counter()
        m.items.inc(n)
        result = kind.result(v, prepared, probs)
        if req.explain:
            await self.offload(kind.explain, v, req.inputs, prepared, result, limits, heavy=heavy)
        if call:
            call.prepare_s, call.queue_s = t1 - t0, max(0.0, t2 - t1 - call.infer_s)
            call.output_s += time.perf_counter() - t2
        self.rollout.served(req, v, batcher, result)
        return result

    # -- model selection ------------------------------------------------------
    def default_model(self, kind: str) -> str:
        """The model a request of ``kind`` that names none gets: the setting, else the first
        configured model of that kind."""
        name = self.settings.default_model(kind)
        if name is None:
            name = next((n for n, vs in self.models().items() if any(v.kind == kind for v in vs.values())), "")
        return name

    def limits(self, model: str) -> Limits:
        limits = self._limits.get(model)
        if limits is None:
            limits = self._limits[model] = self.settings.limits(model)
        return limits

    def default_version(self, name: str, versions: dict[int, ModelVersion]) -> int:
        """The ``stable`` label's version when models.config defines one, else the newest AVAILABLE.
        (A request naming no version may be routed to the canary instead: :meth:`version_number`.)"""
        stable = self.models_config.labels(name).get(STABLE)
        if stable is not None:
            return stable
        available = [n for n, v in versions.items() if v.state == "AVAILABLE"]
        return max(available or versions)

    def version_number(self, name: str, versions: dict[int, ModelVersion], version: int | None, label: str | None) -> int:
        """The version a request means: its label's (models.config), else its own, else (0 or None)
        the default (:meth:`default_version`) or, for the traffic file's share, the canary
        (serving/rollout.py). Not checked against the loaded ``versions``."""
        if label:
            labels = self.models_config.labels(name)
            if label not in labels:
                raise NotFound(f"model {name!r} has no version label {label[:100]!r}; labels: {sorted(labels)}")
            return labels[label]
        return version or self.rollout.route(name, versions, self.default_version(name, versions))

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
            raise InvalidInput(f"model {name!r} classifies {kinds.get(v.kind).items}, not {kinds.get(kind).items}")
        if v.state != "AVAILABLE" or not self._load_task or not self._load_task.done():
            raise Unavailable(f"model {name!r} version {v.version} is not ready ({v.state})")
        return v, self.batchers.get(v)

    def _check_count(self, n: int, what: str, limits: Limits) -> None:
        if n == 0:
            raise InvalidInput(f"{what} must not be empty")
        if n > limits.max_items_per_request:
            raise PayloadTooLarge(f"too many {what}: {n} > max_items_per_request={limits.max_items_per_request}")

    async def offload(self, fn: Callable, *args, heavy: bool = True):
        """``fn(*args)`` in the preprocessing threads, or on the event loop when not ``heavy`` (cheaper
        than a thread hop). The adapters decode large bodies and messages here too."""
        if not heavy:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._prep, fn, *args)

    async def _predict(self, batcher: Batcher, x: np.ndarray, deadline: float | None, what: str,
                       call: Call | None = None) -> np.ndarray:
        deadline = deadline if deadline is not None else self.deadline()
        try:
            async with asyncio.timeout_at(deadline):
                return await batcher.submit(x, deadline, admitted=True, timing=call)
        except TimeoutError:
            raise RequestTimeout(
                f"{what} not answered within its deadline (request_timeout_s={self.settings.request_timeout_s:g} "
                f"or the client's); its queued work was dropped"
            ) from None
