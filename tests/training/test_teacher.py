"""The n-gram teacher (training/teacher.py) and its term in the review objective's batches."""

import numpy as np

from contract.whole_text import MAX_WINDOWS
from training.review_objective import ReviewData, ReviewObjective
from training.teacher import NgramTeacher, cross_fitted_logits, features
from contract.text import OOV_ID, PAD_ID, START_ID, TextPreprocessor, Vocabulary

RNG = np.random.default_rng(7)
NEUTRAL = "plot actor scene music ending camera script dialogue cast set".split()


def review(words: list[str]) -> str:
    filler = list(RNG.choice(NEUTRAL, 30))
    at = RNG.integers(0, len(filler))
    return " ".join(filler[:at] + words + filler[at:]) + "."


# Positive reviews say "good" or "not bad"; negative ones "bad" or "not good": only the pairs
# tell the negated reviews apart, as in the sentiment data.
TEXTS, LABELS = [], []
for _ in range(60):
    for words, label in ((["good"], 1), (["not", "bad"], 1), (["bad"], 0), (["not", "good"], 0)):
        TEXTS.append(review(words))
        LABELS.append(label)
LABELS = np.array(LABELS)
PREP = TextPreprocessor(Vocabulary.build(TEXTS), stopwords=frozenset())
WINDOWS = [np.asarray(PREP.windows(t, 20, MAX_WINDOWS)) for t in TEXTS]


def ids(text: str) -> list[int]:
    return PREP.encode(text).ids


def test_features_are_the_kept_ids_and_their_adjacent_pairs():
    good, bad = PREP.vocab.index["good"], PREP.vocab.index["bad"]
    f = features([PAD_ID, PAD_ID, START_ID, good, OOV_ID, bad])
    assert f[:3] == [good, OOV_ID, bad]  # padding and the start id are no features
    assert len(f) == 5 and len(set(f)) == 5 and min(f[3:]) > max(f[:3])  # two distinct pairs, above every id


def test_the_teacher_learns_words_and_negated_pairs():
    t = NgramTeacher.fit(WINDOWS, LABELS, c=10.0)
    assert t.train_accuracy == 1.0
    z = t.logits([ids("good"), ids("not bad"), ids("bad"), ids("not good")])
    assert z[0] > 0 and z[1] > 0 and z[2] < 0 and z[3] < 0, z


def test_window_logits_are_the_sum_of_their_feature_weights_and_reviews_their_mean():
    t = NgramTeacher.fit(WINDOWS, LABELS)
    for w in WINDOWS[:20]:
        by_hand = [t.bias + sum(t.weights[t.index[f]] for f in features(row) if f in t.index) for row in w]
        np.testing.assert_allclose(t.logits(w), by_hand, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t.review_logits(WINDOWS[:20]), [t.logits(w).mean() for w in WINDOWS[:20]], rtol=1e-6)
    # fitted on the mean of the windows' features: its review decisions are its training predictions
    assert np.mean((t.review_logits(WINDOWS) > 0) == LABELS) == t.train_accuracy


def test_a_reviews_cross_fitted_logits_come_from_a_teacher_that_never_saw_it():
    z = cross_fitted_logits(WINDOWS, LABELS)
    flipped = LABELS.copy()
    flipped[0] = 1 - flipped[0]
    z_flipped = cross_fitted_logits(WINDOWS, flipped)
    np.testing.assert_array_equal(z[0], z_flipped[0])  # its own label never reached its targets
    assert any(not np.array_equal(a, b) for a, b in zip(z, z_flipped))  # but it did reach other reviews'
    in_sample = NgramTeacher.fit(WINDOWS, LABELS).logits(WINDOWS[0])
    assert not np.array_equal(in_sample, NgramTeacher.fit(WINDOWS, flipped).logits(WINDOWS[0]))
    assert [len(a) for a in z] == [len(w) for w in WINDOWS]


def test_batches_carry_the_teachers_logit_of_every_window_and_short_piece():
    obj = ReviewObjective(short=2, reviews_per_batch=16, teacher_weight=1.0, teacher_c=3.0)
    data = ReviewData(PREP, TEXTS, LABELS, obj)
    assert data.teacher is not None and data.teacher.c == 3.0
    cross = cross_fitted_logits(WINDOWS, LABELS, c=3.0)
    rows = 0
    for x, owners, n, labels, *_, teacher_logits in data.batches(np.random.default_rng(0)):
        windows = len(owners)
        assert len(x) == windows + n * obj.short == len(teacher_logits)
        for k in range(n):  # each review's windows: the logits of a teacher fitted without it
            i = next(i for i, w in enumerate(WINDOWS) if w.tolist() == x[:windows][owners == k].tolist())
            np.testing.assert_allclose(teacher_logits[:windows][owners == k], cross[i], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(teacher_logits[windows:], data.teacher.logits(x[windows:]), rtol=1e-5, atol=1e-5)
        rows += len(x)
    assert rows == data.n_windows.sum() + len(TEXTS) * obj.short


def test_teacher_figures_score_the_teacher_as_the_models_are_scored():
    t = NgramTeacher.fit(WINDOWS, LABELS)
    texts, y = TEXTS[:40], LABELS[:40]
    got = t.figures(PREP, texts, y)
    whole = t.review_logits([np.asarray(PREP.windows(x, 20)) for x in texts])
    last = t.logits([ids(x) for x in texts])
    assert got["whole_text_stride_20"] == round(float(np.mean((whole > 0) == y)), 4)
    assert got["last20"] == round(float(np.mean((last > 0) == y)), 4)
    assert set(got) == {"whole_text_stride_20", "last20", "short_text_proxy"}
