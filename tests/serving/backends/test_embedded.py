"""The embedded backend's optional XLA path (tf_jit_compile) against the plain signature call."""

import numpy as np
import tensorflow as tf

from serving.backends.embedded import EmbeddedBackend
from serving.settings import Settings
from testkit.gateway import ROOT


def test_xla_path_pads_to_buckets_and_answers_as_the_signature_does():
    s = Settings(_env_file=None, models=["sentiment_lstm", "digits"], model_base_path=ROOT / "models",
                 tf_jit_compile=True, max_batch_size=16,
                 tf_intra_op_threads=0)  # TensorFlow already runs in this process
    backend = EmbeddedBackend(s)
    backend.load()
    assert backend.status() == (True, "all models loaded and warmed")
    assert backend.buckets == [1, 2, 4, 8, 16]
    rng = np.random.default_rng(0)
    for name, versions in backend.versions().items():
        for v in versions.values():
            sig = tf.saved_model.load(str(v.path)).signatures["serving_default"]
            for n in (1, 3, 5, 16):  # exact buckets and padded sizes
                if v.kind == "text":
                    x = rng.integers(0, len(v.preprocessor.vocab), (n, 20)).astype(np.int32)
                else:
                    x = rng.integers(0, 256, (n, 28, 28)).astype(np.float32)
                got = backend.predict(name, v.version, x)
                want = sig(**{v.input_name: tf.constant(x)})["probabilities"].numpy()
                assert got.shape == want.shape
                np.testing.assert_allclose(got, want, atol=1e-5)
                assert (got.argmax(1) == want.argmax(1)).all()
