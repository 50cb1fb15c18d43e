"""TF Serving's models.config and the traffic file beside it, as the gateway reads them.

Both backends read the same file TF Serving reads (``models_config_file``; text-format
``tensorflow.serving.ModelServerConfig``, parsed with the lean messages of
``protos/tensorflow_serving/config``): the embedded backend loads the versions its
policy names, and the core resolves version labels ("stable", "canary", ...) with it.
The traffic file (``traffic_file``, JSON, beside it in the same ConfigMap) says per
model which share of default requests goes to the canary and which share of the rest
is also scored by the canary in the shadow.

Both files are re-read when they change (:meth:`ModelsConfig.refresh`, called by the
core about once a second), the way TF Serving's ``--model_config_file_poll_wait_seconds``
does. A new file is applied only when it is valid (:func:`problems`): it parses, names
every model the applied one names (removing a model is an explicit step), and every label
points at a version of that model's policy. Otherwise the previous one stays, with one
WARNING naming the problem. ``python -m serving check-config FILE`` runs the same checks
(scripts/rollout.sh runs it before it writes).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from serving.gen.tensorflow_serving.config import model_server_config_pb2

log = logging.getLogger("serving.model_config")
STABLE = "stable"
CANARY = "canary"
MODELS_CONFIG, TRAFFIC = "models_config", "traffic"  # the files, as metrics name them


class ConfigError(ValueError):
    """A models.config or traffic file that must not be applied; the message says why."""


@dataclass(frozen=True)
class ModelPolicy:
    """One model's entry: ``specific`` versions, the ``latest`` n, or ``all``; and its labels."""

    specific: tuple[int, ...] = ()
    latest: int | None = None
    all: bool = False
    labels: dict[str, int] = field(default_factory=dict)

    def choose(self, on_disk: list[int]) -> list[int]:
        """The versions to serve among those on disk (ascending)."""
        if self.all:
            return list(on_disk)
        if self.specific:
            return [v for v in on_disk if v in self.specific]
        return list(on_disk[-(self.latest or 1):])

    def describe(self) -> str:
        policy = (f"versions {list(self.specific)}" if self.specific else "all versions" if self.all
                  else f"latest {self.latest or 1}")
        labels = " ".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
        return policy + (f", {labels}" if labels else "")


@dataclass(frozen=True)
class Traffic:
    """One model's split: ``canary_percent`` of the requests that name no version go to the
    ``canary`` label's version; ``shadow_percent`` of the rest are also scored by it, off the
    critical path."""

    canary_percent: float = 0.0
    shadow_percent: float = 0.0


def parse(text: str) -> dict[str, ModelPolicy]:
    try:
        config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig(), allow_unknown_field=True)
    except text_format.ParseError as e:
        raise ConfigError(f"not a ModelServerConfig: {e}") from None
    out = {}
    for c in config.model_config_list.config:
        if c.name in out:
            raise ConfigError(f"model {c.name!r} is configured twice")
        policy = c.model_version_policy
        choice = policy.WhichOneof("policy_choice")
        out[c.name] = ModelPolicy(
            specific=tuple(policy.specific.versions) if choice == "specific" else (),
            latest=(policy.latest.num_versions or 1) if choice == "latest" else None,
            all=choice == "all",
            labels=dict(c.version_labels),
        )
    return out


def problems(models: dict[str, ModelPolicy], previous: Iterable[str] = (),
             on_disk: Callable[[str], list[int]] | None = None) -> list[str]:
    """Why ``models`` must not replace a config naming ``previous`` (empty: it may). Labels of a
    ``specific`` policy must name one of its versions; of ``latest``/``all``, one of the versions
    that policy chooses among ``on_disk(model)`` (when the repository can be read)."""
    out = [f"model {name!r} is served now but missing from the new config (removing a model is an explicit "
           f"step: restart without it)" for name in previous if name not in models]
    for name, p in models.items():
        for label, version in sorted(p.labels.items()):
            if p.specific:
                allowed = list(p.specific)
            elif on_disk is not None:
                allowed = p.choose(on_disk(name))
            else:
                continue
            if version not in allowed:
                out.append(f"model {name!r}: label {label!r} points to version {version}, which its version "
                           f"policy does not serve (versions {allowed})")
    return out


