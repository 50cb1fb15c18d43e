"""The three models of the seed (Keras 3), all ending in a softmax.

- ``digits``: an MNIST image read row by row (28 steps of 28 pixels) ->
  Dense(128) on every row -> LSTM(128) -> Dense(10, softmax). The model takes
  raw 0-255 pixels and scales them by 1/255 itself (a Rescaling layer), so
  training and serving cannot disagree on the scale.
- ``sentiment_lstm``: Embedding(1000, 8) -> LSTM(256, return_sequences) ->
  Dropout(0.5) -> LSTM(256) -> Dropout(0.5) -> Dense(2, softmax).
- ``sentiment_bilstm``: Embedding(1000, 8) -> SpatialDropout1D(0.3) ->
  Bidirectional(LSTM(100, dropout=0.3, recurrent_dropout=0.3)) ->
  Dense(1024, relu) -> Dropout(0.8) -> Dense(1024, relu) -> Dropout(0.8) ->
  Dense(2, softmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import layers

from contract.text import MAXLEN, NUM_WORDS


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "text" or "image"
    input_name: str
    input_dtype: str
    input_shape: tuple[int, ...]  # without the batch dimension
    labels: tuple[str, ...]
    default_epochs: int
    default_batch_size: int
    learning_rate: float


SPECS: dict[str, ModelSpec] = {
    "digits": ModelSpec("digits", "image", "pixels", "float32", (28, 28), tuple(str(i) for i in range(10)), 20, 128, 1e-3),
    "sentiment_lstm": ModelSpec("sentiment_lstm", "text", "token_ids", "int32", (MAXLEN,), ("negative", "positive"), 6, 64, 1e-3),
    "sentiment_bilstm": ModelSpec("sentiment_bilstm", "text", "token_ids", "int32", (MAXLEN,), ("negative", "positive"), 8, 64, 1e-3),
}


def build_digits() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((28, 28), name="pixels"),
            layers.Rescaling(1.0 / 255, name="scale"),
            layers.Dense(128, activation="relu", name="row_dense"),
            layers.LSTM(128, name="lstm"),
            layers.Dense(10, activation="softmax", name="probabilities"),
        ],
        name="digits",
    )


def build_sentiment_lstm() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((MAXLEN,), dtype="int32", name="token_ids"),
            layers.Embedding(NUM_WORDS, 8, name="embedding"),
            layers.LSTM(256, return_sequences=True, name="lstm_1"),
            layers.Dropout(0.5),
            layers.LSTM(256, name="lstm_2"),
            layers.Dropout(0.5),
            layers.Dense(2, activation="softmax", name="probabilities"),
        ],
        name="sentiment_lstm",
    )


def build_sentiment_bilstm() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((MAXLEN,), dtype="int32", name="token_ids"),
            layers.Embedding(NUM_WORDS, 8, name="embedding"),
            layers.SpatialDropout1D(0.3),
            layers.Bidirectional(layers.LSTM(100, dropout=0.3, recurrent_dropout=0.3), name="bilstm"),
            layers.Dense(1024, activation="relu", name="dense_1"),
            layers.Dropout(0.8),
            layers.Dense(1024, activation="relu", name="dense_2"),
            layers.Dropout(0.8),
            layers.Dense(2, activation="softmax", name="probabilities"),
        ],
        name="sentiment_bilstm",
    )


BUILDERS = {
    "digits": build_digits,
    "sentiment_lstm": build_sentiment_lstm,
    "sentiment_bilstm": build_sentiment_bilstm,
}


def build(name: str) -> keras.Model:
    if name not in BUILDERS:
        raise KeyError(f"unknown model {name!r}; choose one of {sorted(BUILDERS)}")
    model = BUILDERS[name]()
    model.compile(
        optimizer=keras.optimizers.Adam(SPECS[name].learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model
