"""Triton's extensions of the Open Inference Protocol (V2) over REST, beside the core endpoints
(serving/api/rest/v2_endpoints.py); their answers come from serving/api/v2.py's DataPlane, shared
with gRPC.

    POST /v2/repository/index                           configured models' versions and states
    POST /v2/repository/models/{name}/load | unload     load: no-op for a configured model; unload: 501
    GET  /v2/models/stats, /v2/models/{name}[/versions/{v}]/stats   statistics (serving/statistics.py)
    GET  /v2/models/{name}[/versions/{v}]/config        Triton's model configuration

Triton's shared-memory, trace and logging extensions answer 501 saying so.
"""

from __future__ import annotations

import msgspec
from fastapi import FastAPI, Request
from pydantic import BaseModel

from serving.api.rest.v2_endpoints import ERRORS, TAGS, Parameters, V2Error
from serving.api.rest.wire import check_content_type, decode_json, json_response
from serving.api.v2 import EXTENSIONS, DataPlane
from serving.errors import Unsupported


# -- request bodies -------------------------------------------------------------------------------
class V2IndexRequest(msgspec.Struct):
    ready: bool = False  # only the versions that are READY


class V2RepositoryRequest(msgspec.Struct):
    """Body of load / unload (tritonclient: load ``{"parameters": {"config": ...}}`` or ``{}``,
    unload ``{"parameters": {"unload_dependents": false}}``)."""

    parameters: Parameters | None = None


_decode_index = msgspec.json.Decoder(V2IndexRequest)
_decode_repository = msgspec.json.Decoder(V2RepositoryRequest)


# -- documented responses ----------------------------------------------------------------------
class V2IndexEntry(BaseModel):
    name: str
    version: str
    state: str  # READY, LOADING, UNLOADING, UNAVAILABLE
    reason: str | None = None


class V2Duration(BaseModel):
    count: int
    ns: int


class V2InferStats(BaseModel):
    success: V2Duration
    fail: V2Duration
    queue: V2Duration
    compute_input: V2Duration
    compute_infer: V2Duration
    compute_output: V2Duration


class V2BatchStats(BaseModel):
    batch_size: int
    compute_infer: V2Duration


class V2ModelStats(BaseModel):
    name: str
    version: str
    last_inference: int
    inference_count: int
    execution_count: int
    inference_stats: V2InferStats
    batch_stats: list[V2BatchStats]


class V2Statistics(BaseModel):
    model_stats: list[V2ModelStats]


class V2ConfigTensor(BaseModel):
    name: str
    data_type: str
    dims: list[int]
    reshape: dict[str, list[int]] | None = None


class V2ModelConfig(BaseModel):
    name: str
    platform: str
    backend: str
    max_batch_size: int
    input: list[V2ConfigTensor]
    output: list[V2ConfigTensor]
    dynamic_batching: dict[str, int]


async def _small_body(request: Request, decoder: msgspec.json.Decoder):
    """The decoded JSON body of a repository request; an empty body is the defaults."""
    check_content_type(request.headers)
    body = await request.body()
    if not body.strip():
        return decoder.decode(b"{}")
    return decode_json(decoder, body)


def add_routes(app: FastAPI, plane: DataPlane) -> None:
    """Triton's model repository, statistics and model configuration extensions; a ServiceError
    raised here is answered by the app's handler, in the protocol's shape."""
    not_found = {404: ERRORS[404]}
    repository_errors = {400: ERRORS[400], 404: ERRORS[404], 415: ERRORS[415]}
    unsupported = {"model": V2Error, "description": "Not supported by this gateway (the message says what and why)"}

    @app.post("/v2/repository/index", tags=TAGS, response_model=list[V2IndexEntry],
              responses={400: ERRORS[400], 415: ERRORS[415]})
    async def repository_index(request: Request):
        """Every configured model's versions and their state (body ``{"ready": true}``: the READY ones only)."""
        body = await _small_body(request, _decode_index)
        return json_response(plane.repository_index(body.ready))

    @app.post("/v2/repository/models/{name}/load", tags=TAGS, responses={
        **repository_errors, 501: unsupported, 503: {"model": V2Error, "description": "The model is not ready yet"}})
    async def repository_model_load(request: Request, name: str):
        """200 for a configured model that is ready (nothing to load: the gateway serves the models its
        configuration names); 501 with a config or files; 503 while it is still loading."""
        body = await _small_body(request, _decode_repository)
        plane.load(name, body.parameters)
        return json_response({})

    @app.post("/v2/repository/models/{name}/unload", tags=TAGS, responses={**repository_errors, 501: unsupported})
    async def repository_model_unload(request: Request, name: str):
        """501: the gateway does not unload models on request (404 for a model it does not serve)."""
        await _small_body(request, _decode_repository)
        plane.unload(name)

    @app.get("/v2/models/stats", tags=TAGS, response_model=V2Statistics)
    async def all_model_statistics():
        """Statistics of every version of every model."""
        return json_response(plane.statistics())

    @app.get("/v2/models/{name}/stats", tags=TAGS, response_model=V2Statistics, responses=not_found)
    async def model_statistics(name: str):
        """Per version: requests answered and failed, items, backend calls, and cumulative times (ns)."""
        return json_response(plane.statistics(name))

    @app.get("/v2/models/{name}/versions/{version}/stats", tags=TAGS, response_model=V2Statistics, responses=not_found)
    async def model_version_statistics(name: str, version: str):
        """One version's statistics (a number, or a version label such as stable or canary)."""
        return json_response(plane.statistics(name, version))

    @app.get("/v2/models/{name}/config", tags=TAGS, response_model=V2ModelConfig, responses=not_found)
    async def model_config(name: str):
        """Triton's model configuration of the default version."""
        return json_response(plane.model_config(name))

    @app.get("/v2/models/{name}/versions/{version}/config", tags=TAGS, response_model=V2ModelConfig,
             responses=not_found)
    async def model_version_config(name: str, version: str):
        """Triton's model configuration of one version."""
        return json_response(plane.model_config(name, version))

    _unsupported_routes(app)


# Triton extensions this gateway does not offer: their paths answer 501 saying so.
UNSUPPORTED = {
    "/v2/systemsharedmemory/{rest:path}": "system shared memory",
    "/v2/cudasharedmemory/{rest:path}": "CUDA shared memory",
    "/v2/trace/setting": "trace settings",
    "/v2/models/{name}/trace/setting": "trace settings",
    "/v2/logging": "log settings",
}


def _unsupported_routes(app: FastAPI) -> None:
    for path, what in UNSUPPORTED.items():
        async def unsupported(what: str = what):
            raise Unsupported(f"{what} (Triton's extension) is not supported by this gateway; "
                              f"its extensions: {EXTENSIONS}")

        app.add_api_route(path, unsupported, methods=["GET", "POST"], include_in_schema=False)
