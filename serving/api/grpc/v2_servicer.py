"""Open Inference Protocol (V2) over gRPC: ``inference.GRPCInferenceService``, from the
protocol's own .proto (protos/inference/), on the gateway's gRPC port.

Inputs come as ``raw_input_contents`` (what tritonclient and the kserve client send)
or as typed ``contents``; outputs go back as ``raw_output_contents``, as Triton does.
What a model takes and returns is in serving/api/v2.py (shared with REST); errors end
the call with the status code and message of /v1. Requests arrive as bytes and are
parsed here, as for classifier.v1, so an undecodable message is INVALID_ARGUMENT.
A server that is not ready answers ServerReady/ModelReady with ``ready: false``.

Triton's extensions, as on REST (serving/api/v2.py builds the answers of both, with
Triton's JSON field names, made into messages here): ModelStreamInfer (one response or
``error_message`` per request, the stream goes on), ModelConfig, ModelStatistics,
RepositoryIndex, RepositoryModelLoad/Unload. Any other method of the service (shared memory,
trace and log settings) ends UNIMPLEMENTED naming it.
"""

from __future__ import annotations

import grpc
from google.protobuf import json_format

from serving.api.grpc.common import begin_call, grpc_errors, parse_message, set_error
from serving.api.v2 import EXTENSIONS, DataPlane
from serving.core import Classifier
from serving.errors import InvalidInput, ServiceError, Unsupported
from serving.gen.inference import open_inference_grpc_pb2 as pb
from serving.request import Predict, Result
from serving.tensor import ElementLimit, Tensor, declared_count, from_raw, from_values, to_raw

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

