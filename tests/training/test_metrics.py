"""Card metrics (training/metrics.py) on hand-made arrays, and whole-text scoring through a SavedModel."""

from pathlib import Path

import numpy as np
import pytest

from training.metrics import (
    by_length,
    combine_mean_log_prob,
    expected_calibration_error,
    log_probs_to_probs,
    short_text_proxy,
    signature_predict,
    whole_text_scores,
)

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_ece_hand_made():
    # Perfectly calibrated: confidence 1.0 and right -> 0.
    assert expected_calibration_error(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([1, 0])) == 0.0
    # Two examples at confidence 0.9 (bin 13), one right one wrong: |0.5 - 0.9| = 0.4.
    p = np.array([[0.9, 0.1], [0.1, 0.9]])
    assert expected_calibration_error(p, np.array([0, 0])) == pytest.approx(0.4)
    # Two bins: 0.6 right (bin 9: |1-0.6|=0.4), 0.95 wrong (bin 14: |0-0.95|=0.95); each weight 1/2.
    p = np.array([[0.6, 0.4], [0.05, 0.95]])
    assert expected_calibration_error(p, np.array([0, 0])) == pytest.approx((0.4 + 0.95) / 2)
    # Three classes; top-class confidence is what is binned.
    p = np.array([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]])
    assert expected_calibration_error(p, np.array([0, 2])) == pytest.approx(abs(0.5 - 0.5))


def test_mean_log_probability_combination_hand_made():
    windows = np.array([[0.9, 0.1], [0.4, 0.6], [0.45, 0.55], [0.2, 0.8]])
    owners = np.array([0, 0, 1, 1])
    got = combine_mean_log_prob(windows, owners, 2)
    want0 = [(np.log(0.9) + np.log(0.4)) / 2, (np.log(0.1) + np.log(0.6)) / 2]
    want1 = [(np.log(0.45) + np.log(0.2)) / 2, (np.log(0.55) + np.log(0.8)) / 2]
    np.testing.assert_allclose(got, [want0, want1])
    # Text 0: mean prob would say class 0 (0.65) and so does mean log prob; text 1 class 1.
    assert list(got.argmax(1)) == [0, 1]
    # Where averaging probabilities and log-probabilities disagree: two windows mildly for
    # class 0, one all but excluding it (mean prob 0.534 for class 0; mean log prob favours 1).
    w = np.array([[0.8, 0.2], [0.8, 0.2], [0.001, 0.999]])
    assert w.mean(0).argmax() == 0 and combine_mean_log_prob(w, np.zeros(3, int), 1).argmax() == 1
    probs = log_probs_to_probs(got)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    assert (probs.argmax(1) == got.argmax(1)).all()


def test_by_length_buckets():
    pred, y = np.array([1, 0, 1, 1, 0]), np.array([1, 1, 1, 0, 0])
    out = by_length(pred, y, np.array([3, 5, 10, 60, 200]))
    assert out["<=5"] == {"n": 2, "accuracy": 0.5}
    assert out["6-20"] == {"n": 1, "accuracy": 1.0}
    assert out["21-50"] == {"n": 0, "accuracy": None}
    assert out["51-100"]["n"] == 1 and out[">100"] == {"n": 1, "accuracy": 1.0}


def test_short_text_proxy_takes_short_last_sentences():
    texts = ["Long review here. It was a truly great film!", "Awful. " + "word " * 40, "Fine.<br /><br />Worst thing I ever saw."]
    got, y = short_text_proxy(texts, np.array([1, 0, 0]))
    assert got == ["It was a truly great film!", "Worst thing I ever saw."] and list(y) == [1, 0]


def test_whole_text_score_equals_windows_scored_one_by_one():
    import tensorflow as tf

    from training.evaluate import load_version

    path = MODELS / "sentiment_lstm" / "1"
    sig, _, prep = load_version(path)
    predict = signature_predict(path, "token_ids")
    texts = [
        "A slow start, but the second half is wonderful. " * 6 + "I would watch it again, great cast.",
        "Dull.",
    ]
    scores = whole_text_scores(predict, prep, texts, stride=10)
    for text, score in zip(texts, scores):
        logps = []
        for w in prep.windows(text, stride=10):
            p = sig(token_ids=tf.constant([w], dtype=tf.int32))["probabilities"].numpy()[0]
            logps.append(np.log(p))
        np.testing.assert_allclose(score, np.mean(logps, 0), rtol=1e-4, atol=1e-5)
    assert len(prep.windows(texts[0], stride=10)) > 2
