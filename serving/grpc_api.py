"""gRPC adapter: classifier.v1.Classifier, grpc.health.v1 and server reflection.

Errors end the call with the status code of the :class:`ServiceError` and the
same message as REST. Message size limits (``grpc_max_message_bytes``, default
16 MiB, both directions) are set explicitly on the server.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.core import Classifier, Result
from serving.errors import ServiceError
from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc

log = logging.getLogger("serving.grpc")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name


def sentiment_response(r: Result) -> pb.SentimentResponse:
    return pb.SentimentResponse(
        model=pb.ModelRef(name=r.model, version=r.version),
        predictions=[
            pb.SentimentPrediction(
                label=p.label, score=p.score, probabilities=p.probabilities, tokens=p.tokens, unknown_tokens=p.unknown_tokens
            )
            for p in r.predictions
        ],
    )


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, core: Classifier):
        self.core = core

    async def _sentiment(self, request: pb.SentimentRequest, endpoint: str) -> pb.SentimentResponse:
        model = request.model or self.core.settings.default_sentiment_model
        with self.core.track(endpoint, model):
            r = await self.core.sentiment(list(request.texts), model, request.version or None)
        return sentiment_response(r)

    async def ClassifySentiment(self, request, context):
        try:
            return await self._sentiment(request, "ClassifySentiment")
        except ServiceError as e:
            await context.abort(e.grpc_status, e.message)

    async def StreamClassifySentiment(self, request_iterator, context):
        try:
            async for request in request_iterator:
                yield await self._sentiment(request, "StreamClassifySentiment")
        except ServiceError as e:
            await context.abort(e.grpc_status, e.message)

    async def ClassifyDigits(self, request, context):
        images = [(img.WhichOneof("data") or "", getattr(img, img.WhichOneof("data") or "raw")) for img in request.images]
        model = request.model or "digits"
        try:
            with self.core.track("ClassifyDigits", model):
                r = await self.core.digits(lambda: self.core.images_from_proto(images), model, request.version or None)
        except ServiceError as e:
            await context.abort(e.grpc_status, e.message)
        return pb.DigitsResponse(
            model=pb.ModelRef(name=r.model, version=r.version),
            predictions=[pb.DigitPrediction(label=p.label, score=p.score, probabilities=p.probabilities) for p in r.predictions],
        )


def server_options(max_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes)]


async def start_grpc(core: Classifier, address: str) -> tuple[grpc.aio.Server, int, asyncio.Task]:
    server = grpc.aio.server(options=server_options(core.settings.grpc_max_message_bytes))
    pb_grpc.add_ClassifierServicer_to_server(ClassifierServicer(core), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    await server.start()

    async def follow_readiness():
        # NOT_SERVING until every model is loaded and warmed, then SERVING.
        NOT, OK = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
        last = None
        while True:
            status = OK if core.ready()[0] else NOT
            if status != last:
                await health_servicer.set("", status)
                await health_servicer.set(SERVICE_NAME, status)
                last = status
            await asyncio.sleep(0.2)

    return server, port, asyncio.get_running_loop().create_task(follow_readiness())
