"""A kind of model that exists only in the tests: fixed-length feature vectors -> a label.

All a new kind needs: this module (a ModelKind subclass) and its registration (the last
line). Its models are then served by the V2 endpoints, REST and gRPC, with no change to
the gateway's adapters; its versions say ``"kind": "vector"`` in their model card.
"""

from __future__ import annotations

import msgspec
import numpy as np

from serving.errors import InvalidInput
from serving.kinds import ModelKind, Prepared, register
from serving.kinds.base import classifier_outputs, expect, probabilities_tensor
from serving.request import Result
from serving.tensor import Tensor


class VectorPrediction(msgspec.Struct):
    label: str
    probabilities: list[float]


class VectorClassification(ModelKind):
    name = "vector"
    items = "vectors"
    v2_inputs = ("features",)

    @staticmethod
    def width(v) -> int:
        return v.signature["inputs"][v.input_name]["shape"][1]

    def count(self, inputs: np.ndarray) -> tuple[int, str]:
        return len(inputs), "vectors"

    def heavy(self, inputs: np.ndarray) -> bool:
        return False

    def prepare(self, v, inputs: np.ndarray, limits) -> Prepared:
        if not np.isfinite(inputs).all():
            raise InvalidInput("features must be finite numbers")
        return Prepared(inputs.astype(np.float32))

    def result(self, v, prepared: Prepared, probs: np.ndarray) -> Result:
        labels = v.labels
        preds = [VectorPrediction(labels[k], row) for k, row in zip(probs.argmax(1).tolist(), probs.tolist())]
        return Result(v.name, v.version, preds, probs)

    def v2_io(self, v):
        return [{"name": "features", "datatype": "FP32", "shape": [-1, self.width(v)]}], classifier_outputs(v, "BYTES")

    def v2_parse(self, name, t: Tensor, parameters, version) -> np.ndarray:
        width = self.width(version())
        expect(t, {"FP32", "FP64"}, (t.shape[0] if t.shape else 0, width), f"[n, {width}]", rank=2)
        return np.asarray(t.data).reshape(t.shape)

    def v2_outputs(self, r: Result, inputs) -> dict[str, Tensor]:
        n = len(r.predictions)
        return {"probabilities": probabilities_tensor(r),
                "label": Tensor("label", "BYTES", (n,), [p.label.encode() for p in r.predictions])}


register(VectorClassification())
