"""NumPy <-> TensorProto for the lean TF Serving messages (no TensorFlow needed).

Encoding always uses ``tensor_content`` (raw little-endian bytes: compact and
fast). Decoding accepts both ``tensor_content`` and the typed ``*_val`` fields,
including TensorFlow's rule that a single value fills the whole shape.
"""

from __future__ import annotations

import numpy as np

from serving.gen.tensorflow.core.framework import tensor_pb2, types_pb2

_TO_DTYPE = {
    types_pb2.DT_FLOAT: np.dtype("<f4"),
    types_pb2.DT_DOUBLE: np.dtype("<f8"),
    types_pb2.DT_INT32: np.dtype("<i4"),
    types_pb2.DT_UINT8: np.dtype("u1"),
    types_pb2.DT_INT16: np.dtype("<i2"),
    types_pb2.DT_INT8: np.dtype("i1"),
    types_pb2.DT_INT64: np.dtype("<i8"),
    types_pb2.DT_BOOL: np.dtype("?"),
    types_pb2.DT_HALF: np.dtype("<f2"),
}
_FROM_DTYPE = {v.newbyteorder("="): k for k, v in _TO_DTYPE.items()}
# Which typed field holds the values of each dtype.
_VAL_FIELD = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_UINT8: "int_val",
    types_pb2.DT_INT16: "int_val",
    types_pb2.DT_INT8: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_BOOL: "bool_val",
    types_pb2.DT_HALF: "half_val",
}


def dtype_name(dtype: int) -> str:
    """NumPy's name of a DataType (DT_FLOAT -> "float32"), as model cards write it."""
    if dtype in _TO_DTYPE:
        return _TO_DTYPE[dtype].newbyteorder("=").name
    return types_pb2.DataType.Name(dtype).removeprefix("DT_").lower() if dtype in types_pb2.DataType.values() else str(dtype)


def to_tensor_proto(arr: np.ndarray) -> tensor_pb2.TensorProto:
    arr = np.asarray(arr)
    key = arr.dtype.newbyteorder("=")
    if key not in _FROM_DTYPE:
        raise TypeError(f"dtype {arr.dtype} is not supported")
    t = tensor_pb2.TensorProto(dtype=_FROM_DTYPE[key])
    for d in arr.shape:
        t.tensor_shape.dim.add(size=d)
    t.tensor_content = np.ascontiguousarray(arr, dtype=_TO_DTYPE[t.dtype]).tobytes()
    return t


def from_tensor_proto(t: tensor_pb2.TensorProto) -> np.ndarray:
    if t.dtype not in _TO_DTYPE:
        raise TypeError(f"TensorProto dtype {types_pb2.DataType.Name(t.dtype) if t.dtype in types_pb2.DataType.values() else t.dtype} is not supported")
    dtype = _TO_DTYPE[t.dtype]
    shape = tuple(d.size for d in t.tensor_shape.dim)
    size = int(np.prod(shape)) if shape else 1
    if t.tensor_content:
        return np.frombuffer(t.tensor_content, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    values = getattr(t, _VAL_FIELD[t.dtype])
    if t.dtype == types_pb2.DT_HALF:
        flat = np.asarray(values, dtype=np.uint16).view(np.float16)
    else:
        flat = np.asarray(values, dtype=dtype.newbyteorder("="))
    if size == 0:
        return np.zeros(shape, dtype=flat.dtype)
    if len(flat) == size:
        return flat.reshape(shape)
    if len(flat) >= 1:  # TensorFlow pads with the last value
        return np.concatenate([flat, np.full(size - len(flat), flat[-1], flat.dtype)]).reshape(shape)
    return np.zeros(shape, dtype=flat.dtype)
