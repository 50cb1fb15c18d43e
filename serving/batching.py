"""Dynamic batching: concurrent requests for one model version become one backend call.

Each :class:`Batcher` owns a queue of entries (rows, future, arrival, deadline)
and one worker task. The worker takes the oldest entries up to
``max_batch_size`` rows. Batching is adaptive: when no batch of this model is
in flight, whatever is queued goes at once (a lone request pays no batching
delay); while batches are in flight, rows collect in the queue and the next
free slot takes them, waiting at most ``max_batch_wait`` after the *oldest*
entry arrived for more to join (``wait_when_idle=True``: that wait applies
when idle too, the fixed-delay batching of earlier versions), calls the blocking backend in a worker thread
(never on the event loop), and splits the result back to each request in
order. Up to ``max_concurrent`` batches are in flight at once (1 suits an
in-process model that already uses every core; a remote TF Serving keeps its
own batch threads busy with more). A request larger than ``max_batch_size``
is cut into several entries.

Admission (:meth:`admit`) is decided before a request is preprocessed and
costs nothing: it is refused (:class:`Overloaded`, with the time after which
a retry should fit) when the queue would hold more than ``max_queue_items``
rows, or when the rows ahead of it would take longer than ``max_queue_wait``
to compute at the measured speed of recent batches. So latency stays bounded
and the model keeps computing work someone still waits for: an entry whose
deadline passed or whose caller went away (its future cancelled) is dropped
from the queue, never computed.

The time a refusal tells the client to wait (REST ``Retry-After``, gRPC pushback) is the
work ahead, stretched by how contended the model is (:class:`Contention`): when many
clients are refused for each one admitted, telling all of them "when the work ahead is
done" brings them back together, and all but one are refused again, each resending its
whole request (at 50x capacity with 1,024-text requests over gRPC: 135-170 refused 1.3 MB
messages a second). The pushback is ``wait x (1 + refusals per admission)`` over the last
few seconds, at most ``max_retry_after_s``; at equilibrium (N clients waiting, A
admissions/s, W of work ahead) that is about sqrt(W x N / A), and the refused retries
fall from ~N / W a second to ~sqrt(N x A / W). It is also spread by a random 1.0-1.25x
(:data:`RETRY_AFTER_SPREAD`): clients refused in the same moment that wait exactly what they
are told (gRPC's own retry policy does) would otherwise come back in the same moment, a wave
the gateway reads one request after another.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np

from serving import tracing
from serving.errors import Internal, Overloaded, ServiceError, Unavailable

log = logging.getLogger("serving.batching")

RETRY_AFTER_SPREAD = (1.0, 1.25)  # a refusal's pushback times a random factor in this range


class Batcher:
    def __init__(
        self,
        name: str,
        fn: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int,
        max_batch_wait_s: float,
        max_queue_items: int,
        executor: Executor,
        on_batch: Callable[[int, float], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
        max_concurrent: int = 1,
        max_queue_wait_s: float = float("inf"),
        on_drop: Callable[[int, str], None] | None = None,
        tag: Callable[[], str] | None = None,
        wait_when_idle: bool = False,
        model: str | None = None,
        max_retry_after_s: float = float("inf"),
    ):
        self.name = name
        self.model = model or name  # the model whose refusals these are (name: "model/version")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait = max_batch_wait_s
        self.max_queue_items = max_queue_items
        self.max_queue_wait = max_queue_wait_s
        self.max_retry_after = max_retry_after_s
        self.contention = Contention()
        self.max_concurrent = max_concurrent
        self.wait_when_idle = wait_when_idle
        self.executor = executor
        self.on_batch = on_batch or (lambda rows, seconds: None)
        self.on_depth = on_depth or (lambda depth: None)
        self.on_drop = on_drop or (lambda rows, reason: None)
        # With ``tag`` (e.g. the request id), each entry is tagged when submitted and the
        # model is called as fn(x, tags) with the tags of the batch's entries.
        self.tag = tag
        self._queue: deque[_Entry] = deque()
        self._queued_rows = 0  # queued, not yet taken into a batch (dropped entries excluded)
        self._reserved_rows = 0  # admitted, still being preprocessed
        self._in_flight_rows = 0
        # Cost model of one backend call, c(rows) = overhead + rows * per_row, measured on recent
        # calls: the overhead on small batches, the per-row cost on large ones.
        self._overhead_s: float | None = None
        self._seconds_per_row: float | None = None
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._slots = asyncio.Semaphore(max_concurrent)
        # Backend calls running (task -> when it started) and the slot-seconds of finished ones.
        self._calls: dict[asyncio.Task, float] = {}
        self._busy_s = 0.0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop; whatever is still queued or computing is answered UNAVAILABLE (never left hanging)."""
        for e in self._queue:
            if e.queued and not e.fut.done():
                e.queued = False
                e.fut.set_exception(Unavailable(f"{self.name}: the gateway is shutting down"))
        self._queue.clear()
        self._queued_rows = 0
        for task in [self._task, *self._calls]:
            if task:
                task.cancel()
        await asyncio.gather(*[t for t in [self._task, *self._calls] if t], return_exceptions=True)

    @property
    def depth(self) -> int:
        """Rows waiting, admitted or in flight."""
        return self._queued_rows + self._reserved_rows + self._in_flight_rows

    @property
    def waiting(self) -> int:
        """Rows admitted or queued that no batch has taken yet."""
        return self._queued_rows + self._reserved_rows

    async def drained(self, timeout: float) -> bool:
        """Wait until no row is admitted, queued or in flight; False if some still are after ``timeout``."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.depth and loop.time() < end:
            await asyncio.sleep(0.01)
        return not self.depth

    def busy_seconds(self) -> float:
        """Seconds the batch slots have spent in backend calls so far, running calls included
        (its rate / ``max_concurrent`` is the busy fraction of the slots: near 1 before refusals start)."""
        now = time.perf_counter()
        return self._busy_s + sum(now - t for t in self._calls.values())

    def estimated_wait(self) -> float:
        """Seconds until rows admitted now would start being computed (0 until calls were measured)."""
        return self._rows_seconds(self.depth)

    def _rows_seconds(self, rows: int) -> float:
        batches = -(-rows // self.max_batch_size)
        return (batches * (self._overhead_s or 0.0) + rows * (self._seconds_per_row or 0.0)) / self.max_concurrent

    def _measured(self, rows: int, seconds: float) -> None:
        def ewma(old, new):
            return new if old is None else 0.8 * old + 0.2 * new

        if rows <= max(1, self.max_batch_size // 32):
            self._overhead_s = ewma(self._overhead_s, seconds)
        elif rows >= self.max_batch_size // 4:
            self._seconds_per_row = ewma(self._seconds_per_row, seconds / rows)

    def refusal(self, n: int) -> Overloaded | None:
        """Why ``n`` more rows cannot be admitted now, or None if they can (a query: the caller
        that refuses with it calls :meth:`refused`)."""
        waiting = self._queued_rows + self._reserved_rows
        if waiting + n > self.max_queue_items:
            return Overloaded(
                f"queue for {self.name} is full ({waiting} rows waiting + {n} > max_queue_items="
                f"{self.max_queue_items}); retry later",
                retry_after_s=self._retry_after(self._rows_seconds(waiting)), reason="queue_rows",
                model=self.model,
            )
        wait = self.estimated_wait()
        if waiting and wait > self.max_queue_wait:
            return Overloaded(
                f"queue for {self.name} is full: ~{wait:.2f}s of work ahead > max_queue_wait_s="
                f"{self.max_queue_wait:g}; retry later",
                retry_after_s=self._retry_after(wait), reason="work_ahead", model=self.model,
            )
        return None

    def _retry_after(self, wait: float) -> float:
        """When the work ahead now is done, stretched by contention and spread (module docstring)."""
        stretched = max(self.max_queue_wait, wait) * (1.0 + self.contention.ratio())
        stretched *= random.uniform(*RETRY_AFTER_SPREAD)
        return min(stretched, max(self.max_retry_after, self.max_queue_wait))

    def refused(self) -> None:
        """Count a request refused by this batcher (the contention behind the pushback)."""
        self.contention.refused()

    def admit(self, n: int) -> None:
        """Reserve room for ``n`` rows, or raise :class:`Overloaded` at once."""
        refused = self.refusal(n)
        if refused is not None:
            self.refused()
            try:
                raise refused
            finally:  # this frame is in its traceback: no local may hold it (a reference cycle per refusal)
                del refused
        self.contention.admitted()
        self._reserved_rows += n

    def grow(self, n: int) -> None:
        """Add ``n`` rows to an admitted request's reservation (it made more rows than estimated):
        never refused. It was admitted on its estimate and is prepared; refusing it now would
        count its own reservation as work ahead of it, and throw its preprocessing away."""
        self._reserved_rows += n

    def release(self, n: int) -> None:
        """Give back a reservation that will not be submitted (the request failed first)."""
        self._reserved_rows -= n

    async def submit(self, rows: np.ndarray, deadline: float | None = None, admitted: bool = False,
                     timing=None) -> np.ndarray:
        """Probabilities for ``rows``, computed together with whatever else is queued.

        ``deadline`` (the event loop's clock): queued rows still waiting then are
        dropped. ``admitted``: :meth:`admit` already reserved room for them.
        Cancelling the caller drops its rows that are still queued. ``timing``: an object
        whose ``infer_s`` gets the seconds of each backend call that carries its rows.
        """
        n = len(rows)
        if not admitted:
            self.admit(n)
        self._reserved_rows -= n
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        traced = tracing.queued()  # the request's span (tracing on, request sampled), else None
        futures = []
        for start in range(0, n, self.max_batch_size):
            fut = loop.create_future()
            entry = _Entry(rows[start : start + self.max_batch_size], fut, now, deadline, self.tag() if self.tag else None,
                           timing, traced)
            fut.add_done_callback(lambda f, e=entry: self._abandoned(e) if f.cancelled() else None)
            self._queue.append(entry)
            futures.append(fut)
        self._queued_rows += n
        self.on_depth(self.depth)
        self._wakeup.set()
        if len(futures) == 1:  # the usual case: no gather (its own future and callbacks) needed
            return await futures[0]
        return np.concatenate(await asyncio.gather(*futures))

    def _abandoned(self, e: _Entry) -> None:
        """The caller stopped waiting (deadline, disconnect, cancelled RPC): drop rows not yet taken."""
        if e.queued:
            e.queued = False
            self._queued_rows -= len(e.x)
            late = e.deadline is not None and asyncio.get_running_loop().time() >= e.deadline
            self.on_drop(len(e.x), "deadline" if late else "cancelled")
            tracing.dropped(e.trace, "deadline" if late else "cancelled")
            self.on_depth(self.depth)

    def _live_head(self) -> _Entry | None:
        while self._queue and not self._queue[0].queued:
            self._queue.popleft()
        return self._queue[0] if self._queue else None

    async def _run(self) -> None:
        while True:
            if self._live_head() is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._slots.acquire()
            head = self._live_head()
            if head is None:
                self._slots.release()
                continue
            # Nothing in flight: go now. Otherwise (or wait_when_idle) wait for more rows,
            # but never past max_wait after the oldest entry arrived.
            deadline = head.t + self.max_wait
            idle = self._in_flight_rows == 0 and not self.wait_when_idle
            while not idle and self._queued_rows < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch: list[_Entry] = []
            rows = 0
            while (e := self._live_head()) is not None and rows + len(e.x) <= self.max_batch_size:
                self._queue.popleft()
                e.queued = False
                batch.append(e)
                rows += len(e.x)
            if not batch:
                self._slots.release()
                continue
            self._queued_rows -= rows
            self._in_flight_rows += rows
            task = asyncio.get_running_loop().create_task(self._call(batch, rows))
            self._calls[task] = time.perf_counter()
            task.add_done_callback(self._call_done)

    def _call_done(self, task: asyncio.Task) -> None:
        self._busy_s += time.perf_counter() - self._calls.pop(task)

    async def _call(self, batch: list[_Entry], rows: int) -> None:
        loop = asyncio.get_running_loop()
        # Tracing on: the batch's span, linked to the requests it serves (serving/tracing.py); else None.
        traced = tracing.batch(self.name, [e.trace for e in batch], rows) if tracing.enabled() else None
        error: BaseException | None = None
        try:
            x = batch[0].x if len(batch) == 1 else np.concatenate([e.x for e in batch])
            t0 = time.perf_counter()
            args = (x, [e.tag for e in batch]) if self.tag else (x,)
            if traced is None:
                y = await loop.run_in_executor(self.executor, self.fn, *args)
            else:
                y = await loop.run_in_executor(self.executor, traced.run, self.fn, *args)
            seconds = time.perf_counter() - t0
            self._measured(rows, seconds)
            self.on_batch(rows, seconds)
            timings = {id(e.timing): e.timing for e in batch if e.timing is not None}  # each request once
            for t in timings.values():
                t.infer_s += seconds
            offset = 0
            for e in batch:
                if not e.fut.done():
                    e.fut.set_result(y[offset : offset + len(e.x)])
                offset += len(e.x)
        except Exception as ex:  # noqa: BLE001 - the error goes to every waiting request
            if isinstance(ex, ServiceError):  # expected (backend down, too slow): no traceback
                log.warning("backend call for %s failed: %s", self.name, ex)
                err = ex
            else:
                log.exception("backend call for %s failed", self.name)
                err = Internal(f"model call failed for {self.name}: {type(ex).__name__}")
            error = err
            for e in batch:
                if not e.fut.done():
                    e.fut.set_exception(err)
        except asyncio.CancelledError as ex:
            error = ex
            for e in batch:
                if not e.fut.done():
                    e.fut.set_exception(Unavailable(f"{self.name}: the gateway is shutting down"))
            raise
        finally:
            if traced is not None:
                traced.end(error)
            self._in_flight_rows -= rows
            self._slots.release()
            self.on_depth(self.depth)


class _Entry:
    __slots__ = ("x", "fut", "t", "deadline", "tag", "queued", "timing", "trace")

    def __init__(self, x: np.ndarray, fut: asyncio.Future, t: float, deadline: float | None, tag: str | None,
                 timing=None, trace: tuple | None = None):
        self.x, self.fut, self.t, self.deadline, self.tag, self.queued = x, fut, t, deadline, tag, True
        self.timing = timing  # the request's statistics (serving/statistics.py): backend seconds added
        self.trace = trace  # tracing: the request's span and when these rows were queued (serving/tracing.py)


class Contention:
    """Refusals per admission over the last few seconds: both counts decay with time constant
    ``tau_s``; admissions count at least 1, so a few refusals of a quiet model stay small."""

    __slots__ = ("tau", "clock", "_refused", "_admitted", "_t")

    def __init__(self, tau_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.tau, self.clock = tau_s, clock
        self._refused = self._admitted = 0.0
        self._t = clock()

    def _decay(self) -> None:
        now = self.clock()
        if now > self._t:
            f = math.exp((self._t - now) / self.tau)
            self._refused *= f
            self._admitted *= f
            self._t = now

    def refused(self) -> None:
        self._decay()
        self._refused += 1.0

    def admitted(self) -> None:
        self._decay()
        self._admitted += 1.0

    def ratio(self) -> float:
        self._decay()
        return self._refused / max(self._admitted, 1.0)
