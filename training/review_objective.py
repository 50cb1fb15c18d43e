"""Training for whole-review scoring: the loss of the served combination itself.

Whole-text scoring (the gateway's ``whole_text`` option, ``training.metrics``) scores
every 20-token window of a review with the same model and takes, per class, the mean
log-probability over the windows. Training each window on its own with the review's
label (``training.windows``) teaches the model that every window of a positive review
is positive, which most are not; the mean of such windows is then dominated by neutral
ones. Here the model is trained through the combination instead: every step takes a
batch of whole reviews, scores **all** their windows (exactly the ones the gateway
scores, ``TextPreprocessor.windows``), combines them by mean log-probability and
minimises the cross-entropy of the combined prediction, so a window only has to lean
the right way where it carries evidence. Two per-window terms keep the single-window
uses right:

- ``tail``: the review's last window alone (the default last-20 mode, version 1's data);
- ``short``: ``short`` short pieces per review (a sentence of 1-12 kept tokens encoded as
  a short text, :func:`training.windows.short_window`), for short inputs.

With ``teacher_weight`` > 0 a third per-row term distils an n-gram teacher
(:mod:`training.teacher`): the cross-entropy between the model's probabilities for every
window and short piece and the teacher's ``sigmoid(logit)`` for that row. The teacher's
review decision is the mean of its window logits, the served combination's form, so it
tells each window how far to lean rather than only the review's label.

loss = whole + tail_weight * tail + short_weight * short + teacher_weight * teacher. The
architecture, the vocabulary and the exported signature are unchanged: this only changes
the loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from contract.whole_text import MAX_WINDOWS, owners_of
from training.schedules import cosine_lr
from training.windows import review_windows, short_window


@dataclass(frozen=True)
class ReviewObjective:
    tail_weight: float = 1.0
    short_weight: float = 1.0
    short: int = 1
    stride: int = 20
    reviews_per_batch: int = 32
    teacher_weight: float = 0.0
    teacher_c: float = 1.0

    def cli(self) -> str:
        """The training CLI's options for this objective (``--batch-size`` is reviews_per_batch)."""
        return (f" --objective review --tail-weight {self.tail_weight:g} --short-weight {self.short_weight:g}"
                f" --short {self.short}"
                + (f" --teacher-weight {self.teacher_weight:g} --teacher-c {self.teacher_c:g}" if self.teacher_weight else ""))

    def describe(self) -> dict:
        return {
            "loss": "cross-entropy of the mean log-probability over every window of the review "
            f"(stride {self.stride}, at most {MAX_WINDOWS} windows, the last ones) "
            f"+ {self.tail_weight} x cross-entropy of the last window alone "
            f"+ {self.short_weight} x cross-entropy of {self.short} short piece(s) per review"
            + (f" + {self.teacher_weight} x cross-entropy against the n-gram teacher's probability of every window "
               "and short piece (training/teacher.py; a window's from a teacher fitted without its review, 5 folds)"
               if self.teacher_weight else ""),
            "reviews_per_batch": self.reviews_per_batch,
            "short_window": "a sentence of the review with 1-12 kept tokens encoded as a short text "
            "(start id, padded 'pre'), else 2-8 consecutive kept tokens; drawn anew every epoch",
        }


