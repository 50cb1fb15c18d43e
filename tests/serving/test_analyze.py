"""Canary analysis (serving/analyze.py): its verdict logic, and the command against a real Prometheus
server scraping real gateways (two, with a 50 % canary and every stable request shadowed), whose
printed numbers must be the gateways' own /metrics summed. A second Prometheus test scrapes two small
exporters whose counters the test sets, for what live gateways cannot show on demand: counts from
before the window left out, series born within it counted from zero, server errors and slow canaries."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import httpx
import pytest

from serving import analysis, analyze
from serving.analysis import HOLD, INSUFFICIENT, PROMOTE, Observation, ShadowStats, Thresholds, VersionStats
from testkit import prometheus
from testkit.gateway import ROOT, free_port, gateway_processes, metric_samples, wait_until

MODEL = "sentiment_lstm"
STABLE, CANARY = "1", "4"
# The gateways' models.config: whatever the shipped one labels, these two versions side by side.
MODELS_CONFIG_TEXT = f"""model_config_list {{
  config {{
    name: "{MODEL}"
    base_path: "/models/{MODEL}"
    model_platform: "tensorflow"
    model_version_policy {{ specific {{ versions: {STABLE} versions: {CANARY} }} }}
    version_labels {{ key: "stable" value: {STABLE} }}
    version_labels {{ key: "canary" value: {CANARY} }}
  }}
}}
"""
# sentiment_lstm v1 and v4 give different labels to 2 of these.
TEXTS = [
    "A wonderful film, I loved every minute of it.", "Dull and far too long.",
    "The acting was fine but the story made no sense.", "Not bad at all, though the ending dragged.",
    "I expected more from this director.", "A masterpiece of quiet, patient storytelling.",
    "Terrible script, wooden actors, awful music.", "It was okay, nothing special.",
    "The kids enjoyed it more than I did.", "Beautiful photography cannot save a boring plot.",
    "Funny, warm and surprisingly moving.", "I fell asleep halfway through.",
    "One of the worst films I have seen this year.", "Great cast, weak jokes.",
    "The sequel is better than the original.", "Predictable but charming.",
    "An utter waste of time and money.", "Brilliant performances all around.",
    "The plot twists kept me guessing until the end.", "Too violent for my taste, but well made.",
    "I would not watch it again.", "A solid, enjoyable thriller.",
    "The dialogue felt forced and unnatural.", "Visually stunning and emotionally empty.",
]
REQUESTS = 320
needs_prometheus = pytest.mark.skipif(not prometheus.available(), reason=prometheus.MISSING)


def run_analyze(prom_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.analyze", MODEL, "--prometheus", prom_url, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def run_json(prom_url: str, *args: str, model: str = MODEL) -> tuple[int, dict]:
    r = subprocess.run([sys.executable, "-m", "serving.analyze", model, "--prometheus", prom_url, "--json", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode in (0, 1, 2), r.stdout + r.stderr
    return r.returncode, json.loads(r.stdout)


# -- the verdict (pure) ---------------------------------------------------------------------------

def observation(stable_ok=500, canary_ok=500, stable_err=0, canary_err=0, p99=(0.010, 0.012), agree=190,
                disagree=10, labels=None) -> Observation:
    s = VersionStats("1", {"ok": stable_ok, "INTERNAL": stable_err, "INVALID_ARGUMENT": 7}, p99[0])
    c = VersionStats("4", {"ok": canary_ok, "UNAVAILABLE": canary_err, "RESOURCE_EXHAUSTED": 40}, p99[1])
    labels = labels or {"1": {"positive": 100, "negative": 100}, "4": {"positive": 104, "negative": 96}}
    return Observation(MODEL, "10m", 0.0, s, c, ShadowStats({"scored": agree + disagree}, agree, disagree,
                                                             0.05 * (agree + disagree), labels))


def test_promote_when_every_threshold_holds():
    result = analysis.evaluate(observation(), Thresholds())
    assert (result.verdict, result.exit_code, result.reasons) == (PROMOTE, 0, [])
    assert all(ch.ok for ch in result.checks)
    names = [ch.name for ch in result.checks]
    assert names == ["requests stable v1", "requests canary v4", "shadow items", "error ratio delta (canary - stable)",
                     "p99 ratio (canary / stable)", "shadow agreement", "label share delta 'negative' (shadow)",
                     "label share delta 'positive' (shadow)"]


def test_client_errors_and_overload_are_not_server_errors():
    obs = observation()
    assert (obs.stable.errors, obs.canary.errors) == (0, 0)
    assert obs.canary.requests == 540 and obs.stable.requests == 507
    from serving.errors import OUTCOMES

    assert set(analysis.SERVER_ERRORS) <= OUTCOMES and "RESOURCE_EXHAUSTED" in OUTCOMES


@pytest.mark.parametrize("change, threshold, reason", [
    (dict(canary_err=20), "max_error_ratio_delta",
     "error ratio: canary v4 3.57% vs stable v1 0.00%: +3.57 pp > max +1.00 pp"),
    (dict(p99=(0.010, 0.020)), "max_p99_ratio",
     "p99 latency: canary v4 20.00 ms vs stable v1 10.00 ms: ratio 2.00 > max 1.50"),
    (dict(agree=170, disagree=30), "min_agreement",
     "shadow agreement: 85.00% of 200 items (stable v1 vs canary v4) < min 90.00%"),
    (dict(labels={"1": {"positive": 100, "negative": 100}, "4": {"positive": 120, "negative": 80}}),
     "max_label_share_delta",
     "label share of 'negative' on the shadow sample: canary v4 40.00% vs stable v1 50.00%: "
     "|Δ| 10.00 pp > max 5.00 pp"),
])
def test_hold_names_the_broken_threshold_with_both_values(change, threshold, reason):
    result = analysis.evaluate(observation(**change), Thresholds())
    assert (result.verdict, result.exit_code) == (HOLD, 1)
    assert result.reasons[0] == reason
    # the same data passes once the threshold allows it
    lenient = {"max_error_ratio_delta": 0.05, "max_p99_ratio": 2.0, "min_agreement": 0.85,
               "max_label_share_delta": 0.1}[threshold]
    assert analysis.evaluate(observation(**change), Thresholds(**{threshold: lenient})).verdict == PROMOTE


def test_too_little_data_is_insufficient_even_with_a_broken_threshold():
    result = analysis.evaluate(observation(canary_ok=10, canary_err=30), Thresholds())  # 80 requests in all
    assert (result.verdict, result.exit_code) == (INSUFFICIENT, 2)
    assert result.reasons == ["requests of canary v4: 80 < min 100"]
    assert any(ch.ok is False and ch.kind == "threshold" for ch in result.checks)  # reported, not judged
    result = analysis.evaluate(observation(agree=40, disagree=2), Thresholds())
    assert (result.verdict, result.reasons) == (INSUFFICIENT, ["shadow items: 42 < min 100"])


def test_without_shadow_items_the_shadow_checks_need_min_shadow_items_zero():
    obs = observation(agree=0, disagree=0, labels={"1": {}, "4": {}})
    assert analysis.evaluate(obs, Thresholds()).verdict == INSUFFICIENT
    result = analysis.evaluate(obs, Thresholds(min_shadow_items=0))
    assert result.verdict == PROMOTE
    assert [ch.ok for ch in result.checks if "shadow" in ch.name and ch.kind == "threshold"] == [None, None]


def test_p99_is_not_judged_without_successful_requests():
    result = analysis.evaluate(observation(p99=(None, 0.5)), Thresholds())
    (p99,) = [ch for ch in result.checks if ch.name.startswith("p99")]
    assert p99.ok is None and result.verdict == PROMOTE


def test_window_and_arguments():
    assert analyze.window_seconds("10m") == 600 and analyze.window_seconds("1h30m") == 5400
    assert analyze.window_seconds("1500ms") == 1.5
    for bad in ("", "10", "ten minutes", "5m1h"):
        with pytest.raises(ValueError):
            analyze.window_seconds(bad)
    for argv in (["m", "--window", "10"], ["bad name"], ["m", "--stable", "v1"]):
        with pytest.raises(SystemExit) as e:
            analyze.main(argv)
        assert e.value.code == analyze.EXIT_ERROR  # not 2: that is INSUFFICIENT DATA


def test_prometheus_unreachable_is_exit_3(capsys):
    assert analyze.main([MODEL, "--prometheus", f"http://127.0.0.1:{free_port()}", "--stable", "1",
                         "--canary", "4"]) == analyze.EXIT_ERROR
    assert "Prometheus at http://127.0.0.1:" in capsys.readouterr().err


def test_the_command_imports_nothing_heavy():
    code = ("import sys; sys.modules.update(tensorflow=None, fastapi=None, grpc=None, numpy=None, httpx=None); "
            "import serving.analyze")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# -- against a real Prometheus scraping real gateways ---------------------------------------------

def summed(samples: list[dict], name: str, **match) -> dict[tuple, float]:
    """Sum of a series family over the gateways, by the labels not given in ``match``."""
    out: dict[tuple, float] = {}
    for metrics in samples:
        for (sample, labels), value in metrics.items():
            labels = dict(labels)
            if sample == name and all(labels.get(k) == v for k, v in match.items()):
                key = tuple(sorted((k, v) for k, v in labels.items() if k not in match))
                out[key] = out.get(key, 0.0) + value
    return out


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' histogram_quantile over cumulative bucket counts (le -> count)."""
    bounds = sorted(buckets)
    rank = q * buckets[math.inf]
    for i, le in enumerate(bounds):
        if buckets[le] >= rank:
            if le == math.inf:
                return bounds[-2]
            start, below = (bounds[i - 1], buckets[bounds[i - 1]]) if i else (0.0, 0.0)
            return start + (le - start) * (rank - below) / (buckets[le] - below)
    raise AssertionError("no +Inf bucket")


