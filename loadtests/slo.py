"""SLO thresholds (loadtests/slo.toml) checked against a run's statistics.

Standard library only (tomllib; PyYAML is not in the Locust image), no Locust import:
``check(thresholds, stats)`` takes plain numbers, so it can be tested on its own.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

PERCENTILES = {"p50": 0.50, "p90": 0.90, "p95": 0.95, "p99": 0.99, "p999": 0.999}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(path: str | Path, shape: str | None = None) -> dict:
    """The thresholds in ``path`` with the ``[shape.<shape>]`` overrides merged in."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    overrides = doc.pop("shape", {})
    for name in (doc.get("latency_ms") or {}).values():
        unknown = set(name) - set(PERCENTILES)
        if unknown:
            raise ValueError(f"{path}: unknown percentile(s) {sorted(unknown)}; use {sorted(PERCENTILES)}")
    if shape and shape in overrides:
        doc = _merge(doc, overrides[shape])
    doc.setdefault("enforce", True)
    return doc


def check(thresholds: dict, stats: dict[str, dict]) -> list[str]:
    """Broken objectives, as sentences. ``stats``: name -> {"requests", "failures", "p50", "p95", ...}
    (milliseconds), with "Aggregated" for the whole run."""
    broken = []
    max_ratio = thresholds.get("error_ratio")
    if max_ratio is not None:
        for name, s in stats.items():
            if s["requests"]:
                ratio = s["failures"] / s["requests"]
                if ratio > max_ratio:
                    broken.append(f"{name}: error ratio {ratio:.4f} ({s['failures']}/{s['requests']}) > {max_ratio}")
    for name, ceilings in (thresholds.get("latency_ms") or {}).items():
        s = stats.get(name)
        if s is None or not s["requests"]:
            continue  # this request type did not run (e.g. gRPC users off); nothing to judge
        for pct, ceiling in ceilings.items():
            value = s.get(pct)
            if value is not None and value > ceiling:
                broken.append(f"{name}: {pct} {value:.1f} ms > {ceiling} ms")
    return broken
