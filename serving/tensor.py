"""Named, typed tensors as the Open Inference Protocol (V2) carries them: datatypes, shapes,
the raw little-endian form (binary extension, gRPC ``raw_*_contents``) and JSON/typed values.
Shared by the V2 adapters (serving/api/) and the model kinds (serving/kinds/), which say
which tensors their models take and give.

A tensor's declared shape is checked before its data is read: its rank (at most
:data:`MAX_RANK` dimensions), then, for BYTES, its element count against the request's
:class:`ElementLimit` (the model's ``max_items_per_request``), then the data's length or
layout against that count; only then is any element decoded, in a loop bounded by the
count. A payload that does not fit its shape costs a few length comparisons, however many
elements it holds."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from serving.errors import InvalidInput, PayloadTooLarge

# The protocol's datatypes and their little-endian NumPy types (BYTES is a list of bytes).
NUMPY_TYPES = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
DATATYPES = [*NUMPY_TYPES, "BYTES"]
INTEGER_TYPES = {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
PIXEL_TYPES = INTEGER_TYPES | {"FP16", "FP32", "FP64"}
# Dimensions a tensor may declare (NumPy's own limit is 64; no model here takes more than 3).
MAX_RANK = 32

_length = struct.Struct("<I")


@dataclass
class Tensor:
    """One input or output: numeric ``data`` is a flat NumPy array, BYTES ``data`` a list of bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ElementLimit:
    """The most elements one BYTES tensor may declare. Every BYTES input of every kind holds one
    item per element (a text, an encoded image), so this is the model's ``max_items_per_request``
    and the error is the core's own (413, "too many texts: ..."), raised from the declared shape
    before any of the data is read."""

    most: int
    items: str = "elements"

    def check(self, count: int) -> None:
        if count > self.most:
            raise PayloadTooLarge(f"too many {self.items}: {count} > max_items_per_request={self.most}")


# -- tensors: shapes, raw bytes, JSON lists -------------------------------------------------
def element_count(name: str, shape) -> int:
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"input {name!r}: shape has {len(shape)} dimensions; at most {MAX_RANK}")
    n = 1
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise InvalidInput(f"input {name!r}: shape {list(shape)} must be a list of non-negative integers")
        n *= d
    return n


def check_datatype(name: str, datatype: str) -> None:
    if datatype not in DATATYPES:
        raise InvalidInput(f"input {name!r}: unknown datatype {datatype[:40]!r}; datatypes: {DATATYPES}")


def declared_count(name: str, datatype: str, shape, limit: ElementLimit | None = None) -> int:
    """The element count of a declared tensor (datatype and shape checked; BYTES: against ``limit``)."""
    check_datatype(name, datatype)
    count = element_count(name, shape)
    if datatype == "BYTES" and limit is not None:
        limit.check(count)
    return count


def from_raw(name: str, datatype: str, shape, raw: bytes | memoryview, limit: ElementLimit | None = None) -> Tensor:
    """A tensor from its raw little-endian bytes (binary extension / gRPC raw_input_contents)."""
    count = declared_count(name, datatype, shape, limit)
    if datatype == "BYTES":
        return Tensor(name, datatype, tuple(shape), deserialize_bytes(name, raw, count, shape))
    dtype = NUMPY_TYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(f"input {name!r}: {datatype} shape {list(shape)} needs {count * dtype.itemsize} bytes, got {len(raw)}")
    return Tensor(name, datatype, tuple(shape), np.frombuffer(raw, dtype=dtype))


def from_values(name: str, datatype: str, shape, values, limit: ElementLimit | None = None, convert=None) -> Tensor:
    """A tensor from values: JSON's flat or nested lists, or gRPC's typed contents (any flat
    sequence). Their layout is checked against the declared shape first (list lengths only,
    level by level, as far as the shape goes); BYTES elements are then read one by one, at
    most the declared count of them. ``convert``: applied to the flat BYTES elements (in
    order, all of them) before they are checked, e.g. base64 to bytes."""
    count = declared_count(name, datatype, shape, limit)
    if datatype == "BYTES":
        items = _flat(name, shape, count, values)
        if convert is not None:
            items = convert(items)
        data = []
        for x in items:
            if isinstance(x, str):
                data.append(x.encode("utf-8", "surrogatepass"))
            elif isinstance(x, bytes):
                data.append(x)
            else:
                raise InvalidInput(f"input {name!r}: BYTES elements must be strings, got {type(x).__name__}")
        return Tensor(name, datatype, tuple(shape), data)
    if isinstance(values, (list, tuple)):
        _check_layout(name, shape, count, values, leaves=False)
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"input {name!r}: data must be numbers in lists of equal length") from None
    if arr.size and (arr.dtype.kind not in "biuf" or (arr.dtype.kind == "b") != (datatype == "BOOL")):
        raise InvalidInput(f"input {name!r}: data of a {datatype} tensor must be "
                           f"{'true/false' if datatype == 'BOOL' else 'numbers'}")
    dtype = NUMPY_TYPES[datatype]
    flat = arr.reshape(-1)
    if flat.size != count:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} holds {count} elements, the data has {flat.size}")
    if flat.size and dtype.kind in "iu":
        if flat.dtype.kind == "f" and not np.all(np.isfinite(flat) & (flat == np.round(flat))):
            raise InvalidInput(f"input {name!r}: {datatype} data must be integers")
        info = np.iinfo(dtype)
        if flat.min() < info.min or flat.max() > info.max:
            raise InvalidInput(f"input {name!r}: values out of range for {datatype}")
    return Tensor(name, datatype, tuple(shape), flat.astype(dtype, copy=False))


