"""Training windows (training/windows.py): valid id sequences, tails included, short ones padded 'pre'."""

import numpy as np
import pytest

from contract.text import MAXLEN, NUM_WORDS, PAD_ID, START_ID, TextPreprocessor, Vocabulary
from training.train import shift_images
from training.windows import WindowScheme, random_window, sample, short_window

TEXTS = [
    "Great acting. Loved it! " + " ".join(f"word{i}" for i in range(60)) + ". Truly awful ending.",
    "Short and sweet.",
    "Bad.",
    " ".join(f"w{i % 7}" for i in range(45)),
]
LABELS = np.array([1, 1, 0, 0])


@pytest.fixture(scope="module")
def prep():
    return TextPreprocessor(Vocabulary.build(TEXTS))


def test_scheme_names():
    assert WindowScheme.parse(None) == WindowScheme.parse("tail") == WindowScheme(0, 0)
    assert WindowScheme.parse("r3s1") == WindowScheme(3, 1)
    assert WindowScheme.parse("r2") == WindowScheme(2, 0) and WindowScheme.parse("s2") == WindowScheme(0, 2)
    assert WindowScheme(3, 1).name == "r3s1" and WindowScheme().name == "tail"
    with pytest.raises(ValueError):
        WindowScheme.parse("x3")


def test_windows_are_valid_ids_tails_included(prep):
    x, y = sample(prep, TEXTS, LABELS, WindowScheme(3, 1), seed=0)
    assert x.dtype == np.int32 and x.shape[1] == MAXLEN and len(x) == len(y)
    assert x.min() >= 0 and x.max() < NUM_WORDS
    rows = {tuple(r) for r in x}
    for text, label in zip(TEXTS, LABELS):
        tail = tuple(prep.encode(text).ids)
        assert tail in rows  # every review's tail, exactly as encode() gives it
        assert label in y[[tuple(r) == tail for r in x]]
    # Padding only in front: once a non-pad id appears, no pad follows.
    for r in x:
        nz = np.flatnonzero(r != PAD_ID)
        assert len(nz) == 0 or (r[nz[0]:] != PAD_ID).all()
    # Long reviews get 3 random windows + 1 short, reviews no longer than the tail only the short one.
    lens = [len(prep.token_ids(t)) for t in TEXTS]
    assert len(x) == sum(1 + (3 if n > MAXLEN else 0) + 1 for n in lens)
    # Deterministic for a seed.
    x2, y2 = sample(prep, TEXTS, LABELS, WindowScheme(3, 1), seed=0)
    np.testing.assert_array_equal(x, x2) and np.testing.assert_array_equal(y, y2)


def test_tail_scheme_is_version_1_data(prep):
    x, y = sample(prep, TEXTS, LABELS, WindowScheme(), seed=0)
    got = sorted(map(tuple, x))
    assert got == sorted(tuple(prep.encode(t).ids) for t in TEXTS)


def test_random_windows_are_consecutive_runs_before_the_tail(prep):
    ids = prep.token_ids(TEXTS[0])
    rng = np.random.default_rng(1)
    for _ in range(50):
        w = random_window(ids, rng)
        assert len(w) == MAXLEN
        starts = [i for i in range(len(ids) - MAXLEN + 1) if ids[i : i + MAXLEN] == w]
        assert starts and min(starts) + MAXLEN < len(ids) + 1
        assert w != ids[-MAXLEN:] or ids.count(ids[-1]) > 1
    assert random_window(prep.token_ids("Bad."), rng) is None


def test_short_windows_are_padded_pre_like_a_short_text(prep):
    rng = np.random.default_rng(0)
    for text in TEXTS:
        w = short_window(prep, text, prep.token_ids(text), rng)
        assert len(w) == MAXLEN
        k = w.index(START_ID)
        assert all(v == PAD_ID for v in w[:k]) and all(v != PAD_ID for v in w[k + 1 :])
        assert 1 <= MAXLEN - k - 1 <= 12
    # A sentence on its own encodes exactly like the same text sent alone.
    assert short_window(prep, "Bad.", prep.token_ids("Bad."), rng) == prep.encode("Bad.").ids


def test_shift_images_moves_within_bounds():
    x = np.zeros((50, 28, 28), np.float32)
    x[:, 10:18, 10:18] = 255
    out = shift_images(x, np.random.default_rng(0), 2)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert np.allclose(out.sum((1, 2)), x.sum((1, 2)))  # the square never leaves the image
    ys, xs = np.nonzero(out.max(0))
    assert ys.min() >= 8 and ys.max() <= 19 and xs.min() >= 8 and xs.max() <= 19
    assert len({tuple(np.argwhere(o)[0]) for o in out}) > 1  # not all moved the same way
