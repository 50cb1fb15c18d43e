"""The model card of a training run (:func:`training.train.run`): how it was trained, what
it scored, and (with ``--metrics``) the figures measured through the exported signature."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from training.schedules import LR_MIN
from training.windows import WindowScheme


@dataclass
class Trained:
    """What a training run produced, as the card reports it."""

    model: object
    history: dict
    keep: object  # train.keep_best's callback or review_objective.Kept: best, best_epoch, epoch_seconds
    seconds: float  # data preparation and training
    test: tuple[float, float]  # (loss, accuracy) on the test split


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line(name: str, epochs: int, batch_size: int, seed: int, *, limit=None, windows=None, objective=None,
                 shift: int = 0, lr_schedule=None, whole_text_stride=None, measure: bool = False, version=None) -> str:
    """The ``python -m training`` command that repeats the run (default options left out)."""
    scheme = WindowScheme.parse(windows).name if windows else "tail"
    return (
        f"python -m training {name} --epochs {epochs} --batch-size {batch_size} --seed {seed}"
        + (f" --limit {limit}" if limit else "")
        + (f" --windows {scheme}" if scheme != "tail" else "")
        + (objective.cli() if objective is not None else "")
        + (f" --shift {shift}" if shift else "")
        + (f" --lr-schedule {lr_schedule}" if lr_schedule and lr_schedule != "plateau" else "")
        + (f" --whole-text-stride {whole_text_stride}" if whole_text_stride else "")
        + (" --metrics" if measure and not whole_text_stride else "")
        + (f" --version {version}" if version is not None else "")
    )


def model_card(name: str, prep, trained: Trained, epochs: int, batch_size: int, seed: int, command: str) -> dict:
    """The card's figures and provenance (``prep``: :class:`training.train.Prepared`)."""
    import keras
    import tensorflow as tf

    from training.models import SPECS

    spec, keep = SPECS[name], trained.keep
    test_loss, test_acc = trained.test
    return {
        "test_accuracy": round(float(test_acc), 4),
        "test_loss": round(float(test_loss), 4),
        "test_examples": int(len(prep.y_test)),
        "validation_accuracy": round(float(keep.best[0]), 4),
        "validation_loss": round(float(keep.best[1]), 4),
        "validation_examples": int(len(prep.y_val)),
        "train_examples": int(len(prep.y_train)),
        "best_epoch": keep.best_epoch + 1,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": spec.learning_rate,
        "seed": seed,
        "training_seconds": round(trained.seconds, 1),
        "seconds_per_epoch": [round(s, 1) for s in keep.epoch_seconds],
        "history": {k: [round(float(v), 4) for v in vs] for k, vs in trained.history.items()},
        "data_files_sha256": prep.sources,
        "vocab_sha256": prep.preprocessor.vocab.sha256() if prep.preprocessor else None,
        "parameters": int(trained.model.count_params()),
        "labels": list(spec.labels),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        **prep.info,
    }


def training_notes(learning_rate: float, epochs: int, keep, objective=None, shift: int = 0, lr_schedule=None) -> dict:
    """The card's blocks for the options that change training: ``objective`` (the review
    objective, with its teacher), ``augmentation`` (``shift``), ``learning_rate_schedule``."""
    notes: dict = {}
    if objective is not None:
        notes["objective"] = {**objective.describe(), "selection": "the epoch with the best mean of validation "
                              "last-20, whole-text and short-text-proxy accuracy"}
        if keep.teacher:
            notes["objective"]["teacher"] = keep.teacher
    if shift:
        notes["augmentation"] = {"random_shift_pixels": shift, "fill": 0, "per": "image and epoch"}
    if lr_schedule and lr_schedule != "plateau":
        notes["learning_rate_schedule"] = {"name": lr_schedule, "from": learning_rate, "to": LR_MIN, "epochs": epochs}
    return notes


def metrics_measurer(name: str, prep, whole_text_stride: int | None):
    """The ``measure_fn`` of :func:`training.export.export_model`: training.metrics' figures of the
    exported version (validation at strides 20, 10 and the card's; test at the card's), and for
    text models the card's ``whole_text`` block (``whole_text_stride``, default 20)."""
    from training.metrics import version_metrics
    from training.models import SPECS

    spec = SPECS[name]
    stride = whole_text_stride or 20
    val_strides = sorted({stride, 20, 10}, reverse=True)

    def measure_fn(path):
        t0 = time.perf_counter()
        m = version_metrics(path, name, prep.preprocessor, prep.val_raw, prep.test_raw, val_strides, (stride,))
        extra = {"metrics": m, "metrics_seconds": round(time.perf_counter() - t0, 1)}
        if spec.kind == "text":
            from training.metrics import WHOLE_TEXT_STRIDE_CHOICE

            extra["whole_text"] = {"stride": stride, "combine": "mean_log_probability"}
            extra["whole_text_stride_choice"] = WHOLE_TEXT_STRIDE_CHOICE
        return extra

    return measure_fn