@pytest.fixture(scope="module")
def rollout(tmp_path_factory):
    """Prometheus, two gateways (50 % canary, every stable request shadowed) and REQUESTS requests."""
    config = tmp_path_factory.mktemp("rollout")
    (config / "models.config").write_text(MODELS_CONFIG_TEXT)
    (config / "traffic.json").write_text(json.dumps({MODEL: {"canary_percent": 50, "shadow_percent": 100}}))
    spec = dict(models=json.dumps([MODEL]), models_config_file=config / "models.config",
                traffic_file=config / "traffic.json")
    with prometheus.prometheus_server() as prom, gateway_processes(spec, spec) as gateways:  # (skips without it)
        prom.set_targets([gw.rest.removeprefix("http://") for gw in gateways])
        prom.wait_for_scrape()
        started = time.time()
        clients = [httpx.Client(base_url=gw.rest, timeout=30) for gw in gateways]
        for i in range(REQUESTS):
            r = clients[i % 2].post("/v1/sentiment:predict", json={"texts": [TEXTS[i % len(TEXTS)]]},
                                    headers={"x-routing-key": f"user-{i}"})
            assert r.status_code == 200, r.text
        for i in range(6):  # client errors: counted as requests, not as errors
            r = clients[i % 2].post("/v1/sentiment:predict", json={"texts": [""]}, headers={"x-routing-key": "bad"})
            assert r.status_code == 400
        for c in clients:
            c.close()

        def settled():  # shadow scoring runs after the answers: wait until it has caught up
            done = [summed([metric_samples(gw)], "classifier_shadow_requests_total", model=MODEL) for gw in gateways]
            time.sleep(0.5)
            return done == [summed([metric_samples(gw)], "classifier_shadow_requests_total", model=MODEL)
                            for gw in gateways]

        wait_until(settled, timeout=30)
        prom.wait_for_scrape()
        yield prom, gateways, started, [metric_samples(gw) for gw in gateways]


