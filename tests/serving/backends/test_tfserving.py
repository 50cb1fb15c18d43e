"""The TF Serving backend against the stand-in: version-pinned tokenisation, readiness, faults, lean install.

(The same REST/gRPC calls through both backends are in test_gateway.py, which
runs every test with `embedded` and with `tfserving`.)
"""

import json
import re
import shutil
import tomllib
from importlib import metadata
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tensorflow as tf
from packaging.requirements import Requirement

from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from contract.repository import read_version
from testkit.gateway import ROOT, WITHOUT_TENSORFLOW, gateway_process, wait_until
from testkit.standin import StandIn, get_model_status_pb2
from contract.text import RESERVED_TOKENS, TextPreprocessor, Vocabulary

MODELS = ROOT / "models"
ALL = ["digits", "sentiment_lstm", "sentiment_bilstm"]
LOADING = get_model_status_pb2.ModelVersionStatus.LOADING
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
TEXT = "A wonderful film, the acting was great and I loved every minute of the story."


def predict(gw, **body):
    return httpx.post(gw.rest + "/v1/sentiment:predict", json={"texts": [TEXT], **body}, timeout=30)


# -- two versions, two vocabularies ---------------------------------------------------

@pytest.fixture(scope="module")
def two_versions(tmp_path_factory) -> Path:
    """sentiment_lstm v1 (shipped) and a v2 whose vocabulary differs (same weights, other word ids).

    Same weights make the hazard plain: v2's ids mean other words, so ids made
    with v1's vocabulary would give v2 wrong answers without any error.
    """
    base = tmp_path_factory.mktemp("repo")
    (base / "sentiment_lstm").mkdir()
    (base / "sentiment_lstm" / "1").symlink_to(MODELS / "sentiment_lstm" / "1")
    v2 = base / "sentiment_lstm" / "2"
    shutil.copytree(MODELS / "sentiment_lstm" / "1", v2)
    old = TextPreprocessor.load(v2 / "assets.extra")
    words = list(old.vocab.tokens[len(RESERVED_TOKENS):])
    new = TextPreprocessor(Vocabulary(list(RESERVED_TOKENS) + words[::-1]), old.maxlen, old.stopwords)
    new.save(v2 / "assets.extra")
    return base


@pytest.fixture(scope="module")
def pinned(two_versions):
    standin = StandIn(two_versions, ["sentiment_lstm"])
    standin.start()
    try:
        with gateway_process(WITHOUT_TENSORFLOW, backend="tfserving", tfserving_address=standin.address,
                             model_base_path=two_versions, models='["sentiment_lstm"]', tfserving_poll_s=0.1,
                             models_config_file="") as gw:  # no models.config: the newest version by default
            gw.standin = standin
            yield gw
    finally:
        standin.stop()


def test_each_version_gets_ids_from_its_own_vocabulary(pinned, two_versions):
    v1, v2 = (read_version(two_versions, "sentiment_lstm", v) for v in (1, 2))
    ids1, ids2 = v1.preprocessor.encode_batch([TEXT]), v2.preprocessor.encode_batch([TEXT])
    assert not np.array_equal(ids1, ids2)
    sig = tf.saved_model.load(str(v1.path)).signatures["serving_default"]
    for asked, version, ids in [(None, 2, ids2), (2, 2, ids2), (1, 1, ids1)]:
        r = predict(pinned, model="sentiment_lstm", **({"version": asked} if asked else {}))
        assert r.status_code == 200, r.text
        assert r.json()["model"]["version"] == version
        model, sent_version, inputs = pinned.standin.calls[-1]
        assert (model, sent_version) == ("sentiment_lstm", version)
        np.testing.assert_array_equal(inputs["token_ids"], ids)
        expected = sig(token_ids=tf.constant(ids))["probabilities"].numpy()[0]
        got = r.json()["predictions"][0]["probabilities"]
        np.testing.assert_allclose([got["negative"], got["positive"]], expected, atol=1e-5)


def test_a_loading_version_gets_no_traffic_until_available(pinned, two_versions):
    standin = pinned.standin
    standin.state[("sentiment_lstm", 2)] = LOADING
    try:
        wait_until(lambda: predict(pinned).json()["model"]["version"] == 1, timeout=10)
        np.testing.assert_array_equal(standin.calls[-1][2]["token_ids"],
                                      read_version(two_versions, "sentiment_lstm", 1).preprocessor.encode_batch([TEXT]))
        r = predict(pinned, version=2)
        assert r.status_code == 503 and "version 2 is not ready (LOADING)" in r.json()["error"]["message"]
    finally:
        standin.state.clear()
    wait_until(lambda: predict(pinned).json()["model"]["version"] == 2, timeout=10)


def test_unknown_version_is_not_found(pinned):
    r = predict(pinned, version=9)
    assert r.status_code == 404 and "no version 9" in r.json()["error"]["message"]
    with grpc.insecure_channel(pinned.grpc) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.ClassifierStub(ch).ClassifySentiment(pb.SentimentRequest(texts=[TEXT], version=9))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "no version 9" in e.value.details()


# -- readiness and faults ----------------------------------------------------------------

@pytest.fixture(scope="module")
def faulty():
    standin = StandIn(MODELS, ALL)
    standin.start()
    try:
        with gateway_process(WITHOUT_TENSORFLOW, backend="tfserving", tfserving_address=standin.address,
                             tfserving_poll_s=0.1, tfserving_timeout_s=0.5, tfserving_retries=1) as gw:
            gw.standin = standin
            yield gw
    finally:
        standin.stop()