# Which typed field of InferTensorContents holds each datatype's values.
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP16": "fp32_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def input_tensors(request: pb.ModelInferRequest, limit: ElementLimit | None = None) -> list[Tensor]:
    """The request's input tensors; each one's declared shape is checked (BYTES: against ``limit``)
    and its data's length against it before any element is read."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    out = []
    for i, t in enumerate(request.inputs):
        shape = list(t.shape)
        if raw:
            out.append(from_raw(t.name, t.datatype, shape, raw[i], limit))
            continue
        field = CONTENTS_FIELD.get(t.datatype)
        if field is None:
            raise InvalidInput(f"input {t.name!r}: unknown datatype {t.datatype[:40]!r}")
        contents = getattr(t.contents, field)
        count = declared_count(t.name, t.datatype, shape, limit)
        if len(contents) != count:  # before the contents become Python objects
            raise InvalidInput(f"input {t.name!r}: shape {shape} holds {count} elements, the data has {len(contents)}")
        out.append(from_values(t.name, t.datatype, shape, list(contents), limit))
    return out


class InferenceServicer:
    def __init__(self, core: Classifier):
        self.core = core
        self.plane = DataPlane(core)

    async def ServerLive(self, data: bytes, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, data: bytes, context):
        return pb.ServerReadyResponse(ready=self.core.ready()[0])

    async def ServerMetadata(self, data: bytes, context):
        return pb.ServerMetadataResponse(**self.plane.server_metadata())

    @grpc_errors
    async def ModelReady(self, data: bytes, context):
        request = await parse_message(self.core, pb.ModelReadyRequest, data, "ModelReady")
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    @grpc_errors
    async def ModelMetadata(self, data: bytes, context):
        request = await parse_message(self.core, pb.ModelMetadataRequest, data, "ModelMetadata")
        m = self.plane.model_metadata(request.name, request.version)
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=m["name"], versions=m["versions"], platform=m["platform"],
            inputs=[T(**t) for t in m["inputs"]], outputs=[T(**t) for t in m["outputs"]],
        )

    @grpc_errors
    async def ModelInfer(self, data: bytes, context):
        return await self._infer(data, context, "ModelInfer")

    async def ModelStreamInfer(self, requests, context):
        """Each request as ModelInfer; a failed one is answered with its ``error_message`` and the
        stream goes on (as Triton does). Each gets its own request id (trailing metadata: the last)."""
        async for data in requests:
            begin_call(context)
            try:
                yield pb.ModelStreamInferResponse(infer_response=await self._infer(data, context, "ModelStreamInfer"))
            except ServiceError as e:
                yield pb.ModelStreamInferResponse(error_message=e.message)

    @grpc_errors
    async def ModelConfig(self, data: bytes, context):
        request = await parse_message(self.core, pb.ModelConfigRequest, data, "ModelConfig")
        config = self.plane.model_config(request.name, request.version)
        return json_format.ParseDict({"config": config}, pb.ModelConfigResponse())

    @grpc_errors
    async def ModelStatistics(self, data: bytes, context):
        request = await parse_message(self.core, pb.ModelStatisticsRequest, data, "ModelStatistics")
        return json_format.ParseDict(self.plane.statistics(request.name, request.version), pb.ModelStatisticsResponse())

    @grpc_errors
    async def RepositoryIndex(self, data: bytes, context):
        request = await parse_message(self.core, pb.RepositoryIndexRequest, data, "RepositoryIndex")
        index = self.plane.repository_index(request.ready, request.repository_name)
        return json_format.ParseDict({"models": index}, pb.RepositoryIndexResponse())

    @grpc_errors
    async def RepositoryModelLoad(self, data: bytes, context):
        request = await parse_message(self.core, pb.RepositoryModelLoadRequest, data, "RepositoryModelLoad")
        parameters = {k: getattr(v, v.WhichOneof("parameter_choice") or "string_param") for k, v in request.parameters.items()}
        self.plane.load(request.model_name, parameters, request.repository_name)
        return pb.RepositoryModelLoadResponse()

    @grpc_errors
    async def RepositoryModelUnload(self, data: bytes, context):
        request = await parse_message(self.core, pb.RepositoryModelUnloadRequest, data, "RepositoryModelUnload")
        self.plane.unload(request.model_name, request.repository_name)
        return pb.RepositoryModelUnloadResponse()

    def _infer(self, data: bytes, context, endpoint: str):
        core, plane = self.core, self.plane
        wire: pb.ModelInferRequest | None = None

        async def parse() -> Predict:
            nonlocal wire
            wire = await parse_message(core, pb.ModelInferRequest, data, endpoint)
            plane.check_inputs(wire.model_name, [t.name for t in wire.inputs[:10]], len(wire.inputs))
            limit = plane.element_limit(wire.model_name)
            tensors = await core.offload(input_tensors, wire, limit, heavy=len(data) > core.settings.inline_parse_bytes)
            parameters = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in wire.parameters.items()
                          if v.WhichOneof("parameter_choice")}
            return plane.request(wire.model_name, wire.model_version, tensors, [o.name for o in wire.outputs], parameters)

        async def render(req: Predict, r: Result) -> pb.ModelInferResponse:
            out = plane.response(req, r, [o.name for o in wire.outputs])
            response = pb.ModelInferResponse(model_name=out.model, model_version=str(out.version), id=wire.id)
            for t in out.outputs:
                response.outputs.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
                response.raw_output_contents.append(to_raw(t))
            return response

        return core.handle("grpc", endpoint, parse, render, client_timeout=context.time_remaining())


def handlers(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """inference.GRPCInferenceService with bytes in (parsed by the servicer) and messages out."""
    unary = lambda fn, cls: grpc.unary_unary_rpc_method_handler(fn, response_serializer=cls.SerializeToString)  # noqa: E731
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "ServerLive": unary(servicer.ServerLive, pb.ServerLiveResponse),
        "ServerReady": unary(servicer.ServerReady, pb.ServerReadyResponse),
        "ServerMetadata": unary(servicer.ServerMetadata, pb.ServerMetadataResponse),
        "ModelReady": unary(servicer.ModelReady, pb.ModelReadyResponse),
        "ModelMetadata": unary(servicer.ModelMetadata, pb.ModelMetadataResponse),
        "ModelInfer": unary(servicer.ModelInfer, pb.ModelInferResponse),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            servicer.ModelStreamInfer, response_serializer=pb.ModelStreamInferResponse.SerializeToString),
        "ModelConfig": unary(servicer.ModelConfig, pb.ModelConfigResponse),
        "ModelStatistics": unary(servicer.ModelStatistics, pb.ModelStatisticsResponse),
        "RepositoryIndex": unary(servicer.RepositoryIndex, pb.RepositoryIndexResponse),
        "RepositoryModelLoad": unary(servicer.RepositoryModelLoad, pb.RepositoryModelLoadResponse),
        "RepositoryModelUnload": unary(servicer.RepositoryModelUnload, pb.RepositoryModelUnloadResponse),
    })


class Unimplemented(grpc.GenericRpcHandler):
    """The service's other methods (Triton's shared memory, trace and log settings): UNIMPLEMENTED
    naming the method, instead of gRPC's bare "Method not found!"."""

    PREFIX = f"/{SERVICE_NAME}/"

    def service(self, details):
        if not details.method.startswith(self.PREFIX):
            return None
        error = Unsupported(f"{details.method[len(self.PREFIX):][:100]} is not supported by this gateway; its "
                            f"extensions: {EXTENSIONS}")

        async def refuse(requests, context):  # the message is never read; no exception (common.set_error)
            set_error(context, error)

        return grpc.stream_unary_rpc_method_handler(refuse)
