"""Inputs (txt / jsonl / csv / a directory of images), outputs (jsonl / csv) and resume state.

The output file is the resume state: rows are written strictly in input order, one chunk at a
time, each chunk flushed; :func:`rows_done` counts the complete rows already there (a torn last
line left by a killed process is cut off), so a resumed run skips that many inputs and appends.
"""

from __future__ import annotations

import base64
import csv
import gzip
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SENTIMENT_LABELS = ("negative", "positive")


class InputError(ValueError):
    """The input cannot be read as asked (message says where and why)."""


def input_format(path: str, fmt: str | None) -> str:
    if fmt and fmt != "auto":
        return fmt
    if path != "-" and Path(path).is_dir():
        return "dir"
    name = path.lower().removesuffix(".gz")
    for suffix, f in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl"), (".csv", "csv")):
        if name.endswith(suffix):
            return f
    return "txt"


def _open_text(path: str):
    if path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="")
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


@dataclass
class Records:
    items: list  # texts (str), or images (bytes, or a path to read lazily)
    labels: list | None  # the --evaluate field, when asked
    ids: list | None = None  # file names for a directory of images
    keep: tuple[str, ...] = ()  # the --keep fields, in order
    kept: list[dict] | None = None  # each record's --keep fields (jsonl: as JSON values; csv: strings)


def read_records(path: str, fmt: str | None = None, field: str = "text", label_field: str | None = None,
                 keep: list[str] | tuple[str, ...] = ()) -> Records:
    """Every record of ``path``: txt (one item per line; no labels), jsonl or csv (``field``,
    ``label_field`` and the ``keep`` fields by name; a record without one is an error naming its
    line), or a directory of PNG/JPEG files (sorted by name)."""
    fmt = input_format(path, fmt)
    keep = tuple(dict.fromkeys(keep))
    items, labels = [], [] if label_field else None
    kept: list[dict] | None = [] if keep else None
    if fmt in ("dir", "txt") and keep:
        raise InputError(f"--keep needs fields: give a jsonl or csv input, not {'a directory' if fmt == 'dir' else 'txt'}")
    if fmt == "dir":
        files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if label_field:
            raise InputError("--evaluate needs labels: give a jsonl/csv input, not a directory")
        return Records([f for f in files], None, [f.name for f in files])
    with _open_text(path) as f:
        if fmt == "txt":
            return Records([line.rstrip("\r\n") for line in f], None if not label_field else _no_labels())
        if fmt == "jsonl":
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: not JSON ({e})") from None
                items.append(_field(rec, field, path, n))
                if label_field:
                    labels.append(_field(rec, label_field, path, n))
                if keep:
                    kept.append({k: _field(rec, k, path, n) for k in keep})
        elif fmt == "csv":
            reader = csv.DictReader(f)
            for name in (field, label_field, *keep):
                if name and name not in (reader.fieldnames or ()):
                    raise InputError(f"{path}: no column {name!r} (columns: {', '.join(reader.fieldnames or ())})")
            for rec in reader:
                items.append(rec[field])
                if label_field:
                    labels.append(rec[label_field])
                if keep:
                    kept.append({k: rec[k] for k in keep})
        else:
            raise InputError(f"unknown input format {fmt!r} (txt, jsonl, csv, dir)")
    return Records(items, labels, keep=keep, kept=kept)


def _no_labels():
    raise InputError("--evaluate needs labels: give a jsonl or csv input")


def _field(rec, name: str, path: str, n: int):
    if not isinstance(rec, dict) or name not in rec:
        raise InputError(f"{path}:{n}: no field {name!r}")
    return rec[name]


def image_bytes(item) -> bytes:
    """A digits input as bytes for the API: a path (read), 784 pixels (28x28 lists or flat: raw),
    or a base64 string (PNG/JPEG)."""
    if isinstance(item, Path):
        return item.read_bytes()
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str):
        return base64.b64decode(item, validate=True)
    if isinstance(item, list):
        flat = [p for row in item for p in row] if item and isinstance(item[0], list) else item
        if len(flat) != 784 or not all(isinstance(p, int) and 0 <= p <= 255 for p in flat):
            raise InputError("an image as pixels must be 28x28 (or 784) integers 0-255")
        return bytes(flat)
    raise InputError(f"cannot read an image from {type(item).__name__}")


