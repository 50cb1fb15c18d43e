"""The serving signature, called from Python as TF Serving calls it: ``serving_default``,
one named input, output ``probabilities`` [n, classes]. Training measures its figures
through it and evaluation loads versions with it. TensorFlow is imported only when a
signature is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

SIGNATURE = "serving_default"
OUTPUT = "probabilities"

Predict = Callable[[np.ndarray], np.ndarray]


def load_signature(path: str | Path):
    import tensorflow as tf

    return tf.saved_model.load(str(path)).signatures[SIGNATURE]


def call(sig, input_name: str, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    """The signature's probabilities for ``x``, in batches of ``batch`` rows."""
    import tensorflow as tf

    parts = [sig(**{input_name: tf.constant(x[i : i + batch])})[OUTPUT].numpy() for i in range(0, len(x), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def signature_predict(path: str | Path, input_name: str, batch: int = 2048) -> Predict:
    """A predict function over the SavedModel's serving signature."""
    sig = load_signature(path)
    return lambda x: call(sig, input_name, x, batch)
