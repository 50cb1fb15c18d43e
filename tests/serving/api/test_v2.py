"""The Open Inference Protocol (V2) endpoints, REST and gRPC, on both backends: the same
answers as /v1 for every kind of input, the binary tensor extension, metadata, health,
and errors as the protocol specifies them with /v1's messages.

Real gateways (`python -m serving`, embedded and TF Serving backends, the fixture of
tests/serving/test_gateway.py); requests built here by hand from the protocol's
specification. tests/serving/api/test_v2_clients.py runs the real tritonclient and
kserve clients against it. Triton's extensions (model repository, statistics, model
configuration, ModelStreamInfer) are at the end.
"""

from __future__ import annotations

import base64
import io
import json
import struct

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from serving.gen.inference import model_config_pb2
from serving.gen.inference import open_inference_grpc_pb2 as v2
from serving.gen.inference import open_inference_grpc_pb2_grpc as v2_grpc
from contract.repository import read_version
from testkit.gateway import served_versions, stable_version
from tests.serving.test_gateway import MODELS, TEXTS

TOKEN_MODEL = "sentiment_lstm"


@pytest.fixture(scope="module")
def stub(gw):
    with grpc.insecure_channel(gw.grpc) as channel:
        yield v2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def digits(data_dir):
    with np.load(data_dir / "mnist.npz") as f:
        return f["x_test"][:6]


def v1(gw, path, body):
    r = httpx.post(gw.rest + path, json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def infer(gw, model, body, version=None, **kw):
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return httpx.post(gw.rest + path, json=body, timeout=30, **kw)


def outputs(body: dict) -> dict:
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) if o["datatype"] != "BYTES" else o["data"]
            for o in body["outputs"]}


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def unbytes(raw: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(raw):
        (n,) = struct.unpack_from("<I", raw, i)
        out.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return out


# -- REST, JSON ------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["sentiment_lstm", "sentiment_bilstm"])
def test_rest_text_input_answers_as_v1(gw, model):
    want = v1(gw, "/v1/sentiment:predict", {"texts": TEXTS, "model": model})
    r = infer(gw, model, {"id": "req-7", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == model and body["model_version"] == str(want["model"]["version"]) and body["id"] == "req-7"
    out = outputs(body)
    assert out["probabilities"].shape == (len(TEXTS), 2)
    np.testing.assert_allclose(out["probabilities"], [[p["probabilities"]["negative"], p["probabilities"]["positive"]]
                                                      for p in want["predictions"]], atol=1e-6)
    assert out["label"] == [p["label"] for p in want["predictions"]]


def test_rest_token_ids_give_the_same_answer_as_the_texts_they_encode(gw):
    mv = read_version(MODELS, TOKEN_MODEL, stable_version(TOKEN_MODEL))
    ids = mv.preprocessor.encode_batch(TEXTS)
    by_text = outputs(infer(gw, TOKEN_MODEL, {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS), 1],
                                                          "data": [[t] for t in TEXTS]}]}).json())
    r = infer(gw, TOKEN_MODEL, {"inputs": [{"name": "token_ids", "datatype": "INT32", "shape": list(ids.shape),
                                            "data": ids.tolist()}]})
    assert r.status_code == 200, r.text
    by_ids = outputs(r.json())
    np.testing.assert_allclose(by_ids["probabilities"], by_text["probabilities"], atol=1e-6)
    assert by_ids["label"] == by_text["label"]
    # INT64 ids, flat data, only the label asked for
    r = infer(gw, TOKEN_MODEL, {"inputs": [{"name": "token_ids", "datatype": "INT64", "shape": list(ids.shape),
                                            "data": ids.reshape(-1).tolist()}], "outputs": [{"name": "label"}]})
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["label"] and r.json()["outputs"][0]["data"] == by_text["label"]


