"""Dynamic batching: concurrent requests for one model version become one backend call.

Each :class:`Batcher` owns a queue of (rows, future) entries and one worker
task. The worker takes the oldest entries up to ``max_batch_size`` rows, waits
at most ``max_batch_wait`` after the *oldest* entry arrived for more rows to
join (entries that already waited while the backend was busy go at once),
calls the blocking backend in a worker thread (never on the event loop), and
splits the result back to each request in order. Up to ``max_concurrent``
batches are in flight at once (1 suits an in-process model that already uses
every core; a remote TF Serving keeps its own batch threads busy with more). A request larger than
``max_batch_size`` is cut into several entries. When the queue holds
``max_queue_items`` rows, new work is refused at once (:class:`Overloaded`)
instead of letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np

from serving.errors import Internal, Overloaded, ServiceError, Unavailable

log = logging.getLogger("serving.batching")


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
    ):
        self.name = name
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait = max_batch_wait_s
        self.max_queue_items = max_queue_items
        self.executor = executor
        self.on_batch = on_batch or (lambda rows, seconds: None)
        self.on_depth = on_depth or (lambda depth: None)
        self._queue: deque[tuple[np.ndarray, asyncio.Future, float]] = deque()
        self._queued_rows = 0
        self._in_flight_rows = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._slots = asyncio.Semaphore(max_concurrent)
        self._calls: set[asyncio.Task] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        for task in [self._task, *self._calls]:
            if task:
                task.cancel()
        await asyncio.gather(*[t for t in [self._task, *self._calls] if t], return_exceptions=True)

    @property
    def depth(self) -> int:
        return self._queued_rows + self._in_flight_rows

    async def submit(self, rows: np.ndarray) -> np.ndarray:
        """Probabilities for ``rows``, computed together with whatever else is queued."""
        n = len(rows)
        if self._queued_rows + n > self.max_queue_items:
            raise Overloaded(
                f"queue for {self.name} is full ({self._queued_rows} rows waiting, limit max_queue_items="
                f"{self.max_queue_items}); retry later"
            )
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        futures = []
        for start in range(0, n, self.max_batch_size):
            fut = loop.create_future()
            self._queue.append((rows[start : start + self.max_batch_size], fut, now))
            futures.append(fut)
        self._queued_rows += n
        self.on_depth(self.depth)
        self._wakeup.set()
        parts = await asyncio.gather(*futures)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._slots.acquire()
            # Wait for more rows, but never past max_wait after the oldest entry arrived.
            deadline = self._queue[0][2] + self.max_wait
            while self._queued_rows < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch, futures, rows = [], [], 0
            while self._queue and rows + len(self._queue[0][0]) <= self.max_batch_size:
                x, fut, _ = self._queue.popleft()
                batch.append(x)
                futures.append(fut)
                rows += len(x)
            self._queued_rows -= rows
            self._in_flight_rows += rows
            task = asyncio.get_running_loop().create_task(self._call(batch, futures, rows))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _call(self, batch: list[np.ndarray], futures: list[asyncio.Future], rows: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            x = batch[0] if len(batch) == 1 else np.concatenate(batch)
            t0 = time.perf_counter()
            y = await loop.run_in_executor(self.executor, self.fn, x)
            self.on_batch(rows, time.perf_counter() - t0)
            offset = 0
            for part, fut in zip(batch, futures):
                if not fut.done():
                    fut.set_result(y[offset : offset + len(part)])
                offset += len(part)
        except Exception as e:  # noqa: BLE001 - the error goes to every waiting request
            if isinstance(e, ServiceError):  # expected (backend down, too slow): no traceback
                log.warning("backend call for %s failed: %s", self.name, e)
                err = e
            else:
                log.exception("backend call for %s failed", self.name)
                err = Internal(f"model call failed for {self.name}: {type(e).__name__}")
            for fut in futures:
                if not fut.done():
                    fut.set_exception(err)
        except asyncio.CancelledError:
            for fut in futures:
                if not fut.done():
                    fut.set_exception(Unavailable(f"{self.name}: the gateway is shutting down"))
            raise
        finally:
            self._in_flight_rows -= rows
            self._slots.release()
            self.on_depth(self.depth)
