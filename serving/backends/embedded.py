"""The embedded backend: the SavedModels loaded in the gateway's own process with TensorFlow."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from serving.model_config import ModelsConfig
from contract.repository import ModelVersion, read_version, versions_on_disk
from serving.settings import Settings

log = logging.getLogger("serving.backend")


class EmbeddedBackend:
    """SavedModels loaded in this process with TensorFlow: the versions models.config names
    for each model (its version policy, as TF Serving reads it), else the newest on disk."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._versions: dict[str, dict[int, ModelVersion]] = {}
        self._signatures: dict[tuple[str, int], object] = {}
        self._loaded: list[object] = []  # the loaded SavedModels (the XLA-wrapped calls need their variables)
        self._buckets: list[int] = []
        self._reason = "models not loaded yet"
        self._tf = None
        config = ModelsConfig(settings.models_config_file)
        for name in settings.models:
            chosen = config.policy(name).choose(versions_on_disk(settings.model_base_path, name))
            self._versions[name] = {n: read_version(settings.model_base_path, name, n) for n in chosen}

    def versions(self) -> dict[str, dict[int, ModelVersion]]:
        return self._versions

    @property
    def buckets(self) -> list[int]:
        """The batch sizes the XLA path pads to (tf_jit_compile; known once loaded), else empty."""
        return list(self._buckets)

    def load(self) -> None:
        try:
            import tensorflow as tf
        except ImportError as e:
            error = f"the embedded backend needs TensorFlow (install the 'embedded' extra): {type(e).__name__}: {e}"
            for versions in self._versions.values():
                for v in versions.values():
                    v.state, v.error = "FAILED", error
            raise RuntimeError(error) from e
        self._tf = tf
        try:
            if self.settings.tf_intra_op_threads:
                tf.config.threading.set_intra_op_parallelism_threads(self.settings.tf_intra_op_threads)
            if self.settings.tf_inter_op_threads:
                tf.config.threading.set_inter_op_parallelism_threads(self.settings.tf_inter_op_threads)
        except RuntimeError as e:  # TensorFlow already ran in this process: its pools are fixed
            log.warning("TensorFlow thread pools left as they are: %s", e)
        for name, versions in self._versions.items():
            if not versions:
                self._reason = f"no version of model {name!r} under {self.settings.model_base_path / name}"
                log.error(self._reason)
                continue
            for v in versions.values():
                try:
                    t0 = time.perf_counter()
                    loaded = tf.saved_model.load(str(v.path))
                    self._loaded.append(loaded)
                    self._signatures[(name, v.version)] = self._callable(tf, loaded.signatures["serving_default"], v)
                    v.state = "WARMING"
                    if self.settings.warmup:
                        self._warm(v)
                    v.state = "AVAILABLE"
                    log.info("loaded %s/%s in %.1fs", name, v.version, time.perf_counter() - t0)
                except Exception as e:  # noqa: BLE001 - a broken model must not kill the others
                    v.state, v.error = "FAILED", f"{type(e).__name__}: {e}"
                    log.exception("loading %s/%s failed", name, v.version)

    def _callable(self, tf, sig, v: ModelVersion):
        """batch (a tf.Tensor) -> probabilities: the signature, or (tf_jit_compile) the signature
        through XLA, called on batches padded to the next of ``self._buckets`` (powers of two up to
        the largest max_batch_size of any model)."""
        name = v.input_name
        if not self.settings.tf_jit_compile:
            return lambda x: sig(**{name: x})["probabilities"]
        m = max(self.settings.batching(n).max_batch_size for n in self.settings.models)
        self._buckets = sorted({min(2**k, m) for k in range(m.bit_length() + 1)})
        return tf.function(lambda x: sig(**{name: x})["probabilities"], jit_compile=True)

    def _warm(self, v: ModelVersion) -> None:
        """Run the model once at every batch size the batcher may send first (with XLA: every
        padded size, so no request waits for a compilation)."""
        spec = v.signature["inputs"][v.input_name]
        top = self.settings.batching(v.name).max_batch_size  # the model's own (model_settings)
        if self._buckets:
            sizes = [b for b in self._buckets if b < top] + [next(b for b in self._buckets if b >= top)]
        else:
            sizes = sorted({1, 8, 32, top})
        for n in sizes:
            self.predict(v.name, v.version, np.zeros((n, *spec["shape"][1:]), dtype=spec["dtype"]))

    def predict(self, model: str, version: int, batch: np.ndarray, request_ids: Sequence[str] = ()) -> np.ndarray:
        fn = self._signatures[(model, version)]
        n = len(batch)
        if self._buckets and n not in self._buckets and n < self._buckets[-1]:
            size = next(b for b in self._buckets if b > n)
            batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), dtype=batch.dtype)])
        return fn(self._tf.constant(batch)).numpy()[:n]

    def close(self) -> None:
        pass

    def status(self) -> tuple[bool, str]:
        for name, versions in self._versions.items():
            if not versions:
                return False, f"model {name!r}: no version found under {self.settings.model_base_path / name}"
            for v in versions.values():
                if v.state != "AVAILABLE":
                    return False, f"model {name!r} version {v.version} is {v.state}" + (f": {v.error}" if v.error else "")
        return True, "all models loaded and warmed"
