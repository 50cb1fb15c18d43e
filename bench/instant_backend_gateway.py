"""The real gateway over a backend that answers instantly (benchmark only).

Measures what the gateway itself costs per request (HTTP, validation,
tokenisation, batching, metrics, JSON) with the model's compute taken away.
Run by bench/gateway.py as case (e); port from BENCH_REST_PORT.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import uvloop  # noqa: E402

from serving.__main__ import Gateway  # noqa: E402
from serving.backends.embedded import EmbeddedBackend  # noqa: E402
from serving.model_config import ModelsConfig  # noqa: E402
from serving.settings import Settings  # noqa: E402
from serving import tracing  # noqa: E402


class InstantBackend(EmbeddedBackend):
    """The embedded backend's model metadata and tokenizers, no TensorFlow: p = 0.5."""

    def load(self, config: ModelsConfig | None = None) -> None:
        """The versions models.config names, listed from their assets.extra/ (no model is loaded)."""
        config = config or ModelsConfig(self.settings.models_config_file)
        for name in self.settings.models:
            for n in self._wanted(config, name):
                self._add(name, n, load=False)
        for versions in self._versions.values():
            for v in versions.values():
                v.state = "AVAILABLE"
        self._reason = None

    def sync(self, config: ModelsConfig) -> list:
        return []

    def predict(self, model, version, batch, request_ids=None):
        n_classes = len(self._versions[model][version].labels)
        return np.full((len(batch), n_classes), 1.0 / n_classes, np.float32)


if __name__ == "__main__":
    from serving.logs import setup_logging

    s = Settings(host="127.0.0.1", rest_port=int(os.environ["BENCH_REST_PORT"]), grpc_port=0)
    setup_logging(s)  # as `python -m serving`: the access log line of every request is written too
    tracing.configure()  # as `python -m serving`: OTEL_TRACES_EXPORTER=otlp traces (bench/gateway.py --tracing)
    uvloop.run(Gateway(s, InstantBackend(s)).run())
