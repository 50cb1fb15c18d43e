"""Logging of the gateway: one JSON object per line or plain text.

Every line carries the ``request_id`` of the request being handled (``-``
outside requests); the access log (logger ``serving.access``) adds protocol,
endpoint, outcome, model, version, items and latency_ms. TensorFlow's and
absl's start-up chatter is kept to warnings and errors.

With ``log_format=text`` every control character of a record is escaped (:class:`TextLines`):
one record, one line, whatever a request's path or headers hold (JSON escapes them anyway).

An access line is written for every request, so its cost counts: with
python-json-logger and a line-buffered stream it was ~45 us of CPU per request
(bench/instant_backend_gateway.py, access log on vs off), a third of the
gateway's own cost. Lines are now encoded by msgspec (:class:`JsonLines`, the
same keys in the same order) and written by :class:`BufferedHandler` in one
``write`` per ``flush_interval_s`` (0.1 s) from a background thread; warnings
and errors are written at once.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time

import msgspec

from serving.request import request_id
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


# What every LogRecord has; anything else on a record came from ``extra=`` and is written too.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "request_id"}
_encode = msgspec.json.Encoder(enc_hook=str).encode


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level, name, message, request_id, then the record's
    ``extra`` fields, and exc_info / stack_info when there are any."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record), "level": record.levelname, "name": record.name,
               "message": record.getMessage(), "request_id": getattr(record, "request_id", "-")}
        for k, v in record.__dict__.items():
            if k not in _STANDARD:
                out[k] = v
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return _encode(out).decode()


# What could end a line or garble a terminal: C0 controls (newline, carriage return, escape...),
# DEL, C1 controls (NEL, U+0085, ends a line for some readers) and the Unicode line and
# paragraph separators.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(m: re.Match) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (\\n, \\r, \\t, \\x1b, \\x85,
    \\u2028): one line, whatever it holds. Backslashes are left as they are."""
    return _CONTROL.sub(_escaped, text) if _CONTROL.search(text) else text


class TextLines(logging.Formatter):
    """``log_format=text``: one line per record, always. The message, its fields (request id,
    logger name) and any traceback can carry text from outside (a request's path, a header) or
    span lines; every control character in the formatted record is escaped
    (:func:`escape_controls`), so no request can forge a log line or hide one, and a traceback
    is one line with ``\\n`` between its lines."""

    def format(self, record: logging.LogRecord) -> str:
        return escape_controls(super().format(record))


class BufferedHandler(logging.Handler):
    """Formats on the caller's thread, writes from a background thread every ``interval_s`` in one
    ``write``; records of ``flush_level`` and above (and ``flush()``/``close()``) are written at once."""

    def __init__(self, stream, interval_s: float = 0.1, flush_level: int = logging.WARNING):
        super().__init__()
        self.stream, self.interval_s, self.flush_level = stream, interval_s, flush_level
        self._pending: list[str] = []
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="log-writer", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - as logging.StreamHandler: report, never raise
            self.handleError(record)
            return
        if record.levelno >= self.flush_level:
            self.flush()

    def flush(self) -> None:
        # Under the handler's own (reentrant) lock, which logging holds around every emit():
        # no line can be appended to a list that is being written.
        with self.lock:
            if not self._pending:
                return
            lines, self._pending = self._pending, []
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except (OSError, ValueError):  # the stream is gone (closed at exit)
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self.flush()
        super().close()


def setup_logging(settings: Settings, capture_native: bool = True) -> None:
    # Must happen before TensorFlow is imported (the embedded backend imports it later).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    stream = sys.stderr
    if capture_native:  # Python's own writes (the handler, stray tracebacks) go to the real stderr
        stream = sys.stderr = os.fdopen(capture_native_stderr(), "w", buffering=1)
    # Neither format shows where a call was made, or thread/process names: don't collect them
    # (the "Optimization" section of the logging documentation).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = BufferedHandler(stream, settings.log_flush_interval_s)
    handler.addFilter(RequestIdFilter())
    if settings.log_format == "json":
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(TextLines("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    logging.captureWarnings(True)
    for noisy in ("tensorflow", "absl", "h5py"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


class RateLimitedLog:
    """At most one line per ``every_s`` seconds; the next one says how many were suppressed."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0):
        self.logger, self.every, self.next, self.suppressed = logger, every_s, 0.0, 0

    def warning(self, msg: str, *args) -> None:
        now = time.monotonic()
        if now < self.next:
            self.suppressed += 1
            return
        if self.suppressed:
            msg += f" ({self.suppressed} similar suppressed in the last {self.every:g}s)"
        self.next, self.suppressed = now + self.every, 0
        self.logger.warning(msg, *args)
