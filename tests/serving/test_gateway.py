"""The gateway as clients see it: `python -m serving` on loopback, REST and gRPC.

Every test runs twice: with the embedded backend, and with the TF Serving
backend in a process that cannot import TensorFlow, forwarding to the TF
Serving stand-in (testkit/standin.py). Same calls, same answers.
"""

import asyncio
import base64
import io

import grpc
import httpx
import numpy as np
import pytest
import tensorflow as tf
from prometheus_client.parser import text_string_to_metric_families

from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from contract.repository import read_version
from testkit.gateway import ROOT, served_versions, stable_version, wait_until

MODELS = ROOT / "models"
TEXTS = [
    "One of the best films I have seen in years. Wonderful acting, I loved it.",
    "A boring, predictable mess. Don't waste your time.",
    "It was okay, nothing special but not bad either.",
    "The plot made no sense <br /><br />and the ending was awful!",
    "zzzz qqqq wwww",
]


@pytest.fixture(scope="module")
def stub(gw):
    with grpc.insecure_channel(gw.grpc) as channel:
        yield pb_grpc.ClassifierStub(channel)


def rest(gw, path, body):
    return httpx.post(gw.rest + path, json=body, timeout=30)


def direct_probabilities(name: str, x: np.ndarray) -> tuple[int, np.ndarray]:
    """The SavedModel called directly, with no gateway in between."""
    version = stable_version(name)
    sig = tf.saved_model.load(str(MODELS / name / str(version))).signatures["serving_default"]
    key = next(iter(sig.structured_input_signature[1]))
    return version, sig(**{key: tf.constant(x)})["probabilities"].numpy()


@pytest.mark.parametrize("model", ["sentiment_lstm", "sentiment_bilstm"])
def test_sentiment_rest_grpc_and_direct_call_agree(gw, stub, model):
    r = rest(gw, "/v1/sentiment:predict", {"texts": TEXTS, "model": model})
    assert r.status_code == 200, r.text
    body = r.json()
    g = stub.ClassifySentiment(pb.SentimentRequest(texts=TEXTS, model=model))
    mv = read_version(MODELS, model, stable_version(model))
    version, expected = direct_probabilities(model, mv.preprocessor.encode_batch(TEXTS))
    assert body["model"] == {"name": model, "version": version}
    assert (g.model.name, g.model.version) == (model, version)
    assert len(body["predictions"]) == len(g.predictions) == len(TEXTS)
    for p, gp, exp, text in zip(body["predictions"], g.predictions, expected, TEXTS):
        probs = [p["probabilities"]["negative"], p["probabilities"]["positive"]]
        np.testing.assert_allclose(probs, exp, atol=1e-5)
        np.testing.assert_allclose([gp.probabilities["negative"], gp.probabilities["positive"]], exp, atol=1e-5)
        assert p["label"] == gp.label == ("positive" if exp[1] > exp[0] else "negative")
        assert p["score"] == pytest.approx(max(exp), abs=1e-5)
        enc = mv.preprocessor.encode(text)
        assert (p["tokens"], p["unknown_tokens"]) == (gp.tokens, gp.unknown_tokens) == (enc.tokens, enc.unknown_tokens)
    assert body["predictions"][0]["label"] == "positive" and body["predictions"][1]["label"] == "negative"
    if gw.standin:  # the ids went to TF Serving pinned to the version whose vocabulary made them
        sent = [(m, v, x["token_ids"]) for m, v, x in gw.standin.calls if m == model]
        assert sent and all(v == version for _, v, _ in sent)
        np.testing.assert_array_equal(sent[-1][2], mv.preprocessor.encode_batch(TEXTS))