def parse_traffic(text: str, models: dict[str, ModelPolicy]) -> dict[str, Traffic]:
    """The traffic file: ``{"model": {"canary_percent": 10, "shadow_percent": 5}, ...}``."""
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError as e:
        raise ConfigError(f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("expected a JSON object of models")
    out, errors = {}, []
    for name, entry in data.items():
        if name not in models:
            errors.append(f"model {name!r} is not in models.config")
            continue
        if not isinstance(entry, dict) or set(entry) - {"canary_percent", "shadow_percent"}:
            errors.append(f"model {name!r}: expected an object with canary_percent and/or shadow_percent")
            continue
        values = {}
        for key in ("canary_percent", "shadow_percent"):
            v = entry.get(key, 0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v <= 100) or math.isnan(v):
                errors.append(f"model {name!r}: {key} must be a number from 0 to 100, not {v!r}")
            else:
                values[key] = float(v)
        if len(values) < 2:
            continue
        t = out[name] = Traffic(**values)
        if (t.canary_percent or t.shadow_percent) and CANARY not in models[name].labels:
            errors.append(f"model {name!r}: canary_percent/shadow_percent need a {CANARY!r} label in models.config")
    if errors:
        raise ConfigError("; ".join(errors))
    return out


class ModelsConfig:
    """models.config and the traffic file, re-read by :meth:`refresh` when they change; each
    applied only when valid. No models.config file: every model's newest version, no labels."""

    def __init__(self, path: Path | None, traffic_path: Path | None = None,
                 on_disk: Callable[[str], list[int]] | None = None,
                 on_reload: Callable[[str, str], None] | None = None):
        self.path, self.traffic_path = path, traffic_path
        self.on_disk = on_disk
        self.on_reload = on_reload or (lambda file, outcome: None)
        self.models: dict[str, ModelPolicy] = {}
        self.traffic: dict[str, Traffic] = {}
        self.generation = 0  # counts the models.config contents applied
        self.applied = False  # a models.config was applied (or there is none to apply)
        self.errors: dict[str, str | None] = {MODELS_CONFIG: None, TRAFFIC: None}
        self.applied_at: dict[str, float] = {}
        self._stamps: dict[str, tuple | None] = {MODELS_CONFIG: None, TRAFFIC: None}
        self.refresh()

    def refresh(self) -> bool:
        """Re-read what changed; True when a new models.config was applied."""
        changed = self._reload(MODELS_CONFIG, self.path, self._apply_models)
        if changed:  # its labels may make a traffic file valid that was not
            self._stamps[TRAFFIC] = None
        self._reload(TRAFFIC, self.traffic_path, self._apply_traffic)
        return changed

    def _reload(self, file: str, path: Path | None, apply: Callable[[str | None], None]) -> bool:
        if path is None:
            if file == MODELS_CONFIG:
                self.applied = True
            return False
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError as e:
            stamp = ("missing", e.strerror)
        if stamp == self._stamps[file]:
            return False
        self._stamps[file] = stamp
        try:
            apply(None if stamp[0] == "missing" else Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ConfigError) as e:
            self.errors[file] = f"{path}: {e}"
            log.warning("%s %s rejected, the previous one stays: %s", file, path, e)
            self.on_reload(file, "rejected")
            return False
        self.errors[file] = None
        self.applied_at[file] = time.time()
        self.on_reload(file, "applied")
        return file == MODELS_CONFIG

    def _apply_models(self, text: str | None) -> None:
        if text is None:
            if self.applied and self.path is not None and self.generation:
                raise ConfigError("the file is gone (removing models is an explicit step)")
            log.warning("models_config_file %s cannot be read: serving the newest version of each model, "
                        "no version labels", self.path)
            self.applied = True
            return
        models = parse(text)
        found = problems(models, self.models, self.on_disk)
        if found:
            raise ConfigError("; ".join(found))
        if self.generation:
            log.info("models_config_file %s applied: %s", self.path,
                     {name: p.describe() for name, p in models.items()})
        self.models, self.applied = models, True
        self.generation += 1

    def _apply_traffic(self, text: str | None) -> None:
        traffic = parse_traffic(text or "", self.models)
        if traffic != self.traffic and self.applied_at.get(TRAFFIC):
            log.info("traffic_file %s applied: %s", self.traffic_path,
                     {k: vars(t) for k, t in traffic.items() if t != Traffic()})
        self.traffic = traffic

    @property
    def error(self) -> str | None:
        return self.errors[MODELS_CONFIG] or self.errors[TRAFFIC]

    def valid(self, file: str) -> bool:
        return self.errors[file] is None

    def policy(self, model: str) -> ModelPolicy:
        return self.models.get(model, ModelPolicy())

    def labels(self, model: str) -> dict[str, int]:
        return self.policy(model).labels

    def split(self, model: str) -> Traffic:
        return self.traffic.get(model, Traffic())


def check_main(argv: list[str] | None = None) -> int:
    """``python -m serving check-config FILE``: exit 0 when the gateway would apply FILE, else 1."""
    p = argparse.ArgumentParser(prog="python -m serving check-config",
                                description="Check a models.config (and traffic file) as the gateway would before "
                                            "applying it.")
    p.add_argument("file", type=Path, help="the new models.config")
    p.add_argument("--previous", type=Path, help="the models.config applied now: every model it names must stay")
    p.add_argument("--traffic", type=Path, help="the traffic file to check against FILE")
    p.add_argument("--models", type=Path, help="the model repository: every version the policies name must be there")
    a = p.parse_args(argv)
    errors = []
    try:
        from contract.repository import versions_on_disk

        on_disk = (lambda name: versions_on_disk(a.models, name)) if a.models else None
        models = parse(a.file.read_text(encoding="utf-8"))
        previous = parse(a.previous.read_text(encoding="utf-8")) if a.previous and a.previous.exists() else {}
        errors += problems(models, previous, on_disk)
        if on_disk:
            for name, policy in models.items():
                missing = sorted(set(policy.specific) - set(on_disk(name)))
                if missing:
                    errors.append(f"model {name!r}: versions {missing} are not under {a.models / name}")
        if a.traffic and a.traffic.exists():
            parse_traffic(a.traffic.read_text(encoding="utf-8"), models)
    except (OSError, UnicodeDecodeError, ConfigError) as e:
        errors.append(str(e))
    if errors:
        for e in errors:
            print(f"check-config: {a.file}: {e}", file=sys.stderr)
        return 1
    print(f"{a.file}: ok: " + "; ".join(f"{name}: {p.describe()}" for name, p in models.items()))
    return 0
