"""The Open Inference Protocol ("V2", KServe / Triton / MLServer) over the core.

Shared by the REST adapter (serving/api/rest/v2_endpoints.py) and the gRPC one
(serving/api/grpc/v2_servicer.py): each turns its wire format into
:class:`Tensor` values and back; everything else (which inputs a model takes,
their checks, the outputs) is here, and the work itself is the core's, so the
limits, admission and error messages are those of ``/v1``.

Inputs (exactly one per request):

- sentiment models: ``text`` BYTES ``[n]`` (or ``[n, 1]``) of UTF-8 texts, tokenised by
  the gateway as on ``/v1``; or ``token_ids`` INT32/INT64 ``[n, maxlen]`` for clients that
  tokenise themselves (ids below the vocabulary size).
- digits: ``image`` UINT8/FP32 (any integer or float type) ``[n, 28, 28]`` of pixels
  0..255 (white digit on black, as MNIST); or ``image_encoded`` BYTES ``[n]`` of PNG/JPEG
  of any size (made MNIST-like as on ``/v1``).

Outputs: ``probabilities`` FP32 ``[n, classes]`` and ``label`` (BYTES ``[n]`` for the
sentiment models, INT64 ``[n]`` for digits); all of them unless the request names some.
Request parameter ``whole_text: true`` (sentiment, ``text`` input): every window of each
text is scored and combined as on /v1; output ``windows`` INT32 ``[n]`` says how many.

Versions are strings in this protocol: a number, or a version label from
models.config (``stable``, ``canary``); none means the default version, as on ``/v1``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import struct
from dataclasses import dataclass, field

import numpy as np

from serving.core import Call, Classifier, Result
from serving.errors import InvalidInput, NotFound
from serving.images import SIZE
from contract.repository import ModelVersion

SERVER_NAME = "classifier-gateway"
EXTENSIONS = ["binary_tensor_data"]

# The protocol's datatypes and their little-endian NumPy types (BYTES is a list of bytes).
NUMPY_TYPES = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
DATATYPES = [*NUMPY_TYPES, "BYTES"]
INTEGER_TYPES = {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
PIXEL_TYPES = INTEGER_TYPES | {"FP16", "FP32", "FP64"}


@dataclass
class Tensor:
    """One input or output: numeric ``data`` is a flat NumPy array, BYTES ``data`` a list of bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]
    parameters: dict = field(default_factory=dict)


@dataclass
class InferResponse:
    model: str
    version: int
    outputs: list[Tensor]


# -- tensors: shapes, raw bytes, JSON lists -------------------------------------------------
def element_count(name: str, shape) -> int:
    n = 1
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise InvalidInput(f"input {name!r}: shape {list(shape)} must be a list of non-negative integers")
        n *= d
    return n


def check_datatype(name: str, datatype: str) -> None:
    if datatype not in DATATYPES:
        raise InvalidInput(f"input {name!r}: unknown datatype {datatype[:40]!r}; datatypes: {DATATYPES}")


def from_raw(name: str, datatype: str, shape, raw: bytes | memoryview) -> Tensor:
    """A tensor from its raw little-endian bytes (binary extension / gRPC raw_input_contents)."""
    check_datatype(name, datatype)
    count = element_count(name, shape)
    if datatype == "BYTES":
        items = deserialize_bytes(name, raw)
        if len(items) != count:
            raise InvalidInput(f"input {name!r}: shape {list(shape)} holds {count} elements, the data has {len(items)}")
        return Tensor(name, datatype, tuple(shape), items)
    dtype = NUMPY_TYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(f"input {name!r}: {datatype} shape {list(shape)} needs {count * dtype.itemsize} bytes, got {len(raw)}")
    return Tensor(name, datatype, tuple(shape), np.frombuffer(raw, dtype=dtype))


def from_values(name: str, datatype: str, shape, values) -> Tensor:
    """A tensor from values (JSON's flat or nested lists, or gRPC's typed contents)."""
    check_datatype(name, datatype)
    count = element_count(name, shape)
    if datatype == "BYTES":
        items = list(_flatten(values))
        for i, x in enumerate(items):
            if isinstance(x, str):
                items[i] = x.encode("utf-8", "surrogatepass")
            elif not isinstance(x, bytes):
                raise InvalidInput(f"input {name!r}: BYTES elements must be strings, got {type(x).__name__}")
        data = items
        n = len(items)
    else:
        try:
            arr = np.asarray(values)
        except (ValueError, TypeError):
            raise InvalidInput(f"input {name!r}: data must be numbers in lists of equal length") from None
        if arr.size and (arr.dtype.kind not in "biuf" or (arr.dtype.kind == "b") != (datatype == "BOOL")):
            raise InvalidInput(f"input {name!r}: data of a {datatype} tensor must be "
                               f"{'true/false' if datatype == 'BOOL' else 'numbers'}")
        dtype = NUMPY_TYPES[datatype]
        flat = arr.reshape(-1)
        if flat.size and dtype.kind in "iu":
            if flat.dtype.kind == "f" and not np.all(np.isfinite(flat) & (flat == np.round(flat))):
                raise InvalidInput(f"input {name!r}: {datatype} data must be integers")
            info = np.iinfo(dtype)
            if flat.min() < info.min or flat.max() > info.max:
                raise InvalidInput(f"input {name!r}: values out of range for {datatype}")
        data = flat.astype(dtype, copy=False)
        n = data.size
    if n != count:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} holds {count} elements, the data has {n}")
    return Tensor(name, datatype, tuple(shape), data)


