"""A new kind of model is one module and its registration (tests/serving/kinds/vector_kind.py,
which exists only in the tests): a real SavedModel of that kind, served by a real gateway in
this process on the embedded backend, answers over V2 REST and gRPC V2 exactly what the
model computes; its limits are its own (per-model settings), and bad input is a 400 naming
the rule. Nothing in serving/ knows the kind."""

from __future__ import annotations

import json

import grpc
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.gen.inference import open_inference_grpc_pb2 as v2
from serving.gen.inference import open_inference_grpc_pb2_grpc as v2_grpc
from serving.settings import Settings
from testkit.gateway import gateway_in_thread
from tests.serving.kinds import vector_kind  # noqa: F401 - registers the kind

W = np.array([[1.0, -1.0, 0.5], [2.0, 0.0, -1.0], [0.0, 3.0, 0.25]], dtype=np.float32)  # 3 features -> 3 classes
LABELS = ["low", "mid", "high"]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    import tensorflow as tf

    base = tmp_path_factory.mktemp("models")
    path = base / "toy" / "1"

    class Toy(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="features")])
        def serve(self, features):
            return {"probabilities": tf.nn.softmax(features @ tf.constant(W))}

    toy = Toy()
    tf.saved_model.save(toy, str(path), signatures={"serving_default": toy.serve})
    (path / "assets.extra").mkdir()
    (path / "assets.extra" / "model_card.json").write_text(json.dumps({
        "kind": "vector", "signature": {"name": "serving_default", "labels": LABELS,
                                        "inputs": {"features": {"dtype": "float32", "shape": [-1, 3]}},
                                        "outputs": {"probabilities": {"dtype": "float32", "shape": [-1, 3]}}}}))
    settings = Settings(_env_file=None, models=["toy"], model_base_path=base, models_config_file=None,
                        drain_settle_s=0, access_log=False,
                        model_settings={"toy": {"max_items_per_request": 4, "max_queue_items": 64}})
    with gateway_in_thread(settings) as running:
        httpx.get(running.rest + "/readyz", timeout=60)
        yield running


def rest_infer(gw, rows) -> httpx.Response:
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [len(rows), 3], "data": rows}]}
    return httpx.post(gw.rest + "/v2/models/toy/infer", json=body, timeout=30)


def test_the_new_kind_answers_what_its_model_computes_over_v2_rest_and_grpc(gw):
    x = np.array([[0.5, -1.0, 2.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    want = softmax(x @ W)
    r = rest_infer(gw, x.tolist())
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    np.testing.assert_allclose(np.array(out["probabilities"]["data"]).reshape(3, 3), want, rtol=1e-5)
    assert out["label"]["data"] == [LABELS[k] for k in want.argmax(1)]
    assert r.json()["model_name"] == "toy" and r.json()["model_version"] == "1"

    with grpc.insecure_channel(gw.grpc) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        request = v2.ModelInferRequest(model_name="toy", inputs=[v2.ModelInferRequest.InferInputTensor(
            name="features", datatype="FP32", shape=[3, 3])], raw_input_contents=[x.tobytes()])
        answer = stub.ModelInfer(request, timeout=30)
        names = [o.name for o in answer.outputs]
        probs = np.frombuffer(answer.raw_output_contents[names.index("probabilities")], dtype="<f4").reshape(3, 3)
        np.testing.assert_allclose(probs, want, rtol=1e-5)
        meta = stub.ModelMetadata(v2.ModelMetadataRequest(name="toy"), timeout=10)
        assert [(t.name, list(t.shape)) for t in meta.inputs] == [("features", [-1, 3])]


def test_the_new_kind_has_its_own_limits_and_clear_errors(gw):
    r = rest_infer(gw, [[0.0, 0.0, 0.0]] * 5)
    assert r.status_code == 413 and r.json()["error"] == "too many vectors: 5 > max_items_per_request=4"
    r = rest_infer(gw, [[0.0, 0.0]] * 2)
    assert r.status_code == 400 and "elements" in r.json()["error"]
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2], "data": [0.0, 0.0]}]}
    r = httpx.post(gw.rest + "/v2/models/toy/infer", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"] == "input 'features' has shape [1, 2]; expected [n, 3]"
    # /v1 is per kind: the toy model is not a sentiment model.
    r = httpx.post(gw.rest + "/v1/sentiment:predict", json={"texts": ["good"], "model": "toy"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"] == "model 'toy' classifies vectors, not texts"
    limits = {s.labels["model"]: s.value for f in text_string_to_metric_families(httpx.get(gw.rest + "/metrics").text)
              if f.name == "classifier_queue_limit_rows" for s in f.samples}
    assert limits == {"toy": 64.0}  # its batching settings too (max_queue_items)


def test_the_timeout_parameter_bounds_a_request_on_rest_and_grpc(gw):
    """Triton's ``parameters.timeout`` (µs): 1 µs has passed before the model is reached."""
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 3], "data": [0.0, 1.0, 2.0]}],
            "parameters": {"timeout": 1}}
    r = httpx.post(gw.rest + "/v2/models/toy/infer", json=body, timeout=30)
    assert r.status_code == 503 and "not answered within its deadline" in r.json()["error"]
    with grpc.insecure_channel(gw.grpc) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        request = v2.ModelInferRequest(model_name="toy", inputs=[v2.ModelInferRequest.InferInputTensor(
            name="features", datatype="FP32", shape=[1, 3])], raw_input_contents=[np.zeros((1, 3), "<f4").tobytes()])
        request.parameters["timeout"].int64_param = 1
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
        request.parameters["timeout"].int64_param = 30_000_000
        assert stub.ModelInfer(request, timeout=30).model_name == "toy"
