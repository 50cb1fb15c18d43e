"""The three seed architectures: layer parameter counts and outputs."""

import numpy as np
import pytest

from training.models import SPECS, build

EXPECTED_PARAMS = {
    "digits": {"row_dense": 3712, "lstm": 131584, "probabilities": 1290},
    "sentiment_lstm": {"embedding": 8000, "lstm_1": 271360, "lstm_2": 525312, "probabilities": 514},
    "sentiment_bilstm": {"embedding": 8000, "bilstm": 87200, "dense_1": 205824, "dense_2": 1049600, "probabilities": 2050},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_counts(name):
    model = build(name)
    counts = {layer.name: layer.count_params() for layer in model.layers if layer.count_params()}
    assert counts == EXPECTED_PARAMS[name]
    assert model.count_params() == sum(EXPECTED_PARAMS[name].values())


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_outputs_are_probabilities(name):
    spec = SPECS[name]
    model = build(name)
    rng = np.random.default_rng(0)
    if spec.kind == "text":
        x = rng.integers(0, 1000, (5, *spec.input_shape)).astype("int32")
    else:
        x = rng.integers(0, 256, (5, *spec.input_shape)).astype("float32")
    p = np.asarray(model(x, training=False))
    assert p.shape == (5, len(spec.labels))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    assert (p >= 0).all()
