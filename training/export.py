"""Export a trained Keras model as a SavedModel in TF Serving's layout.

``<out>/<model name>/<version>/`` holds the SavedModel with one explicit
signature, ``serving_default``:

- text models: input ``token_ids`` int32 [batch, 20] -> ``probabilities`` float32 [batch, 2]
- digits: input ``pixels`` float32 [batch, 28, 28] (raw 0-255; the model scales
  by 1/255 as in training) -> ``probabilities`` float32 [batch, 10]

and in ``assets.extra/`` (TF Serving's place for extra files, ignored by the
model loader): ``model_card.json``, ``tf_serving_warmup_requests`` (PredictionLog
records TF Serving replays at load time with ``--enable_model_warmup``), and for
text models ``vocab.txt`` + ``preprocessing.json`` (read by
:meth:`contract.text.TextPreprocessor.load`).

Versions are integers that only grow. A version is written to a hidden
temporary folder and renamed into place when complete, so a TF Serving that
polls the folder never sees half a model; an existing version is never
overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import tensorflow as tf
import keras

from contract.layout import ASSETS_EXTRA, CARD_FILE, WARMUP_FILE, next_version
from contract.signature import SIGNATURE
from contract.text import TextPreprocessor
from training.models import SPECS
OUTPUT_NAME = "probabilities"


class VersionExistsError(FileExistsError):
    """The model version to export already exists."""


def write_warmup(path: Path, model_name: str, input_name: str, batches: list[np.ndarray]) -> None:
    """TF Serving's warm-up file: a TFRecord of PredictionLog(predict_log=...)."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    with tf.io.TFRecordWriter(str(path)) as writer:
        for batch in batches:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=SIGNATURE)
            )
            request.inputs[input_name].CopyFrom(tf.make_tensor_proto(batch))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())


def export_model(
    model: keras.Model,
    name: str,
    out_dir: str | os.PathLike,
    card: dict,
    warmup_inputs: np.ndarray,
    preprocessor: TextPreprocessor | None = None,
    version: int | None = None,
    measure=None,
) -> Path:
    """Write ``<out_dir>/<name>/<version>/`` and return its path.

    ``measure``, if given, is called with the path of the written (not yet renamed)
    SavedModel and returns a dict merged into the card: figures measured through the
    exported serving signature itself."""
    spec = SPECS[name]
    base = Path(out_dir) / name
    version = next_version(base) if version is None else int(version)
    final = base / str(version)
    if final.exists():
        raise VersionExistsError(
            f"{final} already exists: versions are immutable, export as a new version "
            f"(next free: {next_version(base)})"
        )
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            name=SIGNATURE,
            # The signature's input is named after the TensorSpec's name.
            fn=lambda x: {OUTPUT_NAME: model(x, training=False)},
            input_signature=[
                tf.TensorSpec((None, *spec.input_shape), tf.as_dtype(spec.input_dtype), name=spec.input_name)
            ],
        )
        archive.write_out(str(tmp), verbose=False)

        extra = tmp / ASSETS_EXTRA
        extra.mkdir()
        if preprocessor is not None:
            preprocessor.save(extra)
        if measure is not None:
            card = {**card, **measure(tmp)}
        card = {**card, "model": name, "version": version, "signature": signature_summary(name)}
        (extra / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        dtype = np.dtype(spec.input_dtype)
        batches = [warmup_inputs[:n].astype(dtype) for n in (1, 8, 32) if n <= len(warmup_inputs)]
        write_warmup(extra / WARMUP_FILE, name, spec.input_name, batches)
        os.rename(tmp, final)  # atomic; fails if another export created it meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def signature_summary(name: str) -> dict:
    spec = SPECS[name]
    return {
        "name": SIGNATURE,
        "inputs": {spec.input_name: {"dtype": spec.input_dtype, "shape": [-1, *spec.input_shape]}},
        "outputs": {OUTPUT_NAME: {"dtype": "float32", "shape": [-1, len(spec.labels)]}},
        "labels": list(spec.labels),
    }