def test_rest_digits_pixels_and_encoded_images_answer_as_v1(gw, digits):
    want = v1(gw, "/v1/digits:predict", {"images": digits.tolist()})
    expected = np.array([p["probabilities"] for p in want["predictions"]])
    for datatype, data in (("UINT8", digits.tolist()), ("FP32", digits.astype(np.float32).reshape(-1).tolist())):
        r = infer(gw, "digits", {"inputs": [{"name": "image", "datatype": datatype, "shape": list(digits.shape), "data": data}]})
        assert r.status_code == 200, r.text
        out = outputs(r.json())
        np.testing.assert_allclose(out["probabilities"], expected, atol=1e-6)
        assert out["label"].tolist() == [p["label"] for p in want["predictions"]]
        assert r.json()["outputs"][1]["datatype"] == "INT64"
    b64 = [base64.b64encode(png(255 - d)).decode() for d in digits]  # black on white, as photographed digits are
    want_b64 = v1(gw, "/v1/digits:predict", {"images_b64": b64})
    r = infer(gw, "digits", {"inputs": [{"name": "image_encoded", "datatype": "BYTES", "shape": [len(b64)], "data": b64}]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(outputs(r.json())["probabilities"], [p["probabilities"] for p in want_b64["predictions"]], atol=1e-6)


# -- REST, binary tensor extension --------------------------------------------------------------
def test_rest_binary_tensors_in_and_out(gw, digits):
    texts = [t.encode() for t in TEXTS]
    header = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)],
                          "parameters": {"binary_data_size": len(bytes_tensor(texts))}}],
              "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "label"}]}
    head = json.dumps(header).encode()
    r = httpx.post(gw.rest + f"/v2/models/{TOKEN_MODEL}/infer", content=head + bytes_tensor(texts), timeout=30,
                   headers={"inference-header-content-length": str(len(head)), "content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:n])
    probs_meta, label_meta = meta["outputs"]
    size = probs_meta["parameters"]["binary_data_size"]
    probs = np.frombuffer(r.content[n:n + size], dtype="<f4").reshape(probs_meta["shape"])
    assert len(r.content) == n + size and "data" not in probs_meta
    want = v1(gw, "/v1/sentiment:predict", {"texts": TEXTS, "model": TOKEN_MODEL})
    np.testing.assert_allclose(probs, [list(p["probabilities"].values()) for p in want["predictions"]], atol=1e-6)
    assert label_meta["data"] == [p["label"] for p in want["predictions"]]
    # Everything binary (request parameter), digits as raw uint8 pixels.
    header = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(digits.shape),
                          "parameters": {"binary_data_size": digits.size}}], "parameters": {"binary_data_output": True}}
    head = json.dumps(header).encode()
    r = httpx.post(gw.rest + "/v2/models/digits/versions/1/infer", content=head + digits.astype(np.uint8).tobytes(),
                   headers={"inference-header-content-length": str(len(head))}, timeout=30)
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    probs_meta, label_meta = json.loads(r.content[:n])["outputs"]
    a = n + probs_meta["parameters"]["binary_data_size"]
    labels = np.frombuffer(r.content[a:a + label_meta["parameters"]["binary_data_size"]], dtype="<i8")
    want = v1(gw, "/v1/digits:predict", {"images": digits.tolist()})
    assert labels.tolist() == [p["label"] for p in want["predictions"]]


# -- gRPC ----------------------------------------------------------------------------------------
def test_grpc_model_infer_raw_and_typed_contents_answer_as_v1(gw, stub, digits):
    want = v1(gw, "/v1/sentiment:predict", {"texts": TEXTS, "model": "sentiment_bilstm"})
    expected = [[p["probabilities"]["negative"], p["probabilities"]["positive"]] for p in want["predictions"]]
    raw = v2.ModelInferRequest(model_name="sentiment_bilstm", id="g-1")
    raw.inputs.add(name="text", datatype="BYTES", shape=[len(TEXTS)])
    raw.raw_input_contents.append(bytes_tensor([t.encode() for t in TEXTS]))
    typed = v2.ModelInferRequest(model_name="sentiment_bilstm", model_version="stable")
    typed.inputs.add(name="text", datatype="BYTES", shape=[len(TEXTS)]).contents.bytes_contents.extend(t.encode() for t in TEXTS)
    for request in (raw, typed):
        r = stub.ModelInfer(request)
        assert (r.model_name, r.model_version) == ("sentiment_bilstm", str(want["model"]["version"]))
        assert [o.name for o in r.outputs] == ["probabilities", "label"] and len(r.raw_output_contents) == 2
        np.testing.assert_allclose(np.frombuffer(r.raw_output_contents[0], "<f4").reshape(list(r.outputs[0].shape)), expected, atol=1e-6)
        assert [x.decode() for x in unbytes(r.raw_output_contents[1])] == [p["label"] for p in want["predictions"]]
    assert stub.ModelInfer(raw).id == "g-1"
    want = v1(gw, "/v1/digits:predict", {"images": digits.tolist()})
    request = v2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="image", datatype="FP32", shape=list(digits.shape)).contents.fp32_contents.extend(digits.reshape(-1).tolist())
    request.outputs.add(name="label")
    r = stub.ModelInfer(request)
    assert [o.name for o in r.outputs] == ["label"]
    assert np.frombuffer(r.raw_output_contents[0], "<i8").tolist() == [p["label"] for p in want["predictions"]]