@needs_prometheus
def test_analysis_of_live_gateways_equals_their_metrics(rollout):
    prom, _, _, samples = rollout
    stable, canary = STABLE, CANARY  # the test's models.config labels them so
    code, out = run_json(prom.url, "--window", "2m", "--min-requests", "50", "--min-shadow-items", "50",
                         "--max-p99-ratio", "100", "--min-agreement", "0.5", "--max-label-share-delta", "0.5")
    assert (code, out["verdict"]) == (0, PROMOTE), out["reasons"]
    assert (out["stable"]["version"], out["canary"]["version"]) == (stable, canary)  # from the label gauge

    for side, version in (("stable", stable), ("canary", canary)):
        outcomes = summed(samples, "classifier_requests_total", model=MODEL, version=version)
        by_outcome: dict[str, float] = {}
        for key, n in outcomes.items():
            by_outcome[dict(key)["outcome"]] = by_outcome.get(dict(key)["outcome"], 0.0) + n
        assert out[side]["outcomes"] == by_outcome
        assert out[side]["requests"] == sum(by_outcome.values()) > 50
        assert out[side]["errors"] == 0 and out[side]["error_ratio"] == 0
        buckets: dict[float, float] = {}
        for key, n in summed(samples, "classifier_request_duration_seconds_bucket", model=MODEL, version=version,
                             outcome="ok").items():
            le = float(dict(key)["le"])
            buckets[le] = buckets.get(le, 0.0) + n
        assert out[side]["p99_s"] == pytest.approx(histogram_quantile(0.99, buckets), rel=1e-9)
        predictions = summed(samples, "classifier_predictions_total", model=MODEL, version=version)
        assert out[side]["predictions"] == {dict(k)["label"]: n for k, n in predictions.items()}
    assert out["stable"]["requests"] + out["canary"]["requests"] >= REQUESTS  # (+ client errors with a version)

    shadow = out["shadow"]
    items = summed(samples, "classifier_shadow_items_total", model=MODEL)
    assert (shadow["agree"], shadow["disagree"]) == (items.get((("agreement", "agree"),), 0.0),
                                                      items.get((("agreement", "disagree"),), 0.0))
    assert shadow["items"] >= 50 and shadow["disagree"] > 0  # the versions disagree on some texts
    (abs_diff,) = summed(samples, "classifier_shadow_probability_abs_diff_total", model=MODEL).values()
    assert shadow["mean_abs_diff"] == pytest.approx(abs_diff / shadow["items"], rel=1e-9)
    assert shadow["requests"] == {dict(k)["outcome"]: n for k, n in
                                  summed(samples, "classifier_shadow_requests_total", model=MODEL).items()}
    for version in (stable, canary):
        counted = summed(samples, "classifier_shadow_labels_total", model=MODEL, version=version)
        assert shadow["labels"][version] == {dict(k)["label"]: n for k, n in counted.items()}
        assert sum(counted.values()) == shadow["items"]
    assert (out["canary_percent"], out["shadow_percent"]) == (50, 100)

    # The table: the same numbers, every threshold, the verdict.
    r = run_analyze(prom.url, "--window", "2m", "--min-requests", "50", "--min-shadow-items", "50",
                    "--max-p99-ratio", "100", "--min-agreement", "0.5", "--max-label-share-delta", "0.5")
    print(r.stdout)
    assert r.returncode == 0, r.stderr
    requests_row = next(line for line in r.stdout.splitlines() if line.strip().startswith("requests "))
    assert requests_row.split()[1:] == [analyze.count(out[side]["requests"]) for side in ("stable", "canary")]
    assert f"{shadow['agree']:.0f} agree, {shadow['disagree']:.0f} disagree" in r.stdout
    for text in ("max error ratio delta +1.00 pp", "max p99 ratio 100.00", "min agreement 50.00%",
                 "max label share delta 50.00 pp", "min requests per version 50", "min shadow items 50",
                 "RESOURCE_EXHAUSTED", "verdict: PROMOTE (exit 0)"):
        assert text in r.stdout


