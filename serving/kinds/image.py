"""Image classification (digits): 28x28 pixels, raw bytes or PNG/JPEG of any size (made
MNIST-like, serving/images.py) -> the model -> a digit with ten probabilities.

Input: :class:`Images`, whose ``build(limits)`` makes the [n, 28, 28] float32 array, validation
and decoding included; it runs only for a resolvable model with room in its queue.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import numpy as np

from contract.repository import ModelVersion
from serving.errors import InvalidInput, PayloadTooLarge
from serving.images import SIZE, decode_b64, decode_image, from_raw_bytes, image_pixels
from serving.kinds.base import ModelKind, Prepared, classifier_outputs, expect, probabilities_tensor
from serving.request import Result
from serving.settings import Limits
from serving.tensor import PIXEL_TYPES, Tensor

INLINE_IMAGES = 8  # requests of up to this many pixel arrays are checked on the event loop


@dataclass
class Images:
    n: int
    build: Callable[[Limits], np.ndarray]  # the model's limits -> [n, 28, 28] float32 (ServiceError for bad input)
    heavy: bool = True  # build off the event loop


class DigitPrediction(msgspec.Struct, omit_defaults=True):
    label: int
    score: float
    probabilities: list[float]
    image: list[list[float]] | None = None  # explain: the 28x28 pixels the model received


class ImageClassification(ModelKind):
    name = "image"
    items = "images"
    v2_inputs = ("image", "image_encoded")

    def count(self, inputs: Images) -> tuple[int, str]:
        return inputs.n, "images"

    def heavy(self, inputs: Images) -> bool:
        return inputs.heavy

    def prepare(self, v: ModelVersion, inputs: Images, limits: Limits) -> Prepared:
        return Prepared(inputs.build(limits))

    def result(self, v: ModelVersion, prepared: Prepared, probs: np.ndarray) -> Result:
        preds = [DigitPrediction(k, row[k], row) for k, row in zip(probs.argmax(1).tolist(), probs.tolist())]
        return Result(v.name, v.version, preds, probs)

    def explain(self, v: ModelVersion, inputs: Images, prepared: Prepared, r: Result, limits: Limits) -> None:
        for p, img in zip(r.predictions, prepared.rows.tolist()):
            p.image = img

    # -- V2: 'image' UINT8/FP32 [n, 28, 28] or 'image_encoded' BYTES [n] (or [n, 1]) ------
    def v2_io(self, v: ModelVersion) -> tuple[list[dict], list[dict]]:
        inputs = [{"name": "image", "datatype": "UINT8", "shape": [-1, SIZE, SIZE]},
                  {"name": "image_encoded", "datatype": "BYTES", "shape": [-1]}]
        return inputs, classifier_outputs(v, "INT64")

    def v2_parse(self, name: str, t: Tensor, parameters: dict, version) -> Images:
        if parameters.get("whole_text", False):
            raise InvalidInput(f"whole_text applies to sentiment models, not {name!r}")
        if t.name == "image":
            expect(t, PIXEL_TYPES, (t.shape[0] if t.shape else 0, SIZE, SIZE), f"[n, {SIZE}, {SIZE}]", rank=3)
            n = t.shape[0]

            def build(limits: Limits) -> np.ndarray:
                a = np.asarray(t.data, dtype=np.float32).reshape(n, SIZE, SIZE)
                if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 255):
                    raise InvalidInput("input 'image' has pixels outside 0..255")
                return a

            return Images(n, build, n > INLINE_IMAGES)
        if t.name == "image_encoded":
            expect(t, {"BYTES"}, t.shape[:1] + (1,) if len(t.shape) == 2 else None, "[n] or [n, 1]")
            images = list(t.data)
            return Images(len(images), lambda limits: from_encoded(images, "image_encoded", limits))
        raise InvalidInput(f"model {name!r} takes input 'image' (UINT8/FP32 [n, 28, 28]) or 'image_encoded' "
                           f"(BYTES PNG/JPEG), not {t.name[:100]!r}")

    def v2_outputs(self, r: Result, inputs: Images) -> dict[str, Tensor]:
        return {"probabilities": probabilities_tensor(r),
                "label": Tensor("label", "INT64", (len(r.predictions),), np.array([p.label for p in r.predictions], np.int64))}


# -- decoding: the per-image and per-request budgets, from the images' headers first -------
def check_encoded(images: list[bytes], where: str, limits: Limits) -> None:
    """Per-image and per-request budgets, from the images' headers, before anything is decoded."""
    total = 0
    for i, data in enumerate(images):
        if len(data) > limits.max_image_bytes:
            raise PayloadTooLarge(f"{where}[{i}] is {len(data)} bytes > max_image_bytes={limits.max_image_bytes}")
        total += image_pixels(data, f"{where}[{i}]", limits.max_image_pixels)
        if total > limits.max_request_pixels:
            raise PayloadTooLarge(
                f"{where}[0..{i}] add up to {total} pixels > max_request_pixels={limits.max_request_pixels}"
            )


def from_encoded(images: list[bytes], where: str, limits: Limits) -> np.ndarray:
    """PNG/JPEG bytes, checked against the budgets from their headers, then decoded."""
    check_encoded(images, where, limits)
    return np.stack([decode_image(d, f"{where}[{i}]", limits.max_image_pixels) for i, d in enumerate(images)])


def from_b64(images_b64: list[str], limits: Limits) -> np.ndarray:
    return from_encoded(decode_b64(images_b64, "images_b64", limits.max_image_bytes), "images_b64", limits)


def from_proto(images: list[tuple[str, bytes]], limits: Limits) -> np.ndarray:
    """(kind, bytes) pairs from gRPC: kind 'raw' (784 bytes) or 'encoded' (PNG/JPEG)."""
    for i, (kind, _) in enumerate(images):
        if kind not in ("raw", "encoded"):
            raise InvalidInput(f"images[{i}] has no data (set raw or encoded)")
    check_encoded([d for k, d in images if k == "encoded"], "images", limits)
    out = []
    for i, (kind, data) in enumerate(images):
        if kind == "raw":
            out.append(from_raw_bytes(data, f"images[{i}]"))
        else:
            out.append(decode_image(data, f"images[{i}]", limits.max_image_pixels))
    return np.stack(out)