def test_grpc_health_and_metadata(gw, stub):
    assert stub.ServerLive(v2.ServerLiveRequest()).live
    assert stub.ServerReady(v2.ServerReadyRequest()).ready
    assert stub.ModelReady(v2.ModelReadyRequest(name="digits")).ready
    assert stub.ModelReady(v2.ModelReadyRequest(name="digits", version="canary")).ready
    meta = stub.ServerMetadata(v2.ServerMetadataRequest())
    assert meta.name == "classifier-gateway" and "binary_tensor_data" in meta.extensions
    m = stub.ModelMetadata(v2.ModelMetadataRequest(name="sentiment_lstm"))
    assert [(t.name, t.datatype, list(t.shape)) for t in m.inputs] == [("text", "BYTES", [-1]), ("token_ids", "INT32", [-1, 20])]
    assert [(t.name, t.datatype, list(t.shape)) for t in m.outputs] == [("probabilities", "FP32", [-1, 2]), ("label", "BYTES", [-1])]
    assert list(m.versions) == [str(v) for v in served_versions("sentiment_lstm")]
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelMetadata(v2.ModelMetadataRequest(name="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "unknown model 'nope'" in e.value.details()


def test_rest_health_and_metadata(gw):
    assert httpx.get(gw.rest + "/v2/health/live").json() == {"live": True}
    assert httpx.get(gw.rest + "/v2/health/ready").json() == {"ready": True}
    assert httpx.get(gw.rest + "/v2/models/digits/ready").json() == {"name": "digits", "ready": True}
    assert httpx.get(gw.rest + "/v2/models/digits/versions/1/ready").status_code == 200
    server = httpx.get(gw.rest + "/v2").json()
    assert server["name"] == "classifier-gateway"
    assert server["extensions"] == ["binary_tensor_data", "model_configuration", "model_repository", "statistics"]
    m = httpx.get(gw.rest + "/v2/models/digits").json()
    assert m["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 28, 28]},
                           {"name": "image_encoded", "datatype": "BYTES", "shape": [-1]}]
    assert m["outputs"][1] == {"name": "label", "datatype": "INT64", "shape": [-1]}
    assert httpx.get(gw.rest + "/v2/models/digits/versions/stable").json()["versions"] == [str(stable_version("digits"))]
    r = httpx.get(gw.rest + "/v2/models/digits/versions/7")
    assert r.status_code == 404 and r.json() == {"error": f"model 'digits' has no version 7; loaded versions: {served_versions('digits')}"}


# -- errors: the protocol's shape, /v1's status codes and messages --------------------------------
def v1_error(gw, body):
    r = httpx.post(gw.rest + "/v1/sentiment:predict", json=body, timeout=30)
    return r.status_code, r.json()["error"]["message"]


@pytest.mark.parametrize("case", ["unknown model", "too many", "too long", "empty", "bad label"])
def test_errors_carry_v1_status_and_message_on_rest_and_grpc(gw, stub, case):
    model, texts, version = TOKEN_MODEL, ["fine"], None
    if case == "unknown model":
        model = "nope"
    elif case == "too many":
        texts = ["fine"] * 1025
    elif case == "too long":
        texts = ["x" * 20_001]
    elif case == "empty":
        texts = ["ok", "  "]
    else:
        version = "beta"
    v1_body = {"texts": texts, "model": model} | ({"version_label": version} if version else {})
    status, message = v1_error(gw, v1_body)
    if case == "unknown model":  # /v1 lists the models of its kind (the path says which), V2 all of them
        assert message == "unknown model 'nope'; text models: ['sentiment_bilstm', 'sentiment_lstm']"
        message = "unknown model 'nope'; models: ['digits', 'sentiment_bilstm', 'sentiment_lstm']"
    r = infer(gw, model, {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}, version)
    assert (r.status_code, r.json()) == (status, {"error": message})
    request = v2.ModelInferRequest(model_name=model, model_version=version or "")
    request.inputs.add(name="text", datatype="BYTES", shape=[len(texts)]).contents.bytes_contents.extend(t.encode() for t in texts)
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request)
    assert e.value.details() == message
    assert e.value.code() == {404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.INVALID_ARGUMENT,
                              400: grpc.StatusCode.INVALID_ARGUMENT}[status]


@pytest.mark.parametrize("body, message", [
    ({"inputs": [{"name": "words", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}, "takes input 'text' (BYTES) or 'token_ids'"),
    ({"inputs": [{"name": "text", "datatype": "INT32", "shape": [1], "data": [1]}]}, "input 'text' must be BYTES, not INT32"),
    ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}, "shape [2] holds 2 elements, the data has 1"),
    ({"inputs": [{"name": "token_ids", "datatype": "INT32", "shape": [1, 19], "data": [0] * 19}]}, "expected [n, 20]"),
    ({"inputs": [{"name": "token_ids", "datatype": "INT32", "shape": [1, 20], "data": [1000] + [0] * 19}]}, "token ids must be in 0..999"),
    ({"inputs": [{"name": "token_ids", "datatype": "INT32", "shape": [1, 20], "data": [1.5] + [0] * 19}]}, "INT32 data must be integers"),
    ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}], "outputs": [{"name": "logits"}]}, "has no output 'logits'"),
    ({"inputs": [{"name": "text", "datatype": "STRING", "shape": [1], "data": ["a"]}]}, "unknown datatype 'STRING'"),
    ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1], "data": ["a"]}]}, "must be a list of non-negative integers"),
    ({"inputs": []}, "inputs: expected array of length >= 1"),
    ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1]}]}, "has neither data nor parameters.binary_data_size"),
])
def test_rest_bad_tensors_are_400_naming_the_rule(gw, body, message):
    r = infer(gw, TOKEN_MODEL, body)
    assert r.status_code == 400 and message in r.json()["error"], r.text


