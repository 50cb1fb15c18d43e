"""One model server of the stage: the project's TF Serving stand-in (testkit/standin.py: the
official servicer classes over real TensorFlow) in its own process, in TF Serving's place.

    python -m stage.model_server --port P --metrics-port Q --models-config F [--base-path models]

Like ``tensorflow_model_server --model_config_file=F --model_config_file_poll_wait_seconds=S``
it serves the versions F's policies name, with its labels, and re-reads F every ``--poll-s``
(a file it cannot parse is ignored: the previous configuration stays). Prometheus reads
``/monitoring/prometheus/metrics`` on ``--metrics-port`` (TF Serving's path, so
deploy/prometheus.yml's tfserving job applies): predictions by model and status.
SIGTERM stops it (in-flight calls get 2 s).
"""

from __future__ import annotations

import argparse
import collections
import signal
import threading
from pathlib import Path

import grpc
from prometheus_client import Counter, start_http_server

from testkit.standin import StandIn

ROOT = Path(__file__).resolve().parent.parent
PREDICTS = Counter("tfserving_standin_predict", "Predict calls answered, by model and gRPC status",
                   ["model", "status"])


class ModelServer(StandIn):
    """The stand-in, counting its predictions and keeping only the last calls (it runs for hours)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = collections.deque(maxlen=64)
        self.request_ids = collections.deque(maxlen=64)

    def Predict(self, request, context):
        name = request.model_spec.name
        try:
            response = super().Predict(request, context)
        except Exception:
            PREDICTS.labels(name, (context.code() or grpc.StatusCode.UNKNOWN).name).inc()
            raise
        PREDICTS.labels(name, "OK").inc()
        return response


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--models-config", type=Path, required=True)
    p.add_argument("--base-path", type=Path, default=ROOT / "models")
    p.add_argument("--poll-s", type=float, default=1.0)
    a = p.parse_args(argv)

    from serving.model_config import ModelsConfig

    models = list(ModelsConfig(a.models_config).models)
    server = ModelServer(a.base_path, models, config=a.models_config)
    server.follow(a.poll_s)
    start_http_server(a.metrics_port, addr="127.0.0.1")
    server.start(a.port)
    print(f"model server on 127.0.0.1:{a.port} ({', '.join(models)}), metrics on :{a.metrics_port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server._stop_following.set()
    server.server.stop(grace=2).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
