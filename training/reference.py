"""What the promotion gate measures itself: the n-gram reference, and the baseline's missing figures.

A text version's whole-text accuracy must come within a point of what the n-gram teacher
(:class:`training.teacher.NgramTeacher`) reaches with **that version's** preprocessor. The
teacher is fitted as training fits it (:class:`training.review_objective.ReviewData`,
``python -m training.experiments --teacher``): on the training part of the IMDB train split
(the train split less the card's validation hold-out, the same seeded split its vocabulary
was built from), each review as its windows at stride 20, at most 32 (the last ones), with
C = 1 and features seen in at least 2 windows. It is then scored on the full test split as
the cards' whole-text figure is scored (:meth:`NgramTeacher.figures`): every window at the
version's whole-text stride, uncapped, and the review's decision = the mean of its windows'
logits.

Fitting takes a minute or two on two cores, so a measurement is cached in
``.cache/gate/`` (not committed), keyed by everything it depends on: the data files'
sha256, the vocabulary's sha256 and the rest of the preprocessor's settings, the teacher's
parameters and the split (:func:`cache_key`). ``limit`` measures on a slice (the first
``limit`` training-part reviews and test reviews), for tests; it is part of the key too.

**The baseline's figures** (:func:`baseline_figures`): the v1 cards predate the last-20,
whole-text, short-text proxy and ECE figures, so the gate measures them itself, through the
baseline's SavedModel serving signature on the full test split, with the code that writes the
newer cards' ``metrics.test`` block (:func:`training.metrics.text_metrics`, which
``training.metrics.version_metrics`` runs at training time and ``python -m training.evaluate
--metrics`` for shipped versions), at the candidate's whole-text stride. Cached in
``.cache/gate/`` too, keyed by the export (sha256 of ``saved_model.pb`` and of every file
under ``variables/``), the version's preprocessor, the data files, the stride and the slice
(:func:`baseline_key`), so a changed export is measured again.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from contract.text import TextPreprocessor
from contract.whole_text import MAX_WINDOWS
from training import data as datasets

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / ".cache" / "gate"
METHOD = 1  # bump when the measurement itself changes: old cache entries then no longer match
BASELINE_METHOD = 1  # the same for the baseline's figures


@dataclass(frozen=True)
class ReferenceParams:
    """What the measurement depends on besides the data and the preprocessor."""

    c: float = 1.0  # the teacher's inverse L2 strength (training's --teacher-c)
    min_count: int = 2  # a feature is kept when seen in at least this many training windows
    fit_stride: int = 20  # the training reviews' windows, as ReviewData makes them
    fit_max_windows: int = MAX_WINDOWS
    seed: int = 1337  # the train/validation split of the version's card (its `seed`)
    held_out: int = 2500  # ... and its `validation_examples`, left out of the fit
    score_stride: int = 20  # the version's whole-text stride (card `whole_text.stride`)
    limit: int | None = None  # None: the full splits

    @classmethod
    def for_card(cls, card: dict, score_stride: int, limit: int | None = None) -> ReferenceParams:
        return cls(seed=int(card.get("seed", 1337)), held_out=int(card.get("validation_examples", 2500)),
                   score_stride=int(score_stride), limit=limit)

    def describe(self) -> str:
        part = f"first {self.limit} reviews of " if self.limit else ""
        return (f"n-gram teacher (C={self.c:g}, min_count {self.min_count}) fitted on {part}IMDB train less its "
                f"{self.held_out} validation reviews (seed {self.seed}), scored on {part}the test split, "
                f"whole text stride {self.score_stride}")


def data_files(data_dir=None) -> dict[str, str]:
    """The IMDB files' sha256 by name, without reading the reviews (load_imdb's ``sources`` otherwise)."""
    directory = datasets.data_dir(data_dir)
    paths = [directory / f for f in datasets.IMDB_FILES.values()]
    if all(p.exists() for p in paths):
        return {p.name: datasets.sha256_file(p) for p in paths}
    return datasets.load_imdb(data_dir).sources


def preprocessor_sha256(prep: TextPreprocessor) -> str:
    """The preprocessor's settings (stop words, maxlen, token pattern, ... and the vocabulary's sha256)."""
    return hashlib.sha256(json.dumps(prep.config(), sort_keys=True).encode("utf-8")).hexdigest()


def cache_key(prep: TextPreprocessor, params: ReferenceParams, files: dict[str, str]) -> dict:
    return {"method": METHOD, "data_files_sha256": dict(sorted(files.items())), "vocab_sha256": prep.vocab.sha256(),
            "preprocessor_sha256": preprocessor_sha256(prep), "params": asdict(params)}


def cache_path(key: dict, cache_dir: Path = CACHE_DIR) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:20]
    return Path(cache_dir) / f"ngram_reference-{digest}.json"


def measure(prep: TextPreprocessor, params: ReferenceParams = ReferenceParams(), data_dir=None) -> dict:
    """Fit the teacher and score it (module docstring); the figure and how long each part took."""
    from training.teacher import NgramTeacher
    from training.windows import review_windows

    t0 = time.perf_counter()
    ds = datasets.load_imdb(data_dir)
    n = len(ds.train.y)
    tr, va = datasets.split_validation(n, params.held_out / n, params.seed)
    assert len(va) == params.held_out, (len(va), params.held_out)
    if params.limit:
        tr = tr[: params.limit]
    texts, labels = [ds.train.x[i] for i in tr], ds.train.y[tr]
    test_x, test_y = ds.test.x, ds.test.y
    if params.limit:
        test_x, test_y = test_x[: params.limit], test_y[: params.limit]
    t1 = time.perf_counter()
    windows = review_windows(prep, [prep.token_ids(t) for t in texts], params.fit_stride, params.fit_max_windows)
    teacher = NgramTeacher.fit(windows, labels, params.c, params.min_count)
    t2 = time.perf_counter()
    test_windows = review_windows(prep, [prep.token_ids(t) for t in test_x], params.score_stride)
    z = teacher.review_logits(test_windows)
    accuracy = round(float(np.mean((z > 0) == np.asarray(test_y))), 4)
    t3 = time.perf_counter()
    return {
        "whole_text_accuracy": accuracy,
        "train_reviews": len(texts),
        "test_reviews": len(test_y),
        "teacher": teacher.describe(),
        "seconds": {"load": round(t1 - t0, 1), "fit": round(t2 - t1, 1), "score": round(t3 - t2, 1),
                    "total": round(t3 - t0, 1)},
        "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


@dataclass
class Reference:
    value: float  # the teacher's whole-text test accuracy
    source: str  # "measured" or "cache"
    path: Path  # the cache file (written when measured, read when from cache)
    result: dict  # measure()'s dict


class NotCached(LookupError):
    """``cache_only`` and no cache entry for this key."""


def _cached(key: dict, path: Path, measure_now, what: str, cache_only: bool, remeasure: bool) -> tuple[dict, str]:
    """(result, "cache" | "measured"): the entry at ``path`` when it holds ``key``, else ``measure_now()``
    written there (atomically)."""
    if not remeasure and path.exists():
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry.get("key") == key:
            return entry["result"], "cache"
    if cache_only:
        raise NotCached(f"no cached {what} ({path})")
    result = measure_now()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "result": result}, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return result, "measured"


def ngram_reference(prep: TextPreprocessor, params: ReferenceParams = ReferenceParams(), data_dir=None,
                    cache_dir: Path = CACHE_DIR, *, cache_only: bool = False, remeasure: bool = False) -> Reference:
    """The reference from the cache when it holds this key, else measured now and cached."""
    key = cache_key(prep, params, data_files(data_dir))
    path = cache_path(key, cache_dir)
    result, source = _cached(key, path, lambda: measure(prep, params, data_dir),
                             "n-gram reference for this version's preprocessor and data", cache_only, remeasure)
    return Reference(result["whole_text_accuracy"], source, path, result)


# -- the baseline's figures ---------------------------------------------------------------------------------------

def export_files(path: Path) -> dict[str, str]:
    """sha256 of the SavedModel's ``saved_model.pb`` and of every file under ``variables/`` (index and data
    shards), by path relative to the version directory: what the served model is."""
    path = Path(path)
    files = [path / "saved_model.pb", *sorted(p for p in (path / "variables").glob("*") if p.is_file())]
    return {f.relative_to(path).as_posix(): datasets.sha256_file(f) for f in files}


def baseline_key(version, stride: int, files: dict[str, str], limit: int | None = None) -> dict:
    """What the baseline's measured figures depend on (``version``: a contract.repository.ModelVersion)."""
    from training import metrics

    return {"method": BASELINE_METHOD, "model": version.name, "version": version.version,
            "export_sha256": export_files(version.path),
            "preprocessor_sha256": preprocessor_sha256(version.preprocessor),
            "data_files_sha256": dict(sorted(files.items())), "split": "test", "limit": limit,
            "whole_text_stride": int(stride), "ece_bins": metrics.ECE_BINS,
            "short_text_proxy": metrics.SHORT_TEXT_PROXY_DEFINITION}


