"""The explain option (REST ``"explain": true``, gRPC ``explain``) on both backends: the slots
are the version's own preprocessor's ids and words, whole-text windows are the preprocessor's
windows scored one by one, digits return the pixels the model got; asking changes no answer,
and not asking adds nothing to the response."""

from __future__ import annotations

import base64
import io

import grpc
import httpx
import numpy as np
import pytest

from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from serving.images import decode_image
from contract.repository import read_version
from tests.serving.conftest import MODELS

TEXTS = [
    "One of the best films I have seen in years. Wonderful acting, I loved it.",
    "The plot made no sense <br /><br />and the ending was awful! Zorblaxian dialogue, quixotically flimsy.",
    "zzzz",
    # Long enough for several whole-text windows.
    " ".join(["The first half drags on and on, the jokes fall flat and the cast looks bored."] * 4
             + ["Then it turns into something wonderful, moving and beautifully acted; I loved the ending."] * 3),
]


@pytest.fixture(scope="module")
def stub(gw):
    with grpc.insecure_channel(gw.grpc) as channel:
        yield pb_grpc.ClassifierStub(channel)


def predict(gw, path, body):
    r = httpx.post(gw.rest + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def model_on(model: str, version: int, ids: list[list[int]]) -> np.ndarray:
    """The SavedModel called directly on rows of ids (no gateway)."""
    import tensorflow as tf

    sig = tf.saved_model.load(str(MODELS / model / str(version))).signatures["serving_default"]
    key = next(iter(sig.structured_input_signature[1]))
    return sig(**{key: tf.constant(ids, dtype=tf.int32)})["probabilities"].numpy()


def expected_slots(prep, text):
    return [{"id": i, "token": t, "kind": {0: "pad", 1: "start", 2: "oov"}.get(i, "word")} for i, t in prep.explain(text)]


@pytest.mark.parametrize("model", ["sentiment_lstm", "sentiment_bilstm"])
def test_slots_are_what_the_preprocessor_made(gw, stub, model):
    plain = predict(gw, "/v1/sentiment:predict", {"texts": TEXTS, "model": model})
    body = predict(gw, "/v1/sentiment:predict", {"texts": TEXTS, "model": model, "explain": True})
    prep = read_version(MODELS, model, body["model"]["version"]).preprocessor
    assert all("explanation" not in p for p in plain["predictions"])  # nothing extra when not asked
    for text, p, q in zip(TEXTS, body["predictions"], plain["predictions"]):
        slots = p["explanation"]["slots"]
        assert {k: v for k, v in p.items() if k != "explanation"} == q  # asking changes no answer
        assert slots == expected_slots(prep, text)
        assert [s["id"] for s in slots] == prep.encode(text).ids
        words = [s for s in slots if s["kind"] in ("word", "oov")]
        assert len(words) == p["tokens"] and sum(s["kind"] == "oov" for s in words) == p["unknown_tokens"]
    oov = [s["token"] for s in body["predictions"][1]["explanation"]["slots"] if s["kind"] == "oov"]
    assert "zorblaxian" in oov  # an unknown word is shown as written (lower-cased), marked oov
    assert body["predictions"][2]["explanation"]["slots"][-2:] == [
        {"id": 1, "token": "<start>", "kind": "start"}, {"id": 2, "token": "zzzz", "kind": "oov"}]

    g = stub.ClassifySentiment(pb.SentimentRequest(texts=TEXTS, model=model, explain=True))
    for p, gp in zip(body["predictions"], g.predictions):
        assert [{"id": s.id, "token": s.token, "kind": s.kind} for s in gp.explanation.slots] == p["explanation"]["slots"]
        assert not gp.explanation.windows
    assert not stub.ClassifySentiment(pb.SentimentRequest(texts=TEXTS, model=model)).predictions[0].HasField("explanation")


def test_whole_text_windows_are_scored_one_by_one(gw, stub):
    model = "sentiment_bilstm"
    body = predict(gw, "/v1/sentiment:predict", {"texts": TEXTS, "model": model, "whole_text": True, "explain": True})
    version = body["model"]["version"]
    mv = read_version(MODELS, model, version)
    stride = mv.whole_text_stride
    for text, p in zip(TEXTS, body["predictions"]):
        e = p["explanation"]
        windows = e["windows"]
        assert len(windows) == p["windows"]
        assert [[s["id"] for s in w["slots"]] for w in windows] == mv.preprocessor.windows(text, stride, 32)
        assert e["slots"] == windows[-1]["slots"] == expected_slots(mv.preprocessor, text)
        # Each window's probabilities are the model's for that window alone; their mean
        # log-probability is the text's answer.
        got = np.array([[w["probabilities"][k] for k in mv.labels] for w in windows])
        np.testing.assert_allclose(got, model_on(model, version, [[s["id"] for s in w["slots"]] for w in windows]), atol=2e-5)
        logs = np.log(got.astype(np.float64)).mean(axis=0)
        combined = np.exp(logs - logs.max())
        np.testing.assert_allclose(combined / combined.sum(), [p["probabilities"][k] for k in mv.labels], atol=2e-5)
        for w in windows:
            assert w["label"] == max(w["probabilities"], key=w["probabilities"].get)
    assert max(p["windows"] for p in body["predictions"]) >= 3

    g = stub.ClassifySentiment(pb.SentimentRequest(texts=TEXTS, model=model, whole_text=True, explain=True))
    for p, gp in zip(body["predictions"], g.predictions):
        assert len(gp.explanation.windows) == p["windows"]
        for w, gw_ in zip(p["explanation"]["windows"], gp.explanation.windows):
            assert [s.id for s in gw_.slots] == [s["id"] for s in w["slots"]] and gw_.label == w["label"]
            assert gw_.probabilities["positive"] == pytest.approx(w["probabilities"]["positive"], abs=1e-6)


def test_digits_explain_returns_the_pixels_the_model_got(gw, stub, data_dir):
    from PIL import Image

    from training.data import load_mnist

    imgs = load_mnist(data_dir).test.x[:3]
    body = predict(gw, "/v1/digits:predict", {"images": imgs.tolist(), "explain": True})
    plain = predict(gw, "/v1/digits:predict", {"images": imgs.tolist()})
    for im, p, q in zip(imgs, body["predictions"], plain["predictions"]):
        assert np.array_equal(np.array(p["image"]), im.astype(np.float32))
        assert {k: v for k, v in p.items() if k != "image"} == q
    assert all("image" not in q for q in plain["predictions"])

    # A drawing: black on white, large and off centre; the answer shows the MNIST-like 28x28.
    canvas = np.full((200, 200), 255, np.uint8)
    canvas[30:150, 120:135] = 0
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    png = buf.getvalue()
    body = predict(gw, "/v1/digits:predict", {"images_b64": [base64.b64encode(png).decode()], "explain": True})
    image = np.array(body["predictions"][0]["image"], dtype=np.float32)
    np.testing.assert_array_equal(image, decode_image(png, "x"))
    assert image.shape == (28, 28) and image[14, 14] > 100 and image[0, 0] == 0  # a white stroke, centred
    g = stub.ClassifyDigits(pb.DigitsRequest(images=[pb.Image(encoded=png)], explain=True))
    np.testing.assert_array_equal(np.array(g.predictions[0].image, dtype=np.float32).reshape(28, 28), image)
    assert not stub.ClassifyDigits(pb.DigitsRequest(images=[pb.Image(encoded=png)])).predictions[0].image


@pytest.mark.parametrize("path,body", [
    ("/v1/sentiment:predict", {"texts": ["good"], "explain": "yes"}),
    ("/v1/digits:predict", {"images": [[[0] * 28] * 28], "explain": 1}),
])
def test_explain_must_be_a_boolean(gw, path, body):
    r = httpx.post(gw.rest + path, json=body)
    assert r.status_code == 400 and "explain" in r.json()["error"]["message"], r.text
