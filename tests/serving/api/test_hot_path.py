"""The REST hot path (serving/api/rest/hot_path.py) answers exactly as the FastAPI routes do.

Two real gateways, one with ``rest_hot_path`` on (the default) and one with it off, both
with API keys and CORS on (so every middleware is in the path), get the same requests:
good ones and every kind of bad one. Status, body and the headers a client reads must be
the same; the request is counted in the metrics under the same labels."""

import asyncio
import json
import types

import httpx
import pytest

from serving.settings import Settings
from testkit.gateway import gateway_processes

KEY = "hot-path-key"
ORIGIN = "https://app.example"
AUTH = {"authorization": f"Bearer {KEY}", "origin": ORIGIN}
TEXT_BODY = {"texts": ["a wonderful, moving film", "dull and far too long"]}
IMAGE = [[0] * 28 for _ in range(28)]

# (name, method, path, headers, body: dict -> JSON, bytes -> raw)
CASES = [
    ("sentiment", "POST", "/v1/sentiment:predict", AUTH, TEXT_BODY),
    ("sentiment whole text", "POST", "/v1/sentiment:predict", AUTH, {**TEXT_BODY, "whole_text": True}),
    ("sentiment canary", "POST", "/v1/sentiment:predict", AUTH, {**TEXT_BODY, "version_label": "canary"}),
    ("digits", "POST", "/v1/digits:predict", AUTH, {"images": [IMAGE]}),
    ("no key", "POST", "/v1/sentiment:predict", {"origin": ORIGIN}, TEXT_BODY),
    ("wrong key", "POST", "/v1/sentiment:predict", {"x-api-key": "nope"}, TEXT_BODY),
    ("unknown model", "POST", "/v1/sentiment:predict", AUTH, {**TEXT_BODY, "model": "nope"}),
    ("unknown version", "POST", "/v1/sentiment:predict", AUTH, {**TEXT_BODY, "version": 99}),
    ("too many texts", "POST", "/v1/sentiment:predict", AUTH, {"texts": ["ok"] * 1025}),
    ("text too long", "POST", "/v1/sentiment:predict", AUTH, {"texts": ["x" * 20001]}),
    ("empty text", "POST", "/v1/sentiment:predict", AUTH, {"texts": [" "]}),
    ("wrong type", "POST", "/v1/sentiment:predict", AUTH, {"texts": [1]}),
    ("not json", "POST", "/v1/sentiment:predict", AUTH, b"{not json"),
    ("wrong content type", "POST", "/v1/sentiment:predict", {**AUTH, "content-type": "text/plain"}, b"hello"),
    ("compressed", "POST", "/v1/sentiment:predict", {**AUTH, "content-encoding": "gzip"}, TEXT_BODY),
    ("body too large", "POST", "/v1/sentiment:predict", AUTH, b"x" * (2 * 2**20 + 1)),
    ("wrong image size", "POST", "/v1/digits:predict", AUTH, {"images": [[[0] * 27] * 28]}),
    ("both image kinds", "POST", "/v1/digits:predict", AUTH, {"images": [IMAGE], "images_b64": ["AA=="]}),
    ("texts to digits", "POST", "/v1/digits:predict", AUTH, {**TEXT_BODY, "model": "sentiment_lstm"}),
    ("GET on a predict path", "GET", "/v1/sentiment:predict", AUTH, None),
    ("trailing slash", "POST", "/v1/sentiment:predict/", AUTH, TEXT_BODY),
]
HEADERS_READ = ("content-type", "location", "www-authenticate", "retry-after", "access-control-allow-origin",
                "access-control-expose-headers", "x-request-id", "allow")


@pytest.fixture(scope="module")
def gateways():
    common = {"api_keys": KEY, "cors_allow_origins": json.dumps([ORIGIN]), "max_body_bytes": 2 * 2**20,
              "models": '["sentiment_lstm", "digits"]'}
    with gateway_processes(dict(rest_hot_path="true", **common), dict(rest_hot_path="false", **common)) as (hot, plain):
        yield hot, plain


def call(base: str, method: str, path: str, headers: dict, body) -> httpx.Response:
    h = {"x-request-id": "same-id", **headers}
    if isinstance(body, dict):
        return httpx.request(method, base + path, headers=h, json=body, timeout=30)
    if isinstance(body, bytes):
        h.setdefault("content-type", "application/json")
    return httpx.request(method, base + path, headers=h, content=body, timeout=30)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hot_path_answers_as_fastapi_does(gateways, case):
    hot, plain = gateways
    _, method, path, headers, body = case
    a, b = call(hot.rest, method, path, headers, body), call(plain.rest, method, path, headers, body)
    assert a.status_code == b.status_code, (a.text, b.text)
    assert a.content == b.content
    for h in HEADERS_READ:
        va, vb = a.headers.get(h), b.headers.get(h)
        if h == "location" and va and vb:  # absolute URLs: each names its own port
            va, vb = va.removeprefix(hot.rest), vb.removeprefix(plain.rest)
        assert va == vb, h


def test_hot_path_requests_are_counted_and_logged_like_the_others(gateways):
    hot, plain = gateways
    for gw in gateways:
        call(gw.rest, "POST", "/v1/sentiment:predict", AUTH, TEXT_BODY)
        call(gw.rest, "POST", "/v1/sentiment:predict", AUTH, {"texts": [" "]})

    def series(gw):
        text = httpx.get(gw.rest + "/metrics", headers=AUTH, timeout=10).text
        return sorted(line.split(" ")[0] for line in text.splitlines()
                      if line.startswith("classifier_requests_total{") and 'protocol="rest"' in line)

    assert series(hot) == series(plain)
    assert any('endpoint="/v1/sentiment:predict"' in s and 'outcome="INVALID_ARGUMENT"' in s for s in series(hot))


def test_only_posts_to_the_two_predict_paths_take_the_hot_path():
    """In process: what reaches the FastAPI app behind the hot path, and what does not (the core
    is a stand-in that refuses every request, so an answer of 503 came from the hot path)."""

    from serving.api.rest.hot_path import HotPath

    reached = []

    async def fastapi_app(scope, receive, send):
        reached.append((scope["method"], scope["path"]))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def refuse(*args, **kwargs):  # the core's request lifecycle, refusing everything
        from serving.errors import Unavailable

        raise Unavailable("not ready")

    core = types.SimpleNamespace(settings=Settings(_env_file=None), record=lambda *a, **k: None, handle=refuse)
    app = HotPath(fastapi_app, core)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            out = {}
            for method, path in [("POST", "/v1/sentiment:predict"), ("POST", "/v1/digits:predict"),
                                 ("GET", "/v1/sentiment:predict"), ("POST", "/v2/models/digits/infer"),
                                 ("POST", "/v1/sentiment:predict/"), ("GET", "/healthz")]:
                out[(method, path)] = (await c.request(method, path, json={})).status_code
            return out

    statuses = asyncio.run(main())
    assert statuses[("POST", "/v1/sentiment:predict")] == 503  # answered by the hot path (the core refused)
    assert statuses[("POST", "/v1/digits:predict")] == 503
    assert reached == [("GET", "/v1/sentiment:predict"), ("POST", "/v2/models/digits/infer"),
                       ("POST", "/v1/sentiment:predict/"), ("GET", "/healthz")]

