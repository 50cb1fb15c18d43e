"""The Grafana dashboard (deploy/grafana/): well-formed, valid PromQL, real metric names,
provisioned by docker-compose and shipped as the k8s component ``grafana-dashboard``.

Every metric a gateway panel queries must be in a live ``/metrics`` scrape of a started
gateway that has answered a sentiment and a digits request (so its histograms and label
sets exist); every TF Serving metric must be in deploy/grafana/tfserving_metrics.txt,
the names TF Serving's Prometheus exporter writes, collected from its sources (no TF
Serving runs here). Label names used in matchers, ``by (...)`` and legends are checked
against the same sources. ``promtool`` (where installed) parses every expression.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import PurePosixPath

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.test_alerts import HISTOGRAM_SUFFIXES, metric_names
from tests.deploy.test_deploy import assert_pinned, container_ports, environment, host_path, load, mounts
from testkit.gateway import ROOT, gateway_process

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "classifier.json"
PROVISIONING = GRAFANA / "provisioning"
TFSERVING_METRICS = GRAFANA / "tfserving_metrics.txt"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
COMPONENT = ROOT / "k8s" / "components" / "grafana-dashboard"
UID = "classifier-gateway"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's interval variables, replaced by a duration before PromQL is parsed.
MACROS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
# Labels every scraped series gets from Prometheus; "le" of the _bucket series.
TARGET_LABELS = {"job", "instance"}
# Synthesised by Prometheus for every scrape target, exported by no one.
PROMETHEUS_METRICS = {"up"}
# Gateway series the live scrape cannot hold samples of: rows are dropped only when a
# deadline passes or a client leaves while queued.
NO_SAMPLES_EXPECTED = {"classifier_dropped_rows_total"}


# -- the dashboard -------------------------------------------------------------------
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(d: dict) -> list[dict]:
    """Every panel, rows' nested panels included."""
    out = []
    for p in d["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def queries(d: dict | None = None) -> list[tuple[str, str]]:
    """(panel title/refId, PromQL expression) of every query, Grafana macros replaced."""
    out = []
    for p in all_panels(d or dashboard()):
        for t in p.get("targets", []):
            out.append((f"{p['title']}/{t.get('refId')}", promql(t.get("expr", ""))))
    return out


def promql(expr: str) -> str:
    for macro, value in MACROS.items():
        expr = expr.replace(macro, value)
    return expr


def jobs(expr: str) -> set[str]:
    return set(re.findall(r'\bjob\s*=\s*"([^"]*)"', expr))


def selector_labels(expr: str) -> dict[str, set[str]]:
    """Metric name -> label names its selectors match on."""
    out: dict[str, set[str]] = {}
    for name, inner in re.findall(r"(?<![\w.])([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", expr):
        out.setdefault(name, set()).update(re.findall(r'([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*"', inner))
    return out


def grouping_labels(expr: str) -> set[str]:
    """Label names of by/without/on/ignoring clauses."""
    groups = re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr)
    return {label.strip() for g in groups for label in g.split(",") if label.strip()}


