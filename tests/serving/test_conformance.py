"""HTTP and gRPC conformance of the gateway, as a client sees it: real `python -m serving`
processes on loopback, real clients (httpx, raw sockets, grpcio), no mocks.

One gateway with the default settings (two models, no drain pause) serves most cases;
a second one with CORS and a small body limit, and a third one with TLS, cover the
settings that change behaviour.
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import ssl
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import grpc
import httpx
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from testkit.gateway import ROOT, gateway_processes, stable_version, wait_until

SENTIMENT, DIGITS = "/v1/sentiment:predict", "/v1/digits:predict"
LOGS = ROOT / ".pytest_cache"
ORIGIN = "https://app.example"
HEX32 = re.compile(r"[0-9a-f]{32}")


def log_path(gw) -> Path:
    """Where testkit.gateway.gateway_process writes this gateway's stdout/stderr."""
    return LOGS / f"gateway-{urlsplit(gw.rest).port}.log"


@contextmanager
def without_tf_log_env():
    """Start the gateway without tests/conftest.py's TF_CPP_MIN_LOG_LEVEL: the gateway
    must keep TensorFlow quiet on its own (serving/logs.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
        yield


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> dict:
    """server.pem/server.key for 127.0.0.1 and localhost from a throwaway CA (trustme), and that CA."""
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = d / "server.pem", d / "server.key", d / "ca.pem"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    return {"cert": cert_file, "key": key_file, "ca": ca_file, "ca_pem": ca.cert_pem.bytes()}


@pytest.fixture(scope="module")
def gateways(tls_files):
    """The module's three gateways, started together (their start-ups overlap), all without
    TF_CPP_MIN_LOG_LEVEL (see without_tf_log_env): the default settings (two models, no drain
    pause); CORS and a small body limit; TLS."""
    LOGS.mkdir(exist_ok=True)
    verify = ssl.create_default_context(cafile=str(tls_files["ca"]))
    default = dict(models='["sentiment_lstm", "digits"]')
    # CORS for one origin and a 4 KiB body limit (both off the defaults).
    configured = dict(models='["sentiment_lstm"]', max_body_bytes=4096, cors_allow_origins=json.dumps([ORIGIN]))
    tls = dict(models='["sentiment_lstm"]', tls_cert_file=tls_files["cert"], tls_key_file=tls_files["key"], verify=verify)
    with without_tf_log_env(), gateway_processes(default, configured, tls) as (running, configured_running, tls_running):
        tls_running.verify = verify
        yield {"gw": running, "configured": configured_running, "tls": tls_running}


@pytest.fixture(scope="module")
def gw(gateways):
    """The default settings (two models, no drain pause), started without TF_CPP_MIN_LOG_LEVEL."""
    return gateways["gw"]


@pytest.fixture(scope="module")
def configured_gw(gateways):
    """CORS for one origin and a 4 KiB body limit (both off the defaults)."""
    return gateways["configured"]


def post(gw, path, body: bytes, **headers) -> httpx.Response:
    return httpx.post(gw.rest + path, content=body, headers=headers, timeout=30)


def assert_error(r: httpx.Response, status: int, code: str) -> str:
    """The one error shape; returns the message."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    return body["error"]["message"]


def blank_image():
    return [[0] * 28 for _ in range(28)]


# -- 1. 405 with Allow -------------------------------------------------------------------
@pytest.mark.parametrize("method, path, allowed", [
    ("PUT", "/healthz", {"GET", "HEAD"}),
    ("DELETE", "/readyz", {"GET", "HEAD"}),
    ("GET", SENTIMENT, {"POST"}),
    ("PUT", DIGITS, {"POST"}),
])
def test_405_names_the_allowed_methods(gw, method, path, allowed):
    r = httpx.request(method, gw.rest + path, timeout=10)
    assert_error(r, 405, "METHOD_NOT_ALLOWED")
    assert {m.strip() for m in r.headers["allow"].split(",")} == allowed


# -- 2. HEAD on the probes -----------------------------------------------------------------
@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_head_probes_answer_200_without_a_body(gw, path):
    # A raw socket: httpx would hide a body sent after a HEAD response.
    port = urlsplit(gw.rest).port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert rest == b""


# -- 3. strict types, errors that name the field -------------------------------------------
def digits_with(value, at: int):
    images = [blank_image(), blank_image()]
    images[at][3][4] = value
    return {"images": images}


