"""Measure preprocessing choices on the validation split (never the test split).

    python -m training.experiments [--model sentiment_lstm --epochs 4]

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

from training.text import FUNCTION_WORDS, STOPWORDS

VARIANTS = {
    "words, no filter": frozenset(),
    "words, function words dropped": FUNCTION_WORDS,
    "words, function words + frequent neutral domain words dropped (chosen: STOPWORDS)": STOPWORDS,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.experiments")
    p.add_argument("--model", default="sentiment_lstm", choices=["sentiment_lstm", "sentiment_bilstm"])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--data-dir")
    a = p.parse_args(argv)

    import keras

    from training.models import SPECS
    from training.train import fit, prepare

    results = []
    for label, stopwords in VARIANTS.items():
        keras.utils.set_random_seed(a.seed)
        prep = prepare(a.model, a.data_dir, 0.1, a.seed, stopwords=stopwords)
        _, _, keep = fit(a.model, prep, a.epochs, SPECS[a.model].default_batch_size, verbose=0)
        x = prep.x_val
        row = {
            "variant": label,
            "val_accuracy": round(float(keep.best[0]), 4),
            "best_epoch": keep.best_epoch + 1,
            "word_slots_filled": round(float(np.mean(x >= 2)), 4),
            "oov_share_of_words": round(float(np.mean(x == 2) / np.mean(x >= 2)), 4),
            "seconds_per_epoch": round(float(np.mean(keep.epoch_seconds)), 1),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
