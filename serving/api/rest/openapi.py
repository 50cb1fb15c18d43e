"""The OpenAPI document: FastAPI's, with the request and answer schemas generated from the
msgspec structs the endpoints decode and encode (serving/api/rest/v1_endpoints.py, v2_endpoints.py,
the kinds' prediction structs), and the limits the server enforces written into them."""

from __future__ import annotations

import warnings

import msgspec
from fastapi import FastAPI

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
    out["DigitsRequest"]["oneOf"] = [
        {"required": ["images"], "properties": {"images": {"type": "array"}}},
        {"required": ["images_b64"], "properties": {"images_b64": {"type": "array"}}},
    ]
    return out


def install(app: FastAPI, s: Settings) -> None:
    """``app.openapi`` with :func:`components` and the fixes below, built once."""
    base_openapi, schemas = app.openapi, components(s)

    def openapi():
        if app.openapi_schema is None:
            with warnings.catch_warnings():  # GET and HEAD of one route share an id: fixed below
                warnings.filterwarnings("ignore", message="Duplicate Operation ID")
                schema = base_openapi()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
            _fix_operations(schema, s)
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
