"""Promotion gate: does a version's model card pass, so it may become ``stable``?

    python -m training.gate MODEL VERSION [--baseline N] [--ngram-reference VALUE] [--from-cache | --remeasure]
                            [--models models] [--config serving/tfserving/models.config] [--cache-dir .cache/gate]

Checks the card's figures (measured on the full test splits through the serving signature
at training time) and compares them with the version that is ``stable`` now (the
``stable`` label of TF Serving's models.config, read with the official
``ModelServerConfig`` proto; ``--baseline N`` names another). Text models:

- last-20 test accuracy >= 0.78;
- whole-text test accuracy at most 1 point below the n-gram reference, which the gate
  measures itself on the same splits with the version's own preprocessor
  (:mod:`training.reference`; ~25 s, then read from ``.cache/gate/``);
- short-text proxy accuracy no worse than the stable version's;
- calibration (ECE of the last-20 test predictions) reported, not gated.

Image models: test accuracy >= 0.990. Both: no regression on any other figure (higher is
better; ECE is only reported). A text baseline whose card lacks a compared figure (last-20,
whole-text and short-text proxy accuracy, ECE: the v1 cards) has it measured by the gate,
through the baseline's serving signature on the full test split with the code that writes
the cards' figures (:func:`training.reference.baseline_figures`; 20-70 s with TensorFlow, then
read from ``.cache/gate/``, keyed by the export's files); such thresholds say "measured by the
gate". One line per check (PASS / FAIL / INFO, with the threshold);
exit status 1 when a gated check fails, 2 when the gate cannot run. The rollout:
``scripts/rollout.sh add-version``, ``canary``, then
``python -m training.gate MODEL VERSION && scripts/rollout.sh promote MODEL``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

from contract.repository import read_version

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "serving" / "tfserving" / "models.config"

LAST20_TARGET = 0.78  # text: last-20 test accuracy
IMAGE_TARGET = 0.990  # image: test accuracy
REFERENCE_TOLERANCE = 0.01  # text: whole-text accuracy may be this far below the n-gram reference
# The card figures (contract.repository.ModelVersion.figures) the no-regression checks compare, higher is
# better, by the gate's name for them. The short-text proxy has a check of its own; ECE is only reported.
NAMES = {"test_accuracy": "test accuracy", "validation_accuracy": "validation accuracy",
         "last20_accuracy": "last-20 test accuracy", "whole_text_accuracy": "whole-text test accuracy",
         "short_text_proxy_accuracy": "short-text proxy accuracy"}
PROXY = "short_text_proxy_accuracy"
# The baseline's figures the gate measures itself when its card lacks them (training.reference.MEASURABLE).
MEASURABLE = ("last20_accuracy", "whole_text_accuracy", "short_text_proxy_accuracy", "test_ece")
FIGURE_NAMES = {**NAMES, "test_ece": "ECE (last 20)"}


class Check(NamedTuple):
    status: str  # PASS, FAIL (gated) or INFO (reported only)
    name: str  # what was checked, with its threshold
    value: str  # the version's figure

    def line(self, model: str, version: int) -> str:
        return f"{self.status}  {model} v{version}: {self.name}: {self.value}"


class Measured(NamedTuple):
    """Figures of the baseline that the gate measured itself (ModelVersion.figures' names), and how."""

    figures: dict
    how: str = "measured by the gate"  # e.g. "measured by the gate, cached"


def gated(name: str, value: float | None, threshold: float) -> Check:
    if value is None:
        return Check("FAIL", name, "missing from the card")
    return Check("PASS" if value >= threshold else "FAIL", name, f"{value}")


def stable_version(config: Path, model: str) -> int | None:
    """The version that ``model``'s ``stable`` label points at in a TF Serving models.config (None: no label)."""
    from google.protobuf import text_format
    from tensorflow_serving.config.model_server_config_pb2 import ModelServerConfig

    parsed = text_format.Parse(Path(config).read_text(encoding="utf-8"), ModelServerConfig())
    for m in parsed.model_config_list.config:
        if m.name == model:
            return m.version_labels["stable"] if "stable" in m.version_labels else None
    return None


def missing_figures(models: Path, model: str, version: int, baseline: int | None) -> list[str]:
    """The figures the gate would measure for ``baseline``: those of MEASURABLE its card lacks, for a text
    version with a baseline other than itself (none otherwise)."""
    if baseline in (None, version) or read_version(models, model, version).kind != "text":
        return []
    card = read_version(models, model, baseline).figures
    return [k for k in MEASURABLE if k not in card]


def check(models: Path, model: str, version: int, baseline: int | None, reference: float | None = None,
          measured: Measured | None = None) -> list[Check]:
    """The gate's checks for ``model`` ``version`` against ``baseline`` (None: nothing to compare with);
    ``reference`` is the n-gram reference's whole-text accuracy, needed for text models; ``measured``
    the baseline's figures the gate measured, used where the baseline's card lacks them (without
    them, such a figure is reported as not compared)."""
    v = read_version(models, model, version)
    got = v.figures
    base = read_version(models, model, baseline).figures if baseline not in (None, version) else None
    from_gate: set[str] = set()
    if base is not None and measured is not None:
        from_gate = {k for k in measured.figures if k not in base and k in MEASURABLE}
        base = {**base, **{k: measured.figures[k] for k in from_gate}}
    bname = f"v{baseline}'s"

    def theirs(key: str) -> str:  # the baseline's figure, and where it came from when not from its card
        return f"{bname} {base[key]}" + (f" ({measured.how})" if key in from_gate else "")

    alone = "no stable version" if baseline is None else f"v{version} is the baseline itself"
    rows: list[Check] = []
    if v.kind == "text":
        if reference is None:
            raise ValueError("a text model's gate needs the n-gram reference")
        floor = round(reference - REFERENCE_TOLERANCE, 4)
        rows.append(gated(f"last-20 test accuracy >= {LAST20_TARGET}", got.get("last20_accuracy"), LAST20_TARGET))
        rows.append(gated(f"whole-text test accuracy >= n-gram reference {reference} - {REFERENCE_TOLERANCE} = {floor}",
                          got.get("whole_text_accuracy"), floor))
        name = "short-text proxy accuracy >= the stable version's"
        if base is None:
            rows.append(Check("INFO", name, f"not compared, {alone}: {got.get(PROXY)}"))
        elif PROXY not in base:
            rows.append(Check("INFO", name, f"not compared, v{baseline}'s card has no short-text proxy figure: "
                              f"{got.get(PROXY)}"))
        else:
            rows.append(gated(f"short-text proxy accuracy >= {theirs(PROXY)}", got.get(PROXY), base[PROXY]))
    else:
        rows.append(gated(f"test accuracy >= {IMAGE_TARGET}", got.get("test_accuracy"), IMAGE_TARGET))
    if "test_ece" in got or (base and "test_ece" in base):
        other = ""
        if base and "test_ece" in base:
            how = f", {measured.how}" if "test_ece" in from_gate else ""
            other = f" ({bname} {base['test_ece']}{how})"
        which = "last-20 test predictions" if v.kind == "text" else "test predictions"
        rows.append(Check("INFO", f"calibration, ECE of the {which} (reported, not gated)",
                          f"{got.get('test_ece', 'not on the card')}{other}"))
    if base is None:
        rows.append(Check("INFO", "no regression", f"not compared, {alone}"))
        return rows
    for key, name in NAMES.items():
        if key == PROXY and v.kind == "text":
            continue  # its own check above
        if key in got and key in base:
            rows.append(gated(f"no regression: {name} >= {theirs(key)}", got[key], base[key]))
        elif key in got:
            rows.append(Check("INFO", f"no regression: {name}",
                              f"not compared, v{baseline}'s card has none: {got[key]}"))
        elif key in base:
            rows.append(Check("FAIL", f"no regression: {name} >= {theirs(key)}", "missing from the card"))
    return rows


def provenance(source: str, path: Path, result: dict) -> str:
    """How a measurement of the gate's was obtained: measured now, or read from its cache file."""
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    seconds = result["seconds"]["total"]
    return (f"measured now in {seconds} s, cached in {where}" if source == "measured"
            else f"read from cache {where} (measured {result['measured_at']} in {seconds} s)")


def passed(rows: list[Check]) -> bool:
    return all(r.status != "FAIL" for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.gate", description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("version", type=int)
    p.add_argument("--baseline", type=int,
                   help="compare with this version (default: the one labelled stable in --config)")
    p.add_argument("--models", type=Path, default=ROOT / "models")
    p.add_argument("--config", type=Path, default=CONFIG, help="models.config whose 'stable' label is the baseline")
    p.add_argument("--ngram-reference", type=float, metavar="ACCURACY",
                   help="text models: take this n-gram reference instead of measuring it")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--from-cache", "--reference-from-cache", dest="from_cache", action="store_true",
                     help="text models: never measure, read the n-gram reference and the baseline's missing figures "
                          "from the cache; exit 2 when one is not there")
    how.add_argument("--remeasure", action="store_true",
                     help="text models: measure the n-gram reference and the baseline's missing figures even if cached")
    p.add_argument("--cache-dir", type=Path,
                   help="where the gate's measurements are kept (default: .cache/gate/)")
    p.add_argument("--data-dir", help="the datasets (default: $CLASSIFIER_DATA_DIR, else ../shared/data/)")
    a = p.parse_args(argv)
    try:
        baseline = a.baseline if a.baseline is not None else stable_version(a.config, a.model)
        v = read_version(a.models, a.model, a.version)
        if baseline is not None:
            read_version(a.models, a.model, baseline)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = a.config.resolve().relative_to(ROOT) if a.config.resolve().is_relative_to(ROOT) else a.config
    source = f"--baseline {baseline}" if a.baseline is not None else f"labelled stable in {config}"
    print(f"{a.model} v{a.version} ({v.kind}) against v{baseline} ({source})" if baseline is not None
          else f"{a.model} v{a.version} ({v.kind}): no stable version in {config}")
    reference = None
    if v.kind == "text":
        reference = a.ngram_reference
        if reference is not None:
            how = "given with --ngram-reference, not measured"
        else:
            from training import reference as ref_mod

            params = ref_mod.ReferenceParams.for_card(v.card, v.whole_text_stride)
            try:
                r = ref_mod.ngram_reference(v.preprocessor, params, a.data_dir, a.cache_dir or ref_mod.CACHE_DIR,
                                            cache_only=a.from_cache, remeasure=a.remeasure)
            except ref_mod.NotCached as e:
                print(f"error: {e}; run without --from-cache to measure it", file=sys.stderr)
                return 2
            except OSError as e:  # the datasets are missing (training.data.DataNotFoundError)
                print(f"error: the n-gram reference needs the IMDB data: {e}", file=sys.stderr)
                return 2
            how = f"{provenance(r.source, r.path, r.result)}; {params.describe()}"
            reference = r.value
        print(f"INFO  {a.model} v{a.version}: n-gram reference, whole-text test accuracy: {reference} ({how})")
    measured = None
    lacking = missing_figures(a.models, a.model, a.version, baseline)
    if lacking:
        from training import reference as ref_mod

        base = read_version(a.models, a.model, baseline)
        try:
            m = ref_mod.baseline_figures(base, v.whole_text_stride, a.data_dir, a.cache_dir or ref_mod.CACHE_DIR,
                                         cache_only=a.from_cache, remeasure=a.remeasure)
        except ref_mod.NotCached as e:
            print(f"error: {e}; run without --from-cache to measure them", file=sys.stderr)
            return 2
        except OSError as e:  # the datasets or the SavedModel are missing
            print(f"error: measuring v{baseline}'s figures needs the IMDB data and its SavedModel: {e}",
                  file=sys.stderr)
            return 2
        except ImportError as e:
            print(f"error: measuring v{baseline}'s figures needs TensorFlow: {e}", file=sys.stderr)
            return 2
        measured = Measured(m.figures, "measured by the gate" + (", cached" if m.source == "cache" else " now"))
        values = ", ".join(f"{FIGURE_NAMES[k]} {m.figures[k]}" for k in lacking if k in m.figures)
        print(f"INFO  {a.model} v{a.version}: v{baseline}'s card lacks {len(lacking)} compared figure"
              f"{'s' * (len(lacking) > 1)}, measured by the gate through v{baseline}'s serving signature on the "
              f"{m.result['test_reviews']} test reviews (training.metrics.text_metrics, whole text stride "
              f"{v.whole_text_stride}): {values} ({provenance(m.source, m.path, m.result)})")
    rows = check(a.models, a.model, a.version, baseline, reference, measured)
    for row in rows:
        print(row.line(a.model, a.version))
    failed = sum(r.status == "FAIL" for r in rows)
    verdict = "passes the promotion gate" if not failed else \
        f"does not pass the promotion gate ({failed} gated check{'s' * (failed > 1)} failed)"
    print(f"{a.model} v{a.version}: {verdict}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
