"""Learning-rate schedules shared by both training loops.

:func:`training.train.fit` (Keras ``model.fit``, one window per example) and
:func:`training.review_objective.fit_reviews` (its own loop over whole reviews) take
``lr_schedule="cosine"`` from here; neither loop imports the other.
"""

from __future__ import annotations

import math

LR_MIN = 1e-5  # where the cosine ends, and the plateau schedule's floor


def cosine_lr(epoch: int, epochs: int, lr0: float, lr_min: float = LR_MIN) -> float:
    """The learning rate of ``epoch`` (from 0) on a cosine from ``lr0`` down to ``lr_min`` over ``epochs``."""
    return lr_min + 0.5 * (lr0 - lr_min) * (1 + math.cos(math.pi * epoch / max(epochs, 1)))


def keras_lr_callback(lr_schedule: str | None, epochs: int, lr0: float):
    """The Keras callback of ``lr_schedule`` for :func:`training.train.fit`: ``"cosine"``
    (:func:`cosine_lr` from ``lr0``), or None / ``"plateau"``: halve the rate when the
    validation loss stalls for 2 epochs, down to :data:`LR_MIN`."""
    import keras

    if lr_schedule == "cosine":
        return keras.callbacks.LearningRateScheduler(lambda e, lr: cosine_lr(e, epochs, lr0))
    if lr_schedule in (None, "plateau"):
        return keras.callbacks.ReduceLROnPlateau(factor=0.5, patience=2, min_lr=LR_MIN)
    raise ValueError(f"unknown learning-rate schedule {lr_schedule!r}")
