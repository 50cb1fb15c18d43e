"""Measure preprocessing choices on the validation split (never the test split).

    python -m training.experiments [--model sentiment_lstm --epochs 4]
    python -m training.experiments --windows tail,r3,r2s1 [--model sentiment_bilstm --epochs 2]
    python -m training.experiments --bow-reference   (a bag-of-words reference on the same vocabulary)
    python -m training.experiments --teacher 0.3,1,3  (the n-gram teacher of training/teacher.py, per C)
    python -m training.experiments --proxy-ceiling   (how far the vocabulary carries the short-text proxy)

Only the last 20 tokens of a review reach the model, so what the tokeniser lets
into those slots matters most. Each variant builds its own 1,000-id vocabulary
from the training part, trains the same model with the same seed, and reports
the best validation accuracy, how much of the 20-slot window holds real words,
and how much of that is out-of-vocabulary.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from contract.text import FUNCTION_WORDS, STOPWORDS

VARIANTS = {
    "words, no filter": frozenset(),
    "words, function words dropped": FUNCTION_WORDS,
    "words, function words + frequent neutral domain words dropped (chosen: STOPWORDS)": STOPWORDS,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.experiments")
    p.add_argument("--model", default="sentiment_lstm", choices=["sentiment_lstm", "sentiment_bilstm"])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--data-dir")
    p.add_argument("--windows", help="compare these training-window schemes (comma-separated, e.g. tail,r3,r2s1) "
                   "instead of the stop-word variants: validation last-20, whole-text (strides 20 and 10) and short-text proxy")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--bow-reference", action="store_true",
                   help="a reference instead: logistic regression on log(1 + count) of each vocabulary word "
                   "of the whole review (full-batch gradient descent), validation and test accuracy")
    p.add_argument("--teacher", metavar="C,C,...", help="instead: fit the n-gram teacher (training/teacher.py) with each "
                   "inverse L2 strength C and print its validation and test figures, scored as the models are")
    p.add_argument("--proxy-ceiling", action="store_true", help="instead: an n-gram model trained on the short-text "
                   "proxy's own kind of data, for the proxy's reach with this vocabulary")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.proxy_ceiling:
        print(json.dumps(proxy_ceiling(a.data_dir, a.seed)))
    elif a.bow_reference:
        print(json.dumps(bow_reference(a.data_dir, a.seed)))
    elif a.teacher:
        teacher_figures(a.data_dir, a.seed, (float(v) for v in a.teacher.split(",")))
    elif a.windows:
        compare_schemes(a.model, a.windows.split(","), a.epochs, a.batch_size, a.data_dir, a.seed)
    else:
        compare_stopwords(a.model, a.epochs, a.data_dir, a.seed)
    return 0


def teacher_figures(data_dir, seed: int, cs) -> None:
    """Print the n-gram teacher's description and validation/test figures for each C (one JSON line each)."""
    from training.review_objective import ReviewData, ReviewObjective
    from training.teacher import NgramTeacher
    from training.train import prepare

    prep = prepare("sentiment_lstm", data_dir, 0.1, seed)
    data = ReviewData(prep.preprocessor, prep.train_raw[0], prep.train_raw[1], ReviewObjective())
    for c in cs:
        t = NgramTeacher.fit(data.windows, data.labels, c)
        print(json.dumps({**t.describe(), "validation": t.figures(prep.preprocessor, *prep.val_raw),
                          "test": t.figures(prep.preprocessor, *prep.test_raw)}), flush=True)


def compare_schemes(model_name: str, schemes, epochs: int, batch_size: int | None, data_dir, seed: int) -> None:
    """Train ``model_name`` on each training-window scheme (training/windows.py), same seed; print
    one JSON line each: validation last-20, whole-text (strides 20 and 10) and short-proxy figures."""
    import time

    import keras

    from training.metrics import text_metrics
    from training.models import SPECS
    from training.train import fit, prepare

    for scheme in schemes:
        keras.utils.set_random_seed(seed)
        t0 = time.perf_counter()
        prep = prepare(model_name, data_dir, 0.1, seed, windows=scheme)
        model, _, keep = fit(model_name, prep, epochs, batch_size or SPECS[model_name].default_batch_size, verbose=0)
        m = text_metrics(lambda x: model.predict(x, batch_size=2048, verbose=0), prep.preprocessor,
                         prep.val_raw[0], prep.val_raw[1], (20, 10))
        row = {
            "model": model_name, "scheme": scheme, "epochs": epochs, "train_examples": int(len(prep.y_train)),
            "best_epoch": keep.best_epoch + 1,
            "val_last20": m["last20"]["accuracy"],
            "val_whole_text_s20": m["whole_text"]["stride_20"]["accuracy"],
            "val_whole_text_s10": m["whole_text"]["stride_10"]["accuracy"],
            "val_short_proxy": m["short_text_proxy"]["accuracy"],
            "val_short_positive_share": m["short_text_proxy"]["positive_share"],
            "val_ece_last20": m["last20"]["ece"],
            "seconds_per_epoch": round(float(np.mean(keep.epoch_seconds)), 1),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(row), flush=True)


