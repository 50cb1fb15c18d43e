"""Per model version inference statistics, as Triton reports them (the Open Inference
Protocol's statistics extension: REST ``/v2/models/{name}/stats``, gRPC ModelStatistics).

Counted by the core (serving/core.py) for every request of every protocol (/v1, V2, gRPC)
once its model version is chosen, from what the core and the batcher measure anyway:

- ``success`` / ``fail``: requests that were answered / failed after their version was chosen
  (over a limit, invalid text, refused by admission, deadline passed, backend error), with their whole time in the
  gateway; requests refused before that (unknown model, bad tensor) belong to no version.
- for successful requests: ``queue`` (waiting in the model's batcher), ``compute_input``
  (validation and preprocessing: ``classifier_preprocess_duration_seconds``), ``compute_infer``
  (the backend calls that carried its rows), ``compute_output`` (answers and the response).
- ``inference_count``: items (texts, images) answered; ``execution_count``: backend calls
  (batches, shadow scoring included), also by batch size (``batch_stats``, compute_infer only).
- ``last_inference``: when the last request was answered, ms since the epoch (0: never).

Durations are cumulative nanoseconds with their counts. Everything runs on the event loop.
"""

from __future__ import annotations

import time

from serving.request import Call


class Duration:
    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count, self.ns = 0, 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(0, int(seconds * 1e9))

    def as_dict(self) -> dict:
        return {"count": self.count, "ns": self.ns}


DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


class VersionStats:
    def __init__(self) -> None:
        self.last_inference = 0
        self.inference_count = 0
        self.execution_count = 0
        self.durations = {name: Duration() for name in DURATIONS}
        self.batches: dict[int, Duration] = {}  # batch size -> its backend calls

    def as_dict(self, name: str, version: int) -> dict:
        """Triton's ``ModelStatistics`` (field names of its protobuf/JSON)."""
        return {
            "name": name, "version": str(version), "last_inference": self.last_inference,
            "inference_count": self.inference_count, "execution_count": self.execution_count,
            "inference_stats": {k: d.as_dict() for k, d in self.durations.items()},
            "batch_stats": [{"batch_size": size, "compute_infer": d.as_dict()} for size, d in sorted(self.batches.items())],
        }


class Statistics:
    """The statistics of every model version that served anything (others read as zeros)."""

    def __init__(self) -> None:
        self._by: dict[tuple[str, int], VersionStats] = {}

    def of(self, name: str, version: int) -> VersionStats:
        s = self._by.get((name, version))
        if s is None:
            s = self._by[(name, version)] = VersionStats()
        return s

    def request(self, call: Call, seconds: float) -> None:
        """One finished request (:meth:`serving.core.Classifier.track`); ignored when it never got
        to a model version."""
        if call.version is None or not call.model:
            return
        s = self.of(call.model, call.version)
        d = s.durations
        if call.outcome != "ok":
            d["fail"].add(seconds)
            return
        s.last_inference = time.time_ns() // 1_000_000
        s.inference_count += call.items
        d["success"].add(seconds)
        d["queue"].add(call.queue_s)
        d["compute_input"].add(call.prepare_s)
        d["compute_infer"].add(call.infer_s)
        d["compute_output"].add(call.output_s)

    def batch(self, name: str, version: int, rows: int, seconds: float) -> None:
        """One backend call of ``rows`` rows (serving/flow.py, from the batcher's ``on_batch``)."""
        s = self.of(name, version)
        s.execution_count += 1
        d = s.batches.get(rows)
        if d is None:
            d = s.batches[rows] = Duration()
        d.add(seconds)

    def model_stats(self, name: str, version: int) -> dict:
        s = self._by.get((name, version))
        return (s or VersionStats()).as_dict(name, version)
