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
    backend: Literal["embedded"] = "embedded"
    model_base_path: Path = ROOT / "models"
    models: list[str] = ["digits", "sentiment_lstm", "sentiment_bilstm"]
    default_sentiment_model: str = "sentiment_lstm"
    warmup: bool = True
    # TensorFlow thread pools of the embedded backend (0 = TensorFlow's default: one per core).
    tf_intra_op_threads: int = Field(0, ge=0)
    tf_inter_op_threads: int = Field(0, ge=0)

    # Servers
    host: str = "0.0.0.0"
    rest_port: int = 8000
    grpc_port: int = 50051
    grpc_max_message_bytes: int = 16 * 1024 * 1024
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    # Request limits
    max_items_per_request: int = Field(1024, ge=1)
    max_text_chars: int = Field(20_000, ge=1)
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_image_bytes: int = Field(4 * 1024 * 1024, ge=1024)  # one decoded base64 / encoded image

    # Dynamic batching (per model version)
    max_batch_size: int = Field(256, ge=1)
    max_batch_wait_us: int = Field(2000, ge=0)
    max_queue_items: int = Field(8192, ge=1)