def baseline_path(key: dict, cache_dir: Path = CACHE_DIR) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:20]
    return Path(cache_dir) / f"baseline_figures-{key['model']}-v{key['version']}-{digest}.json"


def figures_of(test: dict, stride: int) -> dict:
    """ModelVersion.figures' names for a ``metrics.test`` block (text_metrics' dict), as a card's are read."""
    figures = {
        "last20_accuracy": test["last20"]["accuracy"],
        "test_ece": test["last20"]["ece"],
        "whole_text_accuracy": test["whole_text"][f"stride_{stride}"]["accuracy"],
        "short_text_proxy_accuracy": test["short_text_proxy"]["accuracy"],
    }
    return {k: v for k, v in figures.items() if v is not None}


def measure_baseline(version, stride: int, data_dir=None, limit: int | None = None) -> dict:
    """The version's ``metrics.test`` block measured now: its serving signature (TensorFlow) on the test split
    (the first ``limit`` reviews), with training.metrics.text_metrics, as training writes it on a card."""
    from contract.signature import signature_predict
    from training.metrics import text_metrics

    t0 = time.perf_counter()
    ds = datasets.load_imdb(data_dir)
    x, y = (ds.test.x[:limit], ds.test.y[:limit]) if limit else (ds.test.x, ds.test.y)
    t1 = time.perf_counter()
    predict = signature_predict(version.path, version.input_name)
    t2 = time.perf_counter()
    test = text_metrics(predict, version.preprocessor, x, y, (stride,))
    t3 = time.perf_counter()
    return {
        "figures": figures_of(test, stride),
        "test_reviews": len(y),
        "test": test,
        "seconds": {"data": round(t1 - t0, 1), "load": round(t2 - t1, 1), "measure": round(t3 - t2, 1),
                    "total": round(t3 - t0, 1)},
        "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


@dataclass
class BaselineFigures:
    figures: dict  # by ModelVersion.figures' names: last20_accuracy, whole_text_accuracy, short_text_proxy_accuracy,
    # test_ece
    source: str  # "measured" or "cache"
    path: Path  # the cache file
    result: dict  # measure_baseline()'s dict


def baseline_figures(version, stride: int, data_dir=None, cache_dir: Path = CACHE_DIR, *, limit: int | None = None,
                     cache_only: bool = False, remeasure: bool = False) -> BaselineFigures:
    """The baseline ``version``'s test figures at whole-text ``stride``: from the cache when it holds this key
    (no TensorFlow then), else measured now and cached."""
    key = baseline_key(version, stride, data_files(data_dir), limit)
    path = baseline_path(key, cache_dir)
    result, source = _cached(key, path, lambda: measure_baseline(version, stride, data_dir, limit),
                             f"figures of {version.name} v{version.version} for this export and data",
                             cache_only, remeasure)
    return BaselineFigures(result["figures"], source, path, result)
