"""The real Open Inference Protocol clients against a real gateway: tritonclient (http and
grpc) and the kserve SDK's V2 clients (REST and gRPC) get the same answers as /v1.

They pin protobuf < 7 and the gateway's code is generated for 7, so, as the outside
clients they are, they run from a virtual environment of their own
(.pytest_cache/v2clients-venv, made once; tests/venvs.py) with the script
tests/serving/api/v2_clients.py, which imports nothing from this project.
"""

from __future__ import annotations

import base64
import json
import subprocess

import httpx
import numpy as np
import pytest

from contract.repository import read_version
from testkit.gateway import ROOT, served_versions, stable_version
from tests.serving.api.test_v2 import png
from tests.serving.test_gateway import MODELS, TEXTS
from tests.venvs import tool_venv

CLIENTS = ["tritonclient[http,grpc]==2.73.0", "kserve==0.21.0"]
SCRIPT = ROOT / "tests" / "serving" / "api" / "v2_clients.py"
CASES = ["sentiment_lstm text", "sentiment_bilstm text", "sentiment_lstm token_ids", "digits image UINT8",
         "digits image FP32", "digits image_encoded"]

pytestmark = pytest.mark.slow  # the clients' own virtual environment (tool_venv), made on first run


@pytest.fixture(scope="module")
def results(data_dir, tmp_path_factory, shared_gateways):
    python = tool_venv("v2clients", CLIENTS)
    with np.load(data_dir / "mnist.npz") as f:
        digits = f["x_test"][:5]
    mv = read_version(MODELS, "sentiment_lstm", stable_version("sentiment_lstm"))
    data = {"texts": TEXTS, "token_ids": mv.preprocessor.encode_batch(TEXTS).tolist(), "digits": digits.tolist(),
            "pngs_b64": [base64.b64encode(png(255 - d)).decode() for d in digits]}
    path = tmp_path_factory.mktemp("v2clients") / "input.json"
    path.write_text(json.dumps(data))
    got = {}
    gw = shared_gateways.get("embedded")  # the default gateway (tests/serving/conftest.py): only read here
    for which in ("tritonclient", "kserve"):
        r = subprocess.run([str(python), str(SCRIPT), which, str(path), gw.rest, gw.grpc], capture_output=True,
                           text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-4000:]
        got |= json.loads(r.stdout)

    def v1(path, body):
        return httpx.post(gw.rest + path, json=body, timeout=30).json()

    expected = {
        "sentiment_lstm text": v1("/v1/sentiment:predict", {"texts": TEXTS, "model": "sentiment_lstm"}),
        "sentiment_bilstm text": v1("/v1/sentiment:predict", {"texts": TEXTS, "model": "sentiment_bilstm"}),
        "digits image UINT8": v1("/v1/digits:predict", {"images": digits.tolist()}),
        "digits image_encoded": v1("/v1/digits:predict", {"images_b64": data["pngs_b64"]}),
    }
    expected["sentiment_lstm token_ids"] = expected["sentiment_lstm text"]
    expected["digits image FP32"] = expected["digits image UINT8"]
    v1_errors = {
        "unknown model": httpx.post(gw.rest + "/v1/sentiment:predict", json={"texts": ["fine"], "model": "nope"}).json(),
        "too long": httpx.post(gw.rest + "/v1/sentiment:predict", json={"texts": ["x" * 20_001]}).json(),
    }
    return got, expected, v1_errors


@pytest.mark.parametrize("client", ["tritonclient.http", "tritonclient.grpc", "kserve.rest", "kserve.grpc"])
def test_client_gets_the_v1_answers(results, client):
    got, expected, _ = results
    for case in CASES:
        want = expected[case]
        probs = [list(p["probabilities"].values()) if isinstance(p["probabilities"], dict) else p["probabilities"]
                 for p in want["predictions"]]
        np.testing.assert_allclose(got[client][case]["probabilities"], probs, atol=1e-6, err_msg=f"{client}: {case}")
        assert got[client][case]["label"] == [p["label"] for p in want["predictions"]], f"{client}: {case}"
        # kserve's REST client drops model_version when it parses a response (InferResponse.from_bytes, 0.21.0)
        if client != "kserve.rest":
            assert got[client][case]["model_version"] == str(want["model"]["version"])
    assert got[client]["health"]["live"] and got[client]["health"]["ready"] and got[client]["health"]["model_ready"]
    if client.startswith("tritonclient"):
        assert got[client]["health"]["metadata_inputs"] == ["text", "token_ids"]
    if client.startswith("kserve"):
        assert {got[client][case]["id"] for case in CASES} == {f"kserve-{client.split('.')[1]}"}