@needs_prometheus
def test_hold_when_the_live_versions_differ_more_than_allowed(rollout):
    prom, _, _, _ = rollout
    code, out = run_json(prom.url, "--window", "2m", "--min-requests", "50", "--min-shadow-items", "50",
                         "--max-p99-ratio", "100", "--min-agreement", "1.0", "--max-label-share-delta", "0.5")
    assert (code, out["verdict"]) == (1, HOLD)
    shadow, stable, canary = out["shadow"], out["stable"]["version"], out["canary"]["version"]
    assert out["reasons"] == [(f"shadow agreement: {analyze.pct(shadow['agreement'])} of "
                               f"{analyze.count(shadow['items'])} items (stable v{stable} vs canary v{canary}) "
                               "< min 100.00%")]
    r = run_analyze(prom.url, "--window", "2m", "--min-requests", "50", "--min-shadow-items", "50",
                    "--max-p99-ratio", "100", "--min-agreement", "1.0")
    assert r.returncode == 1 and "verdict: HOLD (exit 1)" in r.stdout and out["reasons"][0] in r.stdout


@needs_prometheus
def test_insufficient_data_outside_the_traffic_or_below_the_minimum(rollout):
    prom, _, started, _ = rollout
    code, out = run_json(prom.url, "--window", "2m", "--min-requests", "1000000")
    assert (code, out["verdict"]) == (2, INSUFFICIENT)
    assert out["reasons"][0].startswith("requests of stable v") and out["reasons"][0].endswith("< min 1000000")
    # a window that ends when the first request was sent (the gateways had been scraped by then)
    code, out = run_json(prom.url, "--window", "5s", "--end", f"{started:.3f}")
    assert (code, out["verdict"], out["stable"]["requests"], out["canary"]["requests"]) == (2, INSUFFICIENT, 0, 0)
    assert out["reasons"] == [f"requests of stable v{out['stable']['version']}: 0 < min 100",
                              f"requests of canary v{out['canary']['version']}: 0 < min 100",
                              "shadow items: 0 < min 100"]


