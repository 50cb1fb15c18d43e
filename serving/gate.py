"""Promotion gate: does a version's model card pass, so it may become ``stable``?

    python -m serving.gate MODEL VERSION [--models models] [--config serving/tfserving/models.config]

Checks the card's figures (measured on the full test splits through the serving
signature at training time) against the targets below and against the version that is
``stable`` now (no regression on any figure both cards have). Prints one line per check
and exits 1 when one fails. The rollout: ``scripts/rollout.sh add-version``, ``canary``,
then ``python -m serving.gate MODEL VERSION && scripts/rollout.sh promote MODEL``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from contract.layout import ASSETS_EXTRA, CARD_FILE

ROOT = Path(__file__).resolve().parent.parent

# Issue 11's targets for version 2 (full test splits).
TARGETS = {
    "text": {"last-20 test accuracy": 0.78, "whole-text test accuracy": 0.87, "short-text proxy accuracy": 0.75},
    "image": {"test accuracy": 0.990},
}


def card(models: Path, model: str, version: int) -> dict:
    return json.loads((models / model / str(version) / ASSETS_EXTRA / CARD_FILE).read_text(encoding="utf-8"))


def figures(c: dict) -> dict[str, float]:
    """The card's comparable figures (higher is better), by name."""
    out = {"test accuracy": c.get("test_accuracy"), "validation accuracy": c.get("validation_accuracy")}
    test = (c.get("metrics") or {}).get("test") or {}
    if "last20" in test:
        out["last-20 test accuracy"] = test["last20"]["accuracy"]
    stride = (c.get("whole_text") or {}).get("stride")
    whole = (test.get("whole_text") or {}).get(f"stride_{stride}")
    if whole:
        out["whole-text test accuracy"] = whole["accuracy"]
    if "short_text_proxy" in test:
        out["short-text proxy accuracy"] = test["short_text_proxy"]["accuracy"]
    return {k: v for k, v in out.items() if v is not None}


def check(models: Path, model: str, version: int, baseline: int | None) -> list[tuple[str, bool, str]]:
    c = card(models, model, version)
    kind = "text" if c.get("vocab_sha256") else "image"
    got = figures(c)
    rows = []
    for name, target in TARGETS[kind].items():
        value = got.get(name)
        rows.append((f"{name} >= {target}", value is not None and value >= target, f"{value}"))
    if baseline is not None and baseline != version:
        base = figures(card(models, model, baseline))
        for name in sorted(set(base) & set(got)):
            rows.append((f"{name} >= v{baseline}'s {base[name]}", got[name] >= base[name], f"{got[name]}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.gate", description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("version", type=int)
    p.add_argument("--models", type=Path, default=ROOT / "models")
    p.add_argument("--config", type=Path, default=ROOT / "serving" / "tfserving" / "models.config",
                   help="models.config whose 'stable' label is the baseline")
    a = p.parse_args(argv)
    from serving.model_config import ModelsConfig

    baseline = ModelsConfig(a.config).labels(a.model).get("stable")
    rows = check(a.models, a.model, a.version, baseline)
    for name, ok, value in rows:
        print(f"{'PASS' if ok else 'FAIL'}  {a.model} v{a.version}: {name}: {value}")
    passed = all(ok for _, ok, _ in rows)
    print(f"{a.model} v{a.version}: {'passes' if passed else 'does not pass'} the promotion gate")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
