"""All gateway settings, in one place.

Read from environment variables prefixed ``CLASSIFIER_`` (e.g.
``CLASSIFIER_REST_PORT=8080``), or from a ``.env``-style file named by
``CLASSIFIER_SETTINGS_FILE``. Defaults are what a single node should run with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CLASSIFIER_", env_file=os.environ.get("CLASSIFIER_SETTINGS_FILE"), extra="ignore"
    )

    # Models
    backend: Literal["embedded", "tfserving"] = "embedded"
    model_base_path: Path = ROOT / "models"
    models: list[str] = ["digits", "sentiment_lstm", "sentiment_bilstm"]
    default_sentiment_model: str = "sentiment_lstm"
    warmup: bool = True
    # TensorFlow thread pools of the embedded backend (0 = TensorFlow's default: one per core).
    tf_intra_op_threads: int = Field(0, ge=0)
    tf_inter_op_threads: int = Field(0, ge=0)

    # TF Serving backend (backend="tfserving"): its gRPC address, per-call deadline,
    # retries (only on UNAVAILABLE, exponential backoff) and model-status polling.
    tfserving_address: str = "localhost:8500"
    tfserving_timeout_s: float = Field(5.0, gt=0)
    tfserving_retries: int = Field(2, ge=0)
    tfserving_backoff_s: float = Field(0.05, ge=0)
    tfserving_poll_s: float = Field(2.0, gt=0)
    tfserving_signature: str = "serving_default"

    # Servers
    host: str = "0.0.0.0"
    rest_port: int = 8000
    grpc_port: int = 50051
    grpc_max_message_bytes: int = 16 * 1024 * 1024
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    # FastAPI's native OpenTelemetry hooks (traces/metrics/logs through the global
    # OTel providers). Off by default: Prometheus covers metrics, and when on,
    # every request looks the providers up even if none is configured (about 4 %
    # of py-spy's samples of the gateway under REST load).
    otel_telemetry: bool = False

    # Request limits
    max_items_per_request: int = Field(1024, ge=1)
    max_text_chars: int = Field(20_000, ge=1)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_image_bytes: int = Field(4 * 1024 * 1024, ge=1024)  # one decoded base64 / encoded image

    # Dynamic batching (per model version)
    max_batch_size: int = Field(256, ge=1)
    max_batch_wait_us: int = Field(2000, ge=0)
    max_queue_items: int = Field(8192, ge=1)
    # Batches in flight at once per model version; 0 = by backend (embedded 1: the
    # in-process model already uses every core; tfserving 4: keep TF Serving's
    # batch threads busy while the gateway encodes the next batch).
    max_concurrent_batches: int = Field(0, ge=0)

    def concurrent_batches(self) -> int:
        if self.max_concurrent_batches:
            return self.max_concurrent_batches
        return 1 if self.backend == "embedded" else 4