@pytest.mark.parametrize("path, body, field", [
    (SENTIMENT, {"texts": ["x"], "version": True}, "version:"),
    (SENTIMENT, {"texts": ["x"], "version": "1"}, "version:"),
    (SENTIMENT, {"texts": ["x"], "version": 1.5}, "version:"),
    (SENTIMENT, {"texts": ["x"], "version": 4.0}, "version:"),
    (DIGITS, {"images": [blank_image()], "version": 1.0}, "version:"),
    (SENTIMENT, {"texts": "abc"}, "texts:"),
    (SENTIMENT, {"texts": ["good", 7]}, "texts[1]:"),
    (DIGITS, digits_with("7", at=0), "images[0][3][4]:"),
    (DIGITS, digits_with(True, at=1), "images[1][3][4]:"),
    (SENTIMENT, {"texts": ["good"], "modle": "sentiment_bilstm"}, "body: object contains unknown field modle"),
    (DIGITS, {"images": [blank_image()], "verison": 1}, "body: object contains unknown field verison"),
], ids=["version-bool", "version-str", "version-float", "version-integral-float", "digits-version-integral-float", "texts-str", "text-int", "pixel-str", "pixel-bool",
        "sentiment-unknown-field", "digits-unknown-field"])
def test_strict_types_are_400_naming_the_field(gw, path, body, field):
    r = post(gw, path, json.dumps(body).encode(), **{"content-type": "application/json"})
    message = assert_error(r, 400, "INVALID_ARGUMENT")
    assert message.startswith(field), message


# -- 4. OpenAPI documents the limits and the real responses -------------------------------
@pytest.fixture(scope="module")
def openapi(gw):
    r = httpx.get(gw.rest + "/openapi.json", timeout=10)
    assert r.status_code == 200
    return r.json()


def test_openapi_documents_the_request_limits(openapi):
    schemas = openapi["components"]["schemas"]
    texts = schemas["SentimentRequest"]["properties"]["texts"]
    assert (texts["minItems"], texts["maxItems"]) == (1, 1024)  # max_items_per_request
    assert texts["items"]["type"] == "string" and texts["items"]["maxLength"] == 20_000  # max_text_chars

    images = next(s for s in schemas["DigitsRequest"]["properties"]["images"]["anyOf"] if s.get("type") == "array")
    assert images["maxItems"] == 1024
    rows = images["items"]
    assert (rows["minItems"], rows["maxItems"]) == (28, 28)
    pixels = rows["items"]
    assert (pixels["minItems"], pixels["maxItems"]) == (28, 28)
    assert pixels["items"]["type"] == "number"
    assert (pixels["items"]["minimum"], pixels["items"]["maximum"]) == (0, 255)


def test_openapi_documents_the_responses_the_gateway_gives(openapi):
    operations = {(path, method): op for path, ops in openapi["paths"].items() for method, op in ops.items()}
    assert not [key for key, op in operations.items() if "422" in op["responses"]]  # errors are 400, never 422
    for path in (SENTIMENT, DIGITS):
        documented = set(operations[(path, "post")]["responses"])
        assert {"200", "400", "404", "413", "415", "429", "503"} <= documented, (path, documented)
    metrics = operations[("/metrics", "get")]["responses"]["200"]["content"]
    assert "text/plain" in metrics and "application/json" not in metrics


