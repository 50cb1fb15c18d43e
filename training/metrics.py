"""The model-card figures, measured through the exported serving signature.

Used at training time (``training.train.run`` measures the SavedModel it has just
written, before the version is renamed into place) and by
``python -m training.evaluate --metrics`` for any version (e.g. version 1).

Text models, per split (validation, full test):

- ``last20``: accuracy on the last 20 kept tokens (:meth:`TextPreprocessor.encode`), as served today;
- ``whole_text``: every window of ``prep.windows(text, stride=S)`` scored with the same
  version, combined by the **mean log-probability** over the windows (average log p per
  class, argmax); its probabilities (for ECE) are the softmax of those means;
- ``short_text_proxy``: see :func:`short_text_proxy` -- accuracy and share predicted positive;
- ``by_length``: accuracy by the text's number of kept tokens (last-20 and whole-text);
- ``ece``: expected calibration error, 15 equal-width bins on the top-class probability.

Digits: accuracy and ECE on validation and test.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from contract.signature import Predict, signature_predict
from contract.text import TextPreprocessor, tokenize
from contract.whole_text import combine_mean_log_prob, log_probs_to_probs, owners_of, window_rows
from training.windows import sentences

ECE_BINS = 15
LENGTH_BUCKETS = ((0, 5), (6, 20), (21, 50), (51, 100), (101, None))
SHORT_MIN_WORDS, SHORT_MAX_WORDS = 3, 25

SHORT_TEXT_PROXY_DEFINITION = (
    "each review's last sentence (split on . ! ? followed by space, and on <br />) when it has "
    f"{SHORT_MIN_WORDS}-{SHORT_MAX_WORDS} whitespace-separated words and at least one kept token, "
    "labelled with the review's label, scored on its own (last-20 encoding: start id + tokens, padded 'pre')"
)
# Why stride 20: measured on the validation split (python -m training.evaluate --metrics
# --strides 20,10 for version 1; python -m training.experiments --windows for the schemes).
WHOLE_TEXT_STRIDE_CHOICE = {
    "chosen": 20,
    "validation_accuracy": {
        "sentiment_lstm v1": {"stride_20": 0.8324, "stride_10": 0.8256},
        "sentiment_bilstm v1": {"stride_20": 0.8336, "stride_10": 0.8344},
        "sentiment_bilstm tail+3 random windows, 2 epochs": {"stride_20": 0.8432, "stride_10": 0.8368},
        "sentiment_bilstm tail+3 random+1 short window, 2 epochs": {"stride_20": 0.8416, "stride_10": 0.8336},
    },
    "reason": "stride 20 is as good or better in every measured case and scores half as many windows",
}


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """sum over bins of (share of examples) * |accuracy - mean confidence|, on the top class.

    Bins are equal-width on [0, 1]; a confidence of exactly 1.0 falls in the last bin.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y)
    if len(y) == 0:
        return 0.0
    conf = probs.max(1)
    correct = (probs.argmax(1) == y).astype(np.float64)
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def whole_text_windows(prep: TextPreprocessor, texts: Sequence[str], stride: int) -> tuple[np.ndarray, np.ndarray]:
    """All windows of all texts ([m, maxlen] int32) and the text each belongs to."""
    rows, sizes = window_rows(prep, [prep.token_ids(t) for t in texts], stride)
    return rows, owners_of(sizes)


def whole_text_scores(predict: Predict, prep: TextPreprocessor, texts: Sequence[str], stride: int) -> np.ndarray:
    """Mean log-probability per class of every text ([n, classes])."""
    x, owners = whole_text_windows(prep, texts, stride)
    return combine_mean_log_prob(predict(x), owners, len(texts))


