"""The REST server's app: composes the endpoints (serving/api/rest/v1_endpoints.py,
v2_endpoints.py, the console), the middlewares and the error handlers; OpenAPI at /docs
and /redoc (served from packaged assets: no CDN, works offline; serving/api/rest/openapi.py).

Every /v1 error has one shape, ``{"error": {"code": ..., "message": ...}}``, where the
message names the broken rule; the HTTP status matches the gRPC status of the same error
(serving/errors.py). Every error on a /v2 path (unknown ones, 404/405, 401, 413 included)
has the Open Inference Protocol's ``{"error": message}`` with the same status. With ``rest_hot_path``, POSTs to the two /v1 predict endpoints skip
FastAPI's routing (serving/api/rest/hot_path.py) through the same middlewares and code.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import Counter, Gauge
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from serving.api.rest import openapi, v2_extensions
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


def middlewares(core: Classifier, api_keys: ApiKeys | None = None, docs_paths: tuple[str, ...] = ()) -> list[tuple[type, dict]]:
    """The ASGI middlewares every REST request passes, innermost first: body limit, API keys
    (when configured), CORS (when configured), request id. Shared by the FastAPI app and the hot path."""
    s = core.settings
    reject = lambda outcome: lambda path: core.record("rest", path, None, outcome, 0.0)  # noqa: E731
    out: list[tuple[type, dict]] = [(BodyLimit, {"max_bytes": s.max_body_bytes, "on_reject": reject("PAYLOAD_TOO_LARGE")})]
    keys = api_keys or ApiKeys.from_settings(s)
    if keys.enabled:
        public = [*s.public_paths, *(CONSOLE_PATHS if s.console else ()), *(docs_paths if s.docs_public else ())]
        out.append((ApiKeyMiddleware, {"keys": keys, "public_paths": public, "on_reject": reject("UNAUTHENTICATED")}))
    if s.cors_allow_origins:
        out.append((CORSMiddleware, {
            "allow_origins": s.cors_allow_origins, "allow_methods": s.cors_allow_methods, "allow_headers": s.cors_allow_headers,
            "expose_headers": ["x-request-id", "retry-after"], "max_age": s.cors_max_age_s}))
    out.append((RequestId, {}))
    return out


def unexpected(path: str, e: Exception) -> Response:
    """An exception that is not a ServiceError: logged with its traceback, answered 500 in the path's shape."""
    log.exception("unexpected error on %s", path)
    return error_response(Internal(f"internal error ({type(e).__name__}); it has been logged"), path=path)


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
        redoc_url=None,  # openapi.add_redoc: without the CDN logo
        # No redirect from /path/ to /path: Starlette builds its Location from the request's Host
        # header (an open redirect to any host a client names); such paths are 404 in the one shape.
        redirect_slashes=False,
    )
    keys = api_keys or ApiKeys.from_settings(s)
    openapi.add_redoc(app)
    docs = openapi.docs_paths(app)
    for cls, options in middlewares(core, keys, docs):
        app.add_middleware(cls, **options)
    if s.console:
        add_console_routes(app, lambda: keys.enabled)

    # Errors in the shape of the path's protocol: /v2 paths (unknown ones included) the Open
    # Inference Protocol's {"error": message}, every other path /v1's (serving.errors.error_body).
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, e: ServiceError):
        return error_response(e, path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        error = HTTP_ERRORS.get(e.status_code, InvalidInput)(f"{request.method} {request.url.path}: {e.detail}")
        core.record("rest", request.url.path, None, error.code, 0.0)
        error.http_status = e.status_code
        return error_response(error, e.headers, path=request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        return unexpected(request.url.path, e)

    add_v1_routes(app, core)
    add_v2_routes(app, core, v2_extensions.add_routes)
    add_ops_routes(app, core)
    public = None
    if keys.enabled:
        public = frozenset([*s.public_paths, *(docs if s.docs_public else ())])
    openapi.install(app, s, public)
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

    metrics_cache = MetricsCache(core)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def metrics():
        """Prometheus text format."""
        return Response(await metrics_cache.get(), media_type=core.metrics.content_type)


class MetricsCache:
    """/metrics, rendered (``core.render_metrics``, ~5-20 ms for 100-220 KB) in a thread, never on
    the event loop, one render at a time; scrapes while one runs share it. Its text is reused for
    ``metrics_cache_s`` after the render began, unless something it shows has changed since: a
    value of the gateway's own counters and gauges (requests counted, queue depth, dropped rows,
    shadow scoring, config reloads, ...; a fraction of a millisecond to read) or the readiness
    (``core.ready()``: loading, draining, a version or models.config gone bad). So a client that
    reads the metrics after its own request finished, or after /readyz changed, always sees it,
    while any number of scrapers of an idle gateway cost one render per interval. Only the
    histograms and the process' own series (CPU, memory) may lag by up to the interval."""

    def __init__(self, core: Classifier):
        self.core, self.ttl = core, core.settings.metrics_cache_s
        self.body: bytes | None = None
        self.key: tuple | None = None  # _state() when the cached text's render began
        self.at = 0.0  # loop time its render began
        self.pending: asyncio.Task | None = None
        self.pending_key: tuple | None = None
        self.series: list | None = None  # the Counters and Gauges of core.metrics (read at the first scrape)

    def _state(self) -> tuple:
        """The values of the gateway's counters and gauges, and its readiness."""
        if self.series is None:
            self.series = [m for m in vars(self.core.metrics).values() if isinstance(m, (Counter, Gauge))]
        values = tuple(s.value for m in self.series for family in m.collect() for s in family.samples)
        return values, self.core.ready()

    async def get(self) -> bytes:
        loop = asyncio.get_running_loop()
        while True:
            key, now = self._state(), loop.time()
            if self.body is not None and key == self.key and now - self.at < self.ttl:
                return self.body
            if self.pending is None:
                self.pending, self.pending_key = loop.create_task(self._render(key, now)), key
            if self.pending_key == key:  # began after everything this scrape can know of: share it
                return await asyncio.shield(self.pending)
            await asyncio.wait([self.pending])  # began before a change this scrape may know of: the next one

    def _render_sync(self) -> bytes:
        try:
            return self.core.render_metrics()
        except RuntimeError:  # a dict the event loop changed while this thread read it (a model reloaded): again
            return self.core.render_metrics()

    async def _render(self, key: tuple, began: float) -> bytes:
        try:
            body = await asyncio.to_thread(self._render_sync)
            self.body, self.key, self.at = body, key, began
            return body
        finally:
            self.pending = None
