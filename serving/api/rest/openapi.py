"""The OpenAPI document: FastAPI's, with the request and answer schemas generated from the
msgspec structs the endpoints decode and encode (serving/api/rest/v1_endpoints.py, v2_endpoints.py,
the kinds' prediction structs), and the limits the server enforces written into them; and the
pages that show it, /docs (Swagger UI) and /redoc, from packaged assets (fastapi-offline's):
nothing is fetched from another host, so they work offline and air-gapped."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import fastapi_offline
import msgspec
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse, Response

from serving.api.rest import v1_endpoints, v2_endpoints
from serving.api.rest.v1_endpoints import VERSION_DOC, Image28
from serving.kinds.text import TEXT_PATTERN
from serving.settings import Settings


def components(s: Settings) -> dict:
    """The request and answer schemas, limits included."""
    (_, out) = msgspec.json.schema_components([*v1_endpoints.SCHEMAS, *v2_endpoints.SCHEMAS],
                                              ref_template="#/components/schemas/{name}")
    sent = out["SentimentRequest"]["properties"]
    sent["texts"].update(minItems=1, maxItems=s.max_items_per_request)
    sent["texts"]["items"].update(minLength=1, maxLength=s.max_text_chars, pattern=TEXT_PATTERN)
    dig = out["DigitsRequest"]["properties"]
    for name, props in (("SentimentRequest", sent), ("DigitsRequest", dig)):
        props["version"]["anyOf"] = [{"type": "integer", "minimum": 1, "description": VERSION_DOC}, {"type": "null"}]
        props["version_label"]["anyOf"][0]["minLength"] = 1
        # Not both a version and a label.
        out[name]["not"] = {"required": ["version", "version_label"],
                            "properties": {"version": {"type": "number"}, "version_label": {"type": "string"}}}
    dig["images"]["anyOf"][0] = {"type": "array", "items": msgspec.json.schema(Image28), "minItems": 1,
                                 "maxItems": s.max_items_per_request}
    dig["images_b64"]["anyOf"][0].update(minItems=1, maxItems=s.max_items_per_request)
    dig["images_b64"]["anyOf"][0]["items"].update(contentEncoding="base64", maxLength=s.max_image_bytes * 4 // 3 + 4)
    # Exactly one of the two, not null. ("not null" rather than "type: array": ReDoc merges each
    # branch with the property's own anyOf and warns "Incompatible types in allOf" on a type.)
    out["DigitsRequest"]["oneOf"] = [
        {"required": [name], "properties": {name: {"not": {"type": "null"}}}} for name in ("images", "images_b64")
    ]
    return out


# fastapi-offline's assets, where it mounts them; ReDoc's script is served patched (below).
STATIC_URL, STATIC_DIR = "/static-offline-docs", Path(fastapi_offline.__file__).parent / "static"
REDOC_JS = "/redoc/redoc.standalone.js"
# ReDoc's footer shows Redocly's logo from their CDN (a request to another host on every view);
# the served script has an empty inline image in its place.
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
NO_LOGO = "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg'/%3E"


def docs_paths(app: FastAPI) -> tuple[str, ...]:
    """Every path of the docs pages, their assets and the OpenAPI document (public with ``docs_public``)."""
    assets = (f"{STATIC_URL}/{f.name}" for f in STATIC_DIR.iterdir() if f.is_file())
    # (fastapi-offline serves Swagger UI at its own "/docs" and leaves app.docs_url None)
    return ("/docs", app.swagger_ui_oauth2_redirect_url, "/redoc", REDOC_JS, app.openapi_url, *assets)


@functools.cache
def _redoc_js() -> bytes:
    return (STATIC_DIR / "redoc.standalone.js").read_text(encoding="utf-8").replace(REDOC_LOGO, NO_LOGO).encode()


def add_redoc(app: FastAPI) -> None:
    """/redoc (the app is made with ``redoc_url=None``: fastapi-offline's page loads the unpatched script)."""
    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=root + app.openapi_url, title=app.title + " - ReDoc",
                              redoc_js_url=root + REDOC_JS, with_google_fonts=False, redoc_favicon_url="data:,")

    @app.get(REDOC_JS, include_in_schema=False)
    async def redoc_js() -> Response:
        return Response(_redoc_js(), media_type="text/javascript; charset=utf-8",
                        headers={"cache-control": "public, max-age=86400"})


def install(app: FastAPI, s: Settings, public_paths: frozenset[str] | None = None) -> None:
    """``app.openapi`` with :func:`components` and the fixes below, built once. ``public_paths``:
    API keys are on and these paths need none (the others get the two key schemes, so Swagger
    UI's Authorize button sends the key)."""
    base_openapi, schemas = app.openapi, components(s)

    def openapi():
        if app.openapi_schema is None:
            with warnings.catch_warnings():  # GET and HEAD of one route share an id: fixed below
                warnings.filterwarnings("ignore", message="Duplicate Operation ID")
                schema = base_openapi()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
            _fix_operations(schema, s)
            if public_paths is not None:
                _add_security(schema, public_paths)
        return app.openapi_schema

    app.openapi = openapi


def _fix_operations(schema: dict, s: Settings) -> None:
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
            # FastAPI names both after whichever of the route's methods (a set) comes first in this
            # process, and may hand both the same operation object: one id per method, new dicts.
            base = ops["get"]["operationId"].removesuffix("_get").removesuffix("_head")
            ops["get"] = {**ops["get"], "operationId": base + "_get"}
            ops["head"] = {**ops["head"], "operationId": base + "_head"}


def _add_security(schema: dict, public_paths: frozenset[str]) -> None:
    """The API key schemes (serving/auth.py reads either), required on every non-public operation."""
    schema["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
    }
    for path, ops in schema["paths"].items():
        if path not in public_paths:
            for op in ops.values():
                op["security"] = [{"bearer": []}, {"apiKey": []}]
