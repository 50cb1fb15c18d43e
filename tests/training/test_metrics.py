"""Card metrics (training/metrics.py) on hand-made arrays, and whole-text scoring through a SavedModel."""

from pathlib import Path

import numpy as np
import pytest

from contract.signature import signature_predict
from training.metrics import by_length, expected_calibration_error, short_text_proxy, whole_text_scores

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
