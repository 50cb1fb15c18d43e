"""REST adapter (FastAPI): JSON in, the core, JSON out. OpenAPI at /docs and /redoc (served
from packaged assets: no CDN, works offline).

Every error has one shape, ``{"error": {"code": ..., "message": ...}}``, where
the message names the broken rule; the HTTP status matches the gRPC status of
the same error (see serving/errors.py).

The predict endpoints read the raw body and decode it with msgspec (strict
types: no ``true``/``"1"`` for a number) into the request structs below,
whose JSON Schema is what /openapi.json documents, limits included. Before the
body is even read a request can be refused (draining, every queue full); small
bodies are decoded on the event loop, large ones in a worker thread; a
client that disconnects has its queued work dropped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import warnings
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Literal

import msgspec
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from serving.api.rest.console import PUBLIC_PATHS as CONSOLE_PATHS
from serving.api.rest.console import add_console_routes
from serving.auth import ApiKeyMiddleware, ApiKeys
from serving.core import INLINE_IMAGES, TEXT_PATTERN, Classifier, Result, begin_request_id
from serving.errors import Cancelled, InvalidInput, Overloaded, ServiceError, UnsupportedMediaType
from serving.images import SIZE, check_pixels

log = logging.getLogger("serving.rest")
SENTIMENT, DIGITS = "/v1/sentiment:predict", "/v1/digits:predict"


# -- request bodies: decoded with msgspec, documented from the same structs --------------
# JSON Schema's "integer" includes 2.0, so an integral float is a version too (2.5 is refused
# by _version); it is still documented as an integer (see create_app).
VERSION_DOC = "Model version; default: the version labelled 'stable' in models.config, else the newest loaded"
LABEL_DOC = "A version label from models.config (stable, canary, ...) instead of a version"
Version = Annotated[int, msgspec.Meta(ge=1)] | Annotated[float, msgspec.Meta(ge=1)]


def _label(req) -> str | None:
    """The request's version_label: not empty, and not together with a version (as the schema says)."""
    if req.version_label is None:
        return None
    if not req.version_label:
        raise InvalidInput("version_label must not be empty")
    if req.version is not None:
        raise InvalidInput("give version or version_label, not both")
    return req.version_label


def _version(v: int | float | None) -> int | None:
    if isinstance(v, float):
        if not v.is_integer():
            raise InvalidInput(f"version: expected an integer, got {v!r}")
        return int(v)
    return v


class SentimentRequest(msgspec.Struct):
    texts: Annotated[list[str], msgspec.Meta(description="Review texts, in order; each must contain a non-space character")]
    model: Annotated[str, msgspec.Meta(description="sentiment_lstm (default) or sentiment_bilstm")] | None = None
    version: Version | None = None
    version_label: Annotated[str, msgspec.Meta(description=LABEL_DOC)] | None = None
    whole_text: Annotated[bool, msgspec.Meta(description=(
        "Score every 20-token window of each text and combine them (mean log-probability) instead of the "
        "last 20 tokens only; each window counts as a row against the queue limits"))] = False
    explain: Annotated[bool, msgspec.Meta(description=(
        "Also return, per text, the tokens in the 20 slots the model saw (padding, start and out-of-vocabulary "
        "words marked) and, with whole_text, every window's slots and probabilities"))] = False


Pixel = Annotated[float, msgspec.Meta(ge=0, le=255)]
Image28 = Annotated[
    list[Annotated[list[Pixel], msgspec.Meta(min_length=SIZE, max_length=SIZE)]],
    msgspec.Meta(min_length=SIZE, max_length=SIZE),
]


class DigitsRequest(msgspec.Struct):
    # Each image stays undecoded (msgspec.Raw) until it is checked, one at a time, off the event loop.
    images: Annotated[list[msgspec.Raw], msgspec.Meta(
        description="28x28 nested lists of 0-255 pixel values (white digit on black, as MNIST)")] | None = None
    images_b64: Annotated[list[str], msgspec.Meta(
        description="Base64 PNG/JPEG images of any size; made MNIST-like (grayscale, invert, crop, 20px box, centre of mass)"
    )] | None = None
    model: Annotated[str, msgspec.Meta(description="digits (default)")] | None = None
    version: Version | None = None
    version_label: Annotated[str, msgspec.Meta(description=LABEL_DOC)] | None = None
    explain: Annotated[bool, msgspec.Meta(
        description="Also return, per image, the 28x28 pixels the model received (after decoding and MNIST-style centring)")] = False


