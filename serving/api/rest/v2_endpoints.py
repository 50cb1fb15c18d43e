"""Open Inference Protocol (V2) REST endpoints, next to the gateway's own /v1 API.

    GET  /v2                                  server metadata
    GET  /v2/health/live | /v2/health/ready   200, or 503 when not ready
    GET  /v2/models/{name}[/versions/{v}]     model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

What a model takes and returns is in serving/api/v2.py (shared with gRPC).
Bodies are JSON, or JSON followed by binary tensors (Triton's
``binary_tensor_data`` extension, the default of tritonclient and the kserve
client: ``Inference-Header-Content-Length`` gives the JSON's length, inputs
with ``parameters.binary_data_size`` take their bytes in order). Outputs are
binary when the request asks (output parameter ``binary_data``, or request
parameter ``binary_data_output``). In JSON, BYTES elements are UTF-8 strings;
``image_encoded`` elements sent as JSON strings are base64.
Errors: ``{"error": message}`` with the same status codes and messages as /v1.
A Triton-style ``parameters.timeout`` (microseconds) shortens the deadline.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel

from serving.api.rest.wire import (ERROR_DOCS, check_content_type, json_response, until_done, v2_error_response,
                                   validation_message)
from serving.api.v2 import DataPlane, InferResponse
from serving.core import Classifier
from serving.errors import InvalidInput, ServiceError
from serving.images import decode_b64
from serving.request import Predict, Result
from serving.tensor import Tensor, from_raw, from_values, to_raw

INFER = "/v2/models/{name}/infer"
HEADER_LENGTH = "inference-header-content-length"


class V2Input(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    # Undecoded until its datatype is known (absent: empty); flat or nested lists in row-major order.
    data: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b""))


class V2Output(msgspec.Struct):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(msgspec.Struct):
    inputs: Annotated[list[V2Input], msgspec.Meta(min_length=1, max_length=1, description=(
        "Exactly one input: sentiment models take 'text' (BYTES [n]) or 'token_ids' (INT32 [n, 20]); "
        "digits takes 'image' (UINT8/FP32 [n, 28, 28]) or 'image_encoded' (BYTES [n], PNG/JPEG)"))]
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2Output] | None = None


SCHEMAS = [V2InferRequest]
_decode_request = msgspec.json.Decoder(V2InferRequest)
_decode_any = msgspec.json.Decoder()
_json = msgspec.json.Encoder()


# -- documented responses -----------------------------------------------------------------------
class V2Error(BaseModel):
    error: str


class V2Tensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2OutputTensor(V2Tensor):
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2OutputTensor]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2Tensor]
    outputs: list[V2Tensor]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


def parse_infer(body: bytes, header_length: str | None, max_image_bytes: int) -> tuple[V2InferRequest, list[Tensor]]:
    """The request and its input tensors, from JSON or JSON + binary tensors."""
    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidInput(f"Inference-Header-Content-Length {header_length[:20]!r} is not a length within the "
                               f"{len(body)}-byte body")
        n = int(header_length)
        body, binary = body[:n], memoryview(body)[n:]
    try:
        req = _decode_request.decode(body)
    except msgspec.MsgspecError as e:
        raise InvalidInput(validation_message(e)) from None
    tensors, offset = [], 0
    for i, t in enumerate(req.inputs):
        size = (t.parameters or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise InvalidInput(f"input {t.name!r}: binary_data_size {size!r} runs past the binary data "
                                   f"({len(binary)} bytes after the JSON)")
            tensors.append(from_raw(t.name, t.datatype, t.shape, binary[offset:offset + size]))  # a view, no copy
            offset += size
        elif len(t.data) and bytes(t.data) != b"null":
            try:
                values = _decode_any.decode(t.data)
            except msgspec.MsgspecError as e:  # pragma: no cover - already valid JSON as a whole
                raise InvalidInput(f"inputs[{i}].data: {e}") from None
            if t.datatype == "BYTES" and t.name == "image_encoded":  # JSON carries image bytes as base64
                if not isinstance(values, list):
                    raise InvalidInput(f"input {t.name!r}: data must be a list of base64 strings")
                values = decode_b64(values, "image_encoded", max_image_bytes)
            tensors.append(from_values(t.name, t.datatype, t.shape, values))
        else:
            raise InvalidInput(f"input {t.name!r} has neither data nor parameters.binary_data_size")
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data after the JSON are not claimed by any input")
    return req, tensors


def render_infer(req: V2InferRequest, r: InferResponse) -> Response:
    """JSON, or JSON + binary outputs when the request asks for them."""
    default_binary = bool((req.parameters or {}).get("binary_data_output", False))
    per_output = {o.name: (o.parameters or {}).get("binary_data", default_binary) for o in req.outputs or ()}
    outputs, blobs = [], []
    for t in r.outputs:
        out = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if per_output.get(t.name, default_binary):
            raw = to_raw(t)
            out["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            out["data"] = [x.decode("utf-8", "replace") for x in t.data] if t.datatype == "BYTES" else t.data.tolist()
        outputs.append(out)
    body = {"model_name": r.model, "model_version": str(r.version), "outputs": outputs}
    if req.id is not None:
        body["id"] = req.id
    head = _json.encode(body)
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(b"".join([head, *blobs]), media_type="application/octet-stream",
                    headers={"inference-header-content-length": str(len(head))})


TAGS = ["v2 (Open Inference Protocol)"]
ERRORS = {status: {"model": V2Error, "description": doc} for status, doc in ERROR_DOCS.items()}
INFER_BODY_DOC = {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description":
                                            "JSON request (Inference-Header-Content-Length bytes), then binary tensors"}},
}}


class V2Endpoints:
    """The V2 endpoints' work: parse and render; inference goes through the core's lifecycle."""

    def __init__(self, core: Classifier):
        self.core, self.plane = core, DataPlane(core)

    def metadata(self, name: str, version: str | None) -> Response:
        try:
            return json_response(self.plane.model_metadata(name, version))
        except ServiceError as e:
            return v2_error_response(e)

    def ready(self, name: str, version: str | None) -> Response:
        try:
            ok = self.plane.model_ready(name, version)
        except ServiceError as e:
            return v2_error_response(e)
        return json_response({"name": name, "ready": ok}, 200 if ok else 503)

    async def infer(self, request: Request, name: str, version: str | None) -> Response:
        core, plane, s = self.core, self.plane, self.core.settings
        wire: V2InferRequest | None = None

        async def parse() -> Predict:
            nonlocal wire
            check_content_type(request.headers, ("application/json", "application/octet-stream"),
                               "send application/json (application/octet-stream with binary tensors)")
            body = await request.body()
            wire, tensors = await core.offload(parse_infer, body, request.headers.get(HEADER_LENGTH),
                                               s.max_image_bytes, heavy=len(body) > s.inline_parse_bytes)
            return plane.request(name, version, tensors, [o.name for o in wire.outputs or ()], wire.parameters)

        async def render(req: Predict, r: Result) -> Response:
            out = plane.response(req, r, [o.name for o in wire.outputs or ()])
            return await core.offload(render_infer, wire, out, heavy=len(r.predictions) > 64)

        try:
            return await core.handle("rest", INFER, parse, render, kind=lambda: plane.kind(name), model=name,
                                     watch=lambda work: until_done(request.receive, work))
        except ServiceError as e:
            return v2_error_response(e)


def add_v2_routes(app: FastAPI, core: Classifier) -> None:
    v2 = V2Endpoints(core)
    _server_routes(app, core, v2.plane)
    _model_routes(app, v2)
    _infer_routes(app, v2)


def _server_routes(app: FastAPI, core: Classifier, plane: DataPlane) -> None:
    @app.get("/v2", tags=TAGS, response_model=V2ServerMetadata)
    async def server_metadata():
        """Server name, version and protocol extensions."""
        return plane.server_metadata()

    @app.api_route("/v2/health/live", methods=["GET", "HEAD"], tags=TAGS, response_model=V2Live)
    async def server_live():
        """The process is alive."""
        return {"live": True}

    @app.api_route("/v2/health/ready", methods=["GET", "HEAD"], tags=TAGS, response_model=V2Ready,
                   responses={503: {"model": V2Ready, "description": "Not ready (loading, failed, or draining)"}})
    async def server_ready():
        """200 once every model is loaded and warmed; 503 before, and while draining."""
        ready = core.ready()[0]
        return json_response({"ready": ready}, 200 if ready else 503)


def _model_routes(app: FastAPI, v2: V2Endpoints) -> None:
    meta_responses = {404: ERRORS[404]}
    ready_responses = {404: ERRORS[404], 503: {"model": V2ModelReady, "description": "Not ready"}}

    @app.get("/v2/models/{name}", tags=TAGS, response_model=V2ModelMetadata, responses=meta_responses)
    async def model_metadata(name: str):
        """The model's versions, and the inputs it takes (any one of them) and its outputs."""
        return v2.metadata(name, None)

    @app.get("/v2/models/{name}/versions/{version}", tags=TAGS, response_model=V2ModelMetadata, responses=meta_responses)
    async def model_version_metadata(name: str, version: str):
        """One version (a number, or a version label such as stable or canary)."""
        return v2.metadata(name, version)

    @app.get("/v2/models/{name}/ready", tags=TAGS, response_model=V2ModelReady, responses=ready_responses)
    async def model_ready(name: str):
        """200 when the model's default version is loaded and the gateway takes work."""
        return v2.ready(name, None)

    @app.get("/v2/models/{name}/versions/{version}/ready", tags=TAGS, response_model=V2ModelReady,
             responses=ready_responses)
    async def model_version_ready(name: str, version: str):
        """200 when that version is loaded and the gateway takes work."""
        return v2.ready(name, version)


def _infer_routes(app: FastAPI, v2: V2Endpoints) -> None:
    @app.post(INFER, tags=TAGS, response_model=V2InferResponse, responses=ERRORS,
              openapi_extra={"requestBody": INFER_BODY_DOC})
    async def model_infer(request: Request, name: str):
        """Inference on the model's default version (as /v1: the 'stable' label, else the newest)."""
        return await v2.infer(request, name, None)

    @app.post("/v2/models/{name}/versions/{version}/infer", tags=TAGS, response_model=V2InferResponse,
              responses=ERRORS, openapi_extra={"requestBody": INFER_BODY_DOC})
    async def model_version_infer(request: Request, name: str, version: str):
        """Inference on one version (a number, or a version label such as stable or canary)."""
        return await v2.infer(request, name, version)
