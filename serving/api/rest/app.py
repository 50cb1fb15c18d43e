"""The REST server's app: composes the endpoints (serving/api/rest/v1_endpoints.py,
v2_endpoints.py, the console), the middlewares and the error handlers; OpenAPI at /docs
and /redoc (served from packaged assets: no CDN, works offline; serving/api/rest/openapi.py).

Every /v1 error has one shape, ``{"error": {"code": ..., "message": ...}}``, where the
message names the broken rule; the HTTP status matches the gRPC status of the same error
(serving/errors.py). With ``rest_hot_path``, POSTs to the two /v1 predict endpoints skip
FastAPI's routing (serving/api/rest/hot_path.py) through the same middlewares and code.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from serving.api.rest import openapi
from serving.api.rest.console import PUBLIC_PATHS as CONSOLE_PATHS
from serving.api.rest.console import add_console_routes
from serving.api.rest.v1_endpoints import ERROR_REF, add_v1_routes
from serving.api.rest.v2_endpoints import add_v2_routes
from serving.api.rest.wire import BodyLimit, RequestId, error_response, json_response
from serving.auth import ApiKeyMiddleware, ApiKeys
from serving.core import Classifier
from serving.errors import Internal, InvalidInput, MethodNotAllowed, NotFound, ServiceError, Unavailable

log = logging.getLogger("serving.rest")
HTTP_ERRORS = {404: NotFound, 405: MethodNotAllowed}


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


def unexpected(path: str, e: Exception) -> Response:
    """An exception that is not a ServiceError: logged with its traceback, answered 500 in the one shape."""
    log.exception("unexpected error on %s", path)
    return error_response(Internal(f"internal error ({type(e).__name__}); it has been logged"))


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
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        error = HTTP_ERRORS.get(e.status_code, InvalidInput)(f"{request.method} {request.url.path}: {e.detail}")
        core.record("rest", request.url.path, None, error.code, 0.0)
        error.http_status = e.status_code
        return error_response(error, e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        return unexpected(request.url.path, e)

    add_v1_routes(app, core)
    add_v2_routes(app, core)
    add_ops_routes(app, core)
    openapi.install(app, s)
    return app


def add_ops_routes(app: FastAPI, core: Classifier) -> None:
    @app.api_route("/healthz", methods=["GET", "HEAD"], tags=["ops"])
    async def healthz():
        """The process is alive (answers while draining too)."""
        return {"status": "alive"}

    @app.api_route("/readyz", methods=["GET", "HEAD"], tags=["ops"], responses={503: {**ERROR_REF, "description": "Service Unavailable"}})
    async def readyz():
        """200 once every configured model is loaded and warmed; 503 with the reason before, and while draining."""
        ready, reason = core.ready()
        if not ready:
            return error_response(Unavailable(reason))
        return json_response({"status": "ready", "reason": reason})

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def metrics():
        """Prometheus text format."""
        return Response(core.render_metrics(), media_type=core.metrics.content_type)
