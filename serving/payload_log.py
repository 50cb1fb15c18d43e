"""Payload logging: sampled requests and their answers as JSON lines (as KServe's logger or
BentoML's monitoring), for live accuracy once the ground truth arrives, drift and debugging.

The core (serving/core.py, :meth:`Classifier.track`) hands every request that reached a handler,
whatever its API and outcome, to :meth:`PayloadLog.log` once it is answered. On the event loop
that costs a hash of the request id (sampling) and, for a sampled request, a tuple of references
appended to a bounded queue; everything else (digests, redaction, JSON, writing) happens in the
writer thread. A full queue drops the record and counts it; a request never waits for the log.

Sampling is by request id: a request is logged when the first 8 bytes of SHA-256(request id),
read as a big-endian integer, are below ``payload_log_sample_rate * 2**64``. The same id is
always in or out (on every gateway), so a client that sends its own ``x-request-id`` can tell
which of its requests will be logged; ids the gateway makes up are random, so their share is the rate.

A record holds the request id, never a header or anything else the client sent besides its
inputs: no API key can reach the file (serving/auth.py reads the keys; nothing here sees them).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import NamedTuple

import msgspec
import numpy as np

from serving import kinds
from serving.logs import RateLimitedLog
from serving.metrics import Metrics
from serving.priority import lower_this_thread
from serving.request import Call, request_id
from serving.settings import Settings

log = logging.getLogger("serving.payload_log")

STDOUT = "stdout"
_encode = msgspec.json.Encoder(
    enc_hook=lambda o: o.tolist() if isinstance(o, (np.ndarray, np.generic)) else str(o)).encode


def sampled(rid: str, rate: float) -> bool:
    """Whether the request with id ``rid`` is logged at ``rate`` (see the module's doc)."""
    if rate >= 1:
        return True
    if rate <= 0:
        return False
    return int.from_bytes(hashlib.sha256(rid.encode("utf-8", "surrogatepass")).digest()[:8], "big") < rate * 2**64


def api_of(protocol: str, endpoint: str) -> str:
    """``v1`` (REST /v1, gRPC classifier.v1) or ``v2`` (the Open Inference Protocol, REST and gRPC)."""
    return "v2" if endpoint.startswith("/v2/") or endpoint == "ModelInfer" else "v1"


class Pending(NamedTuple):
    """A sampled request as queued: references only (formatted by the writer thread)."""

    time: float
    request_id: str
    protocol: str
    endpoint: str
    model: str | None
    version: int | None
    outcome: str
    seconds: float
    kind: str | None
    items: int
    inputs: object  # what the kind kept (ModelKind.log_keep)
    outputs: list | None  # ModelKind.log_outputs, None when it failed


class PayloadLog:
    """The bounded queue of sampled records and the thread that writes them."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.rate = settings.payload_log_sample_rate
        self.destination = settings.payload_log_destination
        self.redact = settings.payload_log_redact_texts
        self.max_records, self.max_bytes = settings.payload_log_queue_records, settings.payload_log_queue_bytes
        self.metrics = metrics
        self._queue: deque[tuple[Pending, int]] = deque()
        self._records = self._bytes = 0  # queued or being written (freed once written)
        self._cond = threading.Condition()
        self._closing = False
        self._file = None
        self._warn = RateLimitedLog(log)
        self._nice = settings.worker_nice  # the writer yields to the event loop, as the workers do
        self._thread = threading.Thread(target=self._run, name="payload-log", daemon=True)
        self._thread.start()

    # -- the event loop's side ----------------------------------------------------
    def log(self, call: Call, seconds: float) -> None:
        """Queue the record of a finished request when its id is sampled (never blocks)."""
        rid = request_id.get()
        if not sampled(rid, self.rate):
            return
        self.metrics.payload_sampled.inc()
        req = call.request
        try:
            kept, size = (None, 0) if req is None else kinds.KINDS[req.kind].log_keep(req.inputs, call.rows)
            outputs = None
            if call.result is not None and call.outcome == "ok":
                outputs = kinds.KINDS[req.kind].log_outputs(call.result)  # not the result: it may hold explanations
                size += 128 * len(outputs)
        except Exception:  # noqa: BLE001 - the request is answered; only its record is lost
            log.exception("payload log: the record of a request could not be made")
            self.metrics.payload_dropped.labels("write_error").inc()
            return
        size += 512  # the rest of the record
        record = Pending(time.time(), rid, call.protocol, call.endpoint, call.model, call.version, call.outcome,
                         seconds, req.kind if req else None, call.items, kept, outputs)
        with self._cond:
            if self._records >= self.max_records or self._bytes + size > self.max_bytes:
                self.metrics.payload_dropped.labels("queue_full").inc()
                return
            self._queue.append((record, size))
            self._records += 1
            self._bytes += size
            self._cond.notify()

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (waiting at most ``timeout`` seconds for the writer), then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("payload log: %d record(s) not written at exit (the destination %r is not taking them)",
                        self._records, self.destination)

    # -- the writer thread --------------------------------------------------------
    def _run(self) -> None:
        lower_this_thread(self._nice)
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    break
                batch = list(self._queue)
                self._queue.clear()
            lines = []
            for record, _ in batch:
                try:
                    lines.append(_encode(self.format(record)) + b"\n")
                except Exception:  # noqa: BLE001 - one bad record never stops the log
                    log.exception("payload log: a record could not be encoded")
            written = len(lines) if lines and self._write(b"".join(lines)) else 0
            if written:
                self.metrics.payload_written.inc(written)
            if written < len(batch):
                self.metrics.payload_dropped.labels("write_error").inc(len(batch) - written)
            with self._cond:
                self._records -= len(batch)
                self._bytes -= sum(size for _, size in batch)
        if self._file is not None and self.destination != STDOUT:
            self._file.close()

    def _write(self, data: bytes) -> bool:
        try:
            if self._file is None:  # opened here: a FIFO's open blocks until a reader comes
                self._file = (os.fdopen(os.dup(sys.stdout.fileno()), "wb") if self.destination == STDOUT
                              else open(self.destination, "ab"))
            self._file.write(data)
            self._file.flush()
            return True
        except (OSError, ValueError) as e:
            self._warn.warning("payload log: cannot write to %r: %s", self.destination, e)
            if self._file is not None:
                try:
                    self._file.close()
                except OSError:
                    pass
                self._file = None  # reopened for the next batch
            return False

    def format(self, r: Pending) -> dict:
        """The JSON record of a queued request (README "Payload logging")."""
        kind = kinds.KINDS.get(r.kind) if r.kind else None
        return {
            "time": datetime.fromtimestamp(r.time, timezone.utc).isoformat(timespec="microseconds")[:-6] + "Z",
            "request_id": r.request_id,
            "protocol": r.protocol,
            "api": api_of(r.protocol, r.endpoint),
            "endpoint": r.endpoint[:200],
            "model": r.model[:200] if r.model else None,
            "version": r.version,
            "kind": r.kind,
            "items": r.items,
            "outcome": r.outcome,
            "latency_ms": round(r.seconds * 1000, 3),
            "inputs": kind.log_inputs(r.inputs, self.redact) if kind else None,
            "outputs": r.outputs,
        }