def _flat(name: str, shape, count: int, values) -> list:
    """The ``count`` elements of BYTES data given flat or nested, or InvalidInput as soon as a
    list length disagrees with the shape (no element is looked at before)."""
    if not isinstance(values, (list, tuple)):
        values = [values]  # a lone value: one element
    rows = _check_layout(name, shape, count, values, leaves=True)
    if rows is None:
        return values
    out: list = []
    for row in rows:
        out.extend(row)
    return out


def _check_layout(name: str, shape, count: int, values, leaves: bool) -> list | None:
    """``values`` fit ``shape``: flat (``count`` entries; returns None) or nested row-major,
    each list as long as its dimension (returns the innermost lists, in order). Only list
    lengths are compared, level by level, so a mismatch is found after at most as many
    comparisons as the shape has rows, whatever the data holds. ``leaves``: also refuse an
    innermost entry that is itself a list (numeric data leave that to NumPy)."""
    n, rank = len(values), len(shape)
    nested = rank > 1 and n == shape[0] and n > 0 and isinstance(values[0], (list, tuple))
    if not nested:
        if n != count:
            where = "" if rank <= 1 else f" entries at its top level (flat: {count}; nested: {shape[0]} rows)"
            raise InvalidInput(f"input {name!r}: shape {list(shape)} holds {count} elements, the data has {n}{where}")
        return None
    level = [values]
    for depth, d in enumerate(shape[1:], start=1):
        below = []
        for lst in level:
            for x in lst:
                if not isinstance(x, (list, tuple)) or len(x) != d:
                    got = f"a list of {len(x)}" if isinstance(x, (list, tuple)) else type(x).__name__
                    raise InvalidInput(f"input {name!r}: nested data does not fit shape {list(shape)}: "
                                       f"dimension {depth} has {d} entries, the data has {got}")
                below.append(x)
        level = below
    if leaves:
        for lst in level:
            for x in lst:
                if isinstance(x, (list, tuple)):
                    raise InvalidInput(f"input {name!r}: nested data is deeper than shape {list(shape)}")
    return level


def deserialize_bytes(name: str, raw: bytes | memoryview, count: int, shape=None) -> list[bytes]:
    """The ``count`` BYTES elements of ``raw``, each a 4-byte little-endian length and its bytes
    (the protocol's raw form). The data's length is checked against the count first (each
    element takes at least 4 bytes); the loop reads at most ``count`` elements and stops at the
    first that runs past the end; bytes left after the last element are an error too."""
    shape = [count] if shape is None else list(shape)
    end = len(raw)
    if end < 4 * count:
        raise InvalidInput(f"BYTES tensor {name!r}: shape {shape} holds {count} elements, each a 4-byte length "
                           f"and its bytes; the data has {end} bytes, fewer than {4 * count}")
    out, i = [], 0
    view = memoryview(raw)
    unpack = _length.unpack_from
    for k in range(count):
        if i + 4 > end:
            raise InvalidInput(f"input {name!r}: raw BYTES data ends inside element {k}'s 4-byte length")
        (n,) = unpack(view, i)
        i += 4
        if n > end - i:
            raise InvalidInput(f"input {name!r}: raw BYTES element {k} of {n} bytes runs past the end of the data")
        out.append(bytes(view[i:i + n]))
        i += n
    if i != end:
        raise InvalidInput(f"BYTES tensor {name!r}: {end - i} bytes of data left after the {count} "
                           f"element{'s' if count != 1 else ''} of shape {shape}: the data holds more elements "
                           f"than its shape")
    return out


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def to_raw(t: Tensor) -> bytes:
    return serialize_bytes(t.data) if t.datatype == "BYTES" else np.ascontiguousarray(t.data).tobytes()
