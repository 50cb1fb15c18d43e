"""The Locust load test (loadtests/), run for real: headless, a few seconds, against a real gateway.

Locust monkey-patches the standard library with gevent, so it only ever runs in a
subprocess here, never imported into the pytest process. No timing is asserted: the
smoke run must have no failures and run every request type; an SLO file with an
impossible ceiling must make the run exit non-zero.
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys

import pytest

from testkit.gateway import ROOT, gateway_process

LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
REQUEST_TYPES = {  # (Type, Name) rows in <prefix>_stats.csv
    ("POST", "sentiment x1"), ("POST", "sentiment x32"), ("POST", "digits x1"),
    ("grpc", "ClassifySentiment x1"), ("grpc", "ClassifyDigits x1"), ("grpc", "StreamClassifySentiment 4x8"),
}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("locust") is None,
                                reason="locust is not installed (the dev extra)")


@pytest.fixture(scope="module")
def gateway():
    with gateway_process(drain_settle_s=0) as gw:
        yield gw


def run_locust(gw, prefix, *extra, seconds=7):
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        # 12 users at weights 3:1 -> 9 REST and 3 gRPC users: every task runs within seconds.
        "-u", "12", "-r", "12", "-t", f"{seconds}s", "--stop-timeout", "10",
        "--host", gw.rest, "--grpc-host", gw.grpc,
        "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary", "--loglevel", "WARNING", *extra,
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    return r, f"exit {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}"


def read_stats(prefix):
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


def test_smoke_profile_runs_every_request_type_without_failures(gateway, tmp_path, data_dir):
    prefix = tmp_path / "smoke"
    r, output = run_locust(gateway, prefix, "--data-dir", str(data_dir))

    for suffix in ("_stats.csv", "_stats_history.csv", "_failures.csv", ".html"):
        assert (tmp_path / f"smoke{suffix}").stat().st_size > 0, f"no smoke{suffix}; {output}"
    rows = read_stats(prefix)
    total = rows.pop(("", "Aggregated"))
    failures, requests = int(total["Failure Count"]), int(total["Request Count"])
    failed = (tmp_path / "smoke_failures.csv").read_text()
    assert failures == 0, f"{failures} of {requests} requests failed:\n{failed}\n{output}"
    ran = {key for key, row in rows.items() if int(row["Request Count"]) > 0}
    assert REQUEST_TYPES <= ran, f"missing request types {REQUEST_TYPES - ran}; {output}"
    assert "all met" in r.stdout, output
    assert r.returncode == 0, output


def test_a_broken_slo_makes_the_run_exit_non_zero(gateway, tmp_path, data_dir):
    slo_file = tmp_path / "slo.toml"
    slo_file.write_text('error_ratio = 0.0\n\n[latency_ms.Aggregated]\np99 = 0.001\n')
    prefix = tmp_path / "impossible"
    r, output = run_locust(gateway, prefix, "--data-dir", str(data_dir), "--slo-file", str(slo_file), seconds=3)

    total = read_stats(prefix)[("", "Aggregated")]
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0, output  # only the SLO fails
    assert r.returncode != 0, output
    assert "Aggregated: p99" in r.stdout and "> 0.001 ms" in r.stdout, output


def test_missing_data_is_a_clear_error_naming_the_variable(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "1", "-t", "1s",
         "--host", "http://127.0.0.1:9", "--data-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode != 0
    assert "LOADTEST_DATA_DIR" in r.stderr and "imdb_test.jsonl.gz" in r.stderr, r.stderr[-2000:]


def test_slo_file_loads_with_shape_overrides_and_checks_plain_numbers():
    spec = importlib.util.spec_from_file_location("loadtest_slo", ROOT / "loadtests" / "slo.py")
    slo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(slo)  # standard library only: safe to import here (no Locust)

    default = slo.load(ROOT / "loadtests" / "slo.toml")
    spike = slo.load(ROOT / "loadtests" / "slo.toml", "spike")
    assert default["enforce"] and default["error_ratio"] == 0.0
    assert spike["error_ratio"] > 0 and spike["latency_ms"]["sentiment x1"] == default["latency_ms"]["sentiment x1"]
    assert slo.load(ROOT / "loadtests" / "slo.toml", "ramp")["enforce"] is False

    stats = {"sentiment x1": {"requests": 100, "failures": 2, "p95": 120.0, "p99": 900.0},
             "digits x1": {"requests": 0, "failures": 0}}
    broken = slo.check({"error_ratio": 0.01, "latency_ms": {"sentiment x1": {"p95": 200, "p99": 500},
                                                             "digits x1": {"p99": 1}}}, stats)
    assert broken == ["sentiment x1: error ratio 0.0200 (2/100) > 0.01", "sentiment x1: p99 900.0 ms > 500 ms"]