def legend_labels(legend: str) -> set[str]:
    return set(re.findall(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}", legend or ""))


def test_dashboard_is_well_formed():
    d = dashboard()
    assert d["uid"] == UID and d["title"] and isinstance(d["schemaVersion"], int)
    assert d.get("id") is None, "a provisioned dashboard carries no database id"
    panels = all_panels(d)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, f"{p['title']}: {g}"
        here = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & here, f"{p['title']} overlaps another panel"
        cells |= here
        if p["type"] == "row":
            assert not p.get("targets")
            continue
        assert p["datasource"] == DATASOURCE, f"{p['title']}: datasource {p.get('datasource')}"
        assert p.get("description"), f"{p['title']}: no description"
        targets = p.get("targets") or []
        assert targets, f"{p['title']}: no query"
        refs = [t.get("refId") for t in targets]
        assert all(refs) and len(refs) == len(set(refs)), f"{p['title']}: refIds {refs}"
        for t in targets:
            assert t.get("datasource") == DATASOURCE, f"{p['title']}/{t['refId']}: datasource"
            assert isinstance(t.get("expr"), str) and t["expr"].strip(), f"{p['title']}/{t['refId']}: no expr"


def test_dashboard_covers_the_gateway_and_tfserving():
    used = set().union(*(metric_names(e) for _, e in queries()))
    for needed in ("classifier_requests_total", "classifier_request_duration_seconds_bucket",
                   "classifier_batch_rows_bucket", "classifier_batch_busy_seconds_total", "classifier_batch_slots",
                   "classifier_queue_work_ahead_seconds", "classifier_refusals_total", "classifier_unknown_token_ratio_sum",
                   "classifier_ready", "classifier_draining", "classifier_model_version_info",
                   ":tensorflow:serving:request_count", ":tensorflow:serving:request_latency_bucket",
                   ":tensorflow:core:graph_run_time_usecs_histogram_bucket",
                   ":tensorflow:serving:batching_session:processed_batch_size_bucket"):
        assert needed in used, f"no panel queries {needed}"
    titles = " ".join(p["title"].lower() for p in all_panels(dashboard()))
    for word in ("outcome", "latency", "batch size", "saturation", "refusals", "vocabulary", "readiness", "versions", "tf serving"):
        assert word in titles, f"no panel about {word!r}"


def test_every_query_selects_a_job_that_prometheus_scrapes():
    prom = yaml.safe_load(PROMETHEUS.read_text())
    scraped = {j["job_name"]: [t.split(":")[0] for sc in j.get("static_configs", []) for t in sc["targets"]]
               for j in prom["scrape_configs"]}
    assert scraped.get("gateway") == ["gateway"] and scraped.get("tfserving") == ["tfserving"], scraped
    for where, expr in queries():
        found = jobs(expr)
        assert len(found) == 1, f"{where}: selects jobs {sorted(found)}, not exactly one: {expr}"
        assert found <= set(scraped), f"{where}: job {found} is not scraped by deploy/prometheus.yml"
        for name, labels in selector_labels(expr).items():
            assert "job" in labels, f"{where}: {name} without a job matcher"


def test_metric_name_extraction():
    assert metric_names(promql(
        'histogram_quantile(0.99, sum by (le, model_name) (rate(:tensorflow:serving:request_latency_bucket'
        '{job="tfserving"}[$__rate_interval]))) / 1e6')) == {":tensorflow:serving:request_latency_bucket"}
    assert metric_names('sum by (model) (classifier_queue_rows{job="gateway"}) / max(classifier_queue_limit_rows)') \
        == {"classifier_queue_rows", "classifier_queue_limit_rows"}
    assert selector_labels('a{job="x", model!~"b|c"} + b{le="1"}') == {"a": {"job", "model"}, "b": {"le"}}
    assert grouping_labels("sum by (le, model) (x) / on (job) group_left (version) y") == {"le", "model", "job", "version"}


# -- PromQL syntax -------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not on PATH (Debian: apt-get install prometheus; or the prometheus release tarball)")
def test_every_expression_is_valid_promql(tmp_path):
    """Each query as a recording rule: ``promtool check rules`` parses every expression."""
    rules = [{"record": f"grafana:query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries())]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    where = "\n".join(f"grafana:query_{i} = {w}" for i, (w, _) in enumerate(queries()))
    assert r.returncode == 0, f"{r.stdout}{r.stderr}\n{where}"
    assert f"SUCCESS: {len(rules)} rules found" in r.stdout, r.stdout


# -- metric names: the gateway (live) and TF Serving (from its sources) --------------
def tfserving_metrics() -> dict[str, set[str]]:
    """Every series name TF Serving's exporter can write -> its label names (histogram suffixes expanded)."""
    out: dict[str, set[str]] = {}
    for line in TFSERVING_METRICS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        entry, _, comment = line.partition("#")
        name, kind = entry.split()
        assert kind in {"counter", "gauge", "histogram"}, line
        assert re.fullmatch(r":tensorflow:[a-z_:]+", name), line
        assert re.search(r"\b(tensorflow_serving|tensorflow)/[\w/]+\.(cc|h)\b", comment), f"no source path: {line}"
        slashed = "/" + name[1:].replace(":", "/")
        assert slashed in comment or kind == "histogram" and "batching_util.h" in comment, \
            f"{line}: the comment should name the monitoring metric {slashed}"
        braces = re.search(r"\{([^}]*)\}", comment)
        labels = {x.strip() for x in braces.group(1).split(",")} if braces else set()
        if kind == "histogram":
            out[name + "_bucket"] = labels | {"le"}
            out[name + "_sum"] = out[name + "_count"] = labels
        else:
            out[name] = labels
    return out


def test_tfserving_metric_list_is_well_formed():
    names = tfserving_metrics()
    assert ":tensorflow:serving:request_count" in names and names[":tensorflow:serving:request_count"] == {
        "model_name", "status"}
    assert ":tensorflow:serving:request_latency_bucket" in names


@pytest.fixture(scope="module")
def gateway_series() -> dict[str, set[str] | None]:
    """Series names of a live gateway's /metrics after one sentiment and one digits request
    -> the label names seen on them (None: a name the metric families declare without samples)."""
    with gateway_process() as gw:
        r = httpx.post(gw.rest + "/v1/sentiment:predict", json={"texts": ["A wonderful film, I loved it."]}, timeout=60)
        assert r.status_code == 200, r.text
        r = httpx.post(gw.rest + "/v1/digits:predict", json={"images": [[[0] * 28] * 28]}, timeout=60)
        assert r.status_code == 200, r.text
        scrape = httpx.get(gw.rest + "/metrics", timeout=10)
    scrape.raise_for_status()
    out: dict[str, set[str] | None] = {}
    for family in text_string_to_metric_families(scrape.text):
        declared = {family.name}
        if family.type == "counter":
            declared.add(family.name + "_total")
        elif family.type == "histogram":
            declared |= {family.name + s for s in HISTOGRAM_SUFFIXES}
        for name in declared:
            out.setdefault(name, None)
        for s in family.samples:
            out[s.name] = (out.get(s.name) or set()) | set(s.labels)
    return out


def check_query(where: str, expr: str, legends: list[str], gateway: dict, tfserving: dict) -> list[str]:
    """Problems of one query: unknown metrics, unknown label names (matchers, grouping, legends)."""
    found = jobs(expr)
    job = next(iter(found)) if len(found) == 1 else "?"
    known = {"gateway": gateway, "tfserving": tfserving}.get(job, {})
    problems = []
    labels_of_expr = set(TARGET_LABELS)
    unseen = False
    for name in sorted(metric_names(expr)):
        if name in PROMETHEUS_METRICS:
            continue
        if name not in known:
            problems.append(f"{where}: {name} is not a metric the {job} job exports")
            continue
        labels = known[name]
        if labels is None:
            if name not in NO_SAMPLES_EXPECTED:
                problems.append(f"{where}: {name} has no samples after a sentiment and a digits request")
            unseen = True  # its label names are unknown: grouping and legends go unchecked
            continue
        labels_of_expr |= labels
        unknown = selector_labels(expr).get(name, set()) - labels - TARGET_LABELS
        if unknown:
            problems.append(f"{where}: {name} has no label {sorted(unknown)}")
    if not problems and not unseen:
        grouping = grouping_labels(expr)
        for label in sorted(grouping - labels_of_expr):
            problems.append(f"{where}: groups by {label!r}, which none of its metrics has")
        kept = grouping if grouping else labels_of_expr
        for legend in legends:
            for label in sorted(legend_labels(legend) - kept - TARGET_LABELS):
                problems.append(f"{where}: legend {legend!r} uses {label!r}, which the query does not keep")
    return problems


def dashboard_problems(d: dict, gateway: dict, tfserving: dict) -> list[str]:
    problems = []
    for p in all_panels(d):
        for t in p.get("targets", []):
            where = f"{p['title']}/{t['refId']}"
            problems += check_query(where, promql(t["expr"]), [t.get("legendFormat", "")], gateway, tfserving)
    return problems


def test_every_queried_metric_and_label_is_really_exported(gateway_series):
    problems = dashboard_problems(dashboard(), gateway_series, tfserving_metrics())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("wrong,right", [
    ("classifier_batch_slot{", "classifier_batch_slots{"),  # a misspelled gateway metric
    (":tensorflow:serving:request_counts{", ":tensorflow:serving:request_count{"),  # a misspelled TF Serving metric
    ("sum by (modle)", "sum by (model)"),  # a misspelled label
    ("{{outcme}}", "{{outcome}}"),  # a misspelled legend label
])
def test_a_misspelled_name_fails_the_check(wrong, right, gateway_series):
    text = DASHBOARD.read_text()
    assert right in text
    problems = dashboard_problems(json.loads(text.replace(right, wrong, 1)), gateway_series, tfserving_metrics())
    assert problems and all(wrong.strip("{}").split()[-1].strip("()") in p for p in problems), problems


# -- docker-compose provisioning -----------------------------------------------------
@pytest.fixture(scope="module")
def grafana() -> dict:
    return load("docker-compose.yml")["services"]["grafana"]


def test_compose_runs_a_pinned_grafana_that_waits_for_prometheus(grafana):
    assert grafana["image"].startswith("grafana/grafana:")
    assert_pinned(grafana["image"], "docker-compose.yml grafana")
    assert int(grafana["image"].rpartition(":")[2].split(".")[0]) == 12, "Grafana 13 stores dashboards in a new schema"
    depends = grafana["depends_on"]
    assert "prometheus" in (depends if isinstance(depends, list) else list(depends))
    assert container_ports(grafana) == {3000}
    assert grafana["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    assert "/api/health" in " ".join(grafana["healthcheck"]["test"])
    env = environment(grafana)
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer", "anonymous users may only view"
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD")
    assert host_path(grafana, env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]) == DASHBOARD


def test_compose_mounts_the_provisioning_and_dashboard_folders_read_only(grafana):
    assert host_path(grafana, "/etc/grafana/provisioning") == PROVISIONING
    for source, target, read_only in mounts(grafana):
        assert read_only, f"grafana: {source}:{target} should be :ro"
    sources = {(ROOT / s).resolve() for s, _, _ in mounts(grafana)}
    assert {PROVISIONING, DASHBOARD.parent} <= sources


def test_datasource_points_at_the_compose_prometheus():
    (path,) = sorted((PROVISIONING / "datasources").glob("*.yml"))
    (ds,) = yaml.safe_load(path.read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["access"] == "proxy" and ds["isDefault"] is True
    url = httpx.URL(ds["url"])
    services = load("docker-compose.yml")["services"]
    assert url.host == "prometheus" and url.host in services
    assert url.port in container_ports(services["prometheus"])
    scrape_interval = yaml.safe_load(PROMETHEUS.read_text())["global"]["scrape_interval"]
    assert ds["jsonData"]["timeInterval"] == scrape_interval


def test_dashboard_provider_reads_the_mounted_dashboards(grafana):
    (path,) = sorted((PROVISIONING / "dashboards").glob("*.yml"))
    (provider,) = yaml.safe_load(path.read_text())["providers"]
    assert provider["type"] == "file"
    folder = PurePosixPath(provider["options"]["path"])
    assert host_path(grafana, str(folder)) == DASHBOARD.parent
    assert host_path(grafana, str(folder / DASHBOARD.name)) == DASHBOARD
    assert sorted(p.name for p in DASHBOARD.parent.glob("*.json")) == [DASHBOARD.name]


# -- the k8s component ---------------------------------------------------------------
def test_k8s_component_holds_exactly_the_committed_dashboard():
    from tests.deploy.test_k8s import NAMESPACE, kustomize

    comp = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    assert comp["kind"] == "Component"
    docs = kustomize(COMPONENT)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert len(docs) == 1, [d["kind"] for d in docs]
    assert cm["metadata"]["name"] == "classifier-grafana-dashboard"  # no hash suffix: updated in place
    assert cm["metadata"]["namespace"] == NAMESPACE
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"] == {DASHBOARD.name: DASHBOARD.read_text()}
    assert json.loads(cm["data"][DASHBOARD.name])["uid"] == UID
