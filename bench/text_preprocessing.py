"""Benchmark: microseconds per review for the shared text preprocessor.

    python bench/text_preprocessing.py [--data-dir D] [--n 5000] [--json out.json]

Side by side on the same reviews (IMDB test split): the production path
``TextPreprocessor.encode`` (tokenises only the tail it needs), the reference
full pipeline ``ids_full`` (tokenise everything, then cut/pad), and the batch
call ``encode_batch`` that the gateway uses (ids straight into an int32 array).
"Typical" reviews are those of 200-260 whitespace words (the mean is ~230).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.data import load_imdb  # noqa: E402
from contract.text import TextPreprocessor, Vocabulary  # noqa: E402


def per_item_us(fn, items, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn(items)
        best = min(best, time.perf_counter() - t)
    return best / len(items) * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--json")
    a = p.parse_args(argv)

    ds = load_imdb(a.data_dir)
    shipped = Path(__file__).resolve().parent.parent / "models" / "sentiment_lstm"
    versions = sorted((int(d.name) for d in shipped.glob("[0-9]*")), reverse=True) if shipped.exists() else []
    if versions:
        prep = TextPreprocessor.load(shipped / str(versions[0]) / "assets.extra")
        source = f"models/sentiment_lstm/{versions[0]}"
    else:
        prep = TextPreprocessor(Vocabulary.build(ds.train.x))
        source = "built from the training split"
    allrev = ds.test.x[: a.n]
    typical = [t for t in ds.test.x if 200 <= len(t.split()) <= 260][: a.n]
    results = {"vocabulary": source, "python": sys.version.split()[0]}
    for label, texts in (("all", allrev), ("typical_200_260_words", typical)):
        results[label] = {
            "reviews": len(texts),
            "mean_words": round(statistics.mean(len(t.split()) for t in texts), 1),
            "encode_us": round(per_item_us(lambda ts: [prep.encode(t) for t in ts], texts), 2),
            "encode_batch_us": round(per_item_us(prep.encode_batch, texts), 2),
            "ids_full_reference_us": round(per_item_us(lambda ts: [prep.ids_full(t) for t in ts], texts), 2),
        }
    for label in ("all", "typical_200_260_words"):
        r = results[label]
        print(f"{label:>22}: {r['reviews']} reviews, {r['mean_words']} words on average | "
              f"encode {r['encode_us']} us | encode_batch {r['encode_batch_us']} us/review | "
              f"full-pipeline reference {r['ids_full_reference_us']} us")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