# Strict numbers (no bools or strings); shape and range are checked by check_pixels, whose messages say more.
_decode_image28 = msgspec.json.Decoder(list[list[float]])
_decode_sentiment = msgspec.json.Decoder(SentimentRequest)
_decode_digits = msgspec.json.Decoder(DigitsRequest)


# -- responses (documented in OpenAPI) ------------------------------------------------
class ModelRef(BaseModel):
    name: str
    version: int


class SlotOut(BaseModel):
    id: int
    token: str
    kind: Literal["pad", "start", "word", "oov"]


class WindowScoreOut(BaseModel):
    slots: list[SlotOut]
    label: str
    probabilities: dict[str, float]


class ExplanationOut(BaseModel):
    slots: list[SlotOut]
    windows: list[WindowScoreOut] | None = None


class SentimentPredictionOut(BaseModel):
    label: str
    score: float
    probabilities: dict[str, float]
    tokens: int
    unknown_tokens: int
    windows: int
    explanation: ExplanationOut | None = None


class SentimentResponse(BaseModel):
    model: ModelRef
    predictions: list[SentimentPredictionOut]


class DigitPredictionOut(BaseModel):
    label: int
    score: float
    probabilities: list[float]
    image: list[list[float]] | None = None


class DigitsResponse(BaseModel):
    model: ModelRef
    predictions: list[DigitPredictionOut]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


_json = msgspec.json.Encoder()


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    body = _json.encode({"error": {"code": code, "message": message}})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def retry_headers(e: ServiceError) -> dict | None:
    """``Retry-After`` (whole seconds, at least 1) for an overload, else none."""
    return {"retry-after": str(max(1, math.ceil(e.retry_after_s)))} if isinstance(e, Overloaded) else None


def _error(e: ServiceError) -> Response:
    return error_response(e.http_status, e.code, e.message, retry_headers(e))


ERROR_DOCS = {
    400: "Invalid input (the message names the field and the rule)",
    401: "Missing or invalid API key (only when API keys are configured)",
    404: "Unknown model or version",
    413: "Over a size limit: body, items per request, text length, image bytes or pixels",
    415: "Body is not application/json, or is compressed",
    429: "Queue full: retry after the Retry-After header's seconds",
    503: "Not ready, shutting down, the request's deadline passed, or the backend is unavailable",
    504: "TF Serving did not answer in time",
}
PREDICT_ERRORS = {s: {"model": ErrorResponse, "description": d} for s, d in ERROR_DOCS.items()}


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` with 413, before parsing them.

    Not FastAPI's own ``max_body_size``: on some paths that answers a plain-text
    "Content Too Large", and every error here must have the one JSON shape.
    """

    def __init__(self, app, max_bytes: int, on_reject=None):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject or (lambda path: None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope["headers"]:
            if k == b"content-length" and v.isdigit():
                if int(v) > self.max_bytes:
                    return await self._reject(scope, send, int(v))
                return await self.app(scope, receive, send)  # the server enforces Content-Length
        # No Content-Length (chunked): read the body here, up to the limit, then replay it.
        chunks, seen, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return await self.app(scope, _replay([msg]), send)
            chunks.append(msg)
            seen += len(msg.get("body", b""))
            more = msg.get("more_body", False)
            if seen > self.max_bytes:
                return await self._reject(scope, send, None)
        await self.app(scope, _replay(chunks, receive), send)

    async def _reject(self, scope, send, size: int | None):
        self.on_reject(scope["path"])
        if size is None:
            message = f"request body exceeds max_body_bytes={self.max_bytes}"
        else:
            message = f"request body is {size} bytes > max_body_bytes={self.max_bytes}"
        body = _json.encode({"error": {"code": "PAYLOAD_TOO_LARGE", "message": message}})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class RequestId:
    """ASGI middleware: take the client's ``x-request-id`` (or make one), keep it in the
    ``request_id`` context for every log line, and return it on the response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        rid = begin_request_id(rid.decode("latin-1"))
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


def _replay(messages: list, then=None):
    """An ASGI receive that returns ``messages`` first, then defers to ``then``."""
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        return await then() if then else {"type": "http.disconnect"}

    return receive


def validation_message(e: msgspec.MsgspecError) -> str:
    """msgspec's "Expected `str`, got `int` - at `$.texts[0]`" -> "texts[0]: expected str, got int"."""
    if isinstance(e, msgspec.DecodeError) and not isinstance(e, msgspec.ValidationError):
        return f"body is not valid JSON ({e})"
    text = str(e)
    message, _, where = text.partition(" - at `$")
    message = message.replace("`", "")
    message = message[0].lower() + message[1:] if message else message
    where = where.rstrip("`").lstrip(".")
    return f"{where}: {message}" if where else f"body: {message}"


