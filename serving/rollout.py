"""Rollouts in the core: following models.config and the traffic file, the weighted canary
and shadow scoring.

- **Following the files** (:meth:`Rollout.follow`): changes are applied when valid
  (serving/model_config.py); the embedded backend then loads versions added to a policy and
  unloads removed ones after their queued work, as TF Serving does.

- **Weighted canary.** Of the requests that name no version and no label, ``canary_percent``
  go to the ``canary`` label's version. Which ones is decided by a hash of the model and the
  request's routing key (``x-routing-key``, else its request id), so one key (a user) keeps
  one version, every gateway agrees, and the share converges on the configured weight. A
  canary that is not AVAILABLE (still loading, failed) gets nothing.
- **Shadow scoring.** ``shadow_percent`` of the default requests that stable answered are
  also scored by the canary after the answer went out: never on the request's path, only
  when neither version has work waiting (shadow work is the first to be shed), one at a
  time per model. Agreement, mean |dp| and each version's labels become metrics, which
  ``python -m serving.analyze`` reads from Prometheus.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import numpy as np

from contract.repository import ModelVersion, versions_on_disk
from serving import kinds
from serving.batching import Batcher
from serving.errors import ServiceError
from serving.model_config import CANARY, STABLE, ModelsConfig
from serving.request import Predict, Result, request_id, routing_key

log = logging.getLogger("serving.rollout")


def bucket(model: str, key: str) -> float:
    """Where ``key`` falls for ``model``, uniformly in [0, 100): the same in every process."""
    digest = hashlib.blake2b(f"{model}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") * 100 / 2**64


class Rollout:
    def __init__(self, core):
        """``core``: the serving.core.Classifier whose requests this routes and shadows."""
        self.core = core
        s = core.settings
        self.config = ModelsConfig(s.models_config_file, s.traffic_file, self._on_disk, self._reloaded)
        self._shadowing: set[str] = set()  # models with a shadow score in flight
        self._tasks: set[asyncio.Task] = set()
        self._predictions: dict[tuple[str, int], list] = {}

    # -- following the files ---------------------------------------------------------
    def _on_disk(self, name: str) -> list[int]:
        try:
            return versions_on_disk(self.core.settings.model_base_path, name)
        except OSError:
            return []

    def _reloaded(self, file: str, outcome: str) -> None:
        m = self.core.metrics
        m.config_reloads.labels(file, outcome).inc()
        if outcome == "applied":
            m.config_applied_at.labels(file).set_to_current_time()

    async def follow(self, loaded: asyncio.Future) -> None:
        """Every ``models_config_poll_s`` (once ``loaded``): re-read models.config and the traffic
        file when they changed (each applied only when valid); when models.config was, the backend
        serves what its policies choose now (embedded: new versions are loaded and warmed, removed
        ones unloaded once their queued work is done)."""
        await asyncio.gather(loaded, return_exceptions=True)
        backend, pending = self.core.backend, False
        while True:
            await asyncio.sleep(self.core.settings.models_config_poll_s)
            try:
                pending = await asyncio.to_thread(self.config.refresh) or pending
                if pending:
                    pending = False
                    for v in await asyncio.to_thread(backend.sync, self.config):
                        await self._retire(v)
            except Exception:  # noqa: BLE001 - keep following; the change is applied again next time
                log.exception("applying models.config failed")
                pending = True

    async def _retire(self, v: ModelVersion) -> None:
        """A version no longer served: its admitted and queued work finishes, then it is unloaded."""
        b = self.core.batchers.forget(v)
        if b is not None:
            if not await b.drained(self.core.settings.request_timeout_s):
                log.warning("%s/%s: work still queued after request_timeout_s; answering it 503", v.name, v.version)
            await b.stop()
        await asyncio.to_thread(self.core.backend.unload, v)

    # -- weighted canary ----------------------------------------------------------------
    def canary(self, name: str, versions: dict[int, ModelVersion]) -> ModelVersion | None:
        """The canary label's version when it is another than stable's and AVAILABLE."""
        labels = self.config.labels(name)
        number = labels.get(CANARY)
        if number is None or number == labels.get(STABLE):
            return None
        v = versions.get(number)
        return v if v is not None and v.state == "AVAILABLE" else None

    def route(self, name: str, versions: dict[int, ModelVersion], default: int) -> int:
        """The version of a request that names none: the canary for its share of routing keys, else ``default``."""
        percent = self.config.split(name).canary_percent
        if percent <= 0:
            return default
        canary = self.canary(name, versions)
        if canary is None:
            return default
        return canary.version if bucket(name, routing_key.get() or request_id.get()) < percent else default

    # -- shadow scoring --------------------------------------------------------------------
    def served(self, req: Predict, v: ModelVersion, batcher: Batcher, result: Result) -> None:
        """After a request was answered: count its labels by version; maybe score it in the shadow."""
        self._count(v, result)
        if req.version or req.label or self.core.stopped:
            return
        percent = self.config.split(v.name).shadow_percent
        if percent <= 0 or random.random() * 100 >= percent:
            return
        canary = self.canary(v.name, self.core.models().get(v.name, {}))
        if canary is None or canary.version == v.version or result.probabilities is None:
            return
        m = self.core.metrics
        canary_batcher = self.core.batchers.get(canary)
        if v.name in self._shadowing or batcher.waiting or canary_batcher.depth:
            m.shadow_requests.labels(v.name, "skipped").inc()
            return
        self._shadowing.add(v.name)
        task = asyncio.get_running_loop().create_task(self._shadow(req, v, canary, canary_batcher, batcher, result))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shadow(self, req: Predict, v: ModelVersion, canary: ModelVersion, canary_batcher: Batcher,
                      batcher: Batcher, result: Result) -> None:
        m, name = self.core.metrics, v.name
        kind = kinds.get(req.kind)
        outcome = "failed"
        try:
            limits = self.core.limits(name)
            prepared = await self.core.offload(kind.prepare, canary, req.inputs, limits, heavy=kind.heavy(req.inputs))
            if batcher.waiting or canary_batcher.refusal(len(prepared.rows)):
                outcome = "skipped"
                return
            deadline = asyncio.get_running_loop().time() + self.core.settings.request_timeout_s
            probs = await canary_batcher.submit(prepared.rows, deadline)
            theirs = kind.result(canary, prepared, probs)
            self._compare(v, canary, result, theirs)
            outcome = "scored"
        except ServiceError as e:
            outcome = "skipped" if e.code == "RESOURCE_EXHAUSTED" else "failed"
        except Exception:  # noqa: BLE001 - shadow work must never hurt the service
            log.exception("shadow scoring of %s/%s failed", name, canary.version)
        finally:
            self._shadowing.discard(name)
            m.shadow_requests.labels(name, outcome).inc()

    def _compare(self, v: ModelVersion, canary: ModelVersion, ours: Result, theirs: Result) -> None:
        m, name = self.core.metrics, v.name
        a, b = np.asarray(ours.probabilities), np.asarray(theirs.probabilities)
        la, lb = a.argmax(1), b.argmax(1)
        agree = int((la == lb).sum())
        m.shadow_items.labels(name, "agree").inc(agree)
        m.shadow_items.labels(name, "disagree").inc(len(la) - agree)
        m.shadow_abs_diff.labels(name).inc(float(np.abs(a - b).sum() / 2))
        for version, labels in ((v, la), (canary, lb)):
            for i, count in enumerate(np.bincount(labels, minlength=len(version.labels))):
                if count:
                    m.shadow_labels.labels(name, str(version.version), version.labels[i]).inc(int(count))

    def _count(self, v: ModelVersion, result: Result) -> None:
        if result.probabilities is None:
            return
        series = self._predictions.get((v.name, v.version))
        if series is None:
            series = self._predictions[(v.name, v.version)] = [
                self.core.metrics.predictions.labels(v.name, str(v.version), label) for label in v.labels]
        counts = np.bincount(np.asarray(result.probabilities).argmax(1), minlength=len(series))
        for s, count in zip(series, counts):
            if count:
                s.inc(int(count))

    def export(self) -> None:
        """The applied labels and splits as gauges (at each scrape)."""
        m = self.core.metrics
        m.version_label.clear()
        for name in self.core.settings.models:
            for label, version in self.config.labels(name).items():
                m.version_label.labels(name, label, str(version)).set(1)
            split = self.config.split(name)
            m.canary_percent.labels(name).set(split.canary_percent)
            m.shadow_percent.labels(name).set(split.shadow_percent)

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
