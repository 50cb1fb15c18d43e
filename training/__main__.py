"""Training CLI: ``python -m training <model> [--epochs N --batch-size B ...]``."""

from __future__ import annotations

import argparse
import json
import sys

MODELS = ("digits", "sentiment_lstm", "sentiment_bilstm")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    p.add_argument("model", choices=MODELS)
    p.add_argument("--epochs", type=int, help="default: the model's own (see training/models.py)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--data-dir", help="folder with mnist.npz / imdb_*.jsonl.gz (default: $CLASSIFIER_DATA_DIR or ../shared/data)")
    p.add_argument("--out", default="models", help="model repository root (default: models/)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--val-fraction", type=float, default=0.1, help="part of the training data held out for validation")
    p.add_argument("--limit", type=int, help="use only the first N train and test examples (smoke runs)")
    p.add_argument("--version", type=int, help="version to export (default: the next free one)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)

    from training.data import DataNotFoundError
    from training.export import VersionExistsError
    from training.train import run

    try:
        card = run(
            a.model, a.epochs, a.batch_size, a.data_dir, a.out, a.seed, a.val_fraction, a.limit, a.version,
            verbose=0 if a.quiet else 1,
        )
    except (DataNotFoundError, VersionExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: card[k] for k in ("model", "version", "path", "test_accuracy", "validation_accuracy", "best_epoch", "training_seconds", "seconds_per_epoch")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
