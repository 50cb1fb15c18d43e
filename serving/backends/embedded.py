"""The embedded backend: the SavedModels loaded in the gateway's own process with TensorFlow."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Sequence

import numpy as np

from serving.model_config import ModelsConfig
from contract.repository import ModelVersion, read_version, versions_on_disk
from serving.settings import Settings

log = logging.getLogger("serving.backend")
NOT_LOADED = "models not loaded yet"


class EmbeddedBackend:
    """SavedModels loaded in this process with TensorFlow: the versions models.config names
    for each model (its version policy, as TF Serving reads it), else the newest on disk;
    followed as the file changes (:meth:`sync`), without a restart."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._versions: dict[str, dict[int, ModelVersion]] = {name: {} for name in settings.models}
        self._signatures: dict[tuple[str, int], object] = {}
        # The loaded SavedModels, by version (the XLA-wrapped calls need their variables).
        self._loaded: dict[tuple[str, int], object] = {}
        self._buckets: list[int] = []
        self._reason: str | None = NOT_LOADED
        self._tf = None
        self._lock = threading.Lock()  # one sync at a time

    def versions(self) -> dict[str, dict[int, ModelVersion]]:
        return self._versions

    @property
    def buckets(self) -> list[int]:
        """The batch sizes the XLA path pads to (tf_jit_compile; known once loaded), else empty."""
        return list(self._buckets)

    def load(self, config: ModelsConfig | None = None) -> None:
        """Load and warm the versions ``config`` names (else models_config_file's)."""
        try:
            import tensorflow as tf
        except ImportError as e:
            error = f"the embedded backend needs TensorFlow (install the 'embedded' extra): {type(e).__name__}: {e}"
            self._reason = error
            raise RuntimeError(error) from e
        self._tf = tf
        try:
            if self.settings.tf_intra_op_threads:
                tf.config.threading.set_intra_op_parallelism_threads(self.settings.tf_intra_op_threads)
            if self.settings.tf_inter_op_threads:
                tf.config.threading.set_inter_op_parallelism_threads(self.settings.tf_inter_op_threads)
        except RuntimeError as e:  # TensorFlow already ran in this process: its pools are fixed
            log.warning("TensorFlow thread pools left as they are: %s", e)
        config = config or ModelsConfig(self.settings.models_config_file)
        for name in self.settings.models:  # listed (LOADING) before any is loaded
            for n in self._wanted(config, name):
                self._add(name, n, load=False)
        self.sync(config)
        self._reason = None

    def _wanted(self, config: ModelsConfig, name: str) -> list[int]:
        try:
            return config.policy(name).choose(versions_on_disk(self.settings.model_base_path, name))
        except OSError:
            return []

    def sync(self, config: ModelsConfig) -> list[ModelVersion]:
        """Serve what ``config``'s version policies choose, as TF Serving does when its config changes:
        new versions are loaded and warmed (LOADING, then AVAILABLE: only then can a request reach
        them); versions no longer chosen leave :meth:`versions` (no new request resolves to them) and
        are returned: the caller lets their queued work finish, then calls :meth:`unload`."""
        retired = []
        with self._lock:
            for name in self.settings.models:
                wanted = self._wanted(config, name)
                current = self._versions[name]
                for n in wanted:
                    if n not in current or current[n].state in ("LOADING", "FAILED"):
                        self._add(name, n)
                gone = [v for n, v in self._versions[name].items() if n not in wanted]
                if gone:
                    self._versions[name] = {n: v for n, v in self._versions[name].items() if n in wanted}
                    retired += gone
                    log.info("%s: versions %s no longer in the version policy: unloading them once their "
                             "queued work is done", name, [v.version for v in gone])
        return retired

    def _add(self, name: str, n: int, load: bool = True) -> None:
        """Read, load and warm one version; it is listed (LOADING, WARMING) while that happens."""
        try:
            v = read_version(self.settings.model_base_path, name, n)
        except (OSError, ValueError, KeyError) as e:
            log.error("%s/%s cannot be read: %s", name, n, e)
            return
        v.state = "LOADING"
        self._versions[name] = {**self._versions[name], n: v}  # a new dict: readers never see it change
        if not load:
            return
        try:
            t0 = time.perf_counter()
            loaded = self._tf.saved_model.load(str(v.path))
            self._loaded[(name, n)] = loaded
            self._signatures[(name, n)] = self._callable(self._tf, loaded.signatures["serving_default"], v)
            v.state = "WARMING"
            if self.settings.warmup:
                self._warm(v)
            v.state = "AVAILABLE"
            log.info("loaded %s/%s in %.1fs", name, n, time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - a broken model must not kill the others
            v.state, v.error = "FAILED", f"{type(e).__name__}: {e}"
            self._signatures.pop((name, n), None)
            self._loaded.pop((name, n), None)
            log.exception("loading %s/%s failed", name, n)

    def unload(self, v: ModelVersion) -> None:
        """Drop a retired version's graph and variables (its memory returns once collected)."""
        self._signatures.pop((v.name, v.version), None)
        loaded = self._loaded.pop((v.name, v.version), None)
        v.state = "END"
        del loaded
        gc.collect()
        log.info("unloaded %s/%s", v.name, v.version)

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
        """Ready once loaded, with a version of every model AVAILABLE (or loading: one added later).
        Whether each model's default version is AVAILABLE is the core's check: it knows the labels."""
        loading = self._reason == NOT_LOADED
        if self._reason and not loading:
            return False, self._reason
        for name, versions in self._versions.items():
            for v in sorted(versions.values(), key=lambda v: v.version):
                if loading and v.state != "AVAILABLE":
                    return False, f"model {name!r} version {v.version} is {v.state}"
            if loading:
                continue
            if not versions:
                return False, f"model {name!r}: no version found under {self.settings.model_base_path / name}"
            if all(v.state == "FAILED" for v in versions.values()):
                v = max(versions.values(), key=lambda v: v.version)
                return False, f"model {name!r} version {v.version} is FAILED: {v.error}"
        return (False, NOT_LOADED) if loading else (True, "all models loaded and warmed")
