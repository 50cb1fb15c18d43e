"""REST adapter (FastAPI): JSON in, the core, JSON out. OpenAPI at /docs.

Every error has one shape, ``{"error": {"code": ..., "message": ...}}``, where
the message names the broken rule; the HTTP status matches the gRPC status of
the same error (see serving/errors.py).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, StrictStr, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.core import Classifier
from serving.errors import ServiceError

log = logging.getLogger("serving.rest")


# -- request / response schemas (documented in OpenAPI) -------------------------
class SentimentRequest(BaseModel):
    texts: list[StrictStr] = Field(description="Review texts, 1..max_items_per_request, each 1..max_text_chars characters")
    model: str | None = Field(None, description="sentiment_lstm (default) or sentiment_bilstm")
    version: int | None = Field(None, ge=1, description="Model version; default the latest loaded")


class DigitsRequest(BaseModel):
    images: list[list[list[float]]] | None = Field(
        None, description="28x28 nested lists of 0-255 pixel values (white digit on black, as MNIST)"
    )
    images_b64: list[str] | None = Field(
        None, description="Base64 PNG/JPEG images of any size; made MNIST-like (grayscale, invert, crop, 20px box, centre of mass)"
    )
    model: str | None = Field(None, description="digits (default)")
    version: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.images is None) == (self.images_b64 is None):
            raise ValueError("give exactly one of images or images_b64")
        return self


class ModelRef(BaseModel):
    name: str
    version: int


class SentimentPredictionOut(BaseModel):
    label: str
    score: float
    probabilities: dict[str, float]
    tokens: int
    unknown_tokens: int


class SentimentResponse(BaseModel):
    model: ModelRef
    predictions: list[SentimentPredictionOut]


class DigitPredictionOut(BaseModel):
    label: int
    score: float
    probabilities: list[float]


class DigitsResponse(BaseModel):
    model: ModelRef
    predictions: list[DigitPredictionOut]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 413, 429, 503)}


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` with 413, before parsing them.

    Not FastAPI's own ``max_body_size``: on some paths that answers a plain-text
    "Content Too Large", and every error here must have the one JSON shape.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope["headers"]:
            if k == b"content-length" and v.isdigit():
                if int(v) > self.max_bytes:
                    return await self._reject(send, int(v))
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
                return await self._reject(send, None)
        await self.app(scope, _replay(chunks, receive), send)

    async def _reject(self, send, size: int | None):
        if size is None:
            message = f"request body exceeds max_body_bytes={self.max_bytes}"
        else:
            message = f"request body is {size} bytes > max_body_bytes={self.max_bytes}"
        body = json.dumps({"error": {"code": "PAYLOAD_TOO_LARGE", "message": message}}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def _replay(messages: list, then=None):
    """An ASGI receive that returns ``messages`` first, then defers to ``then``."""
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        return await then() if then else {"type": "http.disconnect"}

    return receive


def _where(loc) -> str:
    out = ""
    for p in loc:
        if p == "body":
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def create_app(core: Classifier) -> FastAPI:
    app = FastAPI(
        title="Sentiment & digit classifier",
        version="1",
        description="Gateway in front of the sentiment_lstm, sentiment_bilstm and digits models. "
        "Errors: `{\"error\": {\"code\", \"message\"}}`; the message names the broken limit.",
        telemetry=None if core.settings.otel_telemetry else {"tracing": False, "metrics": False, "logs": False},
    )
    app.add_middleware(BodyLimit, max_bytes=core.settings.max_body_bytes)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, e: ServiceError):
        return error_response(e.http_status, e.code, e.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        problems = []
        for err in e.errors()[:5]:
            if err["type"] == "json_invalid":
                problems.append(f"body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
            else:
                problems.append(f"{_where(err['loc'])}: {err['msg']}")
        core.metrics.requests.labels(request.url.path, "", "INVALID_ARGUMENT").inc()
        return error_response(400, "INVALID_ARGUMENT", "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(e.status_code, "INVALID_ARGUMENT")
        return error_response(e.status_code, code, f"{request.method} {request.url.path}: {e.detail}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, "INTERNAL", f"internal error ({type(e).__name__}); it has been logged")

    @app.post("/v1/sentiment:predict", response_model=SentimentResponse, responses=ERRORS, tags=["predict"])
    async def predict_sentiment(req: SentimentRequest):
        """Classify review texts as negative/positive, in input order."""
        with core.track("/v1/sentiment:predict", req.model or core.settings.default_sentiment_model):
            r = await core.sentiment(req.texts, req.model, req.version)
        return JSONResponse(
            {
                "model": {"name": r.model, "version": r.version},
                "predictions": [p.__dict__ for p in r.predictions],
            }
        )

    @app.post("/v1/digits:predict", response_model=DigitsResponse, responses=ERRORS, tags=["predict"])
    async def predict_digits(req: DigitsRequest):
        """Classify 28x28 images (or PNG/JPEG of any size) as digits 0-9."""
        if req.images is not None:
            build = lambda: core.images_from_pixels(req.images)  # noqa: E731
        else:
            build = lambda: core.images_from_b64(req.images_b64)  # noqa: E731
        with core.track("/v1/digits:predict", req.model or "digits"):
            r = await core.digits(build, req.model, req.version)
        return JSONResponse(
            {"model": {"name": r.model, "version": r.version}, "predictions": [p.__dict__ for p in r.predictions]}
        )

    @app.get("/v1/models", tags=["models"])
    async def list_models():
        """Every configured model: versions, state, signature and the model card's accuracy."""
        out = []
        for name, versions in core.models().items():
            out.append(
                {
                    "name": name,
                    "versions": [
                        {
                            "version": v.version,
                            "state": v.state,
                            "signature": v.signature,
                            "test_accuracy": v.card.get("test_accuracy"),
                            "validation_accuracy": v.card.get("validation_accuracy"),
                        }
                        for v in sorted(versions.values(), key=lambda v: v.version)
                    ],
                }
            )
        return {"models": out}

    @app.get("/healthz", tags=["ops"])
    async def healthz():
        """The process is alive."""
        return {"status": "alive"}

    @app.get("/readyz", tags=["ops"], responses={503: {"model": ErrorResponse}})
    async def readyz():
        """200 once every configured model is loaded and warmed; 503 with the reason before."""
        ready, reason = core.ready()
        if not ready:
            return error_response(503, "UNAVAILABLE", reason)
        return {"status": "ready", "reason": reason}

    @app.get("/metrics", tags=["ops"])
    async def metrics():
        """Prometheus text format."""
        return Response(core.render_metrics(), media_type=core.metrics.content_type)

    return app
