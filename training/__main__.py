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
    p.add_argument("--windows", metavar="SCHEME", help="text models: training windows per review (training/windows.py): "
                   "'tail' (default, version 1), r<N>, s<M> or r<N>s<M>, e.g. r3s1 = tail + 3 random windows + 1 short one")
    p.add_argument("--shift", type=int, default=0, help="digits: random shift augmentation of up to N pixels (default 0: none)")
    p.add_argument("--lr-schedule", choices=["plateau", "cosine"], help="default: plateau (halve on a validation-loss plateau)")
    p.add_argument("--whole-text-stride", type=int, help="text models: record whole-text scoring with this window stride "
                   "in the card (implies --metrics)")
    p.add_argument("--metrics", action="store_true", help="measure training.metrics' figures through the exported signature into the card")
    p.add_argument("--objective", choices=["window", "review"], default="window",
                   help="text models: 'window' (default) trains each window alone; 'review' trains through the "
                   "whole-text combination of every window of a review (training/review_objective.py); "
                   "--batch-size is then reviews per step")
    p.add_argument("--tail-weight", type=float, default=1.0, help="--objective review: weight of the last-20 window's loss")
    p.add_argument("--short-weight", type=float, default=1.0, help="--objective review: weight of the short pieces' loss")
    p.add_argument("--short", type=int, default=1, help="--objective review: short pieces per review")
    p.add_argument("--teacher-weight", type=float, default=0.0, help="--objective review: weight of the n-gram "
                   "teacher's per-window term (training/teacher.py; default 0: no teacher)")
    p.add_argument("--teacher-c", type=float, default=1.0, help="--objective review: the teacher's inverse L2 strength")
    a = p.parse_args(argv)
    objective = None
    if a.objective == "review":
        from training.review_objective import ReviewObjective

        if a.model == "digits" or a.windows:
            p.error("--objective review is for the text models, without --windows")
        objective = ReviewObjective(tail_weight=a.tail_weight, short_weight=a.short_weight, short=a.short,
                                    teacher_weight=a.teacher_weight, teacher_c=a.teacher_c)

    from training.data import DataNotFoundError
    from training.export import VersionExistsError
    from training.train import run

    try:
        card = run(
            a.model, a.epochs, a.batch_size, a.data_dir, a.out, a.seed, a.val_fraction, a.limit, a.version,
            verbose=0 if a.quiet else 1, windows=a.windows, shift=a.shift, lr_schedule=a.lr_schedule,
            whole_text_stride=a.whole_text_stride, measure=a.metrics, objective=objective,
        )
    except (DataNotFoundError, VersionExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: card[k] for k in ("model", "version", "path", "test_accuracy", "validation_accuracy", "best_epoch", "training_seconds", "seconds_per_epoch")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
