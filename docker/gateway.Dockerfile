# The gateway image: REST :8000 + gRPC :50051, in front of TensorFlow Serving.
# Installs the `serve` extra (FastAPI, gRPC, protobuf, ...), `storage` (fsspec, s3fs,
# gcsfs: `python -m serving pull`, the init container and sidecar of
# k8s/components/models-from-s3; the gateway never imports them) and `tracing` (the
# OpenTelemetry SDK and OTLP exporter, imported only with OTEL_TRACES_EXPORTER=otlp): no TensorFlow.
#
#   docker build -f docker/gateway.Dockerfile -t classifier-gateway .
#   docker run -p 8000:8000 -p 50051:50051 -v "$PWD/models:/models:ro" \
#     -e CLASSIFIER_TFSERVING_ADDRESS=host.docker.internal:8500 classifier-gateway
#
# The models directory is still needed (read-only at /models): the gateway reads
# vocabularies and model cards from <name>/<version>/assets.extra/.

# -- build: a virtual environment with the package and the serve extra ----------
FROM python:3.11.14-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# pyproject.toml names README.md as the readme; serving imports contract/ (the model repository contract).
COPY pyproject.toml README.md ./
COPY contract/ contract/
COPY serving/ serving/
RUN pip install --no-cache-dir '.[serve,storage,tracing]' \
 && python -c "import importlib.util, sys; sys.exit('tensorflow must not be in the gateway image' if importlib.util.find_spec('tensorflow') else 0)" \
 && cd / && python -c "import serving.__main__, serving.backends.tfserving, serving.pull, uvloop, s3fs, gcsfs, opentelemetry.sdk, opentelemetry.exporter.otlp.proto.grpc.trace_exporter"

# -- runtime: the venv only, as a non-root user ---------------------------------
FROM python:3.11.14-slim-bookworm

RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin gateway
COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CLASSIFIER_BACKEND=tfserving \
    CLASSIFIER_TFSERVING_ADDRESS=tfserving:8500 \
    CLASSIFIER_MODEL_BASE_PATH=/models \
    CLASSIFIER_HOST=0.0.0.0

WORKDIR /app
USER 10001:10001
EXPOSE 8000 50051

# Ready = every configured model is loaded (503 before): urlopen raises on non-2xx.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('CLASSIFIER_REST_PORT', '8000'), timeout=3)"]

CMD ["python", "-m", "serving"]
