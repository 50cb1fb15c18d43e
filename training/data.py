"""Dataset loading: MNIST and IMDB reviews from local files, or the real download.

Where the files are looked for, in order: the ``data_dir`` argument (the CLI's
``--data-dir``), the ``CLASSIFIER_DATA_DIR`` environment variable, then
``../shared/data`` beside the project root. When a file is missing there and
downloading is allowed (the default; ``CLASSIFIER_NO_DOWNLOAD=1`` forbids it),
the real Keras download runs; if that fails too, :class:`DataNotFoundError`
names the missing file and how to provide it.

Formats:
- MNIST: ``mnist.npz`` in Keras' layout (uint8 ``x_train`` [60000, 28, 28], ...).
- IMDB: ``imdb_{train,test}.jsonl.gz`` (gzip JSON lines ``{"text", "label"}``,
  label 1 = positive), or the original ``aclImdb/{train,test}/{pos,neg}/*.txt``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"
MNIST_FILE = "mnist.npz"
IMDB_FILES = {"train": "imdb_train.jsonl.gz", "test": "imdb_test.jsonl.gz"}
ACLIMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"


class DataNotFoundError(FileNotFoundError):
    """A dataset file is missing and could not be downloaded."""


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get("CLASSIFIER_DATA_DIR"):
        return Path(os.environ["CLASSIFIER_DATA_DIR"])
    return DEFAULT_DATA_DIR


def downloads_allowed() -> bool:
    return os.environ.get("CLASSIFIER_NO_DOWNLOAD", "").lower() not in ("1", "true", "yes")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _missing(what: str, directory: Path, wanted: str, cause: BaseException | None) -> DataNotFoundError:
    msg = (
        f"{what} not found: {directory / wanted} does not exist"
        + (f" and the download failed ({type(cause).__name__}: {cause})" if cause else " and downloading is disabled")
        + f". Put {wanted} in {directory}, or point --data-dir / CLASSIFIER_DATA_DIR at the folder that has it."
    )
    return DataNotFoundError(msg)


@dataclass
class Split:
    x: np.ndarray | list[str]
    y: np.ndarray


@dataclass
class Dataset:
    train: Split
    test: Split
    sources: dict[str, str]  # file name -> sha256 (or a description of the download)


def load_mnist(directory: str | os.PathLike | None = None, allow_download: bool | None = None) -> Dataset:
    directory = data_dir(directory)
    allow_download = downloads_allowed() if allow_download is None else allow_download
    path = directory / MNIST_FILE
    if not path.exists():
        if not allow_download:
            raise _missing("MNIST", directory, MNIST_FILE, None)
        try:
            import keras

            path = Path(keras.utils.get_file(MNIST_FILE, "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"))
        except Exception as e:  # noqa: BLE001 - any download failure is reported the same way
            raise _missing("MNIST", directory, MNIST_FILE, e) from e
    with np.load(path) as d:
        train = Split(d["x_train"], d["y_train"].astype(np.int64))
        test = Split(d["x_test"], d["y_test"].astype(np.int64))
    return Dataset(train, test, {MNIST_FILE: sha256_file(path)})


def _read_jsonl(path: Path) -> Split:
    texts, labels = [], []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts.append(row["text"])
            labels.append(int(row["label"]))
    return Split(texts, np.asarray(labels, dtype=np.int64))


def _read_aclimdb(root: Path, split: str) -> Split:
    texts, labels = [], []
    for label, folder in ((0, "neg"), (1, "pos")):
        # Sorted by review id so the order does not depend on the file system.
        files = sorted((root / split / folder).glob("*.txt"), key=lambda p: (int(p.stem.split("_")[0]), p.name))
        for p in files:
            texts.append(p.read_text(encoding="utf-8"))
            labels.append(label)
    return Split(texts, np.asarray(labels, dtype=np.int64))


def load_imdb(directory: str | os.PathLike | None = None, allow_download: bool | None = None) -> Dataset:
    """Raw IMDB review texts and labels (1 = positive), train and test splits."""
    directory = data_dir(directory)
    allow_download = downloads_allowed() if allow_download is None else allow_download
    jsonl = {s: directory / f for s, f in IMDB_FILES.items()}
    if all(p.exists() for p in jsonl.values()):
        return Dataset(
            _read_jsonl(jsonl["train"]),
            _read_jsonl(jsonl["test"]),
            {p.name: sha256_file(p) for p in jsonl.values()},
        )
    acl = directory / "aclImdb"
    if not (acl / "train").is_dir() and allow_download:
        try:
            import keras

            archive = keras.utils.get_file("aclImdb_v1.tar.gz", ACLIMDB_URL, extract=True)
            acl = next(Path(archive).parent.glob("**/aclImdb"))
        except Exception as e:  # noqa: BLE001
            missing = next(f for s, f in IMDB_FILES.items() if not jsonl[s].exists())
            raise _missing("IMDB reviews", directory, missing, e) from e
    if (acl / "train").is_dir() and (acl / "test").is_dir():
        return Dataset(_read_aclimdb(acl, "train"), _read_aclimdb(acl, "test"), {"aclImdb": str(acl)})
    missing = next(f for s, f in IMDB_FILES.items() if not jsonl[s].exists())
    raise _missing("IMDB reviews", directory, missing + " (or an aclImdb/ folder)", None)


def split_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) of a seeded shuffle of ``range(n)``."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])
