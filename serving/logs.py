"""Logging of the gateway: one JSON object per line (python-json-logger) or plain text.

Every line carries the ``request_id`` of the request being handled (``-``
outside requests); the access log (logger ``serving.access``) adds protocol,
endpoint, outcome, model, version, items and latency_ms. TensorFlow's and
absl's start-up chatter is kept to warnings and errors.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading

from serving.core import request_id
from serving.settings import Settings


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


# glog/absl lines written by native code (TensorFlow, gRPC core): "I1128 15:43:32.123 12345 file.cc:52] text"
NATIVE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([^\]]+)\] ?(.*)$")
NATIVE_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
# Logged as errors by TensorFlow but only mean "no GPU here": it runs on the CPU.
BENIGN = ("failed call to cuInit",)


def capture_native_stderr() -> int:
    """Route what native libraries write to file descriptor 2 through Python logging.

    TensorFlow 2.21 and gRPC core log through absl/glog straight to fd 2, before
    TF_CPP_MIN_LOG_LEVEL applies (oneDNN banners, cuInit on CPU machines...). fd 2
    becomes a pipe read by a daemon thread: lines below WARNING are dropped (with
    their continuation lines), the rest become log records of logger ``native``.
    Returns a duplicate of the original stderr for the gateway's own handler.
    """
    original = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    log = logging.getLogger("native")

    def pump() -> None:
        level: int | None = logging.WARNING  # of the current message; None while dropping one
        with os.fdopen(read, "r", encoding="utf-8", errors="replace") as lines:
            for line in lines:
                line = line.rstrip("\n")
                if not line or line.startswith("WARNING: All log messages before absl::InitializeLog()"):
                    continue
                m = NATIVE.match(line)
                if m:  # a new native message
                    level = NATIVE_LEVELS[m.group(1)]
                    if level < logging.WARNING or any(b in m.group(3) for b in BENIGN):
                        level = None
                    text = f"{m.group(2)}: {m.group(3)}"
                else:  # its continuation
                    text = line
                if level is not None:
                    log.log(level, "%s", text)

    threading.Thread(target=pump, name="native-stderr", daemon=True).start()
    return original


def setup_logging(settings: Settings, capture_native: bool = True) -> None:
    # Must happen before TensorFlow is imported (the embedded backend imports it later).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    stream = sys.stderr
    if capture_native:  # Python's own writes (the handler, stray tracebacks) go to the real stderr
        stream = sys.stderr = os.fdopen(capture_native_stderr(), "w", buffering=1)
    handler = logging.StreamHandler(stream)
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
    logging.captureWarnings(True)
    for noisy in ("tensorflow", "absl", "h5py"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
