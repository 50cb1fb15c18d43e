"""Open Inference Protocol (V2) over gRPC: ``inference.GRPCInferenceService``, from the
protocol's own .proto (protos/inference/), on the gateway's gRPC port.

Inputs come as ``raw_input_contents`` (what tritonclient and the kserve client send)
or as typed ``contents``; outputs go back as ``raw_output_contents``, as Triton does.
What a model takes and returns is in serving/api/v2.py (shared with REST); errors end
the call with the status code and message of /v1. Requests arrive as bytes and are
parsed here, as for classifier.v1, so an undecodable message is INVALID_ARGUMENT.
A server that is not ready answers ServerReady/ModelReady with ``ready: false``.
"""

from __future__ import annotations

import grpc

from serving.api.grpc.common import grpc_errors, parse_message
from serving.api.v2 import DataPlane
from serving.core import Classifier
from serving.errors import InvalidInput
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
        core, plane = self.core, self.plane
        wire: pb.ModelInferRequest | None = None

        async def parse() -> Predict:
            nonlocal wire
            wire = await parse_message(core, pb.ModelInferRequest, data, "ModelInfer")
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

        return await core.handle("grpc", "ModelInfer", parse, render, client_timeout=context.time_remaining())


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
    })