def check_content_type(headers: Mapping[str, str], accepted: tuple[str, ...] = ("application/json",),
                       hint: str = "send application/json") -> None:
    """415 unless the body is one of the ``accepted`` media types (none given: JSON), uncompressed.
    ``headers``: the request's, lower-case names (Starlette's ``request.headers``, or a dict)."""
    ctype = headers.get("content-type")
    if ctype is not None and ctype.split(";")[0].strip().lower() not in accepted:
        raise UnsupportedMediaType(f"content-type {ctype.split(';')[0]!r} is not supported; {hint}")
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType(f"content-encoding {encoding!r} is not supported; send the body uncompressed")


async def read_body(receive) -> bytes:
    """The whole request body from an ASGI ``receive``."""
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise Cancelled("client disconnected before sending the whole body")
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def until_done(receive, work):
    """``await work``, unless the client disconnects first (``receive``, the request's ASGI receive,
    after the body was read, only returns on a disconnect): then the request's own task is
    cancelled, its queued rows are dropped, and :class:`Cancelled` is raised. One watcher task
    per request, no second task for the work."""
    me = asyncio.current_task()
    state = {"done": False, "gone": False}

    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass
        if not state["done"]:
            state["gone"] = True
            me.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if state["gone"] and me.uncancel() == 0:
            raise Cancelled("client disconnected; its queued work was dropped") from None
        raise
    finally:
        state["done"] = True
        watcher.cancel()


def _result(r: Result) -> Response:
    return Response(
        _json.encode({"model": {"name": r.model, "version": r.version}, "predictions": r.predictions}),
        media_type="application/json",
    )


def _pixels(images: list[msgspec.Raw]) -> np.ndarray:
    out = []
    for i, raw in enumerate(images):
        try:
            out.append(check_pixels(_decode_image28.decode(raw), f"images[{i}]"))
        except msgspec.ValidationError as e:
            where, _, msg = validation_message(e).partition(": ")
            raise InvalidInput(f"images[{i}]{where if where != 'body' else ''}: {msg}") from None
    return np.stack(out)


class V1Predict:
    """The two /v1 predict endpoints, protocol work only: admission before the body is read,
    the body decoded strictly (off the loop when large), the core, the JSON answer. Used by
    FastAPI's routes and by the hot path alike; errors are raised as :class:`ServiceError`.

    Each method takes the request's headers (lower-case names), ``read`` (returns the body)
    and the ASGI ``receive`` (to notice a client that leaves while its work is queued)."""

    def __init__(self, core: Classifier):
        self.core, self.settings = core, core.settings

    async def _decode(self, kind: str, headers: Mapping[str, str], read: Callable[[], Awaitable[bytes]],
                      decoder: msgspec.json.Decoder):
        self.core.precheck(kind)
        check_content_type(headers)
        body = await read()
        try:
            return await self.core.offload(decoder.decode, body, heavy=len(body) > self.settings.inline_parse_bytes)
        except msgspec.MsgspecError as e:
            raise InvalidInput(validation_message(e)) from None

    async def sentiment(self, headers: Mapping[str, str], read: Callable[[], Awaitable[bytes]], receive) -> Response:
        core = self.core
        deadline = core.deadline()
        with core.track("rest", SENTIMENT) as call:
            req = await self._decode("text", headers, read, _decode_sentiment)
            call.model = req.model or self.settings.default_sentiment_model
            r = await until_done(receive, core.sentiment(req.texts, req.model, _version(req.version), deadline, call,
                                                         _label(req), req.whole_text, req.explain))
        return _result(r)

    async def digits(self, headers: Mapping[str, str], read: Callable[[], Awaitable[bytes]], receive) -> Response:
        core = self.core
        deadline = core.deadline()
        with core.track("rest", DIGITS) as call:
            req = await self._decode("image", headers, read, _decode_digits)
            call.model = req.model or "digits"
            if (req.images is None) == (req.images_b64 is None):
                raise InvalidInput("give exactly one of images or images_b64")
            if req.images is not None:
                n, build, heavy = len(req.images), (lambda: _pixels(req.images)), len(req.images) > INLINE_IMAGES
            else:
                n, build, heavy = len(req.images_b64), (lambda: core.images_from_b64(req.images_b64)), True
            r = await until_done(receive, core.digits(n, build, req.model, _version(req.version), heavy, deadline,
                                                      call, _label(req), req.explain))
        return _result(r)


