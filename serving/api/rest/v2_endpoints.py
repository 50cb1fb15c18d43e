"""Open Inference Protocol (V2) REST endpoints, next to the gateway's own /v1 API.

    GET  /v2                                  server metadata
    GET  /v2/health/live | /v2/health/ready   200, or 503 when not ready
    GET  /v2/models/{name}[/versions/{v}]     model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

Triton's extensions (repository, statistics, model configuration; 501 for shared memory, trace
and logging) are in serving/api/rest/v2_extensions.py; any other /v2 path is 404, in the
protocol's error shape.

What a model takes and returns is in serving/api/v2.py (shared with gRPC).
Bodies are JSON, or JSON followed by binary tensors (Triton's
``binary_tensor_data`` extension, the default of tritonclient and the kserve
client: ``Inference-Header-Content-Length`` gives the JSON's length, inputs
with ``parameters.binary_data_size`` take their bytes in order). Outputs are
binary when the request asks (output parameter ``binary_data``, or request
parameter ``binary_data_output``). In JSON, BYTES elements are UTF-8 strings;
``image_encoded`` elements sent as JSON strings are base64.
Errors: ``{"error": message}`` with the same status codes and messages as /v1 (the app's
handlers answer every /v2 path in this shape: serving.errors.error_body).
A Triton-style ``parameters.timeout`` (microseconds) shortens the deadline.
"""

from __future__ import annotations

import functools
import logging
from typing import Annotated, Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel

from serving.api.rest.wire import (ERROR_DOCS, check_content_type, decode_json, json_response, until_done,
                                   v2_error_response)
from serving.api.v2 import DataPlane, InferResponse
from serving.core import Classifier
from serving.errors import Internal, InvalidInput, ServiceError
from serving.images import decode_b64
from serving.request import Predict, Result
from serving.tensor import ElementLimit, Tensor, declared_count, from_raw, from_values, to_raw

log = logging.getLogger("serving.rest")
INFER = "/v2/models/{name}/infer"
HEADER_LENGTH = "inference-header-content-length"


# The protocol's parameter values are scalars (as gRPC's InferParameter): typed so, a body cannot make
# the decoder build arbitrary structures out of them.
Parameters = dict[str, str | int | float | bool | None]


class V2Input(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    # Undecoded until its datatype and shape are known and checked (absent: empty); flat or
    # nested lists in row-major order (decoded by _decode_data).
    data: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b""))


class V2Output(msgspec.Struct):
    name: str
    parameters: Parameters | None = None


class V2InferRequest(msgspec.Struct):
    inputs: Annotated[list[V2Input], msgspec.Meta(min_length=1, max_length=1, description=(
        "Exactly one input: sentiment models take 'text' (BYTES [n]) or 'token_ids' (INT32 [n, 20]); "
        "digits takes 'image' (UINT8/FP32 [n, 28, 28]) or 'image_encoded' (BYTES [n], PNG/JPEG)"))]
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[V2Output] | None = None


SCHEMAS = [V2InferRequest]
_decode_request = msgspec.json.Decoder(V2InferRequest)
_json = msgspec.json.Encoder()
_JSON_SPACE = b" \t\r\n"



@functools.lru_cache(maxsize=64)
def _data_decoder(leaf, depth: int, rows: tuple[int, ...] = ()) -> msgspec.json.Decoder:
    """A decoder of ``leaf`` elements: one lone element (``depth`` 0), a list of them (1), or
    ``depth`` levels of lists; ``rows``: the sizes of the levels below the outermost, decoded as
    tuples of exactly that many entries (so that a row of the wrong size fails where it is)."""
    t = leaf
    for d in reversed(rows):
        t = tuple[(t,) * d] if d else tuple[()]
    for _ in range(depth - len(rows)):
        t = list[t]
    return msgspec.json.Decoder(t)


