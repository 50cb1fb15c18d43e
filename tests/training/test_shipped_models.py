"""The trained versions committed under models/: complete, hostable, as good as their cards say."""

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from training.data import load_mnist
from training.evaluate import load_version, predict
from contract.layout import existing_versions
from training.models import SPECS

MODELS = Path(__file__).resolve().parents[2] / "models"
TARGETS = {"digits": 0.988, "sentiment_lstm": 0.75, "sentiment_bilstm": 0.75}


def latest(name: str) -> Path:
    versions = existing_versions(MODELS / name)
    assert versions, f"no exported version of {name} under {MODELS}"
    return MODELS / name / str(versions[-1])


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_shipped_version_is_complete_and_meets_its_target(name):
    path = latest(name)
    card = json.loads((path / "assets.extra" / "model_card.json").read_text())
    assert card["model"] == name and card["version"] == int(path.name)
    assert card["test_accuracy"] >= TARGETS[name]
    assert card["test_examples"] in (10000, 25000)  # the full test split
    assert card["git_commit"] != "unknown"
    assert (path / "assets.extra" / "tf_serving_warmup_requests").stat().st_size > 0
    sig = tf.saved_model.load(str(path)).signatures["serving_default"]
    spec = SPECS[name]
    assert list(sig.structured_input_signature[1]) == [spec.input_name]
    assert list(sig.structured_outputs) == ["probabilities"]


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_shipped_version_reproduces_its_card_accuracy_on_a_test_slice(name, data_dir, imdb):
    """Model, vocabulary and the shared preprocessor agree: accuracy on 3,000 test
    examples, computed here through the serving signature, is close to the card's."""
    path = latest(name)
    sig, card, prep = load_version(path)
    spec = SPECS[name]
    if spec.kind == "text":
        assert prep is not None and prep.vocab.sha256() == card["vocab_sha256"]
        x, y = prep.encode_batch(imdb.test.x[:3000]), imdb.test.y[:3000]
    else:
        ds = load_mnist(data_dir)
        x, y = ds.test.x[:3000].astype(np.float32), ds.test.y[:3000]
    acc = float(np.mean(predict(sig, spec.input_name, x).argmax(1) == y))
    assert abs(acc - card["test_accuracy"]) < 0.03, (acc, card["test_accuracy"])