class ReviewData:
    """The training reviews as windows, ready to batch."""

    def __init__(self, prep, texts, labels, objective: ReviewObjective):
        self.prep, self.texts, self.objective = prep, list(texts), objective
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ids = [prep.token_ids(t) for t in self.texts]
        self.windows = review_windows(prep, self.ids, objective.stride, MAX_WINDOWS)
        self.n_windows = np.array([len(w) for w in self.windows])
        self.teacher = None
        if objective.teacher_weight:
            from training.teacher import NgramTeacher, cross_fitted_logits

            # windows: a teacher that never saw their review; short pieces: the teacher of all reviews
            self.teacher = NgramTeacher.fit(self.windows, self.labels, objective.teacher_c)
            self.teacher_logits = cross_fitted_logits(self.windows, self.labels, objective.teacher_c)

    def __len__(self) -> int:
        return len(self.texts)

    def batches(self, rng: np.random.Generator):
        """Yield (x [rows, maxlen], owners [windows], n_reviews, labels, tail_rows, short_labels,
        teacher_logits [rows]): x holds every window of the batch's reviews first, then their
        short pieces; without a teacher its logits are zeros (and weigh nothing)."""
        obj = self.objective
        order = rng.permutation(len(self))
        for start in range(0, len(order), obj.reviews_per_batch):
            idx = order[start : start + obj.reviews_per_batch]
            wins = [self.windows[i] for i in idx]
            counts = np.array([len(w) for w in wins])
            owners = owners_of(counts)
            tails = np.cumsum(counts) - 1
            shorts = [
                short_window(self.prep, self.texts[i], self.ids[i], rng) for i in idx for _ in range(obj.short)
            ]
            parts = wins + ([np.asarray(shorts, dtype=np.int32)] if shorts else [])
            x = np.concatenate(parts).astype(np.int32)
            if self.teacher is not None:
                z = np.concatenate([self.teacher_logits[i] for i in idx] + [self.teacher.logits(shorts)])
            else:
                z = np.zeros(len(x), np.float32)
            yield (
                x,
                owners.astype(np.int32),
                np.int32(len(idx)),
                self.labels[idx].astype(np.int32),
                tails.astype(np.int32),
                np.repeat(self.labels[idx], obj.short).astype(np.int32),
                z.astype(np.float32),
            )


def review_losses(p, owners, n, labels, tails, short_labels, teacher_logits):
    """(whole, tail, short, teacher) cross-entropies from the model's probabilities ``p`` of a
    batch (:meth:`ReviewData.batches`): ``whole`` is that of the mean log-probability over each
    review's windows, renormalised (exactly the served combination, training.metrics);
    ``teacher`` that of every row against sigmoid(teacher_logits)."""
    import tensorflow as tf

    n_win = tf.shape(owners)[0]
    logp = tf.math.log(tf.clip_by_value(p, 1e-7, 1.0))
    win_logp = logp[:n_win]
    mean = tf.math.unsorted_segment_mean(win_logp, owners, n)
    whole = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=mean))
    tail = -tf.reduce_mean(tf.gather(tf.gather(win_logp, tails), labels, batch_dims=1))
    short_logp = logp[n_win:]
    short = tf.cond(
        tf.shape(short_logp)[0] > 0,
        lambda: -tf.reduce_mean(tf.gather(short_logp, short_labels, batch_dims=1)),
        lambda: tf.constant(0.0),
    )
    q = tf.sigmoid(teacher_logits)
    teacher = -tf.reduce_mean(q * logp[:, 1] + (1.0 - q) * logp[:, 0])
    return whole, tail, short, teacher


def make_train_step(model, optimizer, objective: ReviewObjective):
    import tensorflow as tf

    tw, sw, kw = float(objective.tail_weight), float(objective.short_weight), float(objective.teacher_weight)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.int32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None], tf.float32),
        ]
    )
    def step(x, owners, n, labels, tails, short_labels, teacher_logits):
        with tf.GradientTape() as tape:
            p = model(x, training=True)
            whole, tail, short, teacher = review_losses(p, owners, n, labels, tails, short_labels, teacher_logits)
            loss = whole + tw * tail + sw * short + kw * teacher
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss, whole, tail, short, teacher

    return step


