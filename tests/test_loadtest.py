"""The Locust load test, run for real: headless, a few seconds, against a real gateway.

Locust monkey-patches the standard library with gevent, so it only ever runs in a
subprocess here, never imported into the pytest process.
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys

import pytest

from tests.gateway import ROOT, gateway_process

LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"


@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust is not installed (the dev extra)")
def test_locustfile_runs_headless_against_the_gateway_without_failures(tmp_path):
    prefix = tmp_path / "locust"
    with gateway_process() as gw:
        cmd = [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "-u", "4", "-r", "4", "-t", "5s", "--stop-timeout", "5",
            "--host", gw.rest, "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING",
        ]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=90)
    output = f"exit {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}"

    stats_file = prefix.parent / (prefix.name + "_stats.csv")
    assert stats_file.exists(), f"no {stats_file.name}; {output}"
    with open(stats_file, newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows.pop("Aggregated")
    requests, failures = int(total["Request Count"]), int(total["Failure Count"])
    failures_file = prefix.parent / (prefix.name + "_failures.csv")
    assert failures == 0, f"{failures} of {requests} requests failed:\n{failures_file.read_text()}\n{output}"
    assert requests > 0, output
    # Every kind of request ran (weights 10:2:3 over ~5 s with 4 users).
    assert any(name.startswith("sentiment x1 ") for name in rows), rows.keys()
    assert "digits x1" in rows, rows.keys()
    assert r.returncode == 0, output
