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
from testkit.gateway import ROOT, stable_version
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