def _decode_data(t: V2Input, data: bytes, count: int, where: str):
    """An input's JSON data (``count`` elements, from its checked shape), decoded only once its
    size fits the shape, and then only as what the datatype and shape allow: one lone element,
    a flat list, or lists nested exactly as the shape (strings for BYTES, true/false for BOOL,
    numbers otherwise). Numeric data cannot hold strings, so their lists and elements are
    counted exactly at C speed first (``[`` and ``,``); BYTES data have at least half as many
    strings as unescaped-looking quotes, so no more than about twice their count gets decoded,
    and any row of the wrong size or type stops the decoder where it is."""
    name, shape, rank = t.name, list(t.shape), len(t.shape)
    head = data.lstrip(_JSON_SPACE)
    if count == 0:
        if head.rstrip(_JSON_SPACE) != b"[]":
            raise InvalidInput(f"input {name!r}: shape {shape} holds no elements; its data must be []")
        return []
    nested = rank > 1 and head.startswith(b"[") and head[1:].lstrip(_JSON_SPACE).startswith(b"[")
    depth = rank if nested else 1 if head.startswith(b"[") else 0
    if t.datatype == "BYTES":
        strings = (data.count(b'"') - data.count(b'\\"')) // 2  # each has 2 quotes; some may look escaped
        if strings > count:
            raise InvalidInput(f"BYTES tensor {name!r}: shape {shape} holds {count} element"
                               f"{'s' if count != 1 else ''}, the data has at least {strings} strings")
        return decode_json(_data_decoder(str, depth, tuple(shape[1:]) if nested else ()), data, where)
    kind = "true/false" if t.datatype == "BOOL" else "numbers"
    if b'"' in data:
        raise InvalidInput(f"input {name!r}: data of a {t.datatype} tensor must be {kind}")
    lists, entries = data.count(b"["), data.count(b",") + 1
    need = 0 if depth == 0 else 1
    if nested:  # 1 + rows + rows of rows ...
        rows = 1
        for d in shape[:-1]:
            rows *= d
            need += rows
    if lists != need:
        raise InvalidInput(f"input {name!r}: data as {'nested lists' if nested else 'a flat list'} for shape {shape} "
                           f"{'have' if nested else 'has'} {need} list{'s' if need != 1 else ''}, the data has {lists}")
    if entries != count:
        raise InvalidInput(f"input {name!r}: shape {shape} holds {count} elements, the data has {entries}")
    return decode_json(_data_decoder(bool if t.datatype == "BOOL" else int | float, depth), data, where)


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


def parse_infer(body: bytes, header_length: str | None, max_image_bytes: int,
                limit: ElementLimit | None = None) -> tuple[V2InferRequest, list[Tensor]]:
    """The request and its input tensors, from JSON or JSON + binary tensors. Each input's
    declared shape is checked (BYTES: against ``limit``) before its data is decoded."""
    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidInput(f"Inference-Header-Content-Length {header_length[:20]!r} is not a length within the "
                               f"{len(body)}-byte body")
        n = int(header_length)
        body, binary = body[:n], memoryview(body)[n:]
    req = decode_json(_decode_request, body)
    tensors, offset = [], 0
    for i, t in enumerate(req.inputs):
        size = (t.parameters or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise InvalidInput(f"input {t.name!r}: binary_data_size {size!r} runs past the binary data "
                                   f"({len(binary)} bytes after the JSON)")
            raw = binary[offset:offset + size]  # a view, no copy
            tensors.append(from_raw(t.name, t.datatype, t.shape, raw, limit))
            offset += size
        elif len(t.data) and bytes(t.data) != b"null":
            count = declared_count(t.name, t.datatype, t.shape, limit)
            values = _decode_data(t, bytes(t.data), count, f"inputs[{i}].data")
            convert = None
            if t.datatype == "BYTES" and t.name == "image_encoded":  # JSON carries image bytes as base64
                convert = lambda items, name=t.name: decode_b64(items, name, max_image_bytes)  # noqa: E731
            tensors.append(from_values(t.name, t.datatype, t.shape, values, limit, convert))
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

    # A ServiceError raised by these is answered by the app's handler, in the protocol's shape.
    def metadata(self, name: str, version: str | None) -> Response:
        return json_response(self.plane.model_metadata(name, version))

    def ready(self, name: str, version: str | None) -> Response:
        ok = self.plane.model_ready(name, version)
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
                                               s.max_image_bytes, plane.element_limit(name),
                                               heavy=len(body) > s.inline_parse_bytes)
            return plane.request(name, version, tensors, [o.name for o in wire.outputs or ()], wire.parameters)

        async def render(req: Predict, r: Result) -> Response:
            out = plane.response(req, r, [o.name for o in wire.outputs or ()])
            return await core.offload(render_infer, wire, out, heavy=len(r.predictions) > 64)

        try:
            return await core.handle("rest", INFER, parse, render, kind=lambda: plane.kind(name), model=name,
                                     watch=lambda work: until_done(request.receive, work))
        except ServiceError as e:
            return v2_error_response(e)
        except Exception as e:  # noqa: BLE001 - as /v1's: logged with its traceback, answered here (FastAPI's
            # handler would answer too, but Starlette then re-raises it and uvicorn drops the connection)
            log.exception("unexpected error on %s", request.url.path)
            return v2_error_response(Internal(f"internal error ({type(e).__name__}); it has been logged"))


def add_v2_routes(app: FastAPI, core: Classifier, extensions=None) -> None:
    """The V2 routes; ``extensions(app, plane)`` adds Triton's extensions (serving/api/rest/v2_extensions.py)
    before the model routes (``/v2/models/{name}`` would take ``/v2/models/stats``)."""
    v2 = V2Endpoints(core)
    _server_routes(app, core, v2.plane)
    if extensions is not None:
        extensions(app, v2.plane)
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
