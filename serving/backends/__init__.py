"""Backends: where the probabilities come from, behind one small interface.

``predict(model, version, batch) -> probabilities`` is blocking and is called
from a worker thread by the batcher, never on the event loop.

- :mod:`serving.backends.embedded`: the SavedModels in this process (TensorFlow).
- :mod:`serving.backends.tfserving`: TF Serving's PredictionService over gRPC (no TensorFlow needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from contract.repository import ModelVersion
from serving.model_config import ModelsConfig
from serving.settings import Settings


class Backend(Protocol):
    def load(self, config: ModelsConfig | None = None) -> None:
        """Load and warm every configured model (blocking; run in a thread)."""

    def sync(self, config: ModelsConfig) -> list[ModelVersion]:
        """models.config changed: serve what its version policies choose now (blocking). Returns the
        versions taken out of :meth:`versions`; the core lets their queued work finish, then
        :meth:`unload`\ s them. (TF Serving reads the file itself: nothing to do there.)"""

    def unload(self, v: ModelVersion) -> None:
        """Release a version :meth:`sync` retired."""

    def versions(self) -> dict[str, dict[int, ModelVersion]]:
        """Every configured model's versions, loaded or not, with their state."""

    def predict(self, model: str, version: int, batch: np.ndarray, request_ids: Sequence[str] = ()) -> np.ndarray:
        """float32 probabilities [len(batch), classes] (blocking). ``request_ids``: of the requests
        whose rows make up the batch (for the backend's logs/traces)."""

    def status(self) -> tuple[bool, str]:
        """(ready, reason): ready once every configured model is loaded and warmed."""

    def close(self) -> None:
        """Release connections and threads (at shutdown)."""


def make_backend(settings: Settings) -> Backend:
    if settings.backend == "embedded":
        from serving.backends.embedded import EmbeddedBackend

        return EmbeddedBackend(settings)
    if settings.backend == "tfserving":
        from serving.backends.tfserving import TFServingBackend

        return TFServingBackend(settings)
    raise ValueError(f"unknown backend {settings.backend!r}")
