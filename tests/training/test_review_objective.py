"""The review objective (training/review_objective.py): its batches hold exactly the windows the
gateway scores, and its whole-text term is the cross-entropy of the served combination."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from contract.whole_text import combine_mean_log_prob, log_probs_to_probs
from training.models import build
from contract.whole_text import MAX_WINDOWS
from training.review_objective import ReviewData, ReviewObjective, make_train_step, review_losses
from contract.text import MAXLEN, TextPreprocessor, Vocabulary

TEXTS = [
    "Great acting. Loved it! " + " ".join(f"word{i}" for i in range(60)) + ". Truly awful ending.",
    "Short and sweet.",
    "Bad.",
    " ".join(f"w{i % 7}" for i in range(45)) + ". Not for me.",
    " ".join(f"filler{i}" for i in range(900)),  # more windows than the gateway scores
]
LABELS = np.array([1, 1, 0, 0, 1])


def test_batches_hold_the_gateways_windows_tails_and_short_pieces():
    prep = TextPreprocessor(Vocabulary.build(TEXTS))
    obj = ReviewObjective(short=2, reviews_per_batch=3)
    data = ReviewData(prep, TEXTS, LABELS, obj)
    seen = []
    for x, owners, n, labels, tails, short_labels, teacher_logits in data.batches(np.random.default_rng(0)):
        assert x.dtype == np.int32 and x.shape[1] == MAXLEN
        windows = len(owners)
        assert len(x) == windows + n * obj.short and len(short_labels) == n * obj.short
        for k in range(n):
            mine = x[:windows][owners == k]
            text = next(i for i, t in enumerate(TEXTS) if prep.windows(t, 20, MAX_WINDOWS) == mine.tolist())
            assert labels[k] == LABELS[text]
            assert x[tails[k]].tolist() == prep.encode(TEXTS[text]).ids  # the last window is the default one
            seen.append(text)
        assert (short_labels == np.repeat(labels, obj.short)).all()
        assert teacher_logits.shape == (len(x),) and not teacher_logits.any()  # no teacher: zeros, weighing nothing
    assert sorted(seen) == list(range(len(TEXTS)))
    assert data.n_windows.max() == MAX_WINDOWS


def test_the_whole_text_loss_is_the_cross_entropy_of_the_served_combination():
    prep = TextPreprocessor(Vocabulary.build(TEXTS))
    obj = ReviewObjective(short=1, reviews_per_batch=len(TEXTS))
    x, owners, n, labels, tails, short_labels, _ = next(ReviewData(prep, TEXTS, LABELS, obj).batches(np.random.default_rng(0)))
    rng = np.random.default_rng(1)
    a = rng.uniform(0.01, 0.99, len(x)).astype(np.float32)
    p = np.stack([1 - a, a], axis=1)  # any probabilities the model could give
    z = rng.normal(0, 3, len(x)).astype(np.float32)  # any teacher logits
    whole, tail, short, teacher = (
        float(v) for v in review_losses(tf.constant(p), owners, n, labels, tails, short_labels, tf.constant(z))
    )
    served = log_probs_to_probs(combine_mean_log_prob(p[: len(owners)], owners, int(n)))  # as the gateway combines
    np.testing.assert_allclose(whole, -np.mean(np.log(served[np.arange(int(n)), labels])), rtol=1e-5)
    np.testing.assert_allclose(tail, -np.mean(np.log(p[tails, labels])), rtol=1e-5)
    np.testing.assert_allclose(short, -np.mean(np.log(p[len(owners):][np.arange(int(n)), short_labels])), rtol=1e-5)
    q = 1 / (1 + np.exp(-z.astype(np.float64)))  # the teacher's probability of "positive", every row
    np.testing.assert_allclose(teacher, -np.mean(q * np.log(p[:, 1]) + (1 - q) * np.log(p[:, 0])), rtol=1e-5)


@pytest.mark.parametrize("teacher_weight", [0.0, 2.0])
def test_one_training_step_lowers_the_loss_on_its_batch(teacher_weight):
    keras.utils.set_random_seed(0)
    prep = TextPreprocessor(Vocabulary.build(TEXTS))
    model = build("sentiment_lstm")
    obj = ReviewObjective(reviews_per_batch=len(TEXTS), teacher_weight=teacher_weight)
    batch = next(ReviewData(prep, TEXTS, LABELS, obj).batches(np.random.default_rng(0)))
    step = make_train_step(model, keras.optimizers.Adam(1e-2), obj)

    def loss_now():
        p = model(tf.constant(batch[0]), training=False)
        w = (1.0, obj.tail_weight, obj.short_weight, obj.teacher_weight)
        return sum(k * float(v) for k, v in zip(w, review_losses(p, *batch[1:])))

    before = loss_now()
    for _ in range(5):
        step(*batch)
    assert loss_now() < before