@needs_prometheus
def test_same_version_or_unknown_model_cannot_be_analysed(rollout):
    prom, _, _, _ = rollout
    r = run_analyze(prom.url, "--stable", "4", "--canary", "4")
    assert r.returncode == 3 and "same version" in r.stderr
    r = subprocess.run([sys.executable, "-m", "serving.analyze", "no_such_model", "--prometheus", prom.url],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "give --stable" in r.stderr


# -- against a real Prometheus scraping exporters the test drives ---------------------------------

class Exporter:
    """The gateway's rollout series for one model, in a registry of its own, served on loopback."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        from serving.metrics import LATENCY_BUCKETS

        r = CollectorRegistry()
        labels = ["protocol", "endpoint", "model", "version", "outcome"]
        self.requests = Counter("classifier_requests", "", labels, registry=r)
        self.seconds = Histogram("classifier_request_duration_seconds", "", labels, buckets=LATENCY_BUCKETS, registry=r)
        self.version_label = Gauge("classifier_model_version_label", "", ["model", "label", "version"], registry=r)
        self.items = Counter("classifier_shadow_items", "", ["model", "agreement"], registry=r)
        self.abs_diff = Counter("classifier_shadow_probability_abs_diff", "", ["model"], registry=r)
        self.labels = Counter("classifier_shadow_labels", "", ["model", "version", "label"], registry=r)
        self.port = free_port()
        self.server, _ = start_http_server(self.port, addr="127.0.0.1", registry=r)

    def serve(self, version: str, outcome: str, n: int, seconds: float = 0.003):
        for _ in range(n):
            self.requests.labels("rest", "/v1/sentiment:predict", "fake", version, outcome).inc()
            self.seconds.labels("rest", "/v1/sentiment:predict", "fake", version, outcome).observe(seconds)


@needs_prometheus
def test_window_counts_are_exact_over_several_targets_and_hold_names_every_broken_threshold():
    a, b = Exporter(), Exporter()
    try:
        with prometheus.prometheus_server([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]) as prom:
            for e in (a, b):
                e.version_label.labels("fake", "stable", "1").set(1)
                e.version_label.labels("fake", "canary", "4").set(1)
            a.serve("1", "ok", 40)  # before the window: left out
            a.items.labels("fake", "agree").inc(1000)
            prom.wait_for_scrape(timeout=30)
            window_start = time.time()
            time.sleep(0.05)
            a.serve("1", "ok", 60)
            b.serve("1", "ok", 40)
            a.serve("1", "INTERNAL", 1)
            b.serve("4", "ok", 90, seconds=0.02)  # series born within the window: counted from 0
            b.serve("4", "UNAVAILABLE", 10, seconds=0.02)
            b.serve("4", "RESOURCE_EXHAUSTED", 50)  # overload refusals and client errors: not errors
            b.serve("4", "INVALID_ARGUMENT", 5)
            a.items.labels("fake", "agree").inc(50)
            b.items.labels("fake", "agree").inc(30)
            b.items.labels("fake", "disagree").inc(20)
            a.abs_diff.labels("fake").inc(5)
            b.abs_diff.labels("fake").inc(7.5)
            for e, (v1_pos, v4_pos) in ((a, (30, 25)), (b, (30, 25))):
                e.labels.labels("fake", "1", "positive").inc(v1_pos)
                e.labels.labels("fake", "1", "negative").inc(50 - v1_pos)
                e.labels.labels("fake", "4", "positive").inc(v4_pos)
                e.labels.labels("fake", "4", "negative").inc(50 - v4_pos)
            prom.wait_for_scrape(timeout=30)
            end = time.time()
            window = f"{int((end - window_start) * 1000)}ms"
            code, out = run_json(prom.url, "--window", window, "--end", f"{end:.3f}", model="fake")
    finally:
        for e in (a, b):
            e.server.shutdown()
            e.server.server_close()
    assert (code, out["verdict"]) == (1, HOLD)
    assert out["stable"]["outcomes"] == {"ok": 100, "INTERNAL": 1}
    assert out["canary"]["outcomes"] == {"ok": 90, "UNAVAILABLE": 10, "RESOURCE_EXHAUSTED": 50, "INVALID_ARGUMENT": 5}
    assert (out["stable"]["errors"], out["canary"]["errors"]) == (1, 10)
    # every ok request of v1 took 3 ms (bucket 2.5-5 ms), of v4 20 ms (bucket 10-25 ms)
    assert out["stable"]["p99_s"] == pytest.approx(0.0025 + 0.0025 * 0.99)
    assert out["canary"]["p99_s"] == pytest.approx(0.01 + 0.015 * 0.99)
    shadow = out["shadow"]
    assert (shadow["agree"], shadow["disagree"], shadow["mean_abs_diff"]) == (80, 20, 0.125)
    assert shadow["label_share"] == {"1": {"positive": 0.6, "negative": 0.4}, "4": {"positive": 0.5, "negative": 0.5}}
    assert out["reasons"] == [
        "error ratio: canary v4 6.45% vs stable v1 0.99%: +5.46 pp > max +1.00 pp",
        "p99 latency: canary v4 24.85 ms vs stable v1 4.98 ms: ratio 4.99 > max 1.50",
        "shadow agreement: 80.00% of 100 items (stable v1 vs canary v4) < min 90.00%",
        "label share of 'negative' on the shadow sample: canary v4 50.00% vs stable v1 40.00%: "
        "|Δ| 10.00 pp > max 5.00 pp",
        "label share of 'positive' on the shadow sample: canary v4 50.00% vs stable v1 60.00%: "
        "|Δ| 10.00 pp > max 5.00 pp",
    ]
