# Training / export image (TensorFlow with CUDA). Reproduces models/<name>/<version>/.
#
#   docker build -f docker/trainer.Dockerfile -t classifier-trainer .
#   docker run --rm --gpus all \
#     -v "$PWD/../shared/data:/data:ro" -v "$PWD/models:/app/models" \
#     classifier-trainer sentiment_lstm --epochs 4
#
# Datasets (mnist.npz, imdb_{train,test}.jsonl.gz) are read from CLASSIFIER_DATA_DIR
# (/data, a volume; `--data-dir` overrides it); exports go to --out (default models/,
# i.e. /app/models, a volume). The container user (uid 10001) must be able to write
# the mounted models directory: add `--user "$(id -u):$(id -g)"` to use yours.
# checkov:skip=CKV_DOCKER_2:a batch training container (a Job), no long-running process for a HEALTHCHECK

# The TensorFlow release the shipped models were exported with (pyproject: tensorflow>=2.21,<2.22),
# so `pip install '.[train]'` keeps the image's CUDA-enabled TensorFlow instead of replacing it.
FROM tensorflow/tensorflow:2.21.0-gpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    CLASSIFIER_DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY contract/ contract/
COPY training/ training/
RUN python -m pip install --no-cache-dir '.[train]' \
 && python -c "import tensorflow as tf, keras; print('tensorflow', tf.__version__, 'keras', keras.__version__)"

RUN groupadd --system --gid 10001 trainer \
 && useradd --system --uid 10001 --gid trainer --create-home --home-dir /home/trainer --shell /bin/bash trainer \
 && mkdir -p /data /app/models \
 && chown trainer:trainer /data /app/models
USER 10001:10001
VOLUME ["/data", "/app/models"]

ENTRYPOINT ["python", "-m", "training"]
CMD ["--help"]
