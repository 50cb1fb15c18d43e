"""Flow control over every model version: their batchers (serving/batching.py, one per loaded
version, made on first use), the refusal decided before a request body is read, and the
signals that lead shedding (serving/metrics.py's FlowCollector reads :meth:`Batchers.stats`).

Admission compares each model's *estimated work ahead* with ``max_queue_wait_s``; the busy
fraction of its batch slots (busy seconds / slots / time) rises with load and reaches ~1
before the first refusal, which is why autoscaling and the alerts read it.
"""

from __future__ import annotations

from concurrent.futures import Executor

from contract.repository import ModelVersion
from serving.backends import Backend
from serving.batching import Batcher
from serving.metrics import FlowStats, Metrics
from serving.request import request_id
from serving.settings import Settings
from serving.statistics import Statistics


class Batchers:
    def __init__(self, settings: Settings, backend: Backend, metrics: Metrics, executor: Executor,
                 statistics: Statistics | None = None):
        self.settings, self.backend, self.metrics, self.executor = settings, backend, metrics, executor
        self.statistics = statistics or Statistics()
        self._live: dict[tuple[str, int], Batcher] = {}
        self._retired_busy_s: dict[str, float] = {}  # busy seconds of retired versions' batchers
        metrics.flow = self.stats

    def __iter__(self):
        return iter(list(self._live.values()))

    def get(self, v: ModelVersion) -> Batcher:
        """The batcher of one model version, made on first use (new versions can appear)."""
        key = (v.name, v.version)
        b = self._live.get(key)
        if b is None:
            s, m, name = self.settings.batching(v.name), self.metrics, v.name
            b = Batcher(
                f"{name}/{v.version}",
                lambda x, tags, ver=v.version: self.backend.predict(name, ver, x, request_ids=tags),
                s.max_batch_size, s.max_batch_wait_us / 1e6, s.max_queue_items, self.executor,
                on_batch=lambda rows, sec, r=m.batch_rows.labels(name), b=m.backend_seconds.labels(name), ver=v.version: (
                    r.observe(rows), b.observe(sec), self.statistics.batch(name, ver, rows, sec)),
                # The model's rows over all its versions (stable and canary share the gauge).
                on_depth=lambda _, g=m.queue_rows.labels(name), name=name: g.set(self.depth(name)),
                on_drop=lambda rows, reason: m.dropped_rows.labels(name, reason).inc(rows),
                max_concurrent=s.max_concurrent_batches,
                max_queue_wait_s=s.max_queue_wait_s,
                max_retry_after_s=s.max_retry_after_s,
                tag=request_id.get,
                wait_when_idle=s.batch_wait_when_idle,
                model=name,
            )
            m.queue_limit.labels(name).set(s.max_queue_items)
            b.start()
            self._live[key] = b
        return b

    def forget(self, v: ModelVersion) -> Batcher | None:
        """Take a retired version's batcher out of use (the caller stops it); its busy seconds stay counted."""
        b = self._live.pop((v.name, v.version), None)
        if b is not None:
            self._retired_busy_s[v.name] = self._retired_busy_s.get(v.name, 0.0) + b.busy_seconds()
        return b

    def depth(self, model: str) -> int:
        return sum(b.depth for (n, _), b in self._live.items() if n == model)

    def precheck(self, kind: str) -> None:
        """Refuse (raise :class:`Overloaded`) when every model of this ``kind`` has a full queue: no
        request of that kind could be admitted, whatever it asks."""
        versions = self.backend.versions()
        batchers = [b for (name, _), b in self._live.items()
                    if (v := versions.get(name)) and any(x.kind == kind for x in v.values())]
        refusals = [b.refusal(1) for b in batchers]
        if refusals and all(refusals):
            i = min(range(len(refusals)), key=lambda i: refusals[i].retry_after_s)
            batchers[i].refused()
            refused = refusals[i]
            refusals.clear()
            try:
                raise refused
            finally:  # no local of this frame (in its traceback) may hold it: no reference cycle per refusal
                del refused

    def stats(self) -> dict[str, FlowStats]:
        """Per configured model: estimated work ahead, wait limit, busy slot-seconds, slots."""
        out: dict[str, FlowStats] = {}
        for name in self.settings.models:
            s = self.settings.batching(name)
            mine = [b for (n, _), b in self._live.items() if n == name]
            out[name] = FlowStats(
                max((b.estimated_wait() for b in mine), default=0.0), s.max_queue_wait_s,
                self._retired_busy_s.get(name, 0.0) + sum(b.busy_seconds() for b in mine),
                sum(b.max_concurrent for b in mine) or s.max_concurrent_batches)
        return out