def compare_stopwords(model_name: str, epochs: int, data_dir, seed: int) -> None:
    """Train ``model_name`` with each stop-word variant's vocabulary (:data:`VARIANTS`), same seed;
    print one JSON line each: best validation accuracy and how the 20 slots are filled."""
    import keras

    from training.models import SPECS
    from training.train import fit, prepare

    for label, stopwords in VARIANTS.items():
        keras.utils.set_random_seed(seed)
        prep = prepare(model_name, data_dir, 0.1, seed, stopwords=stopwords)
        _, _, keep = fit(model_name, prep, epochs, SPECS[model_name].default_batch_size, verbose=0)
        x = prep.x_val
        row = {
            "variant": label,
            "val_accuracy": round(float(keep.best[0]), 4),
            "best_epoch": keep.best_epoch + 1,
            "word_slots_filled": round(float(np.mean(x >= 2)), 4),
            "oov_share_of_words": round(float(np.mean(x == 2) / np.mean(x >= 2)), 4),
            "seconds_per_epoch": round(float(np.mean(keep.epoch_seconds)), 1),
        }
        print(json.dumps(row), flush=True)


def bow_reference(data_dir=None, seed: int = 1337, steps: int = 1000, lr: float = 0.5, l2: float = 1e-4) -> dict:
    """How far the 1,000-word vocabulary carries as a bag of words: logistic regression on
    log(1 + count) of each word id over the whole review (the same vocabulary, split and
    tokeniser as the models), trained on the training part only."""
    from training.train import prepare

    prep = prepare("sentiment_lstm", data_dir, 0.1, seed)
    p = prep.preprocessor
    n_ids = len(p.vocab)

    def features(texts):
        x = np.zeros((len(texts), n_ids), np.float32)
        for i, t in enumerate(texts):
            np.add.at(x[i], p.token_ids(t), 1)
        x[:, :3] = 0  # padding, start, out-of-vocabulary
        return np.log1p(x)

    (xtr, ytr), (xva, yva), (xte, yte) = [(features(t), np.asarray(y)) for t, y in (prep.train_raw, prep.val_raw, prep.test_raw)]
    w, b = np.zeros(n_ids, np.float32), 0.0
    for _ in range(steps):
        g = 1 / (1 + np.exp(-(xtr @ w + b))) - ytr
        w -= lr * (xtr.T @ g / len(ytr) + l2 * w)
        b -= lr * float(g.mean())
    acc = lambda x, y: round(float(np.mean((x @ w + b > 0) == y)), 4)  # noqa: E731
    return {"reference": "bag-of-words logistic regression, whole review", "steps": steps,
            "validation_accuracy": acc(xva, yva), "test_accuracy": acc(xte, yte)}


def proxy_ceiling(data_dir=None, seed: int = 1337, c: float = 1.0) -> dict:
    """The short-text proxy's reach with this vocabulary and tokeniser: a logistic regression
    on counts of kept ids and adjacent id pairs (training/teacher.py's features), trained on
    **every** sentence of 3-25 words of the training reviews, each with its review's label
    (the proxy's own kind of data, about 200,000 of them), scored on the validation proxy."""
    from sklearn.linear_model import LogisticRegression

    from training.metrics import SHORT_MAX_WORDS, SHORT_MIN_WORDS, short_text_proxy
    from training.teacher import feature_matrix, features
    from training.train import prepare
    from training.windows import sentences

    prep = prepare("sentiment_lstm", data_dir, 0.1, seed)
    p = prep.preprocessor
    xs, ys = [], []
    for text, label in zip(*prep.train_raw):
        for s in sentences(text):
            if SHORT_MIN_WORDS <= len(s.split()) <= SHORT_MAX_WORDS:
                xs.append(p.encode(s).ids)
                ys.append(int(label))
    index: dict[int, int] = {}
    for row in xs:
        for f in features(row):
            index.setdefault(f, len(index))
    matrix = lambda rows: feature_matrix(rows, index)  # noqa: E731

    lr = LogisticRegression(C=c, max_iter=3000).fit(matrix(xs), np.asarray(ys))
    px, py = short_text_proxy(*prep.val_raw)
    return {"reference": "logistic regression on kept ids + adjacent id pairs of every 3-25-word sentence of the "
            "training reviews (labelled with the review's label), C=%g" % c, "training_sentences": len(xs),
            "features": len(index), "validation_short_text_proxy_accuracy":
            round(float(np.mean(lr.predict(matrix([p.encode(t).ids for t in px])) == py)), 4),
            "validation_proxy_examples": len(py)}


if __name__ == "__main__":
    raise SystemExit(main())