def fit_reviews(
    name: str,
    prep,
    epochs: int,
    objective: ReviewObjective,
    lr_schedule: str | None = None,
    seed: int = 1337,
    verbose: int = 1,
):
    """Train ``name`` with the review objective; keep the epoch with the best validation
    score, the mean of last-20, whole-text and short-proxy accuracy. ``lr_schedule="cosine"``:
    the learning rate falls from the model's rate to 1e-5 (:func:`training.schedules.cosine_lr`,
    as :func:`training.train.fit`); otherwise it stays at the model's rate.

    Returns (model with the best epoch's weights, history dict, :class:`Kept`)."""
    import keras

    from training.models import SPECS, build

    model = build(name)
    lr0 = SPECS[name].learning_rate
    optimizer = keras.optimizers.Adam(lr0)
    step = make_train_step(model, optimizer, objective)
    data = ReviewData(prep.preprocessor, prep.train_raw[0], prep.train_raw[1], objective)
    rng = np.random.default_rng(seed)
    history: dict[str, list[float]] = {}
    best = {"score": -1.0, "epoch": -1, "weights": None}
    epoch_seconds = []
    for epoch in range(epochs):
        if lr_schedule == "cosine":
            optimizer.learning_rate.assign(cosine_lr(epoch, epochs, lr0))
        t0 = time.perf_counter()
        losses = train_epoch(step, data, rng)
        epoch_seconds.append(time.perf_counter() - t0)
        val = validation_accuracies(model, prep, objective.stride)
        score = float(np.mean(list(val.values())))
        row = {**losses, **val, "val_score": round(score, 4), "learning_rate": float(optimizer.learning_rate.numpy())}
        for k, v in row.items():
            history.setdefault(k, []).append(v)
        if verbose:
            print(f"epoch {epoch + 1}/{epochs} {epoch_seconds[-1]:.0f}s", row, flush=True)
        if score > best["score"]:
            best.update(score=score, epoch=epoch, weights=model.get_weights())
    if best["weights"] is not None:
        model.set_weights(best["weights"])
    return model, history, kept_epoch(model, prep, data, best["epoch"], best["score"], epoch_seconds)


def train_epoch(step, data: ReviewData, rng: np.random.Generator) -> dict[str, float]:
    """One pass of ``step`` (:func:`make_train_step`) over every batch of ``data``; the mean of
    each loss term over the batches (the teacher's only when there is one), rounded."""
    sums = np.zeros(5)
    nb = 0
    for batch in data.batches(rng):
        sums += np.array([float(v) for v in step(*batch)])
        nb += 1
    names = ("loss", "whole_loss", "tail_loss", "short_loss") + (("teacher_loss",) if data.teacher is not None else ())
    return dict(zip(names, (sums / max(nb, 1)).round(4).tolist()))


def validation_accuracies(model, prep, stride: int) -> dict[str, float]:
    """The three accuracies the review objective keeps its epoch by (training.metrics, on the
    validation split): last-20, whole-text at ``stride`` and the short-text proxy."""
    from training.metrics import text_metrics

    m = text_metrics(
        lambda x: model.predict(x, batch_size=2048, verbose=0), prep.preprocessor,
        prep.val_raw[0], prep.val_raw[1], (stride,),
    )
    return {
        "val_last20": m["last20"]["accuracy"],
        "val_whole_text": m["whole_text"][f"stride_{stride}"]["accuracy"],
        "val_short_proxy": m["short_text_proxy"]["accuracy"],
    }


def kept_epoch(model, prep, data: ReviewData, epoch: int, score: float, epoch_seconds: list[float]) -> Kept:
    """:class:`Kept` for ``model`` holding the kept epoch's weights: its validation last-20
    accuracy and loss, and the teacher's description and validation figures (if any)."""
    val_loss, val_acc = model.evaluate(prep.x_val, prep.y_val, batch_size=2048, verbose=0)
    teacher = None if data.teacher is None else {
        **data.teacher.describe(), "validation": data.teacher.figures(prep.preprocessor, *prep.val_raw)}
    return Kept(epoch, (float(val_acc), float(val_loss)), epoch_seconds, score, teacher)


@dataclass
class Kept:
    """What :func:`training.train.run` reads of the kept epoch (as of :func:`training.train.keep_best`):
    ``best`` = (validation last-20 accuracy, validation loss) of the kept weights."""

    best_epoch: int
    best: tuple[float, float]
    epoch_seconds: list[float]
    score: float
    teacher: dict | None = None  # the n-gram teacher's description and validation figures, when one was used
