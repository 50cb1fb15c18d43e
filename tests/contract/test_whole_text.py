"""Whole-text scoring's shared pieces (contract/whole_text.py) on hand-made arrays; through
SavedModels in tests/training/test_metrics.py and tests/serving/test_whole_text.py."""

import numpy as np

from contract.text import TextPreprocessor, Vocabulary
from contract.whole_text import combine_mean_log_prob, combine_windows, log_probs_to_probs, owners_of, window_rows


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


def test_window_rows_are_each_texts_windows_in_order():
    prep = TextPreprocessor(Vocabulary(["<pad>", "<start>", "<oov>", *(f"w{i}" for i in range(50))]), stopwords=frozenset())
    texts = [" ".join(f"w{i}" for i in range(45)), "w1 w2", " ".join(f"w{i}" for i in range(30))]
    ids = [prep.token_ids(t) for t in texts]
    rows, sizes = window_rows(prep, ids, stride=10, max_windows=3)
    assert sizes == [len(prep.windows(t, 10, 3)) for t in texts] and rows.dtype == np.int32
    assert rows.tolist() == [w for t in texts for w in prep.windows(t, 10, 3)]
    assert owners_of(sizes).tolist() == [i for i, n in enumerate(sizes) for _ in range(n)]


def test_combine_windows_is_the_normalised_mean_log_probability():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]], dtype=np.float32)
    got = combine_windows(probs, [2, 1])
    want = log_probs_to_probs(combine_mean_log_prob(probs, np.array([0, 0, 1]), 2))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32
