"""REST /v1: the two predict endpoints and the model list, protocol work only.

The predict endpoints read the raw body and decode it with msgspec (strict types: no
``true``/``"1"`` for a number) into the request structs below, whose JSON Schema is what
/openapi.json documents (limits added by serving/api/rest/openapi.py); the answers are the
core's structs, encoded as they are, and documented from the same structs. Everything
else (admission before the body is read, deadlines, metrics, the access log) is the core's
request lifecycle (:meth:`serving.core.Classifier.handle`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated

import msgspec
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response

from serving.api.rest.wire import ERROR_DOCS, check_content_type, decode_json, until_done
from serving.core import Classifier
from serving.errors import InvalidInput
from serving.images import SIZE, check_pixels
from serving.kinds.image import INLINE_IMAGES, DigitPrediction, Images, from_b64
from serving.kinds.text import SentimentPrediction, Texts
from serving.request import Predict, Result

SENTIMENT, DIGITS = "/v1/sentiment:predict", "/v1/digits:predict"


# -- request bodies: decoded with msgspec, documented from the same structs --------------
# Strict, as every field: a version is a JSON integer; 4.0, 1.5, "4" and true are 400 naming it
# (JSON Schema's "integer" would admit 4.0; the server, as its docs say, does not).
VERSION_DOC = "Model version; default: the version labelled 'stable' in models.config, else the newest loaded"
LABEL_DOC = "A version label from models.config (stable, canary, ...) instead of a version"
Version = Annotated[int, msgspec.Meta(ge=1)]


# Unknown fields are refused (400 naming the first), not ignored: a misspelt "modle" or "verison"
# would otherwise be served by the default model or version without a word.
class SentimentRequest(msgspec.Struct, forbid_unknown_fields=True):
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


class DigitsRequest(msgspec.Struct, forbid_unknown_fields=True):
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


# -- answers: the core's prediction structs, as they are --------------------------------------
class ModelRef(msgspec.Struct):
    name: str
    version: int


class SentimentResponse(msgspec.Struct):
    model: ModelRef
    predictions: list[SentimentPrediction]


class DigitsResponse(msgspec.Struct):
    model: ModelRef
    predictions: list[DigitPrediction]


class ErrorBody(msgspec.Struct):
    code: str
    message: str


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


SCHEMAS = [SentimentRequest, DigitsRequest, SentimentResponse, DigitsResponse, ErrorResponse]

# Strict numbers (no bools or strings); shape and range are checked by check_pixels, whose messages say more.
_decode_image28 = msgspec.json.Decoder(list[list[float]])
_decode_sentiment = msgspec.json.Decoder(SentimentRequest)
_decode_digits = msgspec.json.Decoder(DigitsRequest)
_json = msgspec.json.Encoder()


def _label(req) -> str | None:
    """The request's version_label: not empty, and not together with a version (as the schema says)."""
    if req.version_label is None:
        return None
    if not req.version_label:
        raise InvalidInput("version_label must not be empty")
    if req.version is not None:
        raise InvalidInput("give version or version_label, not both")
    return req.version_label


def _pixels(images: list[msgspec.Raw]) -> np.ndarray:
    return np.stack([check_pixels(decode_json(_decode_image28, raw, f"images[{i}]"), f"images[{i}]")
                     for i, raw in enumerate(images)])


async def _render(req: Predict, r: Result) -> Response:
    return Response(_json.encode({"model": ModelRef(r.model, r.version), "predictions": r.predictions}),
                    media_type="application/json")


