"""Prometheus alerting rules (deploy/alerts.yml) and their promtool unit tests.

Checks the rule file's structure, that every metric an expression reads is one a
running gateway really exports (or ``up``), that Prometheus loads the file, and,
where ``promtool`` is installed, ``promtool check rules`` / ``promtool test rules``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import PurePosixPath

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from testkit.gateway import ROOT, gateway_process
from tests.deploy.test_deploy import host_path, load

ALERTS = ROOT / "deploy" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "alerts_test.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
SEVERITIES = {"critical", "warning", "info"}
# Identifiers in PromQL that are not metric names (functions are recognised by the "(" after them).
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads: identifiers that are neither functions,
    keywords, label names (matchers, by/on lists) nor inside strings or durations."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range / subquery durations
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    names = re.findall(r"(?<![\w.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", expr)
    return {n for n in names if n.lower() not in KEYWORDS}


def test_metric_names_parser():
    expr = ('histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{outcome="ok", x=~"b|c"}[5m]))) > 1e3 '
            'and on (job) b_total offset 5m unless c > bool 0 / sum(rate(d[1m])) without (le)')
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d"}


# -- structure ---------------------------------------------------------------------
def test_rule_file_structure():
    doc = yaml.safe_load(ALERTS.read_text())
    assert [g["name"] for g in doc["groups"]] == ["classifier-gateway"]
    names = [r.get("alert") for r in rules()]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    for rule in rules():
        where = rule.get("alert", rule)
        assert set(rule) >= {"alert", "expr", "for", "labels", "annotations"}, where
        assert rule["labels"].get("severity") in SEVERITIES, where
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), where
        assert metric_names(rule["expr"]), f"{where}: no metric found in {rule['expr']!r}"
    assert {"GatewayDown", "HighErrorRatio", "HighOverloadRatio", "HighLatencyP99", "ModelSaturated", "LoadShedding",
            "GatewayNotReady", "ModelVersionFailed"} <= set(names)


def test_gateway_down_watches_the_scrape_job_of_the_gateway():
    prom = yaml.safe_load(PROMETHEUS.read_text())
    jobs = [j["job_name"] for j in prom["scrape_configs"]
            if any(t.startswith("gateway:") for sc in j.get("static_configs", []) for t in sc["targets"])]
    (down,) = [r for r in rules() if r["alert"] == "GatewayDown"]
    assert jobs and re.fullmatch(rf'up\{{job="{jobs[0]}"\}} == 0', down["expr"].strip()), down["expr"]


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    cases = [c for t in yaml.safe_load(ALERTS_TEST.read_text())["tests"] for c in t["alert_rule_test"]]
    for name in (r["alert"] for r in rules()):
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name}: no test where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{name}: no test where it stays quiet"


def test_prometheus_loads_the_mounted_rule_file():
    prom = yaml.safe_load(PROMETHEUS.read_text())
    assert prom.get("rule_files"), "deploy/prometheus.yml has no rule_files"
    svc = load("docker-compose.yml")["services"]["prometheus"]
    config = PurePosixPath("/etc/prometheus/prometheus.yml")
    assert host_path(svc, str(config)) == PROMETHEUS
    for rule_file in prom["rule_files"]:
        in_container = config.parent / rule_file  # relative paths are relative to the config file
        assert host_path(svc, str(in_container)) == ALERTS, f"{rule_file}: not mounted from deploy/alerts.yml"
        assert (PROMETHEUS.parent / rule_file).resolve() == ALERTS  # the same path works for local promtool


# -- metric names against a live gateway ---------------------------------------------
@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Every series name the gateway's /metrics can contain, samples or not (a gateway of its own)."""
    with gateway_process() as gw:
        r = httpx.get(gw.rest + "/metrics", timeout=10)
    r.raise_for_status()
    names = set()
    for family in text_string_to_metric_families(r.text):
        names |= {family.name} | {s.name for s in family.samples}
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in HISTOGRAM_SUFFIXES}
    return names


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["alert"])
def test_alert_reads_only_metrics_the_gateway_exports(rule, exported):
    unknown = metric_names(rule["expr"]) - exported - {"up"}
    assert not unknown, f"{rule['alert']} reads {sorted(unknown)}, which the gateway does not export"


# -- promtool ------------------------------------------------------------------------
promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not on PATH (Debian: apt-get install prometheus; or the prometheus release tarball)",
)


@promtool
@pytest.mark.parametrize("args", [["check", "rules", ALERTS], ["test", "rules", ALERTS_TEST]],
                         ids=["check", "test"])
def test_promtool(args):
    r = subprocess.run(["promtool", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
