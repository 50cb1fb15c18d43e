"""What a kind of model is to the gateway: a pipeline from a request's inputs to model rows
and from the model's probabilities to answers, the same for every protocol.

The core (serving/core.py) runs every request through one kind's pipeline::

    count -> rows -> (admission) -> prepare: validate + preprocess -> (batcher, backend) -> result -> explain

``prepare`` and ``explain`` run off the event loop when :meth:`ModelKind.heavy` says so.
A kind also says how the Open Inference Protocol (V2, REST and gRPC) carries its inputs
and outputs, so a new kind is served by /v2 and gRPC V2 without touching the adapters.
The kind of a model version is its card's ``kind`` (:attr:`contract.repository.ModelVersion.kind`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from contract.repository import ModelVersion
from serving.errors import InvalidInput
from serving.request import Result
from serving.settings import Limits
from serving.tensor import Tensor


@dataclass
class Prepared:
    """A request's inputs made ready for the model: one row per model input (``rows``),
    and what the kind needs to turn the rows' probabilities into answers (``info``)."""

    rows: np.ndarray
    info: object = None


class ModelKind:
    name: str  # the versions' kind: ModelVersion.kind
    items: str  # what a request's items are called in messages ("texts", "images")
    v2_inputs: tuple[str, ...] = ()  # the V2 input names the kind takes (any one of them)

    def count(self, inputs) -> tuple[int, str]:
        """How many items the request has, and what they are called (for the size limits)."""
        raise NotImplementedError

    def heavy(self, inputs) -> bool:
        """Whether prepare/explain should run off the event loop."""
        return True

    def rows(self, v: ModelVersion, inputs, limits: Limits) -> int:
        """How many model rows the request will make, estimated before it is prepared (default: one
        per item). Admission reserves these rows before any work; the core corrects the reservation
        to the exact count once prepared (admitting the rows missing, releasing the surplus). May
        refuse the request at once (a ServiceError, e.g. 413) when it certainly breaks a limit: only
        on a count that never exceeds the real one. Runs on the event loop unless :meth:`rows_heavy`."""
        return self.count(inputs)[0]

    def rows_heavy(self, v: ModelVersion, inputs, limits: Limits) -> bool:
        """Whether :meth:`rows` should run off the event loop."""
        return False

    def prepare(self, v: ModelVersion, inputs, limits: Limits) -> Prepared:
        """Validate and preprocess (raises ServiceError naming the broken rule)."""
        raise NotImplementedError

    def observe(self, series, prepared: Prepared) -> None:
        """Per-model metrics of a prepared request (serving.metrics.ModelSeries)."""

    def result(self, v: ModelVersion, prepared: Prepared, probs: np.ndarray) -> Result:
        raise NotImplementedError

    def explain(self, v: ModelVersion, inputs, prepared: Prepared, result: Result, limits: Limits) -> None:
        """Attach to each prediction what the model saw."""

    # -- the payload log (serving/payload_log.py) ----------------------------------------
    def log_keep(self, inputs, rows: np.ndarray | None) -> tuple[object, int]:
        """What the payload log keeps of a sampled request's inputs until its writer thread formats
        them (:meth:`log_inputs`), and about how many bytes that holds. Runs on the event loop:
        references, no copies. Default: the rows the model received (None when it failed before)."""
        return rows, 0 if rows is None else rows.nbytes

    def log_inputs(self, kept, redact: bool) -> list[dict] | None:
        """The record's ``inputs``, one per item, from what :meth:`log_keep` kept (writer thread).
        Default: each row's SHA-256 (its bytes as the model received them, C order) and shape, never
        its values (an image's pixels stay out of the log)."""
        if kept is None:
            return None
        shape = list(kept.shape[1:])
        return [{"sha256": hashlib.sha256(np.ascontiguousarray(row).tobytes()).hexdigest(), "shape": shape}
                for row in kept]

    def log_outputs(self, result: Result) -> list[dict]:
        """The record's ``outputs``, one per item: its label and probabilities as the API answers them
        (runs on the event loop: references to the answer's own values)."""
        preds = result.predictions
        if preds and not hasattr(preds[0], "probabilities") and result.probabilities is not None:
            return [{"label": p.label, "probabilities": row} for p, row in zip(preds, result.probabilities.tolist())]
        return [{"label": p.label, "probabilities": getattr(p, "probabilities", None)} for p in preds]

    # -- the Open Inference Protocol (V2) ----------------------------------------------
    def v2_io(self, v: ModelVersion) -> tuple[list[dict], list[dict]]:
        """The inputs a version takes (any one of them) and its outputs, as V2 metadata."""
        raise NotImplementedError

    def v2_parse(self, name: str, t: Tensor, parameters: dict, version: Callable[[], ModelVersion]):
        """The kind's inputs from one V2 input tensor and the request's parameters (``version()``
        resolves the version asked for)."""
        raise NotImplementedError

    def v2_outputs(self, result: Result, inputs) -> dict[str, Tensor]:
        """Every output of a result, by name (the request may ask for some)."""
        raise NotImplementedError

    def v2_output_names(self, inputs) -> list[str]:
        return ["probabilities", "label"]


def expect(t: Tensor, datatypes: set[str], shape: tuple | None, shape_doc: str, rank: int = 1) -> None:
    """A V2 input's datatype and shape (``shape`` None: any of ``rank`` dimensions)."""
    if t.datatype not in datatypes:
        raise InvalidInput(f"input {t.name!r} must be {'/'.join(sorted(datatypes))}, not {t.datatype}")
    ok = len(t.shape) == rank if shape is None else tuple(t.shape) == tuple(shape)
    if not ok:
        raise InvalidInput(f"input {t.name!r} has shape {list(t.shape)}; expected {shape_doc}")


def classifier_outputs(v: ModelVersion, label_datatype: str) -> list[dict]:
    """V2 metadata of a classifier's outputs: ``probabilities`` FP32 [n, classes] and ``label`` [n]."""
    return [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(v.labels)]},
            {"name": "label", "datatype": label_datatype, "shape": [-1]}]


def probabilities_tensor(result: Result) -> Tensor:
    probs = np.asarray(result.probabilities, dtype=np.float32)
    return Tensor("probabilities", "FP32", probs.shape, probs.reshape(-1))
