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
import time
from dataclasses import dataclass, field

import numpy as np

from contract.text import STOPWORDS, TextPreprocessor, Vocabulary
from training import data as datasets
from training.card import Trained, command_line, metrics_measurer, model_card, training_notes
from training.schedules import keras_lr_callback
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


def keep_best():
    """A Keras callback that keeps the weights of the best epoch (best validation accuracy,
    ties: lower validation loss) and puts them back when training ends; it also times each epoch.
    Afterwards: ``best`` = (validation accuracy, validation loss), ``best_epoch`` (from 0),
    ``epoch_seconds``."""
    import keras

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

    return KeepBest()


def shifted_batches(x_tr: np.ndarray, y_tr: np.ndarray, batch_size: int, shift: int, seed: int):
    """A Keras dataset of (images, labels) batches in which every image is moved by a random
    offset of up to ``shift`` pixels (:func:`shift_images`); a new seeded order and new
    offsets every epoch."""
    import keras

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

    return Shifted()


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
    from training.models import SPECS, build

    model = build(name)
    keep = keep_best()
    # plateau (the default): the rate is halved when validation loss stalls; keep
    # restores the best epoch's weights at the end whatever happens after it.
    lr_cb = keras_lr_callback(lr_schedule, epochs, SPECS[name].learning_rate)
    if shift:
        train_args = {"x": shifted_batches(prep.x_train, prep.y_train, batch_size, shift, seed)}
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



def train_model(name: str, prep: Prepared, epochs: int, batch_size: int, verbose: int = 1, shift: int = 0,
                lr_schedule: str | None = None, seed: int = 1337, objective=None):
    """:func:`fit`, or with ``objective`` :func:`training.review_objective.fit_reviews` (text models;
    ``batch_size`` is then the objective's reviews per step). Returns (model, history, kept epoch,
    the objective as used)."""
    if objective is None:
        return (*fit(name, prep, epochs, batch_size, verbose, shift, lr_schedule, seed), None)
    from training.models import SPECS
    from training.review_objective import fit_reviews

    if SPECS[name].kind != "text":
        raise ValueError("the review objective is for the text models")
    objective = dataclasses.replace(objective, reviews_per_batch=batch_size)  # --batch-size: reviews per step
    return (*fit_reviews(name, prep, epochs, objective, lr_schedule, seed, verbose), objective)


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
    train through the whole-text combination instead of on single windows (implies ``measure``)."""
    import keras

    from training.export import export_model
    from training.models import SPECS

    spec = SPECS[name]
    epochs = epochs or spec.default_epochs
    batch_size = batch_size or spec.default_batch_size
    keras.utils.set_random_seed(seed)
    started = time.perf_counter()
    prep = prepare(name, data_dir, val_fraction, seed, limit, windows=windows)
    model, history, keep, objective = train_model(name, prep, epochs, batch_size, verbose, shift, lr_schedule, seed,
                                                  objective)
    measure = measure or objective is not None
    trained = Trained(model, history, keep, time.perf_counter() - started,
                      tuple(model.evaluate(prep.x_test, prep.y_test, batch_size=512, verbose=0)))
    command = command_line(name, epochs, batch_size, seed, limit=limit, windows=windows, objective=objective,
                           shift=shift, lr_schedule=lr_schedule, whole_text_stride=whole_text_stride,
                           measure=measure, version=version)
    card = model_card(name, prep, trained, epochs, batch_size, seed, command)
    card.update(training_notes(spec.learning_rate, epochs, keep, objective, shift, lr_schedule))
    measure_fn = metrics_measurer(name, prep, whole_text_stride) if measure or whole_text_stride else None
    path = export_model(model, name, out, card, prep.x_test[:32], prep.preprocessor, version, measure_fn)
    card = json.loads((path / "assets.extra" / "model_card.json").read_text())
    card["path"] = str(path)
    return card