def test_openapi_operation_ids_are_unique(openapi):
    # OpenAPI requires it; client generators (openapi-generator, orval, ...) fail or overwrite otherwise.
    ids = [op.get("operationId") for ops in openapi["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_get_and_head_of_one_route_have_their_own_operation_ids(openapi):
    both = {path: ops for path, ops in openapi["paths"].items() if "get" in ops and "head" in ops}
    assert "/healthz" in both
    for path, ops in both.items():
        assert ops["get"]["operationId"].endswith("_get") and ops["head"]["operationId"].endswith("_head"), path
        assert ops["head"]["operationId"] == ops["get"]["operationId"].removesuffix("_get") + "_head"


# -- 5. media types ------------------------------------------------------------------------
def test_non_json_content_type_is_415(gw):
    r = post(gw, SENTIMENT, b'{"texts": ["good"]}', **{"content-type": "text/plain"})
    assert "application/json" in assert_error(r, 415, "UNSUPPORTED_MEDIA_TYPE")


def test_compressed_body_is_415(gw):
    r = post(gw, SENTIMENT, gzip.compress(b'{"texts": ["good"]}'),
             **{"content-type": "application/json", "content-encoding": "gzip"})
    assert "gzip" in assert_error(r, 415, "UNSUPPORTED_MEDIA_TYPE")


@pytest.mark.parametrize("headers", [{}, {"content-type": "application/json; charset=utf-8"}], ids=["none", "charset"])
def test_json_without_or_with_parameterised_content_type_is_accepted(gw, headers):
    r = post(gw, SENTIMENT, b'{"texts": ["good"]}', **headers)
    assert "content-type" in headers or "content-type" not in r.request.headers
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 1


# -- 6. 413 from the body limit is counted -------------------------------------------------
def too_large_count(gw) -> float:
    text = httpx.get(gw.rest + "/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "classifier_requests_total"
        and sample.labels.get("protocol") == "rest"
        and sample.labels.get("outcome") == "PAYLOAD_TOO_LARGE"
        and sample.labels.get("endpoint") == SENTIMENT
    )


def test_body_over_the_limit_is_413_and_counted(configured_gw):
    body = json.dumps({"texts": ["a" * 5000]}).encode()  # > max_body_bytes=4096
    before = too_large_count(configured_gw)

    r = post(configured_gw, SENTIMENT, body, **{"content-type": "application/json"})  # with Content-Length
    assert "max_body_bytes=4096" in assert_error(r, 413, "PAYLOAD_TOO_LARGE")

    def chunks():  # no Content-Length: chunked transfer encoding
        yield body[:2000]
        yield body[2000:]

    r = httpx.post(configured_gw.rest + SENTIMENT, content=chunks(), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert_error(r, 413, "PAYLOAD_TOO_LARGE")

    assert too_large_count(configured_gw) == before + 2


def test_body_over_the_limit_on_v2_is_413_in_the_protocols_shape(configured_gw):
    body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a" * 5000]}]}).encode()
    r = post(configured_gw, "/v2/models/sentiment_lstm/infer", body, **{"content-type": "application/json"})
    assert r.status_code == 413 and r.headers["content-type"] == "application/json"
    assert r.json() == {"error": f"request body is {len(body)} bytes > max_body_bytes=4096"}


# -- 7. request ids and the JSON log ------------------------------------------------------
def log_records(gw) -> list[dict]:
    return [json.loads(line) for line in log_path(gw).read_text().splitlines() if line.startswith("{")]


def access_record(gw, rid: str) -> dict:
    def find():
        return next((r for r in log_records(gw) if r.get("name") == "serving.access" and r.get("request_id") == rid),
                    None)

    return wait_until(find, timeout=10)


def test_a_request_without_an_id_gets_one(gw):
    r = post(gw, SENTIMENT, b'{"texts": ["good"]}')
    assert r.status_code == 200
    assert HEX32.fullmatch(r.headers["x-request-id"]), r.headers.get("x-request-id")
    assert HEX32.fullmatch(httpx.put(gw.rest + "/healthz", timeout=10).headers["x-request-id"])  # errors too


def test_rest_request_id_is_echoed_and_logged(gw):
    r = httpx.post(gw.rest + SENTIMENT, json={"texts": ["good film"]}, headers={"x-request-id": "abc-123"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "abc-123"
    record = access_record(gw, "abc-123")
    assert {k: record.get(k) for k in ("protocol", "endpoint", "outcome", "model", "version", "items")} == {
        "protocol": "rest", "endpoint": SENTIMENT, "outcome": "ok", "model": "sentiment_lstm", "version": stable_version("sentiment_lstm"), "items": 1,
    }
    assert isinstance(record["latency_ms"], (int, float)) and record["latency_ms"] >= 0


def test_grpc_request_id_is_returned_in_trailing_metadata_and_logged(gw):
    with grpc.insecure_channel(gw.grpc) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        reply, call = stub.ClassifySentiment.with_call(pb.SentimentRequest(texts=["good film", "bad film"]),
                                                       metadata=(("x-request-id", "grpc-req-456"),), timeout=30)
        assert len(reply.predictions) == 2
        assert ("x-request-id", "grpc-req-456") in tuple(call.trailing_metadata())

        _, call = stub.ClassifySentiment.with_call(pb.SentimentRequest(texts=["good"]), timeout=30)
        made = dict(call.trailing_metadata())["x-request-id"]
        assert HEX32.fullmatch(made), made
    record = access_record(gw, "grpc-req-456")
    assert {k: record.get(k) for k in ("protocol", "endpoint", "outcome", "model", "version", "items")} == {
        "protocol": "grpc", "endpoint": "ClassifySentiment", "outcome": "ok", "model": "sentiment_lstm",
        "version": stable_version("sentiment_lstm"), "items": 2,
    }
    assert isinstance(record["latency_ms"], (int, float))


TF_NOISE = ("oneDNN", "cpu_feature_guard", "This TensorFlow binary", "absl::InitializeLog", "cudart_stub", "cuInit")


def log_lines(gw) -> list[str]:
    # Everything that writes to the log once has by now: the models are loaded (TensorFlow has
    # spoken) and the OpenAPI schema has been generated (FastAPI's warnings).
    assert httpx.get(gw.rest + "/readyz", timeout=10).status_code == 200
    assert httpx.get(gw.rest + "/openapi.json", timeout=10).status_code == 200
    return [line for line in log_path(gw).read_text().splitlines() if line.strip()]


def test_log_has_no_tensorflow_start_up_noise(gw):
    noise = [line for line in log_lines(gw) if any(n in line for n in TF_NOISE)]
    assert not noise, "TensorFlow start-up lines in the gateway log:\n" + "\n".join(noise)


def test_every_log_line_is_a_json_object(gw):
    def is_json_object(line: str) -> bool:
        try:
            return isinstance(json.loads(line), dict)
        except ValueError:
            return False

    lines = log_lines(gw)
    assert lines
    not_json = [line for line in lines if not is_json_object(line)]
    assert not not_json, "log lines that are not JSON objects:\n" + "\n".join(not_json)


# -- 8. API docs work offline -------------------------------------------------------------
ASSET = re.compile(r"""<(?:script|link)\b[^>]*?\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_their_assets_from_the_gateway(gw, page):
    r = httpx.get(gw.rest + page, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for cdn in ("cdn.jsdelivr", "fonts.googleapis", "unpkg.com"):
        assert cdn not in r.text, cdn
    urls = ASSET.findall(r.text)
    assert any(u.endswith(".js") for u in urls), urls
    assert not [u for u in urls if "http://" in u or "https://" in u or u.startswith("//")], urls
    for url in urls:
        if url.startswith("data:"):
            continue
        asset = httpx.get(urljoin(gw.rest + page, url), timeout=30)
        assert asset.status_code == 200, url
        assert asset.content, url


# -- 9. CORS ---------------------------------------------------------------------------------
def preflight(gw, origin: str) -> httpx.Response:
    return httpx.options(gw.rest + SENTIMENT, timeout=10, headers={
        "origin": origin, "access-control-request-method": "POST",
        "access-control-request-headers": "content-type,x-api-key",
    })


def header_set(r: httpx.Response, name: str) -> set[str]:
    return {v.strip().lower() for v in r.headers.get(name, "").split(",") if v.strip()}


def test_cors_preflight_from_an_allowed_origin(configured_gw):
    r = preflight(configured_gw, ORIGIN)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "post" in header_set(r, "access-control-allow-methods")
    assert {"content-type", "x-api-key"} <= header_set(r, "access-control-allow-headers")


def test_cors_preflight_from_another_origin_is_not_allowed(configured_gw):
    r = preflight(configured_gw, "https://evil.example")
    assert r.status_code == 400  # Starlette's answer to a disallowed preflight
    assert "access-control-allow-origin" not in r.headers


def test_cors_simple_request_from_an_allowed_origin(configured_gw):
    r = httpx.post(configured_gw.rest + SENTIMENT, json={"texts": ["good"]}, headers={"origin": ORIGIN}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in header_set(r, "access-control-expose-headers")


def test_no_cors_headers_without_configured_origins(gw):
    answers = [
        preflight(gw, ORIGIN),
        httpx.post(gw.rest + SENTIMENT, json={"texts": ["good"]}, headers={"origin": ORIGIN}, timeout=30),
    ]
    assert answers[1].status_code == 200
    for r in answers:
        assert not [h for h in r.headers if h.lower().startswith("access-control-")], dict(r.headers)


# -- 10. TLS on both servers ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_gw(gateways, tls_files):
    """A gateway with tls_cert_file/tls_key_file from a throwaway CA (trustme), ready over https."""
    g = gateways["tls"]
    return {"rest": int(g.rest.rsplit(":", 1)[1]), "grpc": g.grpc, "verify": g.verify, "ca_pem": tls_files["ca_pem"]}


def test_tls_rest_predict_verified_by_the_ca(tls_gw):
    r = httpx.post(f"https://127.0.0.1:{tls_gw['rest']}{SENTIMENT}", json={"texts": ["good"]},
                   verify=tls_gw["verify"], timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["model"]["name"] == "sentiment_lstm"


def test_tls_port_refuses_plain_http(tls_gw):
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{tls_gw['rest']}/healthz", timeout=5)


def test_tls_grpc_verified_by_the_ca(tls_gw):
    credentials = grpc.ssl_channel_credentials(root_certificates=tls_gw["ca_pem"])
    with grpc.secure_channel(tls_gw["grpc"], credentials) as channel:
        reply = pb_grpc.ClassifierStub(channel).ClassifySentiment(pb.SentimentRequest(texts=["good"]), timeout=30)
    assert reply.model.name == "sentiment_lstm" and len(reply.predictions) == 1

    with grpc.insecure_channel(tls_gw["grpc"]) as channel:  # plaintext gRPC to the TLS port
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.ClassifierStub(channel).ClassifySentiment(pb.SentimentRequest(texts=["good"]), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
