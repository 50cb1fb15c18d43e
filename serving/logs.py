"""Logging of the gateway: one JSON object per line (python-json-logger) or plain text.

Every line carries the ``request_id`` of the request being handled (``-``
outside requests); the access log (logger ``serving.access``) adds protocol,
endpoint, outcome, model, version, items and latency_ms. TensorFlow's and
absl's start-up chatter is kept to warnings and errors.
"""

from __future__ import annotations

import logging
import os
import sys

from serving.core import request_id
from serving.settings import Settings


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def setup_logging(settings: Settings) -> None:
    # Must happen before TensorFlow is imported (the embedded backend imports it later).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if settings.log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(
            "{asctime}{levelname}{name}{message}{request_id}", style="{",
            rename_fields={"levelname": "level", "asctime": "time"},
        ))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for noisy in ("tensorflow", "absl", "h5py"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