def _flatten(values):
    if isinstance(values, list):
        for v in values:
            yield from _flatten(v)
    else:
        yield values


def deserialize_bytes(name: str, raw: bytes | memoryview) -> list[bytes]:
    """BYTES elements, each a 4-byte little-endian length and its bytes (the protocol's raw form)."""
    out, i, end = [], 0, len(raw)
    view = memoryview(raw)
    while i < end:
        if i + 4 > end:
            raise InvalidInput(f"input {name!r}: raw BYTES data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > end:
            raise InvalidInput(f"input {name!r}: raw BYTES element of {n} bytes runs past the end of the data")
        out.append(bytes(view[i:i + n]))
        i += n
    return out


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def to_raw(t: Tensor) -> bytes:
    return serialize_bytes(t.data) if t.datatype == "BYTES" else np.ascontiguousarray(t.data).tobytes()


@functools.cache
def _package_version() -> str:
    """Read from the installed distribution's metadata once (it does not change while serving)."""
    try:
        return importlib.metadata.version("classifier-service")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


# -- the data plane ---------------------------------------------------------------------------
class DataPlane:
    def __init__(self, core: Classifier):
        self.core = core

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": _package_version(), "extensions": EXTENSIONS}

    @staticmethod
    def parse_version(version: str | None) -> tuple[int | None, str | None]:
        """A protocol version string: '' -> default, digits -> that version, else a version label."""
        if not version:
            return None, None
        if version.isdigit() and version.isascii():
            return int(version), None
        return None, version

    def model_version(self, name: str, version: str | None) -> ModelVersion:
        """The version a request names (loaded or not), or NotFound naming what exists."""
        versions = self.core.models().get(name)
        if versions is None:
            raise NotFound(f"unknown model {name[:100]!r}; models: {sorted(self.core.models())}")
        number, label = self.parse_version(version)
        if number == 0:
            raise NotFound(f"model {name!r} has no version 0; loaded versions: {sorted(versions)}")
        if number is None and label is None and not versions:
            raise NotFound(f"model {name!r} has no version")
        number = self.core.version_number(name, versions, number, label)
        if number not in versions:
            raise NotFound(f"model {name!r} has no version {number}; loaded versions: {sorted(versions)}")
        return versions[number]

    def model_ready(self, name: str, version: str | None) -> bool:
        v = self.model_version(name, version)
        return v.state == "AVAILABLE" and not self.core.draining

    def kind(self, name: str) -> str | None:
        """'text' or 'image' for a known model (for admission before the body is read)."""
        versions = self.core.models().get(name)
        return next((v.kind for v in versions.values()), None) if versions else None

    @staticmethod
    def io(v: ModelVersion) -> tuple[list[dict], list[dict]]:
        """The inputs a model version takes (any one of them) and its outputs, as metadata."""
        classes = len(v.labels)
        if v.kind == "text":
            inputs = [{"name": "text", "datatype": "BYTES", "shape": [-1]},
                      {"name": "token_ids", "datatype": "INT32", "shape": [-1, v.preprocessor.maxlen]}]
            label = {"name": "label", "datatype": "BYTES", "shape": [-1]}
        else:
            inputs = [{"name": "image", "datatype": "UINT8", "shape": [-1, SIZE, SIZE]},
                      {"name": "image_encoded", "datatype": "BYTES", "shape": [-1]}]
            label = {"name": "label", "datatype": "INT64", "shape": [-1]}
        return inputs, [{"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]}, label]

    def model_metadata(self, name: str, version: str | None) -> dict:
        v = self.model_version(name, version)
        versions = self.core.models()[name]
        inputs, outputs = self.io(v)
        return {
            "name": name,
            "versions": [str(n) for n in sorted(versions)] if not version else [str(v.version)],
            "platform": "tensorflow_savedmodel",
            "inputs": inputs,
            "outputs": outputs,
        }

    async def infer(self, name: str, version: str | None, inputs: list[Tensor], outputs: list[str] | None,
                    deadline: float | None = None, call: Call | None = None, parameters: dict | None = None) -> InferResponse:
        """``parameters``: the request's; ``whole_text`` (bool) scores every window of each text."""
        core = self.core
        whole_text = (parameters or {}).get("whole_text", False)
        if not isinstance(whole_text, bool):
            raise InvalidInput(f"parameter whole_text must be true or false, got {whole_text!r:.40}")
        number, label = self.parse_version(version)
        versions = core.models().get(name)
        if versions is None or number == 0:
            self.model_version(name, version)  # NotFound naming the models, or the versions
        kind = next((v.kind for v in versions.values()), None)
        if len(inputs) != 1:
            given = [t.name for t in inputs]
            expected = ["text", "token_ids"] if kind == "text" else ["image", "image_encoded"]
            raise InvalidInput(f"give exactly one input, one of {expected}; got {given}")
        t = inputs[0]
        if whole_text and kind != "text":
            raise InvalidInput(f"whole_text applies to sentiment models, not {name!r}")
        available = ["probabilities", "label"] + (["windows"] if whole_text else [])
        for wanted in outputs or ():  # before any work is done
            if wanted not in available:
                raise InvalidInput(f"model {name!r} has no output {wanted[:100]!r}; outputs: {available}")
        if kind == "text":
            r = await self._sentiment(name, number, label, t, deadline, call, whole_text)
        else:
            r = await self._digits(name, number, label, t, deadline, call)
        return InferResponse(r.model, r.version, self._outputs(r, kind, outputs, whole_text))

    async def _sentiment(self, name, number, label, t: Tensor, deadline, call, whole_text: bool) -> Result:
        core = self.core
        if t.name == "text":
            self._expect(t, {"BYTES"}, t.shape[:1] + (1,) if len(t.shape) == 2 else None, "[n] or [n, 1]")
            texts = []
            for i, b in enumerate(t.data):
                try:
                    texts.append(b.decode("utf-8"))
                except UnicodeDecodeError:
                    raise InvalidInput(f"text[{i}] is not valid UTF-8") from None
            return await core.sentiment(texts, name, number, deadline, call, label, whole_text)
        if t.name == "token_ids":
            if whole_text:
                raise InvalidInput("whole_text needs the 'text' input: token ids are already one window each")
            v, _ = core.resolve(name, number, "text", label)
            maxlen = v.preprocessor.maxlen
            self._expect(t, INTEGER_TYPES, (t.shape[0] if t.shape else 0, maxlen), f"[n, {maxlen}]", rank=2)
            ids = np.asarray(t.data).reshape(t.shape)
            return await core.sentiment_ids(ids, name, number, deadline, call, label)
        raise InvalidInput(f"model {name!r} takes input 'text' (BYTES) or 'token_ids' (INT32 [n, maxlen]), not {t.name[:100]!r}")

    async def _digits(self, name, number, label, t: Tensor, deadline, call) -> Result:
        core = self.core
        if t.name == "image":
            self._expect(t, PIXEL_TYPES, (t.shape[0] if t.shape else 0, SIZE, SIZE), f"[n, {SIZE}, {SIZE}]", rank=3)
            n = t.shape[0]

            def build() -> np.ndarray:
                a = np.asarray(t.data, dtype=np.float32).reshape(n, SIZE, SIZE)
                if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 255):
                    raise InvalidInput("input 'image' has pixels outside 0..255")
                return a

            return await core.digits(n, build, name, number, n * SIZE * SIZE > 8 * SIZE * SIZE, deadline, call, label)
        if t.name == "image_encoded":
            self._expect(t, {"BYTES"}, t.shape[:1] + (1,) if len(t.shape) == 2 else None, "[n] or [n, 1]")
            images = list(t.data)
            return await core.digits(len(images), lambda: core.images_from_encoded(images, "image_encoded"), name,
                                     number, True, deadline, call, label)
        raise InvalidInput(f"model {name!r} takes input 'image' (UINT8/FP32 [n, 28, 28]) or 'image_encoded' "
                           f"(BYTES PNG/JPEG), not {t.name[:100]!r}")

    @staticmethod
    def _expect(t: Tensor, datatypes: set[str], shape: tuple | None, shape_doc: str, rank: int = 1) -> None:
        if t.datatype not in datatypes:
            raise InvalidInput(f"input {t.name!r} must be {'/'.join(sorted(datatypes))}, not {t.datatype}")
        ok = len(t.shape) == rank if shape is None else tuple(t.shape) == tuple(shape)
        if not ok:
            raise InvalidInput(f"input {t.name!r} has shape {list(t.shape)}; expected {shape_doc}")

    @staticmethod
    def _outputs(r: Result, kind: str, requested: list[str] | None, whole_text: bool) -> list[Tensor]:
        n = len(r.predictions)
        probs = np.asarray(r.probabilities, dtype=np.float32)
        if kind == "text":
            labels = Tensor("label", "BYTES", (n,), [p.label.encode() for p in r.predictions])
        else:
            labels = Tensor("label", "INT64", (n,), probs.argmax(1).astype(np.int64))
        available = {"probabilities": Tensor("probabilities", "FP32", probs.shape, probs.reshape(-1)), "label": labels}
        if whole_text:  # how many windows each text's answer combines
            available["windows"] = Tensor("windows", "INT32", (n,), np.array([p.windows for p in r.predictions], dtype=np.int32))
        if not requested:
            return list(available.values())
        return [available[name] for name in dict.fromkeys(requested)]  # names checked by infer()

