"""TF Serving's models.config, as the gateway reads it: which versions to serve, and their labels.

Both backends read the same file TF Serving reads (``models_config_file``;
text-format ``tensorflow.serving.ModelServerConfig``, parsed with the lean
messages of ``protos/tensorflow_serving/config``): the embedded backend loads
the versions its policy names, and the core resolves version labels
("stable", "canary", ...) with it. The file is re-read when it changes
(checked at most once a second), so moving a label takes effect without a
restart, the way TF Serving's ``--model_config_file_poll_wait_seconds`` does.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from serving.gen.tensorflow_serving.config import model_server_config_pb2

log = logging.getLogger("serving.model_config")
STABLE = "stable"


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


def parse(text: str) -> dict[str, ModelPolicy]:
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig(), allow_unknown_field=True)
    out = {}
    for c in config.model_config_list.config:
        policy = c.model_version_policy
        choice = policy.WhichOneof("policy_choice")
        out[c.name] = ModelPolicy(
            specific=tuple(policy.specific.versions) if choice == "specific" else (),
            latest=(policy.latest.num_versions or 1) if choice == "latest" else None,
            all=choice == "all",
            labels=dict(c.version_labels),
        )
    return out


class ModelsConfig:
    """The models.config file, re-read when it changes. No file: newest versions, no labels."""

    def __init__(self, path: Path | None, check_interval_s: float = 1.0):
        self.path = path
        self.interval = check_interval_s
        self._models: dict[str, ModelPolicy] = {}
        self._stamp: tuple | None = None
        self._next_check = 0.0
        self.error: str | None = None
        self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.path is None or (not force and now < self._next_check):
            return
        self._next_check = now + self.interval
        try:
            st = os.stat(self.path)
        except OSError as e:
            if self._stamp != ("missing",):
                log.warning("models_config_file %s cannot be read (%s): serving the newest version of each "
                            "model, no version labels", self.path, e.strerror)
                self._stamp, self._models = ("missing",), {}
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        try:
            models = parse(Path(self.path).read_text(encoding="utf-8"))
        except (OSError, text_format.ParseError) as e:
            self.error = f"models_config_file {self.path} is invalid: {e}"
            log.error("%s; keeping the previous configuration", self.error)
            self._stamp = stamp
            return
        if self._stamp is not None:
            log.info("models_config_file %s changed: labels %s", self.path,
                     {name: p.labels for name, p in models.items() if p.labels})
        self._models, self._stamp, self.error = models, stamp, None

    def policy(self, model: str) -> ModelPolicy:
        self._refresh()
        return self._models.get(model, ModelPolicy())

    def labels(self, model: str) -> dict[str, int]:
        return self.policy(model).labels
