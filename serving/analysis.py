"""The canary analysis' verdict (python -m serving.analyze): what is compared, the thresholds, and the
decision, from an :class:`Observation` of both versions over a window (serving/analyze.py reads it
from Prometheus). Only the standard library."""

from __future__ import annotations

from dataclasses import dataclass, field

PROMOTE, HOLD, INSUFFICIENT = "PROMOTE", "HOLD", "INSUFFICIENT DATA"
EXIT_CODES = {PROMOTE: 0, HOLD: 1, INSUFFICIENT: 2}
EXIT_ERROR = 3
# Outcomes (serving/errors.py OUTCOMES) that count as a version's failures.
SERVER_ERRORS = ("INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED")
ERRORS_NOTE = ("error ratio = (INTERNAL + UNAVAILABLE + DEADLINE_EXCEEDED) / all requests of the version; client "
               "errors (INVALID_ARGUMENT, NOT_FOUND, ...) and RESOURCE_EXHAUSTED overload refusals are not a "
               "version's fault and do not count as errors")
P99_NOTE = "p99 latency: successful requests (outcome ok), from the histogram buckets"


@dataclass(frozen=True)
class Thresholds:
    max_error_ratio_delta: float = 0.01  # canary error ratio - stable error ratio (0.01 = 1 percentage point)
    max_p99_ratio: float = 1.5  # canary p99 / stable p99
    min_agreement: float = 0.9  # shadow items with the same label from both versions
    max_label_share_delta: float = 0.05  # per label: |canary share - stable share| on the shadow sample
    min_requests: float = 100  # per version, in the window
    min_shadow_items: float = 100  # 0: shadowing optional (no shadow items: its checks are skipped)


@dataclass
class VersionStats:
    version: str
    outcomes: dict[str, float] = field(default_factory=dict)  # outcome -> requests
    p99_s: float | None = None  # None: no successful request
    predictions: dict[str, float] = field(default_factory=dict)  # label -> items, on served traffic

    @property
    def requests(self) -> float:
        return sum(self.outcomes.values())

    @property
    def errors(self) -> float:
        return sum(self.outcomes.get(code, 0.0) for code in SERVER_ERRORS)

    @property
    def error_ratio(self) -> float | None:
        return self.errors / self.requests if self.requests else None


@dataclass
class ShadowStats:
    requests: dict[str, float] = field(default_factory=dict)  # scored | skipped | failed
    agree: float = 0.0
    disagree: float = 0.0
    abs_diff_sum: float = 0.0
    labels: dict[str, dict[str, float]] = field(default_factory=dict)  # version -> label -> items

    @property
    def items(self) -> float:
        return self.agree + self.disagree

    @property
    def agreement(self) -> float | None:
        return self.agree / self.items if self.items else None

    @property
    def mean_abs_diff(self) -> float | None:
        return self.abs_diff_sum / self.items if self.items else None

    def share(self, version: str) -> dict[str, float]:
        counts = self.labels.get(version, {})
        total = sum(counts.values())
        return {label: n / total for label, n in counts.items()} if total else {}


@dataclass
class Observation:
    model: str
    window: str
    end: float
    stable: VersionStats
    canary: VersionStats
    shadow: ShadowStats
    canary_percent: float | None = None
    shadow_percent: float | None = None


@dataclass
class Check:
    name: str
    kind: str  # "data": a minimum of data; "threshold": a limit on a difference
    threshold: str
    value: str
    ok: bool | None  # None: not applicable (the reason is in value)
    message: str = ""


@dataclass
class Result:
    verdict: str
    checks: list[Check]
    reasons: list[str]

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]


# -- the verdict (pure) -----------------------------------------------------------------------------

def pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def pp(x: float, signed: bool = True) -> str:
    return f"{100 * x:{'+' if signed else ''}.2f} pp"


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:.2f} ms"


def count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}"


