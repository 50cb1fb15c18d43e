"""Load shapes (selected by the locustfile's --shape) and the per-step measurements.

The classes here are abstract: the locustfile defines one concrete subclass of the
shape asked for, so Locust never sees two shapes. Their parameters are Locust
options (see the locustfile), read from ``runner.environment.parsed_options``.
"""

from __future__ import annotations

import csv
import time

from locust import LoadTestShape
from locust.stats import calculate_response_time_percentile

AGGREGATED = "Aggregated"


def _percentile(times: dict, count: int, q: float) -> float:
    return calculate_response_time_percentile(times, count, q) if count else 0.0


class StepRecorder:
    """Statistics per step (or phase): a snapshot of every entry's counts and response-time
    histogram when the step's measuring window opens (``settle`` seconds after the user
    count changed) and when the step ends; the difference is that step alone."""

    def __init__(self, environment, items_per_request):
        self.env = environment
        self.items = items_per_request  # name -> (texts, images) per successful request
        self.steps: list[dict] = []
        self.current: dict | None = None

    def _snapshot(self) -> dict:
        stats = self.env.stats
        snap = {AGGREGATED: (stats.total.num_requests, stats.total.num_failures, dict(stats.total.response_times))}
        for (name, _method), e in stats.entries.items():
            snap[name] = (e.num_requests, e.num_failures, dict(e.response_times))
        return snap

    def at(self, label, users: int, time_in_step: float, settle: float) -> None:
        if self.current is None or self.current["label"] != label:
            self.finish()
            self.current = {"label": label, "users": users, "start": None}
        if self.current["start"] is None and time_in_step >= settle:
            self.current["start"] = (time.perf_counter(), self._snapshot())

    def finish(self) -> None:
        cur, self.current = self.current, None
        if cur is None or cur["start"] is None:
            return
        t0, before = cur["start"]
        seconds = time.perf_counter() - t0
        if seconds < 0.5:
            return
        after = self._snapshot()
        per_name = {}
        texts = images = 0
        for name, (n1, f1, rt1) in after.items():
            n0, f0, rt0 = before.get(name, (0, 0, {}))
            n, f = n1 - n0, f1 - f0
            if n <= 0:
                continue
            rt = {k: v - rt0.get(k, 0) for k, v in rt1.items() if v - rt0.get(k, 0) > 0}
            count = sum(rt.values())
            per_name[name] = {
                "requests": n, "failures": f, "rps": n / seconds,
                "p50": _percentile(rt, count, 0.50), "p95": _percentile(rt, count, 0.95),
                "p99": _percentile(rt, count, 0.99),
            }
            if name != AGGREGATED:
                t, i = self.items(name)
                texts += t * (n - f)
                images += i * (n - f)
        agg = per_name.get(AGGREGATED, {"requests": 0, "failures": 0, "rps": 0.0, "p50": 0, "p95": 0, "p99": 0})
        self.steps.append({
            "label": cur["label"], "users": cur["users"], "seconds": seconds,
            "rps": agg["rps"], "texts_per_s": texts / seconds, "images_per_s": images / seconds,
            "requests": agg["requests"], "failures": agg["failures"],
            "p50": agg["p50"], "p95": agg["p95"], "p99": agg["p99"], "per_name": per_name,
        })

    def knee(self, p99_ms: float) -> dict | None:
        """The step with the highest request throughput whose overall p99 stays under
        ``p99_ms`` and that had no failures."""
        ok = [s for s in self.steps if s["requests"] and not s["failures"] and s["p99"] <= p99_ms]
        return max(ok, key=lambda s: s["rps"]) if ok else None

    def table(self, p99_ms: float | None = None, label: str = "step") -> str:
        knee = self.knee(p99_ms) if p99_ms is not None else None
        lines = [f"{label:>8} {'users':>5} {'req/s':>8} {'texts/s':>9} {'images/s':>8} {'fail':>6} "
                 f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}"]
        for s in self.steps:
            mark = "  <- knee" if s is knee else ""
            lines.append(
                f"{s['label']!s:>8} {s['users']:>5} {s['rps']:>8.1f} {s['texts_per_s']:>9.1f} "
                f"{s['images_per_s']:>8.1f} "
                f"{s['failures']:>6} {s['p50']:>7.0f} {s['p95']:>7.0f} {s['p99']:>7.0f}{mark}"
            )
        if p99_ms is not None:
            if knee is None:
                lines.append(f"knee: none - no step without failures had p99 <= {p99_ms:g} ms")
            else:
                lines.append(f"knee (highest req/s with p99 <= {p99_ms:g} ms, no failures): step {knee['label']}, "
                             f"{knee['users']} users, {knee['rps']:.1f} req/s, {knee['texts_per_s']:.1f} texts/s, "
                             f"{knee['images_per_s']:.1f} images/s; per request type at the knee:")
                lines.append(f"    {'request':<30} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}")
                for name, s in sorted(knee["per_name"].items(), key=lambda kv: kv[0] == AGGREGATED):
                    lines.append(f"    {name:<30} {s['rps']:>7.1f} {s['p50']:>7.0f} {s['p95']:>7.0f} {s['p99']:>7.0f}")
        return "\n".join(lines)

    def write_csv(self, path: str) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "users", "seconds", "name", "requests", "failures", "req/s", "texts/s", "images/s",
                        "p50 ms", "p95 ms", "p99 ms"])
            for s in self.steps:
                for name, n in sorted(s["per_name"].items(), key=lambda kv: kv[0] == AGGREGATED):
                    agg = name == AGGREGATED
                    w.writerow([s["label"], s["users"], f"{s['seconds']:.1f}", name, n["requests"], n["failures"],
                                f"{n['rps']:.2f}", f"{s['texts_per_s']:.2f}" if agg else "",
                                f"{s['images_per_s']:.2f}" if agg else "",
                                f"{n['p50']:.0f}", f"{n['p95']:.0f}", f"{n['p99']:.0f}"])


class _Recorded(LoadTestShape):
    abstract = True
    recorder: StepRecorder | None = None

    @property
    def options(self):
        return self.runner.environment.parsed_options

    def _phase(self, t: float):
        """(label, users, seconds into the phase) or None when the run is over."""
        raise NotImplementedError

    def tick(self):
        phase = self._phase(self.get_run_time())
        if phase is None:
            if self.recorder:
                self.recorder.finish()
            return None
        label, users, into = phase
        if self.recorder:
            self.recorder.at(label, users, into, self.options.step_settle_s)
        return users, self.spawn_rate(users)

    def spawn_rate(self, users: int) -> float:
        return max(1.0, float(users))  # every change within about a second


class StepRamp(_Recorded):
    """users = step_users x k for k = 1..steps, each held for step_s seconds."""

    abstract = True

    def _phase(self, t):
        o = self.options
        k = int(t // o.ramp_step_s)
        if k >= o.ramp_steps:
            return None
        return k + 1, o.ramp_step_users * (k + 1), t - k * o.ramp_step_s


class Spike(_Recorded):
    """base users for spike_before_s, spike users for spike_s, base users again for spike_after_s."""

    abstract = True

    def _phase(self, t):
        o = self.options
        if t < o.spike_before_s:
            return "before", o.spike_base_users, t
        t -= o.spike_before_s
        if t < o.spike_s:
            return "spike", o.spike_users, t
        t -= o.spike_s
        if t < o.spike_after_s:
            return "after", o.spike_base_users, t
        return None

    def spawn_rate(self, users):
        return max(1.0, float(self.options.spike_users))  # the spike arrives at once