def test_clients_see_the_protocol_errors_with_v1_messages(results):
    got, _, v1_errors = results
    http_errors = got["tritonclient.http"]["errors"]
    assert http_errors["unknown model"]["status"] == "404"
    assert http_errors["unknown model"]["message"].startswith("unknown model 'nope'")
    assert http_errors["version label"]["status"] == "404"
    assert "has no version label 'beta'" in http_errors["version label"]["message"]
    too_long = got["tritonclient.grpc"]["errors"]["too long"]
    assert too_long["status"] == "StatusCode.INVALID_ARGUMENT"
    assert too_long["message"] == v1_errors["too long"]["error"]["message"]


MODELS_SERVED = ("digits", "sentiment_bilstm", "sentiment_lstm")
UNSUPPORTED = {"get_trace_settings": "trace settings", "update_trace_settings": "trace settings",
               "get_log_settings": "log settings", "update_log_settings": "log settings",
               "get_system_shared_memory_status": "system shared memory", "register_system_shared_memory":
               "system shared memory", "unregister_system_shared_memory": "system shared memory",
               "get_cuda_shared_memory_status": "CUDA shared memory", "register_cuda_shared_memory": "CUDA shared memory",
               "unregister_cuda_shared_memory": "CUDA shared memory"}


@pytest.mark.parametrize("client", ["tritonclient.http", "tritonclient.grpc"])
def test_tritonclient_every_method_gets_an_answer_or_a_printable_protocol_error(results, client):
    got = results[0][client]["methods"]
    http = client.endswith("http")
    status = (lambda code, name: str(code)) if http else (lambda code, name: f"StatusCode.{name}")
    for call, outcome in got.items():
        if isinstance(outcome, dict) and "error" in outcome:  # tritonclient could print it
            e = outcome["error"]
            assert isinstance(e["message"], str) and e["str"] == f"[{e['status']}] {e['message']}", (call, e)
    ok = {call: outcome["ok"] for call, outcome in got.items() if isinstance(outcome, dict) and "ok" in outcome}
    errors = {call: outcome["error"] for call, outcome in got.items() if isinstance(outcome, dict) and "error" in outcome}
    assert set(ok) == {"get_server_metadata", "get_model_metadata", "get_model_config", "get_model_repository_index",
                       "load_model", "get_inference_statistics", "get_inference_statistics all", "async_infer",
                       *(["is_model_ready nope"] if http else [])}, errors
    assert "statistics" in ok["get_server_metadata"]["extensions"]
    assert ok["get_model_metadata"]["versions"] == [str(stable_version("digits"))]
    if http:  # the client reads 404 as not ready; over gRPC, NOT_FOUND naming the models
        assert ok["is_model_ready nope"] is False
    else:
        assert errors["is_model_ready nope"]["status"] == "StatusCode.NOT_FOUND"
    config = ok["get_model_config"] if http else ok["get_model_config"]["config"]
    assert (config["name"], config["platform"], config["max_batch_size"]) == ("digits", "tensorflow_savedmodel", 1024)
    assert [(t["name"], t["data_type"]) for t in config["input"]] == [("image", "TYPE_UINT8"), ("image_encoded", "TYPE_STRING")]
    index = ok["get_model_repository_index"] if http else ok["get_model_repository_index"]["models"]
    assert index == [{"name": m, "version": str(v), "state": "READY"} for m in MODELS_SERVED for v in served_versions(m)]
    stats = ok["get_inference_statistics"]["model_stats"]
    assert [s["version"] for s in stats] == [str(v) for v in served_versions("digits")]
    # the digits cases above were answered (3 per client): counted, with their times
    assert sum(int(s["inference_stats"]["success"].get("count", 0)) for s in stats) >= 3
    assert all(int(s["inference_stats"]["compute_infer"].get("ns", 0)) > 0 for s in stats if int(s.get("inference_count", 0)))
    assert len(ok["get_inference_statistics all"]["model_stats"]) == sum(len(served_versions(m)) for m in MODELS_SERVED)
    assert ok["async_infer"] in (["positive"], ["negative"])
    for call in ("get_model_config nope", "load_model nope", "get_inference_statistics nope"):
        assert errors[call]["status"] == status(404, "NOT_FOUND") and errors[call]["message"].startswith("unknown model 'nope'")
    assert errors["load_model config"]["status"] == status(501, "UNIMPLEMENTED")
    assert errors["unload_model"]["status"] == status(501, "UNIMPLEMENTED")
    assert errors["unload_model"]["message"].startswith("unloading model 'digits' is not supported")
    for call, what in UNSUPPORTED.items():
        assert errors[call]["status"] == status(501, "UNIMPLEMENTED"), call
        assert "is not supported by this gateway" in errors[call]["message"], call
        if http:
            assert errors[call]["message"].startswith(what), call
    assert errors["infer timeout"]["status"] == status(503, "DEADLINE_EXCEEDED")
    assert "not answered within its deadline" in errors["infer timeout"]["message"]
    if not http:
        first, error, last = got["stream"]
        assert first == last and first in (["positive"], ["negative"])
        assert error == "unknown model 'nope'; models: ['digits', 'sentiment_bilstm', 'sentiment_lstm']"
