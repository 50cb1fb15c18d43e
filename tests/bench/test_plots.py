"""bench/plots.py on small real inputs: the first 200 IMDB test reviews through a shipped
version's serving signature, and the steps CSV of a real step ramp (data/embedded_steps.csv,
copied from bench/results/capacity/ after `make plot-capacity`)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from bench import plots
from tests.conftest import ROOT
from contract.layout import ASSETS_EXTRA
from training.metrics import bucket_name, by_length
from contract.text import TextPreprocessor

DATA = Path(__file__).parent / "data"
VERSION = ROOT / "models" / "sentiment_lstm" / "2"  # has a whole_text stride in its card
N = 200
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_bucket_bounds_are_inclusive():
    lengths = np.array([0, 20, 21, 50, 51, 100, 101, 200, 201, 400, 401, 5000])
    zeros = np.zeros(len(lengths), dtype=np.int64)
    counts = by_length(zeros, zeros, lengths, plots.BUCKETS)
    assert [r["n"] for r in counts.values()] == [2, 2, 2, 2, 2, 2]  # each bucket holds both of its bounds
    assert [bucket_name(*b) for b in plots.BUCKETS] == ["<=20", "21-50", "51-100", "101-200", "201-400", ">400"]
    assert list(counts) == [bucket_name(*b) for b in plots.BUCKETS]


@pytest.fixture(scope="module")
def result(imdb):
    return plots.accuracy_by_length(VERSION, imdb.test.x[:N], imdb.test.y[:N])


def test_bucket_counts_match_token_ids(result, imdb):
    prep = TextPreprocessor.load(VERSION / ASSETS_EXTRA)
    expected = dict.fromkeys(result["buckets"], 0)
    for text in imdb.test.x[:N]:
        kept = len(prep.token_ids(text)) - 1
        lo, hi = next((lo, hi) for lo, hi in plots.BUCKETS if lo <= kept and (hi is None or kept <= hi))
        expected[bucket_name(lo, hi)] += 1
    assert {b: r["n"] for b, r in result["buckets"].items()} == expected
    assert sum(expected.values()) == N == result["examples"]


def test_figures_agree_with_training_metrics(result, imdb):
    """Overall accuracy of both modes is what training.metrics (the model cards' code) measures."""
    from contract.signature import signature_predict
    from training.metrics import text_metrics

    prep = TextPreprocessor.load(VERSION / ASSETS_EXTRA)
    m = text_metrics(signature_predict(VERSION, "token_ids"), prep, imdb.test.x[:N], imdb.test.y[:N], strides=(20,))
    assert result["whole_text_stride"] == 20
    assert result["last20"] == m["last20"]["accuracy"]
    assert result["whole_text"] == m["whole_text"]["stride_20"]["accuracy"]
    for r in result["buckets"].values():
        for mode in ("last20", "whole_text"):
            assert (r[mode] is None) == (r["n"] == 0)
            assert r[mode] is None or 0.0 <= r[mode] <= 1.0


def test_accuracy_plot_is_written(result, tmp_path):
    out = tmp_path / "accuracy.png"
    plots.plot_accuracy([result], out)
    assert is_png(out)


def test_capacity_plot_from_a_real_ramp(tmp_path):
    steps = plots.read_steps(DATA / "embedded_steps.csv")
    with open(DATA / "embedded_steps.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [s["step"] for s in steps] == sorted({int(r["step"]) for r in rows})
    for s in steps:  # the Aggregated row is the sum over the request names
        names = [r for r in rows if int(r["step"]) == s["step"] and r["name"] != "Aggregated"]
        assert s["rps"] == pytest.approx(sum(float(r["req/s"]) for r in names), abs=0.05)
    out = tmp_path / "capacity.png"
    summary = plots.plot_capacity(DATA, out)
    assert list(summary) == ["embedded"] and is_png(out)
    knee = summary["embedded"]["knee"]
    assert knee is None or (not knee["failures"] and knee["p99"] <= plots.KNEE_P99_MS)
