"""Ordered flows of chunks: :func:`ordered_calls` (unary calls, gRPC or REST) and :class:`StreamRun`,
the scheduler behind ``AsyncClient.stream_sentiment``. Both share the flow control of
classifier_client.flow (:class:`~classifier_client.flow.Flow`: an AIMD window of chunks in flight
over the whole run, the server's pushback, retries, splitting, giving up) and yield results strictly
in input order: no row is lost or repeated, whatever was refused, resent or split.

StreamRun sends many texts over StreamClassifySentiment: cut into chunks (never over the server's
1,024 items; whole text, about ``chunk_windows`` windows), one chunk in flight per stream and
streams enough for the window. One per stream, because the gateway reads a stream's next message
only once the previous one is answered (a second one would only wait there), and because a
write under way when the server ends the call makes grpc.aio lose the server's status (the call
ends INTERNAL "Internal error from Core"): with one chunk per stream, a refusal comes back with
its own status and pushback, and names the chunk it refused. A failed stream (refusal, gateway
restart or drain, a chunk past its deadline) is closed, its chunk given back, and the lane opens a
new stream (on the next target) for its next chunk.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable, Iterable

import grpc

from classifier_client.errors import STREAM_BROKE, ClientError, pushback_from
from classifier_client.flow import Chunker, Flow
from serving.gen.classifier.v1 import classifier_pb2 as pb


def _with_rows(err: ClientError, start: int, n: int) -> ClientError:
    """A final error, naming the chunk's input rows (indexes in the message count from its start)."""
    if err.retryable or "(in the chunk of input rows" in err.message:
        return err
    return ClientError(err.code, f"{err.message} (in the chunk of input rows {start}..{start + n - 1})",
                       err.pushback_s, err.label)


@dataclass
class _Chunk:
    start: int  # index of its first item in the input
    items: list
    sent: int = 0
    not_before: float = 0.0  # event-loop time before which it is not sent again (pushback, backoff)
    ticket: int = 0
    strikes: int = 0  # refusals while alone in flight (classifier_client.flow.Flow.failed)
    refusals: int = 0  # refusals in all


class _Gate:
    """Waits for room in a Flow's window, the lowest ``key`` (input position) first."""

    def __init__(self, flow: Flow):
        self.flow = flow
        self.cond = asyncio.Condition()
        self.waiting: set[int] = set()
        self.backing_off: set[int] = set()  # chunks waiting out a backoff after a failure

    def _first(self) -> int:
        """The key that goes next: while failing (gateway down, not ready), a chunk backing off
        holds back the later ones (it is the probe; they would only fail at once too)."""
        return min(self.waiting | self.backing_off) if self.flow.failures else min(self.waiting)

    async def enter(self, key: int) -> int:
        async with self.cond:
            self.waiting.add(key)
            try:
                await self.cond.wait_for(lambda: self.flow.can_send() and key == self._first())
            finally:
                self.waiting.discard(key)
                self.cond.notify_all()
            return self.flow.sent()

    async def changed(self) -> None:
        async with self.cond:
            self.cond.notify_all()


async def ordered_calls(call, items: Iterable, chunk_size: int, window: int | Flow, start: int = 0, *,
                        chunk_rows: int | None = None, windows_of: Callable | None = None):
    """``(start, chunk, await call(chunk))`` per chunk of ``items``, in input order (used by unary
    gRPC and by REST). ``call`` makes one attempt and raises :class:`ClientError`; retries, pushback,
    splitting and the window of calls in flight (``window``: an int, or a :class:`Flow` shared with
    other work) are done here. A chunk split in two comes out as two. ``chunk_rows`` and
    ``windows_of`` (an answer's windows per text): whole-text chunks of about that many windows."""
    flow = window if isinstance(window, Flow) else Flow(window)
    gate = _Gate(flow)
    loop = asyncio.get_running_loop()
    chunker = Chunker(iter(items), chunk_size, chunk_rows)

    async def piece(s: int, items: list, not_before: float = 0.0) -> list:
        chunk = _Chunk(s, items)
        while True:
            if (wait := not_before - loop.time()) > 0:
                gate.backing_off.add(s)
                try:
                    await asyncio.sleep(wait)
                finally:
                    gate.backing_off.discard(s)
            ticket = await gate.enter(s)
            try:
                resp = await call(items)
            except ClientError as e:
                try:
                    verdict = flow.failed(ticket, e, chunk)
                except ClientError as final:
                    raise _with_rows(final, s, len(items)) from None
                finally:
                    await gate.changed()
                not_before = loop.time() + verdict.delay
                if verdict.split:
                    first, second = chunker.split(items, verdict.too_large)
                    halves = [asyncio.ensure_future(piece(s, first, not_before)),
                              asyncio.ensure_future(piece(s + len(first), second, not_before))]
                    try:
                        return await halves[0] + await halves[1]
                    finally:
                        for half in halves:
                            half.cancel()
                continue
            except BaseException:
                flow.abandoned(ticket)
                await gate.changed()
                raise
            flow.answered(ticket)
            chunker.answered()
            await gate.changed()
            if windows_of is not None:
                chunker.learn(items, windows_of(resp))
            return [(s, items, resp)]

    pending: list[asyncio.Task] = []
    ahead = max(2 * flow.cap, 4)
    try:
        while True:
            while len(pending) < ahead and (chunk := chunker.cut()):
                pending.append(asyncio.ensure_future(piece(start, chunk)))
                start += len(chunk)
            if not pending:
                return
            for out in await pending.pop(0):
                yield out
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