def test_bad_binary_data_and_images_are_400(gw, stub):
    head = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 10}}]}).encode()
    r = httpx.post(gw.rest + f"/v2/models/{TOKEN_MODEL}/infer", content=head + b"\x09\x00\x00\x00abc",
                   headers={"inference-header-content-length": str(len(head))})
    assert r.status_code == 400 and "runs past the binary data" in r.json()["error"]
    r = httpx.post(gw.rest + f"/v2/models/{TOKEN_MODEL}/infer", content=head + b"\x09\x00\x00\x00abcdef",
                   headers={"inference-header-content-length": str(len(head))})
    assert r.status_code == 400 and "runs past the end of the data" in r.json()["error"]
    r = httpx.post(gw.rest + f"/v2/models/{TOKEN_MODEL}/infer", content=head, headers={"inference-header-content-length": "999"})
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]
    request = v2.ModelInferRequest(model_name=TOKEN_MODEL)
    request.inputs.add(name="text", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(bytes_tensor([b"\xff\xfe"]))
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details() == "text[0] is not valid UTF-8"
    request = v2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="image", datatype="UINT8", shape=[1, 28, 27])
    request.raw_input_contents.append(bytes(28 * 27))
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request)
    assert "input 'image' has shape [1, 28, 27]; expected [n, 28, 28]" in e.value.details()
    request = v2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="image_encoded", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"not a png")
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image_encoded[0]" in e.value.details()
    with grpc.insecure_channel(gw.grpc) as channel, pytest.raises(grpc.RpcError) as e:  # bytes that are no message
        channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\xff\xff\xff")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid inference.ModelInferRequest" in e.value.details()