class V1Predict:
    """The two /v1 predict endpoints: parse (content type, body, strict decoding off the loop
    when large) and render; the rest is the core's lifecycle. Used by FastAPI's routes and by
    the hot path alike; errors are raised as :class:`ServiceError`.

    Each method takes the request's headers (lower-case names), ``read`` (returns the body)
    and the ASGI ``receive`` (to notice a client that leaves while its work is queued)."""

    def __init__(self, core: Classifier):
        self.core, self.settings = core, core.settings

    async def _decode(self, headers: Mapping[str, str], read: Callable[[], Awaitable[bytes]], decoder):
        check_content_type(headers)
        body = await read()
        return await self.core.offload(decode_json, decoder, body, heavy=len(body) > self.settings.inline_parse_bytes)

    async def sentiment(self, headers: Mapping[str, str], read: Callable[[], Awaitable[bytes]], receive) -> Response:
        async def parse() -> Predict:
            req = await self._decode(headers, read, _decode_sentiment)
            return Predict("text", Texts(req.texts, req.whole_text), req.model, req.version, _label(req),
                           req.explain)

        return await self.core.handle("rest", SENTIMENT, parse, _render, kind="text",
                                      watch=lambda work: until_done(receive, work))

    async def digits(self, headers: Mapping[str, str], read: Callable[[], Awaitable[bytes]], receive) -> Response:
        async def parse() -> Predict:
            req = await self._decode(headers, read, _decode_digits)
            if (req.images is None) == (req.images_b64 is None):
                raise InvalidInput("give exactly one of images or images_b64")
            if req.images is not None:
                images = Images(len(req.images), lambda limits: _pixels(req.images), len(req.images) > INLINE_IMAGES)
            else:
                images = Images(len(req.images_b64), lambda limits: from_b64(req.images_b64, limits))
            return Predict("image", images, req.model, req.version, _label(req), req.explain)

        return await self.core.handle("rest", DIGITS, parse, _render, kind="image",
                                      watch=lambda work: until_done(receive, work))


def _body_doc(name: str) -> dict:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


def _answer_doc(name: str) -> dict:
    return {"description": "Successful Response",
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


ERROR_REF = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
PREDICT_ERRORS = {s: {**ERROR_REF, "description": d} for s, d in ERROR_DOCS.items()}


def add_v1_routes(app: FastAPI, core: Classifier) -> None:
    v1 = V1Predict(core)

    # With rest_hot_path (serving/api/rest/hot_path.py) POSTs to these two paths are served by
    # the same V1Predict methods without FastAPI's routing; these routes document them (and
    # serve them when the hot path is off).
    @app.post(SENTIMENT, responses={200: _answer_doc("SentimentResponse"), **PREDICT_ERRORS}, tags=["predict"],
              openapi_extra={"requestBody": _body_doc("SentimentRequest")})
    async def predict_sentiment(request: Request):
        """Classify review texts as negative/positive, in input order."""
        return await v1.sentiment(request.headers, request.body, request.receive)

    @app.post(DIGITS, responses={200: _answer_doc("DigitsResponse"), **PREDICT_ERRORS}, tags=["predict"],
              openapi_extra={"requestBody": _body_doc("DigitsRequest")})
    async def predict_digits(request: Request):
        """Classify 28x28 images (or PNG/JPEG of any size) as digits 0-9. Give exactly one of images or images_b64."""
        return await v1.digits(request.headers, request.body, request.receive)

    @app.get("/v1/models", tags=["models"], responses={401: {**ERROR_REF, "description": ERROR_DOCS[401]}})
    async def list_models():
        """Every configured model: its version labels, default version and traffic split; each version's state,
        labels, signature and the model card's accuracy and headline figures (``card``)."""
        return {"models": [_model(core, name, versions) for name, versions in core.models().items()]}


def _model(core: Classifier, name: str, versions: dict) -> dict:
    labels = core.models_config.labels(name)
    split = core.models_config.split(name)
    canary = core.rollout.canary(name, versions)
    return {
        "name": name,
        "labels": labels,
        "default_version": core.default_version(name, versions) if versions else None,
        # The traffic file's split of requests that name no version (canary_version: the version
        # that gets canary_percent of them now; null while there is no AVAILABLE canary).
        "traffic": {"canary_percent": split.canary_percent if canary else 0.0,
                    "configured_canary_percent": split.canary_percent,
                    "shadow_percent": split.shadow_percent if canary else 0.0,
                    "canary_version": canary.version if canary else None},
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