def middlewares(core: Classifier, api_keys: ApiKeys | None = None) -> list[tuple[type, dict]]:
    """The ASGI middlewares every REST request passes, innermost first: body limit, API keys
    (when configured), CORS (when configured), request id. Shared by the FastAPI app and the hot path."""
    s = core.settings
    reject = lambda outcome: lambda path: core.record("rest", path, None, outcome, 0.0)  # noqa: E731
    out: list[tuple[type, dict]] = [(BodyLimit, {"max_bytes": s.max_body_bytes, "on_reject": reject("PAYLOAD_TOO_LARGE")})]
    keys = api_keys or ApiKeys.from_settings(s)
    if keys.enabled:
        public = [*s.public_paths, *(CONSOLE_PATHS if s.console else ())]
        out.append((ApiKeyMiddleware, {"keys": keys, "public_paths": public, "on_reject": reject("UNAUTHENTICATED")}))
    if s.cors_allow_origins:
        out.append((CORSMiddleware, {
            "allow_origins": s.cors_allow_origins, "allow_methods": s.cors_allow_methods, "allow_headers": s.cors_allow_headers,
            "expose_headers": ["x-request-id", "retry-after"], "max_age": s.cors_max_age_s}))
    out.append((RequestId, {}))
    return out


def create_app(core: Classifier, api_keys: ApiKeys | None = None) -> FastAPI:
    s = core.settings
    app = FastAPIOffline(
        title="Sentiment & digit classifier",
        version="1",
        description="Gateway in front of the sentiment_lstm, sentiment_bilstm and digits models. "
        "Errors: `{\"error\": {\"code\", \"message\"}}`; the message names the broken limit. "
        "Send `x-request-id` to trace a request (it is returned and logged); when API keys are on, "
        "send `Authorization: Bearer <key>` or `x-api-key`.",
        telemetry=None if s.otel_telemetry else {"tracing": False, "metrics": False, "logs": False},
        favicon_url="data:,",
    )
    keys = api_keys or ApiKeys.from_settings(s)
    for cls, options in middlewares(core, keys):
        app.add_middleware(cls, **options)
    if s.console:
        add_console_routes(app, lambda: keys.enabled)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, e: ServiceError):
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(e.status_code, "INVALID_ARGUMENT")
        core.record("rest", request.url.path, None, code, 0.0)
        return error_response(e.status_code, code, f"{request.method} {request.url.path}: {e.detail}", e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, "INTERNAL", f"internal error ({type(e).__name__}); it has been logged")

    v1 = V1Predict(core)
    sentiment_body = {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SentimentRequest"}}}}
    digits_body = {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/DigitsRequest"}}}}

    # With rest_hot_path (serving/api/rest/hot_path.py) POSTs to these two paths are served by
    # the same V1Predict methods without FastAPI's routing; these routes document them (and
    # serve them when the hot path is off).
    @app.post(SENTIMENT, response_model=SentimentResponse, responses=PREDICT_ERRORS, tags=["predict"],
              openapi_extra={"requestBody": sentiment_body})
    async def predict_sentiment(request: Request):
        """Classify review texts as negative/positive, in input order."""
        return await v1.sentiment(request.headers, request.body, request.receive)

    @app.post(DIGITS, response_model=DigitsResponse, responses=PREDICT_ERRORS, tags=["predict"],
              openapi_extra={"requestBody": digits_body})
    async def predict_digits(request: Request):
        """Classify 28x28 images (or PNG/JPEG of any size) as digits 0-9. Give exactly one of images or images_b64."""
        return await v1.digits(request.headers, request.body, request.receive)

    @app.get("/v1/models", tags=["models"], responses={401: {"model": ErrorResponse, "description": ERROR_DOCS[401]}})
    async def list_models():
        """Every configured model: its version labels and default version; each version's state,
        labels, signature and the model card's accuracy and headline figures (``card``)."""
        out = []
        for name, versions in core.models().items():
            labels = core.models_config.labels(name)
            out.append(
                {
                    "name": name,
                    "labels": labels,
                    "default_version": core.default_version(name, versions) if versions else None,
                    "versions": [
                        {
                            "version": v.version,
                            "state": v.state,
                            "labels": sorted(k for k, n in labels.items() if n == v.version),
                            "signature": v.signature,
                            "test_accuracy": v.card.get("test_accuracy"),
                            "validation_accuracy": v.card.get("validation_accuracy"),
                            "card": v.card_figures,
                        }
                        for v in sorted(versions.values(), key=lambda v: v.version)
                    ],
                }
            )
        return {"models": out}

    from serving.api.rest.v2_endpoints import V2InferRequest, add_v2_routes  # it imports this module's helpers

    add_v2_routes(app, core)

    @app.api_route("/healthz", methods=["GET", "HEAD"], tags=["ops"])
    async def healthz():
        """The process is alive (answers while draining too)."""
        return {"status": "alive"}

    @app.api_route("/readyz", methods=["GET", "HEAD"], tags=["ops"], responses={503: {"model": ErrorResponse}})
    async def readyz():
        """200 once every configured model is loaded and warmed; 503 with the reason before, and while draining."""
        ready, reason = core.ready()
        if not ready:
            return error_response(503, "UNAVAILABLE", reason)
        return {"status": "ready", "reason": reason}

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def metrics():
        """Prometheus text format."""
        return Response(core.render_metrics(), media_type=core.metrics.content_type)

    # The request bodies' JSON Schema, with the limits the server enforces.
    (_, components) = msgspec.json.schema_components([SentimentRequest, DigitsRequest, V2InferRequest],
                                                     ref_template="#/components/schemas/{name}")
    sent = components["SentimentRequest"]["properties"]
    sent["texts"].update(minItems=1, maxItems=s.max_items_per_request)
    sent["texts"]["items"].update(minLength=1, maxLength=s.max_text_chars, pattern=TEXT_PATTERN)
    dig = components["DigitsRequest"]["properties"]
    for name, props in (("SentimentRequest", sent), ("DigitsRequest", dig)):
        props["version"]["anyOf"] = [{"type": "integer", "minimum": 1, "description": VERSION_DOC}, {"type": "null"}]
        props["version_label"]["anyOf"][0]["minLength"] = 1
        # Not both a version and a label.
        components[name]["not"] = {"required": ["version", "version_label"],
                                    "properties": {"version": {"type": "number"}, "version_label": {"type": "string"}}}
    image_schema = msgspec.json.schema(Image28)
    dig["images"]["anyOf"][0] = {"type": "array", "items": image_schema, "minItems": 1, "maxItems": s.max_items_per_request}
    dig["images_b64"]["anyOf"][0].update(minItems=1, maxItems=s.max_items_per_request)
    dig["images_b64"]["anyOf"][0]["items"].update(contentEncoding="base64", maxLength=s.max_image_bytes * 4 // 3 + 4)
    components["DigitsRequest"]["oneOf"] = [
        {"required": ["images"], "properties": {"images": {"type": "array"}}},
        {"required": ["images_b64"], "properties": {"images_b64": {"type": "array"}}},
    ]
    base_openapi = app.openapi

    def openapi():
        if app.openapi_schema is None:
            with warnings.catch_warnings():  # GET and HEAD of one route share an id: fixed below
                warnings.filterwarnings("ignore", message="Duplicate Operation ID")
                schema = base_openapi()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            # V2 paths: the model name is one of the configured models. Their string path
            # parameters cannot fail FastAPI's validation: no 422 (errors are 400, in one shape).
            for path, ops in schema["paths"].items():
                for op in ops.values():
                    op["responses"].pop("422", None)
                    for param in op.get("parameters", []):
                        if path.startswith("/v2/models/") and param["name"] == "name":
                            param["schema"]["enum"] = list(s.models)
            for unused in ("HTTPValidationError", "ValidationError"):
                schema["components"]["schemas"].pop(unused, None)
            for ops in schema["paths"].values():
                if "head" in ops and "get" in ops and ops["head"].get("operationId") == ops["get"].get("operationId"):
                    ops["head"]["operationId"] = ops["get"]["operationId"].removesuffix("_get") + "_head"
        return app.openapi_schema

    app.openapi = openapi
    return app
