"""Canary analysis: canary against stable over a window, from the gateways' metrics in Prometheus.

    python -m serving.analyze sentiment_lstm --prometheus http://localhost:9090 --window 10m

Compares, for one model, the version labelled ``canary`` with the one labelled ``stable`` (read
from ``classifier_model_version_label``, or given with --stable/--canary):

- on served traffic, per version: requests, the server-side error ratio (INTERNAL, UNAVAILABLE,
  DEADLINE_EXCEEDED over all requests; client errors and RESOURCE_EXHAUSTED overload refusals are
  not a version's fault and are not errors here) and the p99 latency of successful requests;
- on the shadow sample (the same items scored by both versions): how often they give the same label,
  the mean total-variation distance of their probabilities (mean |Δp|), and each version's share of
  each label;

and prints a verdict with every threshold it used: PROMOTE (exit 0), HOLD (exit 1: a threshold is
broken; the reasons name both values and the threshold), INSUFFICIENT DATA (exit 2: fewer requests
per version or shadow items than the minimum; thresholds are then not judged), or exit 3 when it
cannot analyse (Prometheus unreachable, versions unknown, bad arguments).

Counts over the window are exact, summed over every gateway (scrape target): a counter's value at
the end minus its value at the start (0 for a series born within the window: a new gateway, or a
version's first request), and Prometheus' ``increase()`` only for a series that reset (a restart)
or vanished within the window. Plain ``increase()`` extrapolates to the window's edges and misses
a series' first count, which matters for a canary's few hundred requests. (A series Prometheus
first saw within the window is counted from 0 too: start the window after Prometheus has scraped
the gateways once.)

Only the standard library: the tool runs wherever the gateway's package is installed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict

from serving.analysis import (
    EXIT_ERROR, SERVER_ERRORS, ERRORS_NOTE, P99_NOTE, Thresholds, VersionStats,
    ShadowStats, Observation, Result, pct, pp, ms, count, evaluate,
)

DURATION = re.compile(r"^(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?$")
UNITS = {"y": 365 * 86400, "w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class AnalysisError(Exception):
    """Cannot analyse: Prometheus unreachable or failing, versions unknown."""


class Prometheus:
    """The few calls of Prometheus' HTTP API this needs (instant queries), standard library only."""

    def __init__(self, url: str, timeout_s: float = 30):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def query(self, expr: str, at: float) -> list[tuple[dict[str, str], float]]:
        body = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"}).encode()
        request = urllib.request.Request(self.url + "/api/v1/query", data=body,
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as r:
                answer = json.load(r)
        except urllib.error.HTTPError as e:
            try:
                answer = json.load(e)
            except ValueError:
                raise AnalysisError(f"Prometheus at {self.url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise AnalysisError(f"Prometheus at {self.url}: {getattr(e, 'reason', e)}") from None
        if answer.get("status") != "success":
            raise AnalysisError(f"Prometheus at {self.url}: {answer.get('errorType')}: {answer.get('error')} "
                                f"(query: {expr})")
        data = answer["data"]
        if data["resultType"] != "vector":
            raise AnalysisError(f"query {expr!r} gave a {data['resultType']}, not a vector")
        return [(sample["metric"], float(sample["value"][1])) for sample in data["result"]]


def window_seconds(window: str) -> float:
    """A Prometheus duration ("10m", "1h30m", "90s") in seconds; ValueError if it is not one."""
    match = DURATION.match(window)
    if not window or not match:
        raise ValueError(f"not a Prometheus duration: {window!r} (e.g. 90s, 10m, 1h)")
    return sum(int(part[:-2] if part.endswith("ms") else part[:-1]) * UNITS[
        "ms" if part.endswith("ms") else part[-1]] for part in match.groups() if part)


def exact_increase(selector: str, window: str) -> str:
    """PromQL for each series' increase over ``window`` (see the module's docstring): end value minus
    start value (0 when the series did not exist then), ``increase()`` for series that reset or vanished."""
    s, w = selector, window
    return (f"(({s} - ({s} offset {w} or {s} * 0)) unless (resets({s}[{w}]) > 0))"
            f" or increase({s}[{w}])")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def version_labels(prom: Prometheus, model: str, at: float) -> dict[str, set[str]]:
    """label -> the versions the gateways report for it (classifier_model_version_label == 1)."""
    out: dict[str, set[str]] = {}
    for metric, _ in prom.query(f"classifier_model_version_label{{model={_quote(model)}}} == 1", at):
        out.setdefault(metric.get("label", ""), set()).add(metric.get("version", ""))
    return out


def observe(prom: Prometheus, model: str, stable: str, canary: str, window: str, at: float) -> Observation:
    """Everything the verdict needs, from a handful of instant queries at ``at``."""
    m = f"model={_quote(model)}"
    versions = f"version=~{_quote(f'{re.escape(stable)}|{re.escape(canary)}')}"

    def inc(name: str, matchers: str) -> str:
        return exact_increase(f"{name}{{{matchers}}}", window)

    stats = {v: VersionStats(v) for v in (stable, canary)}
    for metric, n in prom.query(f"sum by (version, outcome) ({inc('classifier_requests_total', f'{m}, {versions}')})",
                                at):
        stats[metric["version"]].outcomes[metric.get("outcome", "")] = n
    ok = f'{m}, {versions}, outcome="ok"'
    p99 = f"histogram_quantile(0.99, sum by (version, le) ({inc('classifier_request_duration_seconds_bucket', ok)}))"
    for metric, seconds in prom.query(p99, at):
        stats[metric["version"]].p99_s = None if math.isnan(seconds) else seconds
    for metric, n in prom.query(f"sum by (version, label) ({inc('classifier_predictions_total', f'{m}, {versions}')})",
                                at):
        stats[metric["version"]].predictions[metric.get("label", "")] = n

    shadow = ShadowStats()
    for metric, n in prom.query(f"sum by (outcome) ({inc('classifier_shadow_requests_total', m)})", at):
        shadow.requests[metric.get("outcome", "")] = n
    for metric, n in prom.query(f"sum by (agreement) ({inc('classifier_shadow_items_total', m)})", at):
        if metric.get("agreement") == "agree":
            shadow.agree = n
        elif metric.get("agreement") == "disagree":
            shadow.disagree = n
    for _, x in prom.query(f"sum({inc('classifier_shadow_probability_abs_diff_total', m)})", at):
        shadow.abs_diff_sum = x
    for metric, n in prom.query(
            f"sum by (version, label) ({inc('classifier_shadow_labels_total', f'{m}, {versions}')})", at):
        shadow.labels.setdefault(metric["version"], {})[metric.get("label", "")] = n

    def gauge(name: str) -> float | None:
        values = [v for _, v in prom.query(f"max({name}{{{m}}})", at)]
        return values[0] if values else None

    return Observation(model, window, at, stats[stable], stats[canary], shadow,
                       gauge("classifier_canary_percent"), gauge("classifier_shadow_percent"))


# -- output -----------------------------------------------------------------------------------------

def _table(rows: list[tuple[str, ...]], indent: str = "  ", left: bool = False) -> list[str]:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned (or all left)."""
    widths = [max(len(r[i]) for r in rows if len(r) > i) for i in range(max(map(len, rows)))]
    return [indent + "  ".join(cell.ljust(widths[i]) if i == 0 or left else cell.rjust(widths[i])
                               for i, cell in enumerate(row)).rstrip() for row in rows]


def render(obs: Observation, th: Thresholds, result: Result, prometheus: str) -> str:
    s, c, sh = obs.stable, obs.canary, obs.shadow
    sv, cv = f"stable v{s.version}", f"canary v{c.version}"
    at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(obs.end))
    lines = [f"Canary analysis of {obs.model}: {sv} vs {cv}, window {obs.window} ending {at} ({prometheus})"]
    percent = {k: "n/a" if v is None else f"{count(v)}%" for k, v in
               (("canary", obs.canary_percent), ("shadow", obs.shadow_percent))}
    lines.append(f"traffic gauges (max over the gateways at the end): canary {percent['canary']}, "
                 f"shadow {percent['shadow']}")
    lines += ["", "served traffic"]
    rows = [("", sv, cv), ("requests", count(s.requests), count(c.requests)),
            ("server errors", count(s.errors), count(c.errors)),
            ("error ratio", pct(s.error_ratio), pct(c.error_ratio)),
            ("p99 latency (ok)", ms(s.p99_s), ms(c.p99_s))]
    for label in sorted(set(s.predictions) | set(c.predictions)):
        rows.append((f"predicted '{label}'", count(s.predictions.get(label, 0)), count(c.predictions.get(label, 0))))
    lines += _table(rows)
    lines += ["", "shadow sample (the same items scored by both versions)"]
    rows = [("requests", ", ".join(f"{count(sh.requests.get(o, 0))} {o}" for o in ("scored", "skipped", "failed"))),
            ("items", count(sh.items)),
            ("agreement", f"{pct(sh.agreement)} ({count(sh.agree)} agree, {count(sh.disagree)} disagree)"),
            ("mean |Δp|", "n/a" if sh.mean_abs_diff is None else f"{sh.mean_abs_diff:.4f}")]
    lines += _table(rows, left=True)
    s_share, c_share = sh.share(s.version), sh.share(c.version)
    labels = sorted(set(s_share) | set(c_share))
    if labels:
        rows = [("label share", sv, cv, "|Δ|")]
        rows += [(f"'{label}'", pct(s_share.get(label, 0.0)), pct(c_share.get(label, 0.0)),
                  pp(abs(c_share.get(label, 0.0) - s_share.get(label, 0.0)), False)) for label in labels]
        lines += _table(rows)
    lines += ["", "checks"]
    mark = {True: "ok", False: "BROKEN", None: "-"}
    rows = [("check", "threshold", "value", "")]
    rows += [(ch.name, ch.threshold, ch.value, mark[ch.ok] if ch.kind == "threshold" else
              {True: "ok", False: "TOO FEW", None: "-"}[ch.ok]) for ch in result.checks]
    lines += _table(rows)
    used = (f"thresholds: max error ratio delta {pp(th.max_error_ratio_delta)}, max p99 ratio "
            f"{th.max_p99_ratio:.2f}, min agreement {pct(th.min_agreement)}, max label share delta "
            f"{pp(th.max_label_share_delta, False)}, min requests per version {count(th.min_requests)}, "
            f"min shadow items {count(th.min_shadow_items)}")
    lines += ["", used, ERRORS_NOTE, P99_NOTE, ""]
    lines.append(f"verdict: {result.verdict} (exit {result.exit_code})")
    lines += [f"  - {reason}" for reason in result.reasons]
    return "\n".join(lines)


def as_json(obs: Observation, th: Thresholds, result: Result, prometheus: str) -> dict:
    def version(v: VersionStats) -> dict:
        return {"version": v.version, "requests": v.requests, "errors": v.errors, "error_ratio": v.error_ratio,
                "p99_s": v.p99_s, "outcomes": v.outcomes, "predictions": v.predictions}

    sh = obs.shadow
    return {
        "model": obs.model, "window": obs.window, "window_s": window_seconds(obs.window), "end": obs.end,
        "prometheus": prometheus, "stable": version(obs.stable), "canary": version(obs.canary),
        "canary_percent": obs.canary_percent, "shadow_percent": obs.shadow_percent,
        "shadow": {"requests": sh.requests, "items": sh.items, "agree": sh.agree, "disagree": sh.disagree,
                   "agreement": sh.agreement, "abs_diff_sum": sh.abs_diff_sum, "mean_abs_diff": sh.mean_abs_diff,
                   "labels": sh.labels,
                   "label_share": {v: sh.share(v) for v in (obs.stable.version, obs.canary.version)}},
        "thresholds": asdict(th), "server_errors": list(SERVER_ERRORS),
        "checks": [asdict(ch) for ch in result.checks],
        "verdict": result.verdict, "exit_code": result.exit_code, "reasons": result.reasons,
    }


# -- command line -----------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # exit 3, not argparse's 2 (that is INSUFFICIENT DATA here)
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    d = Thresholds()
    p = _Parser(prog="python -m serving.analyze", description=(
        "Canary analysis: the canary version of MODEL against its stable version over a window, from the "
        "gateways' metrics in Prometheus. Exit 0 PROMOTE, 1 HOLD, 2 INSUFFICIENT DATA, 3 cannot analyse."))
    p.add_argument("model")
    p.add_argument("--prometheus", default=os.environ.get("PROMETHEUS_URL") or "http://localhost:9090",
                   help="Prometheus' base URL (default: $PROMETHEUS_URL, else %(default)s)")
    p.add_argument("--window", default="10m", help="Prometheus duration ending at --end (default %(default)s)")
    p.add_argument("--end", type=float, default=None, help="Unix time the window ends (default: now)")
    p.add_argument("--stable", help="stable version (default: the 'stable' label the gateways report)")
    p.add_argument("--canary", help="canary version (default: the 'canary' label the gateways report)")
    p.add_argument("--max-error-ratio-delta", type=float, default=d.max_error_ratio_delta,
                   help="canary minus stable server-side error ratio (default %(default)s = 1 percentage point)")
    p.add_argument("--max-p99-ratio", type=float, default=d.max_p99_ratio,
                   help="canary p99 / stable p99 of successful requests (default %(default)s)")
    p.add_argument("--min-agreement", type=float, default=d.min_agreement,
                   help="share of shadow items given the same label by both versions (default %(default)s)")
    p.add_argument("--max-label-share-delta", type=float, default=d.max_label_share_delta,
                   help="per label, |canary share - stable share| on the shadow sample (default %(default)s)")
    p.add_argument("--min-requests", type=float, default=d.min_requests,
                   help="requests per version in the window, else INSUFFICIENT DATA (default %(default)s)")
    p.add_argument("--min-shadow-items", type=float, default=d.min_shadow_items,
                   help="shadow items in the window, else INSUFFICIENT DATA; 0: shadow checks only when "
                        "there are shadow items (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the analysis as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        window_seconds(args.window)
        if not NAME.match(args.model):
            raise ValueError(f"invalid model name {args.model!r}")
        for v in (args.stable, args.canary):
            if v is not None and not v.isdigit():
                raise ValueError(f"invalid version {v!r} (a number)")
    except ValueError as e:
        parser().error(str(e))
    th = Thresholds(args.max_error_ratio_delta, args.max_p99_ratio, args.min_agreement, args.max_label_share_delta,
                    args.min_requests, args.min_shadow_items)
    at = time.time() if args.end is None else args.end
    prom = Prometheus(args.prometheus)
    try:
        stable, canary = args.stable, args.canary
        if stable is None or canary is None:
            labels = version_labels(prom, args.model, at)
            for name in ("stable", "canary"):
                if (stable if name == "stable" else canary) is not None:
                    continue
                found = labels.get(name, set())
                if len(found) != 1:
                    raise AnalysisError(
                        f"{args.model}: the gateways report {sorted(found) or 'no version'} for label '{name}' "
                        f"(classifier_model_version_label at the window's end); give --{name}")
                if name == "stable":
                    stable = found.pop()
                else:
                    canary = found.pop()
        if stable == canary:
            raise AnalysisError(f"{args.model}: stable and canary are the same version ({stable}): nothing to compare")
        obs = observe(prom, args.model, stable, canary, args.window, at)
    except AnalysisError as e:
        print(f"analyze: {e}", file=sys.stderr)
        return EXIT_ERROR
    result = evaluate(obs, th)
    if args.json:
        print(json.dumps(as_json(obs, th, result, prom.url), indent=2))
    else:
        print(render(obs, th, result, prom.url))
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