def readyz(gw):
    return httpx.get(gw.rest + "/readyz", timeout=5)


def test_ready_only_when_every_model_is_available(faulty):
    faulty.standin.state["digits"] = LOADING
    try:
        wait_until(lambda: readyz(faulty).status_code == 503, timeout=10)
        assert "digits" in readyz(faulty).json()["error"]["message"]
        assert predict(faulty).status_code == 200  # the other models still answer
    finally:
        faulty.standin.state.clear()
    wait_until(lambda: readyz(faulty).status_code == 200, timeout=10)


def test_tf_serving_down_gives_503_then_recovers_without_restart(faulty):
    standin = faulty.standin
    assert predict(faulty).status_code == 200
    standin.stop()
    try:
        r = predict(faulty)
        assert r.status_code == 503 and r.json()["error"]["code"] == "UNAVAILABLE", r.text
        with grpc.insecure_channel(faulty.grpc) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.ClassifierStub(ch).ClassifySentiment(pb.SentimentRequest(texts=[TEXT]))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        wait_until(lambda: readyz(faulty).status_code == 503, timeout=10)
        assert "TF Serving" in readyz(faulty).json()["error"]["message"]
    finally:
        standin.start()  # same port
    wait_until(lambda: readyz(faulty).status_code == 200, timeout=20)
    wait_until(lambda: predict(faulty).status_code == 200, timeout=10)
    assert faulty.process.poll() is None


def test_slow_tf_serving_gives_504_and_the_gateway_stays_up(faulty):
    faulty.standin.delay_s = 1.5  # tfserving_timeout_s=0.5
    try:
        r = predict(faulty)
        assert r.status_code == 504 and r.json()["error"]["code"] == "DEADLINE_EXCEEDED", r.text
        assert "tfserving_timeout_s=0.5" in r.json()["error"]["message"]
        with grpc.insecure_channel(faulty.grpc) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.ClassifierStub(ch).ClassifySentiment(pb.SentimentRequest(texts=[TEXT]))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        faulty.standin.delay_s = 0
    wait_until(lambda: predict(faulty).status_code == 200, timeout=10)


def test_models_listing_comes_from_tf_serving_status(faulty):
    body = httpx.get(faulty.rest + "/v1/models", timeout=5).json()
    names = {m["name"]: m for m in body["models"]}
    assert set(names) == set(ALL)
    assert all(v["state"] == "AVAILABLE" for m in names.values() for v in m["versions"])
    metrics = httpx.get(faulty.rest + "/metrics", timeout=5).text
    assert re.search(r'classifier_model_version_info\{model="sentiment_lstm",state="AVAILABLE",version="1"\} 1\.0', metrics), metrics


# -- no TensorFlow in the gateway ----------------------------------------------------------

def test_the_no_tensorflow_process_really_cannot_import_tensorflow():
    """The embedded backend needs TensorFlow: started the same way, it must report that it cannot load."""
    with gateway_process(WITHOUT_TENSORFLOW, wait_ready=False, backend="embedded") as gw:
        wait_until(lambda: "tensorflow" in readyz(gw).text.lower(), timeout=30)
        assert readyz(gw).status_code == 503


def _requires(extra: str) -> set[str]:
    """Every distribution that installing ``.[extra]`` pulls in: pyproject.toml, then installed metadata."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    seen: set[str] = set()
    todo = [(r.name, frozenset(r.extras)) for r in map(Requirement, project["dependencies"] + project["optional-dependencies"][extra])]
    while todo:
        name, ex = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen and not ex:
            continue
        seen.add(key)
        for line in metadata.distribution(name).requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in ex] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(e) for e in envs):
                todo.append((req.name, frozenset(req.extras)))
    return seen


def test_the_serve_extra_does_not_install_tensorflow():
    serve = _requires("serve")
    assert {"fastapi", "grpcio", "protobuf", "prometheus-client"} <= serve
    assert not {k for k in serve if k.startswith(("tensorflow", "keras", "tf-"))}, sorted(serve)
    # The check can fail: the embedded extra does pull TensorFlow in.
    assert "tensorflow" in _requires("embedded")


def test_a_repository_that_disagrees_with_tf_serving_is_refused(tmp_path):
    """The gateway reads another export than TF Serving serves: its signature check refuses to route to it."""
    extra = tmp_path / "sentiment_lstm" / "1" / "assets.extra"
    shutil.copytree(MODELS / "sentiment_lstm" / "1" / "assets.extra", extra)
    card = json.loads((extra / "model_card.json").read_text())
    card["signature"]["outputs"]["probabilities"]["shape"] = [-1, 3]  # e.g. a three-class export
    (extra / "model_card.json").write_text(json.dumps(card))
    standin = StandIn(MODELS, ["sentiment_lstm"])
    standin.state["sentiment_lstm"] = LOADING  # first seen while loading, as TF Serving reports a new version
    standin.start()
    try:
        with gateway_process(WITHOUT_TENSORFLOW, wait_ready=False, backend="tfserving", tfserving_address=standin.address,
                             model_base_path=tmp_path, models='["sentiment_lstm"]', tfserving_poll_s=0.2,
                             models_config_file="") as gw:  # the repository has version 1 only: no labels
            wait_until(lambda: "LOADING" in readyz(gw).text, timeout=20)
            standin.state.clear()
            wait_until(lambda: "differs from the model card" in readyz(gw).text, timeout=20)
            assert readyz(gw).status_code == 503
            r = predict(gw)
            assert r.status_code == 503 and "FAILED" in r.json()["error"]["message"], r.text
            assert not standin.calls
    finally:
        standin.stop()
