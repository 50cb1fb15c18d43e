"""The hot path: POST /v1/sentiment:predict and /v1/digits:predict without FastAPI's routing.

A profile of the gateway over an instant backend (py-spy, bench/gateway.py case e) put
about a third of the event loop's time in the ASGI stack around the endpoint: FastAPI's
and Starlette's layers (routing over every route, the Request object, exception and
exit-stack middlewares, the endpoint wrapper). The two predict endpoints are the only
ones clients call at high rates, so :class:`HotPath` answers POSTs to exactly these two
paths itself, through the same middlewares (:func:`serving.api.rest.app.middlewares`:
body limit, API keys, CORS, request id), the same endpoint code
(:class:`serving.api.rest.v1_endpoints.V1Predict`) and the same error responses; everything else
(other methods on these paths, /v2, docs, ops) goes to the FastAPI app, whose routes
still document the two endpoints. ``rest_hot_path=false`` sends everything through FastAPI.
"""

from __future__ import annotations

import logging

from starlette.datastructures import Headers

from serving.api.rest.app import create_app, middlewares, unexpected
from serving.api.rest.v1_endpoints import DIGITS, SENTIMENT, V1Predict
from serving.api.rest.wire import error_response, read_body
from serving.auth import ApiKeys
from serving.core import Classifier
from serving.errors import ServiceError

log = logging.getLogger("serving.rest")


class _V1Endpoints:
    """ASGI app of the two predict endpoints (inside the middlewares)."""

    def __init__(self, v1: V1Predict):
        self.routes = {SENTIMENT: v1.sentiment, DIGITS: v1.digits}

    async def __call__(self, scope, receive, send):
        handler = self.routes[scope["path"]]
        try:
            response = await handler(Headers(scope=scope), lambda: read_body(receive), receive)
        except ServiceError as e:
            response = error_response(e)
        except Exception as e:  # noqa: BLE001 - as the FastAPI app's handler: logged, one JSON shape
            response = unexpected(scope["path"], e)
        # What Response.__call__ sends (these responses have no background tasks), without its layers.
        await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


class HotPath:
    """ASGI: POSTs to the two predict paths go to the lean stack, everything else to ``app``."""

    def __init__(self, app, core: Classifier, api_keys: ApiKeys | None = None):
        self.app = app
        stack = _V1Endpoints(V1Predict(core))
        for cls, options in middlewares(core, api_keys):
            stack = cls(stack, **options)
        self.stack = stack
        self.paths = frozenset((SENTIMENT, DIGITS))

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            return await self.stack(scope, receive, send)
        return await self.app(scope, receive, send)


def create_asgi(core: Classifier, api_keys: ApiKeys | None = None):
    """The REST server's ASGI app: the FastAPI app, behind the hot path unless ``rest_hot_path`` is off."""
    keys = api_keys or ApiKeys.from_settings(core.settings)
    app = create_app(core, keys)
    return HotPath(app, core, keys) if core.settings.rest_hot_path else app