def test_request_ids_are_returned_and_reach_tf_serving(gw, stub):
    r = httpx.post(gw.rest + "/v1/sentiment:predict", json={"texts": ["fine"]}, headers={"x-request-id": "trace-rest-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-rest-1"
    _, call = stub.ClassifySentiment.with_call(pb.SentimentRequest(texts=["fine"]), metadata=(("x-request-id", "trace-grpc-1"),))
    assert dict(call.trailing_metadata())["x-request-id"] == "trace-grpc-1"
    generated = httpx.post(gw.rest + "/v1/sentiment:predict", json={"texts": ["fine"]}).headers["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    if gw.standin:  # batches carry their requests' ids to TF Serving as metadata
        sent = ",".join(i for i in gw.standin.request_ids if i).split(",")
        assert {"trace-rest-1", "trace-grpc-1", generated} <= set(sent)


def test_grpc_stream_answers_each_chunk_in_order(stub):
    chunks = [TEXTS[:2], TEXTS[2:3], TEXTS[3:]]
    answers = list(stub.StreamClassifySentiment(iter(pb.SentimentRequest(texts=c) for c in chunks)))
    assert [len(a.predictions) for a in answers] == [2, 1, 2]
    unary = stub.ClassifySentiment(pb.SentimentRequest(texts=TEXTS))
    streamed = [p for a in answers for p in a.predictions]
    assert [p.label for p in streamed] == [p.label for p in unary.predictions]
    np.testing.assert_allclose([p.score for p in streamed], [p.score for p in unary.predictions], atol=1e-6)


@pytest.fixture(scope="module")
def mnist(data_dir):
    from training.data import load_mnist

    return load_mnist(data_dir).test


def test_digits_rest_grpc_and_direct_call_agree(gw, stub, mnist):
    imgs = mnist.x[:16]
    r = rest(gw, "/v1/digits:predict", {"images": imgs.tolist()})
    assert r.status_code == 200, r.text
    g = stub.ClassifyDigits(pb.DigitsRequest(images=[pb.Image(raw=im.tobytes()) for im in imgs]))
    _, expected = direct_probabilities("digits", imgs.astype(np.float32))
    rp = np.array([p["probabilities"] for p in r.json()["predictions"]])
    gp = np.array([list(p.probabilities) for p in g.predictions])
    np.testing.assert_allclose(rp, expected, atol=1e-5)
    np.testing.assert_allclose(gp, expected, atol=1e-5)
    labels = [p["label"] for p in r.json()["predictions"]]
    assert labels == [p.label for p in g.predictions] == list(expected.argmax(1))
    assert np.mean(np.array(labels) == mnist.y[:16]) >= 0.9


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_encoded_images_of_any_size_are_made_mnist_like(gw, stub, mnist):
    from PIL import Image

    # Black digits on a white, larger canvas, off centre: what a phone photo or a canvas gives.
    pngs, truth = [], []
    for im, y in zip(mnist.x[:20], mnist.y[:20]):
        big = np.asarray(Image.fromarray(im).resize((90, 90), Image.BILINEAR))
        canvas = np.full((140, 120), 255, np.uint8)
        canvas[10:100, 25:115] = 255 - big
        pngs.append(_png(canvas))
        truth.append(int(y))
    r = rest(gw, "/v1/digits:predict", {"images_b64": [base64.b64encode(p).decode() for p in pngs]})
    assert r.status_code == 200, r.text
    labels = [p["label"] for p in r.json()["predictions"]]
    g = stub.ClassifyDigits(pb.DigitsRequest(images=[pb.Image(encoded=p) for p in pngs]))
    assert labels == [p.label for p in g.predictions]
    assert np.mean(np.array(labels) == np.array(truth)) >= 0.9


BAD_SENTIMENT = [
    # (REST body, gRPC request, HTTP status, gRPC code, message)
    ({"texts": []}, pb.SentimentRequest(texts=[]), 400, grpc.StatusCode.INVALID_ARGUMENT, "texts must not be empty"),
    ({"texts": ["ok", " "]}, pb.SentimentRequest(texts=["ok", " "]), 400, grpc.StatusCode.INVALID_ARGUMENT, "texts[1] is empty"),
    ({"texts": ["x"] * 1025}, pb.SentimentRequest(texts=["x"] * 1025), 413, grpc.StatusCode.INVALID_ARGUMENT,
     "too many texts: 1025 > max_items_per_request=1024"),
    ({"texts": ["x" * 20001]}, pb.SentimentRequest(texts=["x" * 20001]), 413, grpc.StatusCode.INVALID_ARGUMENT,
     "texts[0] is too long: 20001 characters > max_text_chars=20000"),
    ({"texts": ["x"], "model": "nope"}, pb.SentimentRequest(texts=["x"], model="nope"), 404, grpc.StatusCode.NOT_FOUND,
     "unknown model 'nope'; text models: ['sentiment_bilstm', 'sentiment_lstm']"),
    ({"texts": ["x"], "version": 999}, pb.SentimentRequest(texts=["x"], version=999), 404, grpc.StatusCode.NOT_FOUND,
     "model 'sentiment_lstm' has no version 999"),
    ({"texts": ["x"], "model": "digits"}, pb.SentimentRequest(texts=["x"], model="digits"), 400,
     grpc.StatusCode.INVALID_ARGUMENT, "model 'digits' classifies images, not texts"),
]


@pytest.mark.parametrize(("body", "request_pb", "http", "code", "message"), BAD_SENTIMENT, ids=lambda v: None)
def test_bad_sentiment_input_same_status_and_message_on_both_protocols(gw, stub, body, request_pb, http, code, message):
    r = rest(gw, "/v1/sentiment:predict", body)
    assert r.status_code == http
    err = r.json()["error"]
    assert message in err["message"]
    with pytest.raises(grpc.RpcError) as e:
        stub.ClassifySentiment(request_pb)
    assert e.value.code() == code
    assert e.value.details() == err["message"]


def test_bad_images_are_named(gw, stub):
    cases = [
        ({"images": [[[0] * 28] * 27]}, "images[0] has shape 27x28; images must be 28x28"),
        ({"images": [[[0] * 28] * 27 + [[0] * 27]]}, "images[0] must be 28x28 numbers"),
        ({"images": [[[300] * 28] * 28]}, "images[0] has pixels outside 0..255"),
        ({"images_b64": ["@@@"]}, "images_b64[0] is not valid base64"),
        ({"images_b64": [base64.b64encode(b"not an image").decode()]}, "images_b64[0] could not be decoded as PNG or JPEG"),
        ({"images": [[[0] * 28] * 28], "images_b64": []}, "give exactly one of images or images_b64"),
        ({"images": []}, "images must not be empty"),
    ]
    for body, message in cases:
        r = rest(gw, "/v1/digits:predict", body)
        assert r.status_code == 400, (body, r.text)
        assert message in r.json()["error"]["message"]
    for img, message in [
        (pb.Image(raw=b"\0" * 100), "images[0] raw image has 100 bytes; must be 784 (28x28 uint8)"),
        (pb.Image(encoded=b"GIF89a"), "images[0] could not be decoded as PNG or JPEG"),
        (pb.Image(), "images[0] has no data (set raw or encoded)"),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            stub.ClassifyDigits(pb.DigitsRequest(images=[img]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()


def test_rest_protocol_errors_use_the_error_shape(gw):
    r = httpx.post(gw.rest + "/v1/sentiment:predict", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("body is not valid JSON")
    r = rest(gw, "/v1/sentiment:predict", {"texts": [1]})
    assert r.status_code == 400 and r.json()["error"]["message"] == "texts[0]: expected str, got int"
    r = httpx.post(gw.rest + "/v1/sentiment:predict", content=b"x" * (16 * 1024 * 1024 + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes=16777216" in r.json()["error"]["message"]

    def chunked():
        for _ in range(17):
            yield b"x" * (1024 * 1024)

    r = httpx.post(gw.rest + "/v1/sentiment:predict", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    r = httpx.get(gw.rest + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"


def test_grpc_message_size_limit(gw, stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.ClassifySentiment(pb.SentimentRequest(texts=["x" * (17 * 1024 * 1024)]))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _metrics(gw) -> dict:
    text = httpx.get(gw.rest + "/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_concurrent_requests_are_merged_into_batches(gw):
    key_count = ("classifier_batch_rows_count", (("model", "sentiment_bilstm"),))
    key_sum = ("classifier_batch_rows_sum", (("model", "sentiment_bilstm"),))
    before = _metrics(gw)

    async def fire():
        async with httpx.AsyncClient(timeout=60) as client:
            reqs = [
                client.post(gw.rest + "/v1/sentiment:predict", json={"texts": [TEXTS[i % 5]], "model": "sentiment_bilstm"})
                for i in range(64)
            ]
            return await asyncio.gather(*reqs)

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    # Same text -> same answer, whichever batch it landed in.
    for i, r in enumerate(responses):
        assert r.json()["predictions"][0]["score"] == pytest.approx(responses[i % 5].json()["predictions"][0]["score"], abs=1e-6)
    after = _metrics(gw)
    rows = after[key_sum] - before.get(key_sum, 0)
    batches = after[key_count] - before.get(key_count, 0)
    assert rows == 64
    assert batches < 64, "no two requests were merged into one backend call"


def test_metrics_are_exposed(gw):
    rest(gw, "/v1/sentiment:predict", {"texts": TEXTS})
    rest(gw, "/v1/sentiment:predict", {"texts": []})
    m = _metrics(gw)
    names = {k[0] for k in m}
    for name in ("classifier_requests_total", "classifier_request_duration_seconds_bucket",
                 "classifier_preprocess_duration_seconds_bucket", "classifier_backend_duration_seconds_bucket",
                 "classifier_batch_rows_bucket", "classifier_queue_rows", "classifier_queue_limit_rows", "classifier_ready",
                 "classifier_unknown_token_ratio_bucket", "classifier_model_version_info", "process_cpu_seconds_total"):
        assert name in names, name
    labels = (("endpoint", "/v1/sentiment:predict"), ("model", "sentiment_lstm"))
    version = ("version", str(stable_version("sentiment_lstm")))  # the version that served it
    ok = ("classifier_requests_total", (*labels, ("outcome", "ok"), ("protocol", "rest"), version))
    bad = ("classifier_requests_total", (*labels, ("outcome", "INVALID_ARGUMENT"), ("protocol", "rest"), version))
    assert m[ok] >= 1 and m[bad] >= 1  # (the empty request was refused after its version was chosen)
    available = sorted((dict(k[1])["model"], int(dict(k[1])["version"])) for k, v in m.items()
                       if k[0] == "classifier_model_version_info" and v == 1)
    assert available == sorted((n, v) for n in ("digits", "sentiment_lstm", "sentiment_bilstm") for v in served_versions(n))


def test_metrics_have_no_created_series(gw):
    """Issue 25: every counter and histogram also exposed a ``_created`` series (the process start)."""
    rest(gw, "/v1/sentiment:predict", {"texts": TEXTS})
    text = httpx.get(gw.rest + "/metrics", timeout=10).text
    assert "classifier_requests_total{" in text
    assert [line for line in text.splitlines() if "_created" in line] == []


def test_default_sentiment_versions_are_the_promoted_ones(gw):
    """Issue 21: the versions that passed the restated gate (training.gate) serve requests naming no version."""
    for model, version in (("sentiment_lstm", 4), ("sentiment_bilstm", 2)):
        r = httpx.post(gw.rest + "/v1/sentiment:predict", json={"texts": ["a fine film"], "model": model}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == {"name": model, "version": version}, r.text


def test_models_listing(gw):
    models = {m["name"]: m for m in httpx.get(gw.rest + "/v1/models").json()["models"]}
    assert set(models) == {"digits", "sentiment_lstm", "sentiment_bilstm"}
    v = models["sentiment_lstm"]["versions"][-1]
    assert v["state"] == "AVAILABLE"
    assert v["signature"]["inputs"] == {"token_ids": {"dtype": "int32", "shape": [-1, 20]}}
    assert v["signature"]["outputs"] == {"probabilities": {"dtype": "float32", "shape": [-1, 2]}}
    assert v["test_accuracy"] >= 0.75


def test_health_reflection_and_openapi(gw):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(gw.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "classifier.v1.Classifier"):  # follows /readyz within its 0.2 s poll
            wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(service=service)).status
                       == health_pb2.HealthCheckResponse.SERVING, 5)
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"classifier.v1.Classifier", "grpc.health.v1.Health"} <= services
        methods = {m.name for m in db.FindFileContainingSymbol("classifier.v1.Classifier").service[0].method}
        assert methods == {"ClassifySentiment", "ClassifyDigits", "StreamClassifySentiment"}
        # grpc.reflection.v1 too (what current grpcurl asks first); its messages are v1alpha's, field for field.
        from grpc_reflection.v1alpha import reflection_pb2 as r

        v1 = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                   request_serializer=r.ServerReflectionRequest.SerializeToString,
                                   response_deserializer=r.ServerReflectionResponse.FromString)
        answer = next(v1(iter([r.ServerReflectionRequest(list_services="")])))
        assert {"classifier.v1.Classifier", "grpc.reflection.v1.ServerReflection"} <= {
            s.name for s in answer.list_services_response.service}
    assert httpx.get(gw.rest + "/healthz").json() == {"status": "alive"}
    assert httpx.get(gw.rest + "/readyz").status_code == 200
    paths = httpx.get(gw.rest + "/openapi.json").json()["paths"]
    assert {"/v1/sentiment:predict", "/v1/digits:predict", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(paths)
    assert httpx.get(gw.rest + "/docs").status_code == 200