def short_text_proxy(texts: Sequence[str], labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Short texts carrying their review's label: the review's **last sentence** (split on
    . ! ? followed by space, and on <br />) when it has 3-25 whitespace-separated words
    and at least one kept token; reviews whose last sentence is longer or shorter give none."""
    out, ys = [], []
    for text, label in zip(texts, labels):
        sents = sentences(text)
        if not sents:
            continue
        last = sents[-1].strip()
        if SHORT_MIN_WORDS <= len(last.split()) <= SHORT_MAX_WORDS and tokenize(last):
            out.append(last)
            ys.append(int(label))
    return out, np.asarray(ys, dtype=np.int64)


def _acc(probs_or_pred: np.ndarray, y: np.ndarray) -> float | None:
    if len(y) == 0:
        return None
    pred = probs_or_pred.argmax(1) if probs_or_pred.ndim == 2 else probs_or_pred
    return round(float(np.mean(pred == y)), 4)


def bucket_name(lo: int, hi: int | None) -> str:
    return f"<={hi}" if lo == 0 else (f">{lo - 1}" if hi is None else f"{lo}-{hi}")


def by_length(pred: np.ndarray, y: np.ndarray, lengths: np.ndarray, buckets=LENGTH_BUCKETS) -> dict:
    """Count and accuracy per length bucket (inclusive bounds; ``hi`` None: no upper bound)."""
    out = {}
    for lo, hi in buckets:
        m = (lengths >= lo) & (lengths <= (hi if hi is not None else np.iinfo(np.int64).max))
        out[bucket_name(lo, hi)] = {"n": int(m.sum()), "accuracy": _acc(pred[m], y[m])}
    return out


def text_metrics(
    predict: Predict,
    prep: TextPreprocessor,
    texts: Sequence[str],
    y: np.ndarray,
    strides: Sequence[int] = (20,),
    bucket_stride: int | None = None,
) -> dict:
    """All figures of one split (see the module docstring)."""
    y = np.asarray(y)
    p20 = predict(prep.encode_batch(texts))
    lengths = np.array([len(tokenize(t, prep.stopwords)) for t in texts], dtype=np.int64)
    result: dict = {
        "examples": int(len(y)),
        "last20": {"accuracy": _acc(p20, y), "ece": round(expected_calibration_error(p20, y), 4)},
        "whole_text": {},
    }
    whole_pred = {}
    for s in strides:
        logp = whole_text_scores(predict, prep, texts, s)
        probs = log_probs_to_probs(logp)
        whole_pred[s] = probs.argmax(1)
        result["whole_text"][f"stride_{s}"] = {
            "accuracy": _acc(probs, y),
            "ece": round(expected_calibration_error(probs, y), 4),
            "combine": "mean_log_probability",
        }
    short_x, short_y = short_text_proxy(texts, y)
    ps = predict(prep.encode_batch(short_x)) if short_x else np.zeros((0, 2), np.float32)
    result["short_text_proxy"] = {
        "definition": SHORT_TEXT_PROXY_DEFINITION,
        "examples": int(len(short_y)),
        "accuracy": _acc(ps, short_y),
        "positive_share": round(float(np.mean(ps.argmax(1) == 1)), 4) if len(short_y) else None,
        "true_positive_share": round(float(np.mean(short_y == 1)), 4) if len(short_y) else None,
        "ece": round(expected_calibration_error(ps, short_y), 4),
    }
    bs = bucket_stride or strides[0]
    result["by_length_tokens"] = {
        "last20": by_length(p20.argmax(1), y, lengths),
        f"whole_text_stride_{bs}": by_length(whole_pred[bs], y, lengths),
    }
    return result


def image_metrics(predict: Predict, x: np.ndarray, y: np.ndarray) -> dict:
    p = predict(np.asarray(x, dtype=np.float32))
    return {"examples": int(len(y)), "accuracy": _acc(p, np.asarray(y)), "ece": round(expected_calibration_error(p, y), 4)}


def version_metrics(
    path,
    name: str,
    prep: TextPreprocessor | None,
    val: tuple,
    test: tuple,
    strides: Sequence[int] = (20,),
    test_strides: Sequence[int] | None = None,
) -> dict:
    """The card's ``metrics`` block for the SavedModel at ``path``: ``val``/``test`` are
    (inputs, labels), raw texts for text models, raw 0-255 images for digits."""
    from training.models import SPECS

    spec = SPECS[name]
    predict = signature_predict(path, spec.input_name)
    if spec.kind == "image":
        return {"validation": image_metrics(predict, *val), "test": image_metrics(predict, *test)}
    test_strides = tuple(test_strides or strides)
    return {
        "validation": text_metrics(predict, prep, val[0], val[1], strides, bucket_stride=test_strides[0]),
        "test": text_metrics(predict, prep, test[0], test[1], test_strides, bucket_stride=test_strides[0]),
    }