def counted(gw, protocol: str, endpoint: str) -> float:
    for family in text_string_to_metric_families(httpx.get(gw.rest + "/metrics").text):
        if family.name == "classifier_requests":
            return sum(s.value for s in family.samples if s.name == "classifier_requests_total"
                       and s.labels["protocol"] == protocol and s.labels["endpoint"] == endpoint
                       and s.labels["model"] == "digits" and s.labels["outcome"] == "ok")
    return 0.0


def test_v2_infer_is_counted_in_the_metrics(gw, stub):
    before = counted(gw, "rest", "/v2/models/{name}/infer"), counted(gw, "grpc", "ModelInfer")
    infer(gw, "digits", {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}]})
    request = v2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="image", datatype="UINT8", shape=[1, 28, 28])
    request.raw_input_contents.append(bytes(784))
    stub.ModelInfer(request)
    assert (counted(gw, "rest", "/v2/models/{name}/infer"), counted(gw, "grpc", "ModelInfer")) == (before[0] + 1, before[1] + 1)


# -- Triton's extensions: repository, statistics, config; errors in the protocol's shape ---------
def test_unknown_v2_paths_methods_and_extensions_answer_in_the_protocol_shape(gw):
    r = httpx.get(gw.rest + "/v2/nope")
    assert (r.status_code, r.json()) == (404, {"error": "GET /v2/nope: Not Found"})
    r = httpx.get(gw.rest + "/v2/models/digits/infer")
    assert (r.status_code, r.json()) == (405, {"error": "GET /v2/models/digits/infer: Method Not Allowed"})
    for method, path, what in [("POST", "/v2/systemsharedmemory/region/r/register", "system shared memory"),
                               ("GET", "/v2/cudasharedmemory/status", "CUDA shared memory"),
                               ("GET", "/v2/trace/setting", "trace settings"), ("POST", "/v2/logging", "log settings")]:
        r = httpx.request(method, gw.rest + path, json={})
        assert r.status_code == 501 and r.json()["error"].startswith(f"{what} (Triton's extension) is not supported"), r.text
    r = httpx.get(gw.rest + "/v1/nope")  # the gateway's own paths keep /v1's shape
    assert r.json() == {"error": {"code": "NOT_FOUND", "message": "GET /v1/nope: Not Found"}}
    with grpc.insecure_channel(gw.grpc) as channel, pytest.raises(grpc.RpcError) as e:
        channel.unary_unary("/inference.GRPCInferenceService/SystemSharedMemoryStatus")(b"")
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert e.value.details().startswith("SystemSharedMemoryStatus is not supported by this gateway")


def expected_index() -> list[dict]:
    return [{"name": m, "version": str(v), "state": "READY"} for m in sorted(MODEL_NAMES) for v in served_versions(m)]


MODEL_NAMES = ("digits", "sentiment_bilstm", "sentiment_lstm")


