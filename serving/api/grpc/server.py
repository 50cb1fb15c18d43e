"""gRPC adapter: classifier.v1.Classifier, grpc.health.v1 and server reflection (v1 and v1alpha).

Errors end the call with the status code of the :class:`ServiceError` and the
same message as REST; RESOURCE_EXHAUSTED carries ``grpc-retry-pushback-ms``.
Requests arrive as bytes and are parsed here, so an undecodable message is
INVALID_ARGUMENT with one (rate-limited) WARNING line, never UNKNOWN with a
traceback; large messages are parsed off the event loop. Each call's
deadline (or request_timeout_s, whichever is sooner) bounds its queued work,
and a cancelled call drops it. ``x-request-id`` metadata is taken (or made),
logged and returned in the trailing metadata. Message size limits
(``grpc_max_message_bytes``, default 16 MiB, both directions), idle
connection and concurrent stream limits are set on the server.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from serving.auth import ApiKeyInterceptor, ApiKeys
from serving.api.grpc import v2_servicer
from serving.api.grpc.common import grpc_errors, parse_message, set_error
from serving.core import Classifier
from serving.errors import ServiceError
from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.kinds.image import INLINE_IMAGES, Images, from_proto
from serving.kinds.text import Texts
from serving.request import Predict, Result

log = logging.getLogger("serving.grpc")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
# What the health service knows, each following readiness: the server ("") and each API's service.
HEALTH_NAMES = ("", SERVICE_NAME, v2_servicer.SERVICE_NAME)


def _slots(slots: list) -> list[pb.Slot]:
    return [pb.Slot(id=s.id, token=s.token, kind=s.kind) for s in slots]


def _explanation(e) -> pb.Explanation | None:
    if e is None:
        return None
    windows = [pb.WindowScore(slots=_slots(w.slots), label=w.label, probabilities=w.probabilities) for w in e.windows or ()]
    return pb.Explanation(slots=_slots(e.slots), windows=windows)


async def sentiment_response(req: Predict, r: Result) -> pb.SentimentResponse:
    return pb.SentimentResponse(
        model=pb.ModelRef(name=r.model, version=r.version),
        predictions=[
            pb.SentimentPrediction(
                label=p.label, score=p.score, probabilities=p.probabilities, tokens=p.tokens,
                unknown_tokens=p.unknown_tokens, windows=p.windows, explanation=_explanation(p.explanation),
            )
            for p in r.predictions
        ],
    )


async def digits_response(req: Predict, r: Result) -> pb.DigitsResponse:
    return pb.DigitsResponse(
        model=pb.ModelRef(name=r.model, version=r.version),
        predictions=[pb.DigitPrediction(label=p.label, score=p.score, probabilities=p.probabilities,
                                        image=[x for row in p.image for x in row] if p.image else ())
                     for p in r.predictions],
    )


class ClassifierServicer:
    """The three RPCs: parse and render; the rest is the core's request lifecycle. Requests
    come in as bytes (see :func:`handlers`)."""

    def __init__(self, core: Classifier):
        self.core = core

    def _sentiment(self, data: bytes, endpoint: str, context):
        async def parse() -> Predict:
            m = await parse_message(self.core, pb.SentimentRequest, data, endpoint)
            return Predict("text", Texts(list(m.texts), m.whole_text), m.model or None, m.version or None,
                           m.version_label or None, m.explain)

        return self.core.handle("grpc", endpoint, parse, sentiment_response, kind="text",
                                client_timeout=context.time_remaining())

    @grpc_errors
    async def ClassifySentiment(self, data: bytes, context):
        return await self._sentiment(data, "ClassifySentiment", context)

    @grpc_errors
    async def StreamClassifySentiment(self, request_iterator, context):
        async for data in request_iterator:
            yield await self._sentiment(data, "StreamClassifySentiment", context)

    @grpc_errors
    async def ClassifyDigits(self, data: bytes, context):
        async def parse() -> Predict:
            m = await parse_message(self.core, pb.DigitsRequest, data, "ClassifyDigits")
            images = [(img.WhichOneof("data") or "", getattr(img, img.WhichOneof("data") or "raw")) for img in m.images]
            heavy = len(images) > INLINE_IMAGES or any(kind == "encoded" for kind, _ in images)
            return Predict("image", Images(len(images), lambda limits: from_proto(images, limits), heavy),
                           m.model or None, m.version or None, m.version_label or None, m.explain)

        return await self.core.handle("grpc", "ClassifyDigits", parse, digits_response, kind="image",
                                      client_timeout=context.time_remaining())


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Refuse a unary call as soon as its headers arrive, before its message is received and
    parsed, when the gateway drains or every model of its kind is saturated (the servicer
    decides again, exactly, once the message is read).

    The refusal is answered by a handler that takes the request as a stream it never reads: a
    unary handler would first wait for the whole message (1.3 MB for 1,024 texts) to arrive and
    be copied, so at high overload refused calls cost as much wire and CPU as admitted ones. The
    client sees the same unary call end with RESOURCE_EXHAUSTED (or UNAVAILABLE) and its pushback;
    its unsent message is cancelled with the stream."""

    KINDS = {f"/{SERVICE_NAME}/ClassifySentiment": "text", f"/{SERVICE_NAME}/ClassifyDigits": "image"}

    def __init__(self, core: Classifier):
        self.core = core

    async def intercept_service(self, continuation, details):
        kind = self.KINDS.get(details.method)
        if kind is not None:
            try:
                self.core.precheck(kind)
            except ServiceError as e:
                refused = e.with_traceback(None)  # kept by the handler below: no cycle through this frame
                self.core.record("grpc", details.method.rsplit("/", 1)[-1], None, e.code, 0.0)
                self.core.metrics.refused(e.model, e.reason)
                handler = await continuation(details)

                async def refuse(requests, context):  # the message is never read
                    set_error(context, refused)

                return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=handler.response_serializer)
        return await continuation(details)