def normalise_label(kind: str, value):
    """A true label as the model names it: sentiment 0/1/"0"/"1"/"negative"/"positive"; digits 0-9."""
    if kind == "sentiment":
        if isinstance(value, str) and value.lower() in SENTIMENT_LABELS:
            return value.lower()
        try:
            return SENTIMENT_LABELS[int(value)]
        except (ValueError, TypeError, IndexError):
            raise InputError(f"label {value!r}: expected 0/1 or negative/positive") from None
    try:
        return int(value)
    except (ValueError, TypeError):
        raise InputError(f"label {value!r}: expected a digit 0-9") from None


# Output ------------------------------------------------------------------------------------

def columns(kind: str) -> list[str]:
    if kind == "sentiment":
        return ["index", "label", "score", "negative", "positive", "tokens", "unknown_tokens", "windows"]
    return ["index", "id", "label", "score"] + [f"p{d}" for d in range(10)]


def _f(x: float) -> float:
    return round(float(x), 6)


def rows_of(kind: str, start: int, response, ids: list | None = None, kept: list[dict] | None = None) -> list[dict]:
    """The output rows of one answered chunk: ``index``, the record's ``--keep`` fields, the prediction."""
    rows = []
    for i, p in enumerate(response.predictions):
        row = {"index": start + i, **(kept[start + i] if kept else {})}
        if kind == "sentiment":
            row.update({"label": p.label, "score": _f(p.score),
                        "negative": _f(p.probabilities["negative"]), "positive": _f(p.probabilities["positive"]),
                        "tokens": p.tokens, "unknown_tokens": p.unknown_tokens, "windows": p.windows or 1})
        else:
            row.update({"id": ids[start + i] if ids else "", "label": p.label, "score": _f(p.score)})
            row.update({f"p{d}": _f(v) for d, v in enumerate(p.probabilities)})
        rows.append(row)
    return rows


def output_format(path: str | None, fmt: str | None) -> str:
    if fmt and fmt != "auto":
        return fmt
    return "csv" if path and path.lower().endswith(".csv") else "jsonl"


def rows_done(path: str, fmt: str) -> list[dict]:
    """The complete rows of an output file left by an earlier run; a torn last line is cut off
    (the file is truncated to its last newline)."""
    p = Path(path)
    if not p.exists():
        return []
    data = p.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(p, "r+b") as f:
            f.truncate(end)
        data = data[:end]
    text = data.decode("utf-8")
    if fmt == "jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    for n, row in enumerate(rows):
        if int(row["index"]) != n:
            raise InputError(f"{path}: row {n} has index {row['index']}: not an output of this tool in order; "
                             "cannot resume from it")
    return rows


class Writer:
    """Rows to a file (or stdout), in the order given, flushed after each chunk."""

    def __init__(self, path: str | None, fmt: str, kind: str, append: bool = False, keep: tuple[str, ...] = ()):
        cols = columns(kind)
        self.fmt, self.cols = fmt, cols[:1] + list(keep) + cols[1:]
        if path is None or path == "-":
            self.f, self.close_f = sys.stdout, False
        else:
            fresh = not append or not os.path.exists(path) or os.path.getsize(path) == 0
            self.f, self.close_f = open(path, "a" if append else "w", encoding="utf-8", newline=""), True
            append = not fresh
        self.csv = csv.DictWriter(self.f, self.cols, lineterminator="\n") if fmt == "csv" else None
        if self.csv and not append:
            self.csv.writeheader()

    def write(self, rows: list[dict]) -> None:
        if self.csv:
            self.csv.writerows(rows)
        else:
            self.f.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
        self.f.flush()

    def close(self):
        if self.close_f:
            self.f.close()
        else:
            self.f.flush()
