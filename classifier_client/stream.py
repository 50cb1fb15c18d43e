"""Ordered flows of chunks: :func:`ordered_calls` (a window of unary calls, gRPC or REST) and
:class:`StreamRun`, the scheduler behind ``AsyncClient.stream_sentiment``.

StreamRun sends many texts over StreamClassifySentiment: cut into chunks (never over the server's
1,024 items), a window of chunks in flight per stream, ``streams`` streams at once, a deadline per
chunk, and results yielded strictly in input order. A broken stream (gateway restart, drain,
pushback, a chunk past its deadline) is reopened after a backoff and its unanswered chunks are
sent again, in order: no row is lost or repeated.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

import grpc

from classifier_client.errors import RETRYABLE, ClientError, backoff_s, pushback_from
from serving.gen.classifier.v1 import classifier_pb2 as pb


async def ordered_calls(call, items: Iterable, chunk_size: int, window: int, start: int = 0):
    """``(start, chunk, await call(chunk))`` per chunk of ``items``, in input order, with up to
    ``window`` calls in flight (used by unary gRPC and by REST)."""
    it, pending = iter(items), deque()
    try:
        while True:
            while len(pending) < window and (chunk := list(itertools.islice(it, chunk_size))):
                pending.append((start, chunk, asyncio.ensure_future(call(chunk))))
                start += len(chunk)
            if not pending:
                return
            s, chunk, task = pending.popleft()
            yield s, chunk, await task
    finally:
        for *_, task in pending:
            task.cancel()


@dataclass(order=True)
class _Chunk:
    seq: int
    start: int = field(compare=False)  # index of its first item in the input
    items: list = field(compare=False)
    sent: int = field(default=0, compare=False)


class StreamRun:
    """Lanes (one stream each) take chunks in order; results are yielded in order; a lane that
    fails puts its unanswered chunks back. ``client`` is the AsyncClient whose channels, options
    and stats the run uses."""

    def __init__(self, client, texts, start: int):
        self.c, self.o = client, client.options
        self.texts, self.next_start, self.exhausted = texts, start, False
        self.next_seq = 0  # next chunk to cut from the input
        self.emit_seq = 0  # next chunk to yield
        self.retry: list[_Chunk] = []  # heap of chunks given back by a failed lane
        self.results: dict[int, tuple[_Chunk, pb.SentimentResponse]] = {}
        self.cond = asyncio.Condition()
        self.error: BaseException | None = None
        n = self.o.streams or max(2, len(self.o.targets))
        self.lanes = n
        self.max_ahead = max(2 * n * self.o.window, 8)  # bounds memory when one lane lags

    def _take(self) -> _Chunk | None:
        if self.retry:
            return heapq.heappop(self.retry)
        if self.exhausted or self.next_seq - self.emit_seq >= self.max_ahead:
            return None
        items = list(itertools.islice(self.texts, self.o.chunk_size))
        if not items:
            self.exhausted = True
            return None
        chunk = _Chunk(self.next_seq, self.next_start, items)
        self.next_seq += 1
        self.next_start += len(items)
        return chunk

    def _finished(self) -> bool:
        return self.exhausted and not self.retry

    async def _lane(self, lane: int):
        """One stream at a time, reopened (on the next target) after a retryable failure."""
        failures, opened = 0, 0
        while True:
            async with self.cond:
                if self._finished() and not self.retry:
                    return
            channel = (lane + opened) % len(self.c.channels)  # a reopened stream tries the next target
            opened += 1
            call = self.c._methods[channel]["StreamClassifySentiment"](metadata=self.o.metadata())
            self.c.stats.streams_opened += 1
            inflight: deque[_Chunk] = deque()
            try:
                while True:
                    new = await self._next_chunks(inflight)
                    inflight.extend(new)  # before any write: a failed write gives them all back
                    await self._send(call, new)
                    if not inflight:
                        await call.done_writing()
                        return
                    await self._receive(call, inflight)
                    failures = 0
            except (grpc.RpcError, ClientError, asyncio.InvalidStateError) as e:
                failures += 1
                await self._recover(call, e, inflight, failures)
            except BaseException:
                call.cancel()
                raise

    async def _next_chunks(self, inflight: deque[_Chunk]) -> list[_Chunk]:
        """Chunks to fill the lane's window; waits while it has none in flight and none to take
        (chunks may come back from another lane, or room ahead), unless the input is done."""
        new: list[_Chunk] = []
        async with self.cond:
            while True:
                while len(inflight) + len(new) < self.o.window and (chunk := self._take()) is not None:
                    new.append(chunk)
                if inflight or new or self._finished():
                    return new
                await self.cond.wait()

    async def _send(self, call, new: list[_Chunk]) -> None:
        """Writes ``new`` (outside the lock: a write can wait for flow control)."""
        o = self.o
        for chunk in new:
            chunk.sent += 1
            if chunk.sent > 1:
                self.c.stats.chunks_resent += 1
            try:
                await asyncio.wait_for(call.write(o.sentiment_request(chunk.items)), o.deadline_s)
            except asyncio.TimeoutError:
                raise ClientError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"could not send a chunk within {o.deadline_s:g}s") from None
            except (grpc.RpcError, asyncio.InvalidStateError):
                # The call has ended ("Internal error from Core" says only that): reading
                # gives the answers it still has, then its real status.
                return

    async def _receive(self, call, inflight: deque[_Chunk]) -> None:
        """Reads the answer to the oldest chunk in flight and files it for :meth:`__aiter__`."""
        o = self.o
        try:
            response = await asyncio.wait_for(call.read(), o.deadline_s)
        except asyncio.TimeoutError:
            raise ClientError(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"no answer to a chunk within {o.deadline_s:g}s") from None
        if response is grpc.aio.EOF:
            code = await call.code()
            if code != grpc.StatusCode.OK:
                raise ClientError(code, await call.details() or "", None)
            raise ClientError(grpc.StatusCode.UNAVAILABLE, f"stream ended with {len(inflight)} chunks unanswered")
        chunk = inflight.popleft()
        if len(response.predictions) != len(chunk.items):
            raise ClientError(grpc.StatusCode.INTERNAL,
                              f"{len(response.predictions)} predictions for a chunk of {len(chunk.items)} texts")
        async with self.cond:
            self.results[chunk.seq] = (chunk, response)
            self.cond.notify_all()

    async def _recover(self, call, e: BaseException, inflight: deque[_Chunk], failures: int) -> None:
        """After a broken stream: raises the error when it is final (or retries ran out), else gives
        the unanswered chunks back and waits the backoff."""
        o = self.o
        err = e if isinstance(e, ClientError) else await _status_of(call, e)
        if err.code == grpc.StatusCode.INTERNAL and err.message == "Internal error from Core":
            # grpc's own status for a call torn down under a write (the server ended it, e.g.
            # UNAVAILABLE while draining, as our next chunk went out): the stream broke, no verdict.
            err = ClientError(grpc.StatusCode.UNAVAILABLE, "the stream broke (Internal error from Core)")
        call.cancel()
        if err.code not in RETRYABLE or failures > o.retries:
            if inflight and err.code not in RETRYABLE:  # indexes in the message count from the chunk's start
                head = inflight[0]
                err = ClientError(err.code, f"{err.message} (in the chunk of input rows {head.start}.."
                                            f"{head.start + len(head.items) - 1})", err.pushback_s)
            raise err from None
        self.c.stats.retries[err.code.name] += 1
        self.c.stats.last_error = str(err)
        async with self.cond:
            for chunk in inflight:
                heapq.heappush(self.retry, chunk)
            self.cond.notify_all()
        await asyncio.sleep(backoff_s(failures, o.backoff_base_s, o.backoff_cap_s, err.pushback_s))

    async def __aiter__(self):
        tasks = [asyncio.ensure_future(self._lane(i)) for i in range(self.lanes)]
        alive = set(tasks)

        def done(t: asyncio.Task):
            alive.discard(t)
            if not t.cancelled() and t.exception() is not None and self.error is None:
                self.error = t.exception()

            async def wake():
                async with self.cond:
                    self.cond.notify_all()
            asyncio.ensure_future(wake())

        for t in tasks:
            t.add_done_callback(done)
        try:
            while True:
                async with self.cond:
                    while self.emit_seq not in self.results and self.error is None and alive:
                        await self.cond.wait()
                    if self.emit_seq in self.results:
                        chunk, response = self.results.pop(self.emit_seq)
                        self.emit_seq += 1
                        self.cond.notify_all()
                    elif self.error is not None:
                        raise self.error
                    else:
                        if not self._finished() or self.emit_seq != self.next_seq:
                            raise ClientError(grpc.StatusCode.INTERNAL, "streams ended with chunks unanswered")
                        return
                yield chunk.start, chunk.items, response
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _status_of(call, e: BaseException) -> ClientError:
    """The call's own final status (a failed write reports only "Internal error from Core")."""
    try:
        code = await asyncio.wait_for(call.code(), 2.0)
        if code != grpc.StatusCode.OK:
            return ClientError(code, await call.details() or "", pushback_from(await call.trailing_metadata()))
    except Exception:  # noqa: BLE001
        pass
    if isinstance(e, grpc.RpcError):
        return ClientError.from_rpc(e)
    return ClientError(grpc.StatusCode.UNAVAILABLE, str(e) or type(e).__name__)
