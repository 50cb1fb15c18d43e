"""The model repository on disk: ``<base>/<name>/<version>/`` as TF Serving reads it.

Everything the gateway needs besides the model itself comes from a version's
``assets.extra/``: the model card, and for text models the vocabulary and
preprocessing settings, so each version is tokenised the way it was trained.
No TensorFlow needed here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from contract.layout import ASSETS_EXTRA, CARD_FILE, existing_versions
from contract.text import TextPreprocessor


@dataclass
class ModelVersion:
    name: str
    version: int
    path: Path
    card: dict
    preprocessor: TextPreprocessor | None
    state: str = "LOADING"  # LOADING -> WARMING -> AVAILABLE | FAILED
    error: str | None = None

    @property
    def signature(self) -> dict:
        return self.card["signature"]

    @property
    def labels(self) -> list[str]:
        return self.card["signature"]["labels"]

    @property
    def input_name(self) -> str:
        return next(iter(self.card["signature"]["inputs"]))

    @property
    def kind(self) -> str:
        """The card's ``kind``; cards without one: ``text`` when the version has a text
        preprocessor (``assets.extra/preprocessing.json``), else ``image``."""
        return self.card.get("kind") or ("text" if self.preprocessor is not None else "image")

    @property
    def whole_text_stride(self) -> int:
        """Whole-text mode's window stride: the card's ``whole_text.stride``, else maxlen (no overlap)."""
        return (self.card.get("whole_text") or {}).get("stride") or self.preprocessor.maxlen

    @property
    def figures(self) -> dict:
        """The model card's figures on the test split (absent ones left out): accuracy as trained
        (last 20 tokens for text; ``last20_accuracy`` where the card measured it apart), whole-text
        accuracy at the card's stride, the short-text proxy, the expected calibration error; when
        and how long it was trained, its parameter count. Read here only: the API's ``card``
        block and the promotion gate both take them from this."""
        test = (self.card.get("metrics") or {}).get("test") or {}
        default = test.get("last20") or test
        whole = (test.get("whole_text") or {}).get(f"stride_{self.whole_text_stride}") or {} if self.kind == "text" else {}
        figures = {
            "test_accuracy": self.card.get("test_accuracy"),
            "validation_accuracy": self.card.get("validation_accuracy"),
            "last20_accuracy": (test.get("last20") or {}).get("accuracy"),
            "test_ece": default.get("ece"),
            "whole_text_accuracy": whole.get("accuracy"),
            "short_text_proxy_accuracy": (test.get("short_text_proxy") or {}).get("accuracy"),
            "parameters": self.card.get("parameters"),
            "created": self.card.get("created"),
            "training_seconds": self.card.get("training_seconds"),
        }
        return {k: v for k, v in figures.items() if v is not None}

    @property
    def card_figures(self) -> dict:
        """The figures the API shows for a version (/v1/models' ``card``)."""
        figures = self.figures
        return {k: figures[k] for k in CARD_FIGURES if k in figures}


# The figures /v1/models shows per version (ModelVersion.figures has them all).
CARD_FIGURES = ("test_accuracy", "validation_accuracy", "test_ece", "whole_text_accuracy", "short_text_proxy_accuracy",
                "parameters", "created", "training_seconds")


def versions_on_disk(base: Path, name: str) -> list[int]:
    return existing_versions(base / name)


def read_version(base: Path, name: str, version: int) -> ModelVersion:
    path = base / name / str(version)
    extra = path / ASSETS_EXTRA
    card = json.loads((extra / CARD_FILE).read_text(encoding="utf-8"))
    prep = TextPreprocessor.load(extra) if (extra / "preprocessing.json").exists() else None
    return ModelVersion(name, version, path, card, prep)
