"""Reviews and digit images from the real test splits, read with the standard library only.

The Locust image (docker compose's ``locust`` service) has no numpy, so ``mnist.npz``
is read as what it is: a zip of ``.npy`` files (a small header, then raw uint8 bytes).

Where the files are looked for: ``--data-dir`` (env ``LOCUST_DATA_DIR``), else
``LOADTEST_DATA_DIR``, else ``CLASSIFIER_DATA_DIR``, else ``../shared/data`` beside
the project root (the same default as training/data.py).
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import random
import struct
import zipfile
from pathlib import Path

IMDB_TEST = "imdb_test.jsonl.gz"
MNIST = "mnist.npz"
ENV_VARS = ("LOCUST_DATA_DIR", "LOADTEST_DATA_DIR", "CLASSIFIER_DATA_DIR")
DEFAULT_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


class DataMissing(SystemExit):
    pass


def resolve_dir(explicit: str | None = None) -> Path:
    if explicit:
        return Path(explicit)
    for var in ENV_VARS:
        if os.environ.get(var):
            return Path(os.environ[var])
    return DEFAULT_DIR


def check(directory: Path) -> None:
    missing = [f for f in (IMDB_TEST, MNIST) if not (directory / f).is_file()]
    if missing:
        raise DataMissing(
            f"load test data not found: {', '.join(str(directory / f) for f in missing)} missing. "
            f"Point --data-dir or the LOADTEST_DATA_DIR environment variable at the folder holding "
            f"{IMDB_TEST} and {MNIST} (the project's ../shared/data); with docker compose, mount it, "
            f"e.g. volumes: ['../shared/data:/data:ro'] and environment: {{LOADTEST_DATA_DIR: /data}}."
        )


def load_reviews(directory: Path, limit: int | None = None) -> list[str]:
    texts = []
    with gzip.open(directory / IMDB_TEST, "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            if text.strip():
                texts.append(text)
            if limit and len(texts) >= limit:
                break
    return texts


def _read_npy_uint8(raw: bytes) -> tuple[tuple[int, ...], bytes]:
    if raw[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy file")
    major = raw[6]
    if major == 1:
        (hlen,) = struct.unpack("<H", raw[8:10])
        start = 10
    else:
        (hlen,) = struct.unpack("<I", raw[8:12])
        start = 12
    header = ast.literal_eval(raw[start:start + hlen].decode("latin1"))
    if header["descr"] not in ("|u1", "<u1", "u1") or header["fortran_order"]:
        raise ValueError(f"expected C-ordered uint8, got {header}")
    return tuple(header["shape"]), raw[start + hlen:]


def load_digits(directory: Path) -> list[bytes]:
    """The MNIST test images: 784 bytes each (28x28 uint8, row-major, 0 = background)."""
    with zipfile.ZipFile(directory / MNIST) as z:
        shape, data = _read_npy_uint8(z.read("x_test.npy"))
    n = shape[0]
    size = shape[1] * shape[2]
    return [data[i * size:(i + 1) * size] for i in range(n)]


def as_rows(image: bytes) -> list[list[int]]:
    """784 raw bytes -> the REST API's 28x28 lists of 0-255."""
    return [list(image[r * 28:(r + 1) * 28]) for r in range(28)]


class Samples:
    """What the users send: random real reviews and digits (each user has its own rng)."""

    def __init__(self, directory: Path):
        check(directory)
        self.directory = directory
        self.reviews = load_reviews(directory)
        self.digits = load_digits(directory)

    def texts(self, rng: random.Random, n: int) -> list[str]:
        return [rng.choice(self.reviews) for _ in range(n)]

    def images(self, rng: random.Random, n: int) -> list[bytes]:
        return [rng.choice(self.digits) for _ in range(n)]
