"""A tiny real training run on a slice of the real data, exported and reloaded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from contract.layout import next_version
from training.export import VersionExistsError, export_model
from training.models import SPECS
from contract.text import TextPreprocessor
from training.train import fit, prepare

CARD = {"test_accuracy": 0.5, "note": "tiny test run"}
MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="module", params=["sentiment_lstm", "digits"])
def exported(request, tmp_path_factory, data_dir):
    name = request.param
    out = tmp_path_factory.mktemp("models")
    prep = prepare(name, data_dir, val_fraction=0.2, seed=3, limit=600)
    model, _, _ = fit(name, prep, epochs=1, batch_size=64, verbose=0)
    path = export_model(model, name, out, CARD, prep.x_test[:32], prep.preprocessor)
    return name, out, path, model, prep


def test_layout_is_tf_serving_s(exported):
    name, out, path, _, _ = exported
    assert path == out / name / "1"
    assert (path / "saved_model.pb").exists() and (path / "variables").is_dir()
    extra = sorted(p.name for p in (path / "assets.extra").iterdir())
    text_files = ["preprocessing.json", "vocab.txt"] if SPECS[name].kind == "text" else []
    assert extra == sorted(["model_card.json", "tf_serving_warmup_requests", *text_files])
    assert [p.name for p in (out / name).iterdir()] == ["1"]  # no temporary folder left


def test_signature_names_dtypes_and_shapes(exported):
    name, _, path, _, _ = exported
    spec = SPECS[name]
    sig = tf.saved_model.load(str(path)).signatures["serving_default"]
    _, inputs = sig.structured_input_signature
    assert list(inputs) == [spec.input_name]
    assert inputs[spec.input_name].dtype == tf.as_dtype(spec.input_dtype)
    assert inputs[spec.input_name].shape.as_list() == [None, *spec.input_shape]
    out = sig.structured_outputs
    assert list(out) == ["probabilities"]
    assert out["probabilities"].dtype == tf.float32
    assert out["probabilities"].shape.as_list() == [None, len(spec.labels)]


def test_reloaded_model_predicts_like_the_in_memory_model(exported):
    name, _, path, model, prep = exported
    spec = SPECS[name]
    sig = tf.saved_model.load(str(path)).signatures["serving_default"]
    x = prep.x_test[:100]
    got = sig(**{spec.input_name: tf.constant(x)})["probabilities"].numpy()
    np.testing.assert_allclose(got, model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_vocabulary_round_trips_through_the_export(exported):
    name, _, path, _, prep = exported
    if SPECS[name].kind != "text":
        assert not (path / "assets.extra" / "vocab.txt").exists()
        return
    loaded = TextPreprocessor.load(path / "assets.extra")
    assert loaded.vocab == prep.preprocessor.vocab
    assert loaded.config() == prep.preprocessor.config()
    card = json.loads((path / "assets.extra" / "model_card.json").read_text())
    assert card["signature"]["inputs"] == {"token_ids": {"dtype": "int32", "shape": [-1, 20]}}


def test_warmup_records_are_prediction_logs_the_model_accepts(exported):
    from tensorflow_serving.apis import prediction_log_pb2

    name, _, path, _, _ = exported
    spec = SPECS[name]
    sig = tf.saved_model.load(str(path)).signatures["serving_default"]
    sizes = []
    for raw in tf.data.TFRecordDataset(str(path / "assets.extra" / "tf_serving_warmup_requests")):
        log = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        req = log.predict_log.request
        assert req.model_spec.name == name and req.model_spec.signature_name == "serving_default"
        x = tf.make_ndarray(req.inputs[spec.input_name])
        sizes.append(len(x))
        assert sig(**{spec.input_name: tf.constant(x)})["probabilities"].shape[0] == len(x)
    assert sizes == [1, 8, 32]


def test_export_refuses_to_overwrite_and_versions_grow(exported):
    name, out, path, model, prep = exported
    before = (path / "saved_model.pb").read_bytes()
    with pytest.raises(VersionExistsError, match="already exists"):
        export_model(model, name, out, CARD, prep.x_test[:4], prep.preprocessor, version=1)
    assert (path / "saved_model.pb").read_bytes() == before
    assert next_version(out / name) == 2
    second = export_model(model, name, out, CARD, prep.x_test[:4], prep.preprocessor)
    assert second.name == "2"
    card = json.loads((second / "assets.extra" / "model_card.json").read_text())
    assert (card["model"], card["version"], card["note"]) == (name, 2, "tiny test run")


def test_training_cli_end_to_end(tmp_path, data_dir):
    env = {**os.environ, "CLASSIFIER_DATA_DIR": str(data_dir)}
    cmd = [sys.executable, "-m", "training", "sentiment_bilstm", "--epochs", "1", "--limit", "300", "--quiet"]
    # --version 1 where version 1 exists (the shipped export, linked into a repository of its own) is
    # refused with a clear message. That run goes alongside the first one: each trains for seconds first.
    taken = tmp_path / "taken"
    (taken / "sentiment_bilstm").mkdir(parents=True)
    (taken / "sentiment_bilstm" / "1").symlink_to(MODELS / "sentiment_bilstm" / "1")
    refused_log = tmp_path / "refused.stderr"
    with open(refused_log, "w") as log:
        refused = subprocess.Popen([*cmd, "--out", str(taken), "--version", "1"], stdout=subprocess.DEVNULL,
                                   stderr=log, env=env)
    try:
        out = tmp_path / "out"
        r = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, env=env, check=True)
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        assert summary["path"] == str(out / "sentiment_bilstm" / "1")
        card = json.loads((out / "sentiment_bilstm" / "1" / "assets.extra" / "model_card.json").read_text())
        for key in ("test_accuracy", "validation_accuracy", "epochs", "training_seconds", "data_files_sha256",
                    "vocab_sha256", "parameters", "tensorflow_version", "keras_version", "git_commit"):
            assert key in card, key
        assert card["parameters"] == 1352674 and card["epochs"] == 1
        assert card["vocab_sha256"] == TextPreprocessor.load(out / "sentiment_bilstm" / "1" / "assets.extra").vocab.sha256()
        refused.wait(timeout=600)
    finally:
        if refused.poll() is None:
            refused.kill()
            refused.wait()
    refused_stderr = refused_log.read_text()
    assert refused.returncode == 2 and "already exists" in refused_stderr and "Traceback" not in refused_stderr
    assert [p.name for p in (taken / "sentiment_bilstm").iterdir()] == ["1"]  # nothing written beside it
