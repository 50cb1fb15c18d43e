"""The lean TensorProto codec against TensorFlow's own (tf.make_tensor_proto / tf.make_ndarray).

The lean messages (serving/gen, no TensorFlow) and the official ones must be the
same on the wire: each side parses what the other serialised.
"""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2 as official_tensor_pb2
from tensorflow_serving.apis import predict_pb2 as official_predict_pb2

from serving.gen.tensorflow.core.framework import tensor_pb2
from serving.gen.tensorflow_serving.apis import predict_pb2
from serving.backends.tensors import from_tensor_proto, to_tensor_proto

rng = np.random.default_rng(0)
ARRAYS = [
    rng.integers(0, 1000, (5, 20)).astype(np.int32),
    rng.random((3, 28, 28)).astype(np.float32),
    rng.random((4, 2)).astype(np.float64),
    rng.integers(-(2**40), 2**40, (7,)).astype(np.int64),
    rng.integers(0, 256, (2, 3)).astype(np.uint8),
    rng.integers(-128, 128, (6,)).astype(np.int8),
    rng.integers(-(2**15), 2**15, (6,)).astype(np.int16),
    rng.random((3, 3)).astype(np.float16),
    rng.random((4,)) > 0.5,
    np.zeros((0, 20), np.int32),
    np.float32(3.5).reshape(()),
]


@pytest.mark.parametrize("arr", ARRAYS, ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_lean_encoding_is_what_tensorflow_decodes(arr):
    wire = to_tensor_proto(arr).SerializeToString()
    decoded = tf.make_ndarray(official_tensor_pb2.TensorProto.FromString(wire))
    assert decoded.dtype == arr.dtype and decoded.shape == arr.shape
    np.testing.assert_array_equal(decoded, arr)


@pytest.mark.parametrize("arr", ARRAYS, ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_lean_decoding_of_tensorflow_encoding(arr):
    wire = tf.make_tensor_proto(arr).SerializeToString()  # tensor_content for arrays
    out = from_tensor_proto(tensor_pb2.TensorProto.FromString(wire))
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize(
    "values,dtype,shape",
    [
        ([0.25, 0.75, 0.5, 0.5], tf.float32, [2, 2]),  # float_val
        ([1, 2, 3], tf.int32, [3]),  # int_val
        ([2**40, -1], tf.int64, [2]),  # int64_val
        ([0.5, 0.25], tf.float64, [2]),  # double_val
        ([True, False], tf.bool, [2]),  # bool_val
        ([7], tf.uint8, [1]),  # int_val for uint8
        ([0.5, 1.5], tf.float16, [2]),  # half_val (bit patterns)
        (0.5, tf.float32, [2, 3]),  # one value fills the shape
    ],
)
def test_lean_decoding_of_typed_val_fields(values, dtype, shape):
    official = tf.make_tensor_proto(values, dtype=dtype, shape=shape)
    # Force the *_val form TF Serving may send (tf.make_tensor_proto prefers tensor_content for lists).
    expected = tf.make_ndarray(official)
    typed = official_tensor_pb2.TensorProto(dtype=official.dtype, tensor_shape=official.tensor_shape)
    field = {tf.float32: "float_val", tf.int32: "int_val", tf.int64: "int64_val", tf.float64: "double_val",
             tf.bool: "bool_val", tf.uint8: "int_val", tf.float16: "half_val"}[dtype]
    flat = np.atleast_1d(np.asarray(values, dtype=dtype.as_numpy_dtype))
    if dtype == tf.float16:
        flat = flat.view(np.uint16)
    getattr(typed, field).extend(flat.tolist())
    np.testing.assert_array_equal(tf.make_ndarray(typed), expected)  # TF agrees this is the same tensor
    out = from_tensor_proto(tensor_pb2.TensorProto.FromString(typed.SerializeToString()))
    assert out.dtype == expected.dtype and out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)


def test_predict_request_is_wire_compatible_both_ways():
    ids = rng.integers(0, 1000, (2, 20)).astype(np.int32)
    lean = predict_pb2.PredictRequest()
    lean.model_spec.name = "sentiment_lstm"
    lean.model_spec.version.value = 3
    lean.model_spec.signature_name = "serving_default"
    lean.inputs["token_ids"].CopyFrom(to_tensor_proto(ids))
    lean.output_filter.append("probabilities")
    official = official_predict_pb2.PredictRequest.FromString(lean.SerializeToString())
    assert official.model_spec.name == "sentiment_lstm" and official.model_spec.version.value == 3
    assert official.model_spec.signature_name == "serving_default" and list(official.output_filter) == ["probabilities"]
    np.testing.assert_array_equal(tf.make_ndarray(official.inputs["token_ids"]), ids)
    assert predict_pb2.PredictRequest.FromString(official.SerializeToString()) == lean


def test_unsupported_dtypes_are_refused_clearly():
    with pytest.raises(TypeError, match="not supported"):
        to_tensor_proto(np.array(["a"], dtype=object))
    with pytest.raises(TypeError, match="DT_STRING"):
        from_tensor_proto(tensor_pb2.TensorProto.FromString(tf.make_tensor_proto([b"x"]).SerializeToString()))


def _lean_modules():
    import importlib
    from pathlib import Path

    gen = Path(tensor_pb2.__file__).parents[3]
    for f in sorted(gen.glob("tensorflow*/**/*_pb2.py")):
        rel = f.relative_to(gen).with_suffix("")
        yield importlib.import_module("serving.gen." + ".".join(rel.parts))


def test_every_lean_message_matches_the_official_field_by_field():
    """Same full names, field names, numbers, types and labels as TF / TF Serving's own messages."""
    import importlib

    checked = 0
    for lean in _lean_modules():
        official = importlib.import_module(lean.__name__.removeprefix("serving.gen."))
        assert lean.DESCRIPTOR.package == official.DESCRIPTOR.package

        def walk(lean_msg, official_msg):
            nonlocal checked
            assert lean_msg.full_name == official_msg.full_name
            for field in lean_msg.fields:
                ref = official_msg.fields_by_name.get(field.name)
                assert ref is not None, f"{lean_msg.full_name}.{field.name} is not in TF Serving's message"
                # An enum may be declared as int32 here (same varint on the wire); nothing else may differ.
                same_wire = {field.type, ref.type} == {field.TYPE_INT32, field.TYPE_ENUM}
                assert (field.number, field.is_repeated) == (ref.number, ref.is_repeated), f"{lean_msg.full_name}.{field.name}"
                assert field.type == ref.type or same_wire, f"{lean_msg.full_name}.{field.name}"
                if field.message_type is not None:
                    assert field.message_type.full_name == ref.message_type.full_name
                checked += 1
            for nested in lean_msg.nested_types:
                walk(nested, official_msg.nested_types_by_name[nested.name])

        for name, msg in lean.DESCRIPTOR.message_types_by_name.items():
            walk(msg, official.DESCRIPTOR.message_types_by_name[name])
        for name, enum in lean.DESCRIPTOR.enum_types_by_name.items():
            ref = official.DESCRIPTOR.enum_types_by_name[name]
            for value in enum.values:
                assert ref.values_by_name[value.name].number == value.number
        for name, service in lean.DESCRIPTOR.services_by_name.items():
            ref = official.DESCRIPTOR.services_by_name[name]
            for method in service.methods:
                r = ref.methods_by_name[method.name]
                assert (method.input_type.full_name, method.output_type.full_name) == (
                    r.input_type.full_name, r.output_type.full_name)
    assert checked > 40