def test_repository_index_load_and_unload(gw, stub):
    for body in (b"", b"{}", b'{"ready": true}'):
        r = httpx.post(gw.rest + "/v2/repository/index", content=body)
        assert (r.status_code, r.json()) == (200, expected_index())
    index = stub.RepositoryIndex(v2.RepositoryIndexRequest(ready=True))
    assert [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in index.models] == expected_index()
    # load: nothing to do for a configured, ready model; unknown ones and overrides are errors
    for name in MODEL_NAMES:
        r = httpx.post(gw.rest + f"/v2/repository/models/{name}/load", content=b"")
        assert (r.status_code, r.json()) == (200, {})
        stub.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name=name))
    r = httpx.post(gw.rest + "/v2/repository/models/nope/load", json={})
    assert r.status_code == 404 and r.json()["error"].startswith("unknown model 'nope'")
    r = httpx.post(gw.rest + "/v2/repository/models/digits/load", json={"parameters": {"config": "{}"}})
    assert r.status_code == 501 and r.json()["error"].startswith("loading model 'digits' with parameters ['config']")
    request = v2.RepositoryModelLoadRequest(model_name="digits")
    request.parameters["config"].string_param = "{}"
    with pytest.raises(grpc.RpcError) as e:
        stub.RepositoryModelLoad(request)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "is not supported" in e.value.details()
    # unload: not what this gateway does, and it says why
    served_by = "TF Serving loads their versions" if gw.standin else "their versions are chosen by models.config"
    r = httpx.post(gw.rest + "/v2/repository/models/digits/unload", json={"parameters": {"unload_dependents": False}})
    assert r.status_code == 501
    assert r.json()["error"].startswith("unloading model 'digits' is not supported") and served_by in r.json()["error"]
    with pytest.raises(grpc.RpcError) as e:
        stub.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name="digits"))
    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.UNIMPLEMENTED, r.json()["error"])
    with pytest.raises(grpc.RpcError) as e:
        stub.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        stub.RepositoryIndex(v2.RepositoryIndexRequest(repository_name="other"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "this gateway has one" in e.value.details()


def test_model_config(gw, stub):
    r = httpx.get(gw.rest + "/v2/models/sentiment_lstm/config")
    assert r.status_code == 200, r.text
    config = r.json()
    assert {k: config[k] for k in ("name", "platform", "backend", "max_batch_size")} == {
        "name": "sentiment_lstm", "platform": "tensorflow_savedmodel", "backend": "tensorflow", "max_batch_size": 1024}
    assert config["input"] == [{"name": "text", "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}},
                               {"name": "token_ids", "data_type": "TYPE_INT32", "dims": [20]}]
    assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [2]},
                                {"name": "label", "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}}]
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 2000}
    got = stub.ModelConfig(v2.ModelConfigRequest(name="sentiment_lstm")).config
    assert (got.name, got.platform, got.max_batch_size) == ("sentiment_lstm", "tensorflow_savedmodel", 1024)
    assert [(t.name, list(t.dims)) for t in got.input] == [("text", [1]), ("token_ids", [20])]
    assert got.output[1].data_type == got.input[0].data_type == model_config_pb2.TYPE_STRING and got.input[0].HasField("reshape")
    digits = httpx.get(gw.rest + "/v2/models/digits/versions/stable/config").json()
    assert digits["input"][0] == {"name": "image", "data_type": "TYPE_UINT8", "dims": [28, 28]}
    assert digits["output"][1] == {"name": "label", "data_type": "TYPE_INT64", "dims": [1], "reshape": {"shape": []}}
    r = httpx.get(gw.rest + "/v2/models/digits/versions/9/config")
    assert r.status_code == 404 and r.json()["error"].startswith("model 'digits' has no version 9")
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelConfig(v2.ModelConfigRequest(name="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def rest_stats(gw, path: str) -> dict:
    r = httpx.get(gw.rest + path)
    assert r.status_code == 200, r.text
    return r.json()


def test_statistics_count_every_protocol_per_version(gw, stub):
    model, version = TOKEN_MODEL, stable_version(TOKEN_MODEL)
    path = f"/v2/models/{model}/versions/{version}/stats"
    (before,) = rest_stats(gw, path)["model_stats"]
    t0 = __import__("time").time()
    texts = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": TEXTS[:3]}]}
    assert infer(gw, model, texts, str(version)).status_code == 200  # V2 REST: 3 items
    request = v2.ModelInferRequest(model_name=model, model_version=str(version))
    request.inputs.add(name="text", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"fine", b"awful"])
    stub.ModelInfer(request)  # V2 gRPC: 2 items
    v1(gw, "/v1/sentiment:predict", {"texts": ["ok"], "model": model, "version": version})  # /v1: 1 item
    too_long = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x" * 20_001]}]}
    assert infer(gw, model, too_long, str(version)).status_code == 413  # failed once its version was chosen
    assert infer(gw, "nope", texts).status_code == 404  # no model, no version: counted nowhere
    (after,) = rest_stats(gw, path)["model_stats"]
    assert (after["name"], after["version"]) == (model, str(version))
    assert after["inference_count"] - before["inference_count"] == 6
    assert after["execution_count"] - before["execution_count"] >= 3
    assert after["last_inference"] >= int(t0 * 1000)
    b, a = before["inference_stats"], after["inference_stats"]
    for name in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert a[name]["count"] - b[name]["count"] == 3, name
        assert a[name]["ns"] > b[name]["ns"], name
    assert a["fail"]["count"] - b["fail"]["count"] == 1 and a["fail"]["ns"] > b["fail"]["ns"]
    # the parts of a request take no longer than the whole
    parts = sum(a[k]["ns"] - b[k]["ns"] for k in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert parts <= a["success"]["ns"] - b["success"]["ns"]
    sizes = {s["batch_size"]: s["compute_infer"]["count"] for s in after["batch_stats"]}
    assert sum(sizes.values()) == after["execution_count"]
    # the same from gRPC, the version label's, the model's and every model's
    got = json_format.MessageToDict(stub.ModelStatistics(v2.ModelStatisticsRequest(name=model, version=str(version))),
                                    preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    assert int(got["model_stats"][0]["inference_count"]) == after["inference_count"]
    assert int(got["model_stats"][0]["inference_stats"]["success"]["ns"]) == a["success"]["ns"]
    assert rest_stats(gw, f"/v2/models/{model}/versions/stable/stats")["model_stats"][0]["version"] == str(stable_version(model))
    assert [s["version"] for s in rest_stats(gw, f"/v2/models/{model}/stats")["model_stats"]] == [
        str(v) for v in served_versions(model)]
    assert [(s["name"], s["version"]) for s in rest_stats(gw, "/v2/models/stats")["model_stats"]] == [
        (e["name"], e["version"]) for e in expected_index()]
    assert len(stub.ModelStatistics(v2.ModelStatisticsRequest()).model_stats) == len(expected_index())
    r = httpx.get(gw.rest + f"/v2/models/{model}/versions/99/stats")
    assert r.status_code == 404 and r.json()["error"].startswith(f"model '{model}' has no version 99")
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelStatistics(v2.ModelStatisticsRequest(name="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_timeout_parameter_shortens_the_deadline_on_rest_and_grpc(gw, stub):
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["fine"]}], "parameters": {"timeout": 1}}
    r = infer(gw, TOKEN_MODEL, body)
    assert r.status_code == 503 and "not answered within its deadline" in r.json()["error"], r.text
    request = v2.ModelInferRequest(model_name=TOKEN_MODEL)
    request.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"fine")
    request.parameters["timeout"].int64_param = 1
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "not answered within its deadline" in e.value.details()
    request.parameters["timeout"].int64_param = 30_000_000  # 30 s: answered
    assert stub.ModelInfer(request).model_name == TOKEN_MODEL


def test_grpc_health_knows_the_v2_service(gw):
    with grpc.insecure_channel(gw.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "classifier.v1.Classifier", "inference.GRPCInferenceService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_model_stream_infer_answers_each_request_in_order(gw, stub):
    def request(model: str, text: str) -> v2.ModelInferRequest:
        m = v2.ModelInferRequest(model_name=model, id=text)
        m.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(text.encode())
        return m

    responses = list(stub.ModelStreamInfer(iter([request(TOKEN_MODEL, TEXTS[0]), request("nope", "x"),
                                                 request(TOKEN_MODEL, TEXTS[1])])))
    assert [r.error_message for r in responses] == ["", "unknown model 'nope'; models: " + str(list(MODEL_NAMES)), ""]
    want = v1(gw, "/v1/sentiment:predict", {"texts": TEXTS[:2], "model": TOKEN_MODEL})["predictions"]
    for r, p in zip((responses[0], responses[2]), want):
        assert r.infer_response.id in TEXTS and [x.decode() for x in unbytes(r.infer_response.raw_output_contents[1])] == [p["label"]]


@pytest.mark.parametrize("method", ["ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
                                    "RepositoryModelUnload"])
def test_grpc_extensions_refuse_undecodable_messages(gw, method):
    with grpc.insecure_channel(gw.grpc) as channel, pytest.raises(grpc.RpcError) as e:
        channel.unary_unary(f"/inference.GRPCInferenceService/{method}")(b"\xff\xff\xff")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "is not a valid inference." in e.value.details()


def test_grpc_model_stream_infer_answers_an_undecodable_message_and_goes_on(gw):
    good = v2.ModelInferRequest(model_name=TOKEN_MODEL)
    good.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"fine")
    with grpc.insecure_channel(gw.grpc) as channel:
        call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                     response_deserializer=v2.ModelStreamInferResponse.FromString)
        first, second = list(call(iter([b"\xff\xff\xff", good.SerializeToString()])))
    assert first.error_message.startswith("request is not a valid inference.ModelInferRequest message")
    assert not second.error_message and second.infer_response.model_name == TOKEN_MODEL
