"""Named, typed tensors as the Open Inference Protocol (V2) carries them: datatypes, shapes,
the raw little-endian form (binary extension, gRPC ``raw_*_contents``) and JSON/typed values.
Shared by the V2 adapters (serving/api/) and the model kinds (serving/kinds/), which say
which tensors their models take and give."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from serving.errors import InvalidInput

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
