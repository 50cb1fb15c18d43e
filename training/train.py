"""Train one of the models, keep its best epoch, evaluate on the test split, export.

The validation split is held out **from the training data** (a seeded
``--val-fraction`` of it); the test split is used exactly once, after training,
to report the final accuracy. The epoch with the best validation accuracy
(ties: lower validation loss) is the one kept and exported. For text models the
vocabulary is built from the training part only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training import data as datasets
from contract.text import STOPWORDS, TextPreprocessor, Vocabulary
from training.windows import SCHEME_COMPARISON, WindowScheme
from training.windows import sample as sample_windows


@dataclass
class Prepared:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    sources: dict[str, str]
    preprocessor: TextPreprocessor | None = None
    info: dict = field(default_factory=dict)
    # Raw validation/test inputs (texts, or 0-255 images) for training.metrics.
    val_raw: tuple | None = None
    test_raw: tuple | None = None
    train_raw: tuple | None = None  # text models: (training-part texts, labels), for training.review_objective


def prepare(
    name: str,
    data_dir=None,
    val_fraction: float = 0.1,
    seed: int = 1337,
    limit: int | None = None,
    stopwords: frozenset[str] = STOPWORDS,
    windows: str | None = None,
) -> Prepared:
    """Load the data of ``name`` and turn it into model inputs.

    ``windows`` (text models): the training-data scheme of :mod:`training.windows`
    (None or "tail": each review's last 20 tokens only, as version 1)."""
    from training.models import SPECS

    spec = SPECS[name]
    ds = datasets.load_mnist(data_dir) if spec.kind == "image" else datasets.load_imdb(data_dir)
    x_all, y_all = ds.train.x, ds.train.y
    x_test, y_test = ds.test.x, ds.test.y
    if limit:
        x_all, y_all, x_test, y_test = x_all[:limit], y_all[:limit], x_test[:limit], y_test[:limit]
    tr, va = datasets.split_validation(len(y_all), val_fraction, seed)
    if spec.kind == "image":
        f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731 - raw 0-255, scaled in the model
        x_all, x_test = f32(x_all), f32(x_test)
        return Prepared(
            x_all[tr], y_all[tr], x_all[va], y_all[va], x_test, y_test, ds.sources,
            val_raw=(x_all[va], y_all[va]), test_raw=(x_test, y_test),
        )
    vocab = Vocabulary.build((x_all[i] for i in tr), stopwords=stopwords)
    prep = TextPreprocessor(vocab, stopwords=stopwords)
    enc = prep.encode_batch
    x_enc = enc(x_all)
    x_test_enc = enc(x_test)
    oov = float(np.mean(x_test_enc == 2) / max(np.mean(x_test_enc > 0), 1e-9))
    info = {"test_oov_ratio_in_window": round(oov, 4)}
    x_train, y_train = x_enc[tr], y_all[tr]
    scheme = WindowScheme.parse(windows)
    if scheme.name != "tail":
        x_train, y_train = sample_windows(prep, [x_all[i] for i in tr], y_all[tr], scheme, seed)
        info["training_windows"] = {
            **scheme.describe(), "train_reviews": int(len(tr)), "train_windows": int(len(y_train)),
            "scheme_comparison": SCHEME_COMPARISON,
        }
    return Prepared(
        x_train, y_train, x_enc[va], y_all[va], x_test_enc, y_test, ds.sources, prep, info,
        val_raw=([x_all[i] for i in va], y_all[va]), test_raw=(x_test, y_test),
        train_raw=([x_all[i] for i in tr], y_all[tr]),
    )


def shift_images(x: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Each image moved by a random (dy, dx) in [-max_shift, max_shift]^2, zero-filled."""
    n, h, w = x.shape
    p = max_shift
    padded = np.zeros((n, h + 2 * p, w + 2 * p), dtype=x.dtype)
    padded[:, p : p + h, p : p + w] = x
    dy = rng.integers(0, 2 * p + 1, n)
    dx = rng.integers(0, 2 * p + 1, n)
    rows = dy[:, None] + np.arange(h)[None, :]  # [n, h]
    cols = dx[:, None] + np.arange(w)[None, :]  # [n, w]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def cosine_lr(epoch: int, epochs: int, lr0: float, lr_min: float = 1e-5) -> float:
    """The learning rate of ``epoch`` (from 0) on a cosine from ``lr0`` down to ``lr_min`` over ``epochs``."""
    return lr_min + 0.5 * (lr0 - lr_min) * (1 + math.cos(math.pi * epoch / max(epochs, 1)))


def fit(
    name: str,
    prep: Prepared,
    epochs: int,
    batch_size: int,
    verbose: int = 1,
    shift: int = 0,
    lr_schedule: str | None = None,
    seed: int = 1337,
):
    """Train; return (model with the best epoch's weights, history dict, timings).

    ``shift`` > 0 (images): every epoch sees each training image moved by a random
    offset of up to ``shift`` pixels in each direction. ``lr_schedule="cosine"``:
    the learning rate follows a cosine from the model's rate down to 1e-5 over
    ``epochs`` instead of being halved on a validation-loss plateau."""
    import keras

    from training.models import build

    model = build(name)

    class KeepBest(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best = (-1.0, float("inf"))
            self.best_epoch = -1
            self.weights = None
            self.epoch_seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_seconds.append(time.perf_counter() - self._t)
            key = (logs["val_accuracy"], logs["val_loss"])
            if key[0] > self.best[0] or (key[0] == self.best[0] and key[1] < self.best[1]):
                self.best, self.best_epoch = key, epoch
                self.weights = self.model.get_weights()

        def on_train_end(self, logs=None):
            if self.weights is not None:
                self.model.set_weights(self.weights)

    keep = KeepBest()
    if lr_schedule == "cosine":
        from training.models import SPECS

        lr_cb = keras.callbacks.LearningRateScheduler(lambda e, lr: cosine_lr(e, epochs, SPECS[name].learning_rate))
    elif lr_schedule in (None, "plateau"):
        # Halve the learning rate when validation loss stalls; KeepBest restores
        # the best epoch's weights at the end whatever happens after it.
        lr_cb = keras.callbacks.ReduceLROnPlateau(factor=0.5, patience=2, min_lr=1e-5)
    else:
        raise ValueError(f"unknown learning-rate schedule {lr_schedule!r}")
    if shift:
        x_tr, y_tr = prep.x_train, prep.y_train

        class Shifted(keras.utils.PyDataset):
            def __init__(self):
                super().__init__()
                self.rng = np.random.default_rng(seed)
                self.order = self.rng.permutation(len(y_tr))

            def __len__(self):
                return math.ceil(len(y_tr) / batch_size)

            def __getitem__(self, i):
                idx = self.order[i * batch_size : (i + 1) * batch_size]
                return shift_images(x_tr[idx], self.rng, shift), y_tr[idx]

            def on_epoch_end(self):
                self.order = self.rng.permutation(len(y_tr))

        train_args = {"x": Shifted()}
    else:
        train_args = {"x": prep.x_train, "y": prep.y_train, "batch_size": batch_size}
    history = model.fit(
        **train_args,
        validation_data=(prep.x_val, prep.y_val),
        epochs=epochs,
        callbacks=[lr_cb, keep],
        verbose=verbose,
    )
    return model, history.history, keep


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(
    name: str,
    epochs: int | None = None,
    batch_size: int | None = None,
    data_dir=None,
    out="models",
    seed: int = 1337,
    val_fraction: float = 0.1,
    limit: int | None = None,
    version: int | None = None,
    verbose: int = 1,
    windows: str | None = None,
    shift: int = 0,
    lr_schedule: str | None = None,
    whole_text_stride: int | None = None,
    measure: bool = False,
    objective=None,
) -> dict:
    """Train, evaluate on the test split and export; return the model card.

    ``measure`` (implied by ``whole_text_stride``): add training.metrics' figures,
    measured through the exported signature, to the card; text models then also
    get ``"whole_text": {"stride": S, "combine": "mean_log_probability"}``.
    ``objective`` (a :class:`training.review_objective.ReviewObjective`, text models):
    train through the whole-text combination instead of on single windows."""
    import keras
    import tensorflow as tf

    from training.export import export_model
    from training.models import SPECS

    spec = SPECS[name]
    epochs = epochs or spec.default_epochs
    batch_size = batch_size or spec.default_batch_size
    keras.utils.set_random_seed(seed)
    started = time.perf_counter()
    prep = prepare(name, data_dir, val_fraction, seed, limit, windows=windows)
    if objective is not None:
        from training.review_objective import fit_reviews

        if spec.kind != "text":
            raise ValueError("the review objective is for the text models")
        objective = dataclasses.replace(objective, reviews_per_batch=batch_size)  # --batch-size: reviews per step
        model, history, keep = fit_reviews(name, prep, epochs, objective, lr_schedule, seed, verbose)
        measure = True
    else:
        model, history, keep = fit(name, prep, epochs, batch_size, verbose, shift, lr_schedule, seed)
    train_seconds = time.perf_counter() - started
    test_loss, test_acc = model.evaluate(prep.x_test, prep.y_test, batch_size=512, verbose=0)
    card = {
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
        "training_seconds": round(train_seconds, 1),
        "seconds_per_epoch": [round(s, 1) for s in keep.epoch_seconds],
        "history": {k: [round(float(v), 4) for v in vs] for k, vs in history.items()},
        "data_files_sha256": prep.sources,
        "vocab_sha256": prep.preprocessor.vocab.sha256() if prep.preprocessor else None,
        "parameters": int(model.count_params()),
        "labels": list(spec.labels),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": f"python -m training {name} --epochs {epochs} --batch-size {batch_size} --seed {seed}"
        + (f" --limit {limit}" if limit else "")
        + (f" --windows {WindowScheme.parse(windows).name}" if windows and WindowScheme.parse(windows).name != "tail" else "")
        + (objective.cli() if objective is not None else "")
        + (f" --shift {shift}" if shift else "")
        + (f" --lr-schedule {lr_schedule}" if lr_schedule and lr_schedule != "plateau" else "")
        + (f" --whole-text-stride {whole_text_stride}" if whole_text_stride else "")
        + (" --metrics" if measure and not whole_text_stride else "")
        + (f" --version {version}" if version is not None else ""),
        **prep.info,
    }
    if objective is not None:
        card["objective"] = {**objective.describe(), "selection": "the epoch with the best mean of validation "
                             "last-20, whole-text and short-text-proxy accuracy"}
        if keep.teacher:
            card["objective"]["teacher"] = keep.teacher
    if shift:
        card["augmentation"] = {"random_shift_pixels": shift, "fill": 0, "per": "image and epoch"}
    if lr_schedule and lr_schedule != "plateau":
        card["learning_rate_schedule"] = {"name": lr_schedule, "from": spec.learning_rate, "to": 1e-5, "epochs": epochs}
    measure_fn = None
    if measure or whole_text_stride:
        from training.metrics import version_metrics

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

    path = export_model(model, name, out, card, prep.x_test[:32], prep.preprocessor, version, measure_fn)
    card = json.loads((path / "assets.extra" / "model_card.json").read_text())
    card["path"] = str(path)
    return card
