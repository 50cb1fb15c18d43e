"""TF Serving's model repository layout, shared by export (training) and the gateway.

``<base>/<model name>/<version>/`` with integer versions; extra files in the
version's ``assets.extra/``. No TensorFlow import.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ASSETS_EXTRA = "assets.extra"
CARD_FILE = "model_card.json"
WARMUP_FILE = "tf_serving_warmup_requests"


def existing_versions(model_base: str | os.PathLike) -> list[int]:
    """The integer versions under ``<base>/<name>/``, ascending (hidden/temporary folders ignored)."""
    base = Path(model_base)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and re.fullmatch(r"[0-9]+", p.name))


def next_version(model_base: str | os.PathLike) -> int:
    versions = existing_versions(model_base)
    return versions[-1] + 1 if versions else 1
