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
import sys
from pathlib import Path

from contract.repository import read_version
from serving.model_config import ModelsConfig

ROOT = Path(__file__).resolve().parent.parent

# Issue 11's targets for version 2 (full test splits), by the figure's name in the gate's report.
TARGETS = {
    "text": {"last-20 test accuracy": 0.78, "whole-text test accuracy": 0.87, "short-text proxy accuracy": 0.75},
    "image": {"test accuracy": 0.990},
}
# The card figures the gate compares (contract.repository.ModelVersion.figures), higher is better.
NAMES = {"test_accuracy": "test accuracy", "validation_accuracy": "validation accuracy",
         "last20_accuracy": "last-20 test accuracy", "whole_text_accuracy": "whole-text test accuracy",
         "short_text_proxy_accuracy": "short-text proxy accuracy"}


def figures(models: Path, model: str, version: int) -> tuple[str, dict[str, float]]:
    """The version's kind and its comparable card figures, by the gate's names."""
    v = read_version(models, model, version)
    got = v.figures
    return v.kind, {name: got[key] for key, name in NAMES.items() if key in got}


def check(models: Path, model: str, version: int, baseline: int | None) -> list[tuple[str, bool, str]]:
    kind, got = figures(models, model, version)
    rows = []
    for name, target in TARGETS[kind].items():
        value = got.get(name)
        rows.append((f"{name} >= {target}", value is not None and value >= target, f"{value}"))
    if baseline is not None and baseline != version:
        base = figures(models, model, baseline)[1]
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
    baseline = ModelsConfig(a.config).labels(a.model).get("stable")
    rows = check(a.models, a.model, a.version, baseline)
    for name, ok, value in rows:
        print(f"{'PASS' if ok else 'FAIL'}  {a.model} v{a.version}: {name}: {value}")
    passed = all(ok for _, ok, _ in rows)
    print(f"{a.model} v{a.version}: {'passes' if passed else 'does not pass'} the promotion gate")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
