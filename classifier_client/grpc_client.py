"""gRPC clients (sync :class:`Client`, async :class:`AsyncClient`) of classifier.v1.Classifier.

Both connect to one or several targets (``host:port``, or ``dns:///host:port`` resolved to several
pods and balanced with the ``round_robin`` policy); several targets are used in turn, call by call
(and stream by stream). TLS (``tls``/``ca``) and metadata (``api_key`` -> ``authorization: Bearer``,
extra ``headers``) apply to every call (:class:`Options`, in classifier_client.protocol). Unary calls
are retried on UNAVAILABLE, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED with exponential backoff and
jitter, honouring ``grpc-retry-pushback-ms``; :meth:`AsyncClient.map_unary` shares one flow control
over its calls (classifier_client.flow: AIMD window, pushback, splitting, giving up).

:meth:`AsyncClient.stream_sentiment` sends many texts over StreamClassifySentiment, in order and
resumably (the scheduler is classifier_client.stream.StreamRun).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import AsyncIterator, Iterable, Sequence

import grpc

from classifier_client.errors import ClientError, retry_delay
from classifier_client.flow import Flow
from classifier_client.protocol import MAX_ITEMS, MAX_MESSAGE, SERVICE, Options, StreamStats, as_image, method_stubs
from classifier_client.stream import StreamRun, ordered_calls
from serving.gen.classifier.v1 import classifier_pb2 as pb

__all__ = ["Client", "AsyncClient", "Options", "StreamStats", "ordered_calls", "as_image", "MAX_ITEMS", "MAX_MESSAGE",
           "SERVICE"]


class Client:
    """Synchronous unary calls with retries, round-robin over the targets."""

    def __init__(self, targets: str | Sequence[str] = "127.0.0.1:50051", options: Options | None = None, **kw):
        self.options = options or Options(targets=targets, **kw)
        o, creds = self.options, self.options.credentials()
        self.channels = [grpc.secure_channel(t, creds, o.channel_options()) if creds else grpc.insecure_channel(t, o.channel_options())
                         for t in o.targets]
        self._methods = [method_stubs(c) for c in self.channels]
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
                self.stats.retries[err.label] += 1
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


class AsyncClient:
    """grpc.aio client: unary calls with retries, and the ordered, resumable sentiment stream."""

    def __init__(self, targets: str | Sequence[str] = "127.0.0.1:50051", options: Options | None = None, **kw):
        self.options = options or Options(targets=targets, **kw)
        o, creds = self.options, self.options.credentials()
        self.channels = [grpc.aio.secure_channel(t, creds, o.channel_options()) if creds
                         else grpc.aio.insecure_channel(t, o.channel_options()) for t in o.targets]
        self._methods = [method_stubs(c) for c in self.channels]
        self._next = itertools.count()
        self.stats = StreamStats()

    async def close(self):
        for c in self.channels:
            await c.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def _once(self, name: str, request):
        """One attempt (the next target); raises :class:`ClientError`."""
        m = self._methods[next(self._next) % len(self._methods)][name]
        try:
            return await m(request, timeout=self.options.deadline_s, metadata=self.options.metadata())
        except grpc.RpcError as e:
            raise ClientError.from_rpc(e) from None

    async def _call(self, name: str, request):
        o, failures = self.options, 0
        while True:
            try:
                return await self._once(name, request)
            except ClientError as err:
                failures += 1
                delay = retry_delay(err, failures, o.retries, o.backoff_base_s, o.backoff_cap_s)
                self.stats.retries[err.label] += 1
                self.stats.last_error = str(err)
                await asyncio.sleep(delay)

    async def sentiment(self, texts: Sequence[str]) -> pb.SentimentResponse:
        return await self._call("ClassifySentiment", self.options.sentiment_request(texts))

    async def digits(self, images: Sequence) -> pb.DigitsResponse:
        return await self._call("ClassifyDigits", self.options.digits_request(images))

    async def map_unary(self, kind: str, items: Iterable, start: int = 0) -> AsyncIterator[tuple[int, list, object]]:
        """``(start, chunk, response)`` in input order, for unary calls (``kind`` "sentiment" or "digits"):
        chunks of ``chunk_size`` (whole text: of about ``chunk_windows`` windows), up to ``window``
        calls in flight (an AIMD window: see classifier_client.flow)."""
        o = self.options
        if kind == "sentiment":
            async def call(texts):
                return await self._once("ClassifySentiment", o.sentiment_request(texts))
        else:
            async def call(images):
                return await self._once("ClassifyDigits", o.digits_request(images))
        whole = kind == "sentiment" and o.whole_text
        flow = Flow(o.window, retries=o.retries, give_up_s=o.give_up_s, backoff_base_s=o.backoff_base_s,
                    backoff_cap_s=o.backoff_cap_s, stats=self.stats, split_refused=whole,
                    connect_retries=o.connect_retries)
        async for out in ordered_calls(call, items, o.chunk_size, flow, start,
                                       chunk_rows=o.chunk_windows if whole else None,
                                       windows_of=(lambda r: [p.windows for p in r.predictions]) if whole else None):
            yield out

    async def stream_sentiment(self, texts: Iterable[str], start: int = 0) -> AsyncIterator[tuple[int, list, pb.SentimentResponse]]:
        """``(start, texts, response)`` per chunk, strictly in input order (``start`` = index of the
        chunk's first text, counting from ``start``). Raises :class:`ClientError` on a status that is
        not worth retrying (e.g. NOT_FOUND, INVALID_ARGUMENT), or when no chunk is answered for
        ``retries`` failed attempts or ``give_up_s`` seconds (classifier_client.flow)."""
        run = StreamRun(self, iter(texts), start)
        async for out in run:
            yield out
