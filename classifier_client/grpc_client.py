"""gRPC clients (sync :class:`Client`, async :class:`AsyncClient`) of classifier.v1.Classifier.

Both connect to one or several targets (``host:port``, or ``dns:///host:port`` resolved to several
pods and balanced with the ``round_robin`` policy); several targets are used in turn, call by call
(and stream by stream). TLS (``tls``/``ca``) and metadata (``api_key`` -> ``authorization: Bearer``,
extra ``headers``) apply to every call. Unary calls are retried on UNAVAILABLE, RESOURCE_EXHAUSTED
and DEADLINE_EXCEEDED with exponential backoff and jitter, honouring ``grpc-retry-pushback-ms``.

:meth:`AsyncClient.stream_sentiment` sends many texts over StreamClassifySentiment: cut into chunks
(never over the server's 1,024 items), a window of chunks in flight per stream, ``streams`` streams
at once, a deadline per chunk, and results yielded strictly in input order. A broken stream
(gateway restart, drain, pushback, a chunk past its deadline) is reopened after a backoff and its
unanswered chunks are sent again, in order: no row is lost or repeated.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterable, Sequence

import grpc

from classifier_client.errors import RETRYABLE, ClientError, backoff_s, pushback_from, retry_delay
from serving.gen.classifier.v1 import classifier_pb2 as pb

SERVICE = "/classifier.v1.Classifier/"
MAX_ITEMS = 1024  # the server's max_items_per_request (default)
MAX_MESSAGE = 16 * 1024 * 1024


@dataclass
class Options:
    targets: Sequence[str] = ("127.0.0.1:50051",)
    tls: bool = False
    ca: str | Path | None = None  # PEM file of the CA to trust (implies TLS); None = the system roots
    api_key: str | None = None
    headers: Sequence[tuple[str, str]] = ()
    lb_policy: str = "round_robin"
    model: str = ""
    version: int = 0
    version_label: str = ""
    whole_text: bool = False  # sentiment: score every window of each text (server option whole_text)
    chunk_size: int = 512
    window: int = 4  # chunks in flight per stream (or unary calls in flight)
    streams: int = 0  # streams at once; 0 = one per target, at least 2
    deadline_s: float = 30.0  # per chunk / per call
    retries: int = 10  # consecutive failed attempts before giving up
    backoff_base_s: float = 0.1
    backoff_cap_s: float = 5.0

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if not self.targets:
            raise ValueError("at least one target")
        if not 1 <= self.chunk_size <= MAX_ITEMS:
            raise ValueError(f"chunk size must be 1..{MAX_ITEMS} (the server's limit per request)")
        if self.version and self.version_label:
            raise ValueError("give a version or a version label, not both")
        if self.window < 1 or self.streams < 0 or self.retries < 0 or self.deadline_s <= 0:
            raise ValueError("window >= 1, streams >= 0, retries >= 0 and deadline > 0")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        md = [(k.lower(), v) for k, v in self.headers]
        if self.api_key:
            md.append(("authorization", f"Bearer {self.api_key}"))
        return tuple(md)

    def channel_options(self) -> list[tuple[str, object]]:
        return [
            ("grpc.lb_policy_name", self.lb_policy),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            # Reconnect quickly after a gateway restart (the default backoff grows to 2 minutes).
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.tls or self.ca):
            return None
        return grpc.ssl_channel_credentials(Path(self.ca).read_bytes() if self.ca else None)

    def sentiment_request(self, texts) -> pb.SentimentRequest:
        return pb.SentimentRequest(texts=texts, model=self.model, version=self.version, version_label=self.version_label,
                                   whole_text=self.whole_text)

    def digits_request(self, images) -> pb.DigitsRequest:
        return pb.DigitsRequest(images=[as_image(i) for i in images], model=self.model, version=self.version,
                                version_label=self.version_label)


def as_image(x) -> pb.Image:
    """784 raw bytes (28x28 uint8) or PNG/JPEG bytes, or a pb.Image."""
    if isinstance(x, pb.Image):
        return x
    x = bytes(x)
    return pb.Image(raw=x) if len(x) == 784 and not x.startswith((b"\x89PNG", b"\xff\xd8")) else pb.Image(encoded=x)


@dataclass
class StreamStats:
    """What a run cost: retries by status code, streams (re)opened, chunks resent."""

    retries: Counter = field(default_factory=Counter)
    streams_opened: int = 0
    chunks_resent: int = 0
    last_error: str = ""

    @property
    def total_retries(self) -> int:
        return sum(self.retries.values())

    def summary(self) -> str:
        by = ", ".join(f"{k} {v}" for k, v in sorted(self.retries.items()))
        return f"retries: {self.total_retries}" + (f" ({by}; chunks resent {self.chunks_resent})" if by else "")


def _methods(channel, aio: bool):
    return {
        "ClassifySentiment": channel.unary_unary(SERVICE + "ClassifySentiment", request_serializer=pb.SentimentRequest.SerializeToString,
                                                 response_deserializer=pb.SentimentResponse.FromString),
        "ClassifyDigits": channel.unary_unary(SERVICE + "ClassifyDigits", request_serializer=pb.DigitsRequest.SerializeToString,
                                              response_deserializer=pb.DigitsResponse.FromString),
        "StreamClassifySentiment": channel.stream_stream(SERVICE + "StreamClassifySentiment",
                                                         request_serializer=pb.SentimentRequest.SerializeToString,
                                                         response_deserializer=pb.SentimentResponse.FromString),
    }


class Client:
    """Synchronous unary calls with retries, round-robin over the targets."""

    def __init__(self, targets: str | Sequence[str] = "127.0.0.1:50051", options: Options | None = None, **kw):
        self.options = options or Options(targets=targets, **kw)
        o, creds = self.options, self.options.credentials()
        self.channels = [grpc.secure_channel(t, creds, o.channel_options()) if creds else grpc.insecure_channel(t, o.channel_options())
                         for t in o.targets]
        self._methods = [_methods(c, aio=False) for c in self.channels]
        self._next = itertools.count()
        self.stats = StreamStats()

    def _call(self, name: str, request):
        import time

        o, failures = self.options, 0
        while True:
            m = self._methods[next(self._next) % len(self._methods)][name]
            try:
                return m(request, timeout=o.deadline_s, metadata=o.metadata())
            except grpc.RpcError as e:
                err = ClientError.from_rpc(e)
                failures += 1
                delay = retry_delay(err, failures, o.retries, o.backoff_base_s, o.backoff_cap_s)
                self.stats.retries[err.code.name] += 1
                time.sleep(delay)

    def sentiment(self, texts: Sequence[str]) -> pb.SentimentResponse:
        return self._call("ClassifySentiment", self.options.sentiment_request(texts))

    def digits(self, images: Sequence) -> pb.DigitsResponse:
        return self._call("ClassifyDigits", self.options.digits_request(images))

    def close(self):
        for c in self.channels:
            c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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


class AsyncClient:
    """grpc.aio client: unary calls with retries, and the ordered, resumable sentiment stream."""

    def __init__(self, targets: str | Sequence[str] = "127.0.0.1:50051", options: Options | None = None, **kw):
        self.options = options or Options(targets=targets, **kw)
        o, creds = self.options, self.options.credentials()
        self.channels = [grpc.aio.secure_channel(t, creds, o.channel_options()) if creds
                         else grpc.aio.insecure_channel(t, o.channel_options()) for t in o.targets]
        self._methods = [_methods(c, aio=True) for c in self.channels]
        self._next = itertools.count()
        self.stats = StreamStats()

    async def close(self):
        for c in self.channels:
            await c.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def _call(self, name: str, request):
        o, failures = self.options, 0
        while True:
            m = self._methods[next(self._next) % len(self._methods)][name]
            try:
                return await m(request, timeout=o.deadline_s, metadata=o.metadata())
            except grpc.RpcError as e:
                err = ClientError.from_rpc(e)
                failures += 1
                delay = retry_delay(err, failures, o.retries, o.backoff_base_s, o.backoff_cap_s)
                self.stats.retries[err.code.name] += 1
                self.stats.last_error = str(err)
                await asyncio.sleep(delay)

    async def sentiment(self, texts: Sequence[str]) -> pb.SentimentResponse:
        return await self._call("ClassifySentiment", self.options.sentiment_request(texts))

    async def digits(self, images: Sequence) -> pb.DigitsResponse:
        return await self._call("ClassifyDigits", self.options.digits_request(images))

    async def map_unary(self, kind: str, items: Iterable, start: int = 0) -> AsyncIterator[tuple[int, list, object]]:
        """``(start, chunk, response)`` in input order, for unary calls (``kind`` "sentiment" or "digits"):
        chunks of ``chunk_size``, ``window`` calls in flight."""
        call = self.sentiment if kind == "sentiment" else self.digits
        async for out in ordered_calls(call, items, self.options.chunk_size, self.options.window, start):
            yield out

    async def stream_sentiment(self, texts: Iterable[str], start: int = 0) -> AsyncIterator[tuple[int, list, pb.SentimentResponse]]:
        """``(start, texts, response)`` per chunk, strictly in input order (``start`` = index of the
        chunk's first text, counting from ``start``). Raises :class:`ClientError` on a status that is
        not worth retrying (e.g. INVALID_ARGUMENT), or after ``retries`` failures in a row."""
        run = _StreamRun(self, iter(texts), start)
        async for out in run:
            yield out


class _StreamRun:
    """The scheduler behind :meth:`AsyncClient.stream_sentiment`: lanes (one stream each) take chunks
    in order; results are yielded in order; a lane that fails puts its unanswered chunks back."""

    def __init__(self, client: AsyncClient, texts, start: int):
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
        o, failures, opened = self.o, 0, 0
        while True:
            async with self.cond:
                if self._finished() and not self.retry:
                    return
            channel = (lane + opened) % len(self.c.channels)  # a reopened stream tries the next target
            opened += 1
            call = self.c._methods[channel]["StreamClassifySentiment"](metadata=o.metadata())
            self.c.stats.streams_opened += 1
            inflight: deque[_Chunk] = deque()
            try:
                while True:
                    new: list[_Chunk] = []
                    async with self.cond:
                        while True:
                            while len(inflight) + len(new) < o.window and (chunk := self._take()) is not None:
                                new.append(chunk)
                            if inflight or new or self._finished():
                                break
                            await self.cond.wait()  # chunks may come back from another lane, or room ahead
                    inflight.extend(new)  # before any write: a failed write gives them all back
                    for chunk in new:  # written outside the lock (a write can wait for flow control)
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
                            break
                    if not inflight:
                        await call.done_writing()
                        return
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
                    failures = 0
                    async with self.cond:
                        self.results[chunk.seq] = (chunk, response)
                        self.cond.notify_all()
            except (grpc.RpcError, ClientError, asyncio.InvalidStateError) as e:
                err = e if isinstance(e, ClientError) else await _status_of(call, e)
                if err.code == grpc.StatusCode.INTERNAL and err.message == "Internal error from Core":
                    # grpc's own status for a call torn down under a write (the server ended it, e.g.
                    # UNAVAILABLE while draining, as our next chunk went out): the stream broke, no verdict.
                    err = ClientError(grpc.StatusCode.UNAVAILABLE, "the stream broke (Internal error from Core)")
                call.cancel()
                failures += 1
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
            except BaseException:
                call.cancel()
                raise

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