class StreamRun:
    """Lanes (one stream each, one chunk in flight each) take chunks in input order while the run's
    window has room; answers are yielded in order; a failed chunk is given back (to be sent again
    after its pushback or backoff, or cut in two when refused for size). ``client`` is the
    AsyncClient whose channels, options and stats the run uses."""

    def __init__(self, client, texts, start: int):
        self.c, self.o = client, client.options
        o = self.o
        self.lanes = o.streams or max(o.window, len(o.targets))
        self.flow = Flow(min(o.window, self.lanes), retries=o.retries, give_up_s=o.give_up_s,
                         backoff_base_s=o.backoff_base_s, backoff_cap_s=o.backoff_cap_s, stats=client.stats,
                         split_refused=o.whole_text, connect_retries=o.connect_retries)
        self.chunker = Chunker(texts, o.chunk_size, o.chunk_windows if o.whole_text else None)
        self.next_start = self.emit_start = start  # next input row to cut; next to yield
        self.exhausted = False
        self.retry: list[_Chunk] = []  # chunks given back, to send again
        self.flying = 0
        self.idle: list[int] = []  # lanes waiting for a chunk, longest first
        self.results: dict[int, tuple[_Chunk, pb.SentimentResponse]] = {}  # by start
        self.cond = asyncio.Condition()
        self.error: BaseException | None = None
        self.ahead = 0  # chunks cut (or split) and not yet yielded
        self.max_ahead = max(4 * self.lanes, 16)  # bounds memory, and how far ahead of a late chunk the run goes

    # -- chunks ------------------------------------------------------------------------------
    def _take(self, now: float) -> _Chunk | None:
        """The first chunk given back whose wait is over, else a new one (unless far ahead)."""
        ready = [c for c in self.retry if c.not_before <= now]
        if ready:
            chunk = min(ready, key=lambda c: c.start)
            self.retry.remove(chunk)
            return chunk
        if self.retry and self.flow.failures:
            # Failing (gateway down, restarting, not ready): the chunks given back are the probes, each
            # after its backoff; a new chunk now would only fail at once and use up the retries.
            return None
        if self.exhausted or self.ahead >= self.max_ahead:
            return None
        items = self.chunker.cut()
        if not items:
            self.exhausted = True
            return None
        self.ahead += 1
        chunk = _Chunk(self.next_start, items)
        self.next_start += len(items)
        return chunk

    def _finished(self) -> bool:
        return self.exhausted and not self.retry and not self.flying

    async def _claim(self, lane: int) -> _Chunk | None:
        """The lane's next chunk once the window has room, or None when the run is over. Idle lanes
        take chunks in turn (the one idle longest first), so the chunks go round the streams and
        their targets even when the window is smaller than the number of lanes."""
        loop = asyncio.get_running_loop()
        async with self.cond:
            self.idle.append(lane)
            try:
                while True:
                    if self.error is not None or self._finished():
                        return None
                    now = loop.time()
                    if self.idle[0] == lane and self.flow.can_send() and (chunk := self._take(now)) is not None:
                        chunk.ticket = self.flow.sent()
                        self.flying += 1
                        return chunk
                    waits = [c.not_before - now for c in self.retry if c.not_before > now]
                    try:
                        await asyncio.wait_for(self.cond.wait(), min(waits) if waits else None)
                    except TimeoutError:
                        pass
            finally:
                self.idle.remove(lane)
                self.cond.notify_all()

    async def _lane(self, lane: int):
        """Sends the lane's chunks one at a time on its stream; a failed stream is closed and the
        next chunk opens a new one, on the next target."""
        call, opened, done = None, 0, False
        try:
            while (chunk := await self._claim(lane)) is not None:
                if call is None:
                    channel = (lane + opened) % len(self.c.channels)
                    opened += 1
                    call = self.c._methods[channel]["StreamClassifySentiment"](metadata=self.o.metadata())
                    self.c.stats.streams_opened += 1
                try:
                    response = await self._exchange(call, chunk)
                except (grpc.RpcError, ClientError, asyncio.InvalidStateError) as e:
                    err = e if isinstance(e, ClientError) else await _status_of(call, e)
                    call.cancel()
                    call = None
                    await self._failed(chunk, err)
                    continue
                except BaseException:
                    async with self.cond:
                        self.flying -= 1
                        self.flow.abandoned(chunk.ticket)
                    raise
                await self._answered(chunk, response)
            done = self.error is None
        finally:
            if call is not None:
                if done:
                    await _close(call)
                else:
                    call.cancel()

    async def _exchange(self, call, chunk: _Chunk) -> pb.SentimentResponse:
        o = self.o
        chunk.sent += 1
        if chunk.sent > 1:
            self.c.stats.chunks_resent += 1
        try:
            await asyncio.wait_for(call.write(o.sentiment_request(chunk.items)), o.deadline_s)
        except asyncio.TimeoutError:
            raise ClientError(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"could not send a chunk within {o.deadline_s:g}s") from None
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass  # the call has ended: reading gives its status
        try:
            response = await asyncio.wait_for(call.read(), o.deadline_s)
        except asyncio.TimeoutError:
            raise ClientError(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"no answer to a chunk within {o.deadline_s:g}s") from None
        if response is grpc.aio.EOF:
            raise await _status_of(call, None)
        if len(response.predictions) != len(chunk.items):
            raise ClientError(grpc.StatusCode.INTERNAL,
                              f"{len(response.predictions)} predictions for a chunk of {len(chunk.items)} texts")
        return response

    async def _answered(self, chunk: _Chunk, response) -> None:
        async with self.cond:
            self.flying -= 1
            self.flow.answered(chunk.ticket)
            self.chunker.answered()
            if self.o.whole_text:
                self.chunker.learn(chunk.items, [p.windows for p in response.predictions])
            self.results[chunk.start] = (chunk, response)
            self.cond.notify_all()

    async def _failed(self, chunk: _Chunk, err: ClientError) -> None:
        """Gives the chunk back (cut in two when refused for size), or raises the final error."""
        async with self.cond:
            self.flying -= 1
            try:
                verdict = self.flow.failed(chunk.ticket, err, chunk)
            except ClientError as final:
                self.error = _with_rows(final, chunk.start, len(chunk.items))
                self.cond.notify_all()
                raise self.error from None
            not_before = asyncio.get_running_loop().time() + verdict.delay
            if verdict.split:
                first, second = self.chunker.split(chunk.items, verdict.too_large)
                self.retry += [_Chunk(chunk.start, first, not_before=not_before),
                               _Chunk(chunk.start + len(first), second, not_before=not_before)]
                self.ahead += 1
            else:
                chunk.not_before = not_before
                self.retry.append(chunk)
            self.cond.notify_all()

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
                    while self.emit_start not in self.results and self.error is None and alive:
                        await self.cond.wait()
                    if self.emit_start in self.results:
                        chunk, response = self.results.pop(self.emit_start)
                        self.emit_start += len(chunk.items)
                        self.ahead -= 1
                        self.cond.notify_all()
                    elif self.error is not None:
                        raise self.error
                    else:
                        if not self._finished() or self.emit_start != self.next_start:
                            raise ClientError(grpc.StatusCode.INTERNAL, "streams ended with chunks unanswered")
                        return
                yield chunk.start, chunk.items, response
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _close(call) -> None:
    """Half-closes a stream whose work is done and lets it end (cancels it if that takes long)."""
    try:
        await asyncio.wait_for(call.done_writing(), 2.0)
        await asyncio.wait_for(call.code(), 2.0)
    except BaseException:  # noqa: BLE001 - closing is best effort; the results are in
        call.cancel()


async def _status_of(call, e: BaseException | None) -> ClientError:
    """The call's own final status (a failed write reports only "Internal error from Core")."""
    try:
        code = await asyncio.wait_for(call.code(), 2.0)
        if code != grpc.StatusCode.OK:
            details = await call.details() or ""
            if code == grpc.StatusCode.INTERNAL and details == "Internal error from Core":
                # grpc.aio's own status for a call torn down under a write: the server's is lost.
                return ClientError(grpc.StatusCode.UNAVAILABLE, "the stream broke (Internal error from Core)",
                                   label=STREAM_BROKE)
            return ClientError(code, details, pushback_from(await call.trailing_metadata()))
        if e is None:
            return ClientError(grpc.StatusCode.UNAVAILABLE, "the stream ended with a chunk unanswered",
                               label=STREAM_BROKE)
    except Exception:  # noqa: BLE001
        pass
    if isinstance(e, grpc.RpcError):
        return ClientError.from_rpc(e)
    return ClientError(grpc.StatusCode.UNAVAILABLE, str(e) or type(e).__name__ if e else "the stream broke",
                       label=STREAM_BROKE)