def evaluate(obs: Observation, th: Thresholds) -> Result:
    """The verdict on ``obs`` under ``th``: INSUFFICIENT DATA when a minimum of data is not met (the
    thresholds are then reported but not judged), else HOLD when any threshold is broken, else PROMOTE."""
    s, c, sh = obs.stable, obs.canary, obs.shadow
    sv, cv = f"stable v{s.version}", f"canary v{c.version}"
    checks: list[Check] = []

    for stats, who in ((s, sv), (c, cv)):
        ok = stats.requests >= th.min_requests
        checks.append(Check(f"requests {who}", "data", f">= {count(th.min_requests)}", count(stats.requests), ok,
                            "" if ok else f"requests of {who}: {count(stats.requests)} < min {count(th.min_requests)}"))
    shadow_needed = th.min_shadow_items > 0
    ok = sh.items >= th.min_shadow_items
    checks.append(Check("shadow items", "data", f">= {count(th.min_shadow_items)}", count(sh.items), ok,
                        "" if ok else f"shadow items: {count(sh.items)} < min {count(th.min_shadow_items)}"))

    # error ratio
    if s.error_ratio is None or c.error_ratio is None:
        checks.append(Check("error ratio delta (canary - stable)", "threshold", f"<= {pp(th.max_error_ratio_delta)}",
                            "n/a (no requests)", None))
    else:
        delta = c.error_ratio - s.error_ratio
        ok = delta <= th.max_error_ratio_delta
        checks.append(Check(
            "error ratio delta (canary - stable)", "threshold", f"<= {pp(th.max_error_ratio_delta)}", pp(delta), ok,
            "" if ok else f"error ratio: {cv} {pct(c.error_ratio)} vs {sv} {pct(s.error_ratio)}: "
                          f"{pp(delta)} > max {pp(th.max_error_ratio_delta)}"))
    # p99
    if not s.p99_s or c.p99_s is None:
        checks.append(Check("p99 ratio (canary / stable)", "threshold", f"<= {th.max_p99_ratio:.2f}",
                            "n/a (no successful requests)", None))
    else:
        ratio = c.p99_s / s.p99_s
        ok = ratio <= th.max_p99_ratio
        checks.append(Check(
            "p99 ratio (canary / stable)", "threshold", f"<= {th.max_p99_ratio:.2f}", f"{ratio:.2f}", ok,
            "" if ok else f"p99 latency: {cv} {ms(c.p99_s)} vs {sv} {ms(s.p99_s)}: "
                          f"ratio {ratio:.2f} > max {th.max_p99_ratio:.2f}"))
    # shadow agreement and label shares
    if not sh.items:
        why = "n/a (no shadow items)" + ("" if shadow_needed else ": not judged, min shadow items is 0")
        checks.append(Check("shadow agreement", "threshold", f">= {pct(th.min_agreement)}", why, None))
        checks.append(Check("label share delta (shadow)", "threshold", f"<= {pp(th.max_label_share_delta, False)}",
                            why, None))
    else:
        ok = sh.agreement >= th.min_agreement
        checks.append(Check(
            "shadow agreement", "threshold", f">= {pct(th.min_agreement)}", pct(sh.agreement), ok,
            "" if ok else f"shadow agreement: {pct(sh.agreement)} of {count(sh.items)} items ({sv} vs {cv}) "
                          f"< min {pct(th.min_agreement)}"))
        s_share, c_share = sh.share(s.version), sh.share(c.version)
        if not s_share or not c_share:
            checks.append(Check("label share delta (shadow)", "threshold",
                                f"<= {pp(th.max_label_share_delta, False)}", "n/a (no labels counted)", None))
        for label in sorted(set(s_share) | set(c_share)) if s_share and c_share else ():
            delta = abs(c_share.get(label, 0.0) - s_share.get(label, 0.0))
            ok = delta <= th.max_label_share_delta
            checks.append(Check(
                f"label share delta '{label}' (shadow)", "threshold", f"<= {pp(th.max_label_share_delta, False)}",
                pp(delta, False), ok,
                "" if ok else f"label share of '{label}' on the shadow sample: {cv} {pct(c_share.get(label, 0.0))} "
                              f"vs {sv} {pct(s_share.get(label, 0.0))}: |Δ| {pp(delta, False)} > max "
                              f"{pp(th.max_label_share_delta, False)}"))

    short = [ch.message for ch in checks if ch.kind == "data" and ch.ok is False]
    if short:
        return Result(INSUFFICIENT, checks, short)
    broken = [ch.message for ch in checks if ch.kind == "threshold" and ch.ok is False]
    return Result(HOLD if broken else PROMOTE, checks, broken)


# -- Prometheus ---------------------------------------------------------------------------------------