def handlers(servicer: ClassifierServicer) -> grpc.GenericRpcHandler:
    """classifier.v1.Classifier with bytes in (parsed by the servicer) and messages out."""
    out = lambda cls: cls.SerializeToString  # noqa: E731
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "ClassifySentiment": grpc.unary_unary_rpc_method_handler(
            servicer.ClassifySentiment, response_serializer=out(pb.SentimentResponse)),
        "ClassifyDigits": grpc.unary_unary_rpc_method_handler(
            servicer.ClassifyDigits, response_serializer=out(pb.DigitsResponse)),
        "StreamClassifySentiment": grpc.stream_stream_rpc_method_handler(
            servicer.StreamClassifySentiment, response_serializer=out(pb.SentimentResponse)),
    })


def reflection_v1(servicer) -> grpc.GenericRpcHandler:
    """grpc.reflection.v1 (what current grpcurl/Postman ask first): the same messages, field for
    field, as v1alpha, which is all grpcio-reflection ships; served by the same servicer."""
    return grpc.method_handlers_generic_handler(REFLECTION_V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    })


def server_options(core: Classifier) -> list[tuple[str, int]]:
    s = core.settings
    return [
        ("grpc.max_receive_message_length", s.grpc_max_message_bytes),
        ("grpc.max_send_message_length", s.grpc_max_message_bytes),
        # Bounded port (README "Resource limits"): at most grpc_max_connections open (more are
        # closed at once, so file descriptors stay bounded); a connection that has not sent its
        # HTTP/2 preface and settings within grpc_handshake_timeout_s is closed, an established
        # idle one after grpc_max_connection_idle_s, any one after grpc_max_connection_age_s.
        ("grpc.max_allowed_incoming_connections", s.grpc_max_connections),
        ("grpc.server_handshake_timeout_ms", int(s.grpc_handshake_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", int(s.grpc_max_connection_idle_s * 1000)),
        *([("grpc.max_connection_age_ms", int(s.grpc_max_connection_age_s * 1000)),
           ("grpc.max_connection_age_grace_ms", int(s.grpc_max_connection_age_grace_s * 1000))]
          if s.grpc_max_connection_age_s else []),
        # More concurrent calls on one connection are refused with REFUSED_STREAM (UNAVAILABLE at the client).
        ("grpc.max_concurrent_streams", s.grpc_max_concurrent_streams),
        # Keepalive pings from clients at most every 10 s; a peer that stops answering ours is dropped.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


class GrpcServer:
    """The gRPC server and its health service, which follows the core's readiness."""

    def __init__(self, core: Classifier, api_keys: ApiKeys | None = None):
        self.core = core
        self.keys = api_keys or ApiKeys.from_settings(core.settings)
        self.server: grpc.aio.Server | None = None
        self.health: health.aio.HealthServicer | None = None
        self._follow: asyncio.Task | None = None

    async def start(self, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
        """Build (on the running loop, as grpc.aio requires) and start the server; returns its port."""
        from grpc_reflection.v1alpha import reflection_pb2_grpc

        core = self.core
        interceptors = [ApiKeyInterceptor(self.keys, core.settings.public_grpc_methods)] if self.keys.enabled else []
        interceptors.append(AdmissionInterceptor(core))
        self.server = grpc.aio.server(options=server_options(core), interceptors=interceptors)
        self.server.add_generic_rpc_handlers((handlers(ClassifierServicer(core)),
                                              v2_servicer.handlers(v2_servicer.InferenceServicer(core)),
                                              v2_servicer.Unimplemented()))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE_NAME, v2_servicer.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)
        v1alpha = reflection.aio.ReflectionServicer(names)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(v1alpha, self.server)
        self.server.add_generic_rpc_handlers((reflection_v1(v1alpha),))
        port = self.server.add_secure_port(address, credentials) if credentials else self.server.add_insecure_port(address)
        await self.server.start()
        self._follow = asyncio.get_running_loop().create_task(self._follow_readiness())
        return port

    async def _follow_readiness(self):
        # NOT_SERVING until every model is loaded and warmed, then SERVING; NOT_SERVING again when draining.
        NOT, OK = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
        last = None
        while True:
            status = OK if self.core.ready()[0] else NOT
            if status != last:
                for name in HEALTH_NAMES:
                    await self.health.set(name, status)
                last = status
            await asyncio.sleep(0.2)

    async def drain(self) -> None:
        """Health NOT_SERVING at once (and for good): clients and balancers move away."""
        if self._follow:
            self._follow.cancel()
        if self.health:
            await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        if self._follow:
            self._follow.cancel()
        if self.server:
            await self.server.stop(grace)
