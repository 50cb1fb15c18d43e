"""Evaluate exported SavedModels through their serving signature.

    python -m training.evaluate [--models models] [--data-dir D] [--limit N]
    python -m training.evaluate --metrics [--version 1] [--strides 20,10]

For every model under the repository (latest version unless ``--version``), it
loads the SavedModel the way a server would (``tf.saved_model.load`` and the
``serving_default`` signature), tokenises with the version's own
``assets.extra/`` vocabulary, and measures accuracy on the full test split
next to the accuracy recorded in the model card. With ``--metrics`` it prints every
figure of :mod:`training.metrics` (last-20, whole-text per stride, short-text proxy,
accuracy by length, ECE) on the validation hold-out and the full test split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from training import data as datasets
from contract.layout import existing_versions
from contract.repository import read_version
from contract.signature import call, load_signature
from training.models import SPECS

EXAMPLES = [
    "One of the best films I have seen in years. Wonderful acting, I loved it.",
    "A boring, predictable mess. The worst movie of the year, don't waste your time.",
]


def load_version(path: Path):
    """(serving signature, model card, text preprocessor or None) of the version at ``path``,
    read as the gateway reads it (:func:`contract.repository.read_version`)."""
    v = read_version(path.parent.parent, path.parent.name, int(path.name))
    return load_signature(path), v.card, v.preprocessor


predict = call  # the serving signature's probabilities, in batches


def evaluate(path: Path, data_dir=None, limit: int | None = None) -> dict:
    name = path.parent.name
    spec = SPECS[name]
    sig, card, prep = load_version(path)
    ds = datasets.load_mnist(data_dir) if spec.kind == "image" else datasets.load_imdb(data_dir)
    x, y = ds.test.x[:limit] if limit else ds.test.x, ds.test.y[:limit] if limit else ds.test.y
    t0 = time.perf_counter()
    inputs = prep.encode_batch(x) if prep else np.asarray(x, dtype=np.float32)
    t1 = time.perf_counter()
    probs = predict(sig, spec.input_name, inputs)
    t2 = time.perf_counter()
    result = {
        "model": name,
        "version": int(path.name),
        "test_examples": len(y),
        "test_accuracy": round(float(np.mean(probs.argmax(1) == y)), 4),
        "card_test_accuracy": card.get("test_accuracy"),
        "preprocess_us_per_example": round((t1 - t0) / max(len(y), 1) * 1e6, 1),
        "predict_examples_per_second": round(len(y) / (t2 - t1)),
    }
    if prep:
        ex = predict(sig, spec.input_name, prep.encode_batch(EXAMPLES))
        result["examples"] = {t: {lab: round(float(p), 3) for lab, p in zip(spec.labels, row)} for t, row in zip(EXAMPLES, ex)}
    return result


def full_metrics(path: Path, data_dir=None, strides=(20, 10), val_fraction: float = 0.1, limit: int | None = None) -> dict:
    """training.metrics' figures for one exported version, on the validation part of the
    training split (the same seeded hold-out as in training: the card's seed) and the test split."""
    from training.metrics import version_metrics

    name = path.parent.name
    spec = SPECS[name]
    _, card, prep = load_version(path)
    ds = datasets.load_mnist(data_dir) if spec.kind == "image" else datasets.load_imdb(data_dir)
    x_all, y_all = ds.train.x, ds.train.y
    _, va = datasets.split_validation(len(y_all), val_fraction, card.get("seed", 1337))
    if spec.kind == "image":
        val = (np.asarray(x_all[va], np.float32), y_all[va])
        test = (np.asarray(ds.test.x[:limit] if limit else ds.test.x, np.float32), ds.test.y[:limit] if limit else ds.test.y)
    else:
        val = ([x_all[i] for i in va], y_all[va])
        test = (ds.test.x[:limit] if limit else ds.test.x, ds.test.y[:limit] if limit else ds.test.y)
    t0 = time.perf_counter()
    m = version_metrics(path, name, prep, val, test, strides)
    return {"model": name, "version": int(path.name), "metrics": m, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="models", help="model repository root")
    p.add_argument("--model", action="append", choices=sorted(SPECS), help="only these models (repeatable)")
    p.add_argument("--version", type=int, help="this version instead of the latest")
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=int, help="only the first N test examples")
    p.add_argument("--metrics", action="store_true", help="all model-card figures (training.metrics) on the validation and test splits")
    p.add_argument("--strides", default="20,10", help="whole-text strides measured with --metrics (default: 20,10)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    a = p.parse_args(argv)
    root = Path(a.models)
    status = 0
    for name in a.model or sorted(SPECS):
        versions = existing_versions(root / name)
        if not versions:
            print(f"error: no versions of {name} under {root / name}", file=sys.stderr)
            status = 1
            continue
        path = root / name / str(a.version or versions[-1])
        try:
            if a.metrics:
                strides = tuple(int(s) for s in a.strides.split(","))
                out = full_metrics(path, a.data_dir, strides, a.val_fraction, a.limit)
            else:
                out = evaluate(path, a.data_dir, a.limit)
            print(json.dumps(out), flush=True)
        except (datasets.DataNotFoundError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
