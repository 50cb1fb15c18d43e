"""Autoscaling on the signal that leads shedding (k8s/components/autoscaling-*).

No cluster needed. The gateway HPA scales on the busy fraction of its batch slots (a Pods
metric from prometheus-adapter), TF Serving on the busy fraction of all gateways' slots
toward it (an External metric from prometheus-adapter, or KEDA's prometheus trigger on
the same query). Checked here: the adapter rules (its config format, the names they expose
against the names the HPAs ask for, every query parsed by ``promtool`` and evaluated on
made-up series by ``promtool test rules``), the metric names against serving/metrics.py,
the ScaledObject against KEDA's CRD schema (vendored in tests/deploy/schemas/), one
autoscaler per Deployment and no fixed replicas where one owns it, the scaling behaviour,
and that the components give the same objects listed in an overlay or on top of it.
The rendering and the Kubernetes schemas of every target: tests/deploy/test_k8s.py.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy import test_k8s
from tests.deploy.test_k8s import (
    ALTERNATIVES, K8S, LAYERED, NAMESPACE, ROOT, TARGETS, kubectl, kustomize, layered_kustomization, objects, one,
    quantity,
)

rendered = test_k8s.rendered  # the fixture: every target of test_k8s.py, rendered once for this module

SCHEMAS = Path(__file__).resolve().parent / "schemas"
KEDA_SCHEMA = SCHEMAS / "keda-scaledobject-v1alpha1.yaml"
METRICS_PY = ROOT / "serving" / "metrics.py"
ADAPTER_PREFIX = "prometheus-adapter-rules-"
GATEWAY_COMPONENT, TFSERVING_COMPONENT = "autoscaling-gateway", "autoscaling-tfserving"
KEDA_COMPONENT = "autoscaling-tfserving-keda"
BUSY_RATIO = "classifier_batch_busy_ratio"  # the gateway HPA's Pods metric
# What prometheus-adapter's config loader accepts (yaml.UnmarshalStrict into MetricsDiscoveryConfig,
# kubernetes-sigs/prometheus-adapter pkg/config/config.go).
ADAPTER_KEYS = {"rules", "externalRules", "resourceRules"}
RULE_KEYS = {"seriesQuery", "seriesFilters", "resources", "name", "metricsQuery"}
RESOURCES_KEYS = {"template", "overrides", "namespaced"}
PLACEHOLDER = re.compile(r"<<\s*\.(\w+)\s*>>")
# What the adapter puts in for a Pods query on two gateway pods, and for an External query (no
# selector on the HPA: the HPA's namespace only; GroupBy is empty for external metrics).
PODS = ("gateway-a", "gateway-b", "gateway-c")
POD_QUERY = {"LabelMatchers": f'namespace="{NAMESPACE}",pod=~"{"|".join(PODS)}"', "GroupBy": "pod"}
EXTERNAL_QUERY = {"LabelMatchers": f'namespace="{NAMESPACE}"', "GroupBy": ""}
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not on PATH (Debian: apt-get install prometheus; or the release tarball)")


# -- helpers ------------------------------------------------------------------------
def components_of(target: str) -> list[str]:
    return LAYERED.get(target, (None, []))[1]


def adapter_config(docs: list[dict]) -> dict[str, list[dict]]:
    """The prometheus-adapter rules the target ships, merged: {"rules": [...], "externalRules": [...]}."""
    out: dict[str, list[dict]] = {"rules": [], "externalRules": []}
    for name, cm in objects(docs, "ConfigMap").items():
        if name.startswith(ADAPTER_PREFIX):
            assert list(cm["data"]) == ["config.yaml"], f"ConfigMap/{name}: one key, config.yaml"
            config = yaml.safe_load(cm["data"]["config.yaml"])
            assert set(config) <= ADAPTER_KEYS, f"ConfigMap/{name}: unknown keys {set(config) - ADAPTER_KEYS}"
            for key in ("rules", "externalRules"):
                out[key] += config.get(key) or []
    return out


def series_name(rule: dict) -> str:
    m = re.fullmatch(r"([A-Za-z_:][\w:]*)\{.*\}", rule["seriesQuery"].strip())
    assert m, f"seriesQuery {rule['seriesQuery']!r}: write it as name{{matchers}}"
    return m.group(1)


def exposed_name(rule: dict) -> str:
    """The name under which the adapter serves a rule's series (name.matches / name.as, Go regexp expansion)."""
    pattern = re.compile(rule.get("name", {}).get("matches") or ".*")
    series = series_name(rule)
    m = pattern.search(series)
    assert m, f"name.matches {pattern.pattern!r} does not match the series {series}"
    template = rule["name"].get("as") or ("$1" if pattern.groups == 1 else "$0")
    return re.sub(r"\$\{?(\d+)\}?", lambda g: m.group(int(g.group(1))), template)


def substitute(query: str, series: str, values: dict[str, str]) -> str:
    out = PLACEHOLDER.sub(lambda m: {"Series": series, **values}[m.group(1)], query)
    assert "<<" not in out and ">>" not in out, out
    return out


def exposed(docs: list[dict]) -> dict[str, dict[str, str]]:
    """API kind ("rules" = custom metrics, "externalRules" = external) -> exposed name -> PromQL as queried."""
    config = adapter_config(docs)
    return {
        "rules": {exposed_name(r): substitute(r["metricsQuery"], series_name(r), POD_QUERY) for r in config["rules"]},
        "externalRules": {exposed_name(r): substitute(r["metricsQuery"], series_name(r), EXTERNAL_QUERY)
                          for r in config["externalRules"]},
    }


def autoscalers_of(docs: list[dict], deployment: str) -> list[dict]:
    """HPAs and KEDA ScaledObjects whose target is the Deployment."""
    out = []
    for d in docs:
        if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject"):
            ref = d["spec"]["scaleTargetRef"]
            if ref.get("kind", "Deployment") == "Deployment" and ref["name"] == deployment:
                out.append(d)
    return out


def behavior(autoscaler: dict) -> dict:
    if autoscaler["kind"] == "ScaledObject":
        return autoscaler["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    return autoscaler["spec"]["behavior"]


def replica_range(autoscaler: dict) -> tuple[int, int]:
    s = autoscaler["spec"]
    if autoscaler["kind"] == "ScaledObject":
        return s["minReplicaCount"], s["maxReplicaCount"]
    return s["minReplicas"], s["maxReplicas"]


def normalised(promql: str) -> str:
    return re.sub(r"\s+", "", promql)


def metric_names(expr: str) -> set[str]:
    from tests.deploy.test_alerts import metric_names as names

    return names(expr)


# -- the gateway -----------------------------------------------------------------------
@pytest.mark.parametrize("target", [t for t in TARGETS if GATEWAY_COMPONENT in components_of(t)])
def test_gateway_hpa_scales_on_the_busy_fraction_then_cpu(target, rendered):
    docs = rendered[target]
    hpa = one(docs, "HorizontalPodAutoscaler", "gateway")
    plain = one(rendered[LAYERED[target][0]], "HorizontalPodAutoscaler", "gateway")
    busy, cpu = hpa["spec"]["metrics"]
    assert busy["type"] == "Pods" and busy["pods"]["metric"] == {"name": BUSY_RATIO}
    assert busy["pods"]["target"]["type"] == "AverageValue"
    # Below 1, where the slots are full and refusals begin; high enough not to run idle pods.
    assert 0.4 <= quantity(busy["pods"]["target"]["averageValue"]) <= 0.8
    assert cpu == plain["spec"]["metrics"][0] and cpu["resource"]["name"] == "cpu"
    # The component changes the metrics only: the overlay's replica range and behaviour stay.
    assert {k: v for k, v in hpa["spec"].items() if k != "metrics"} == \
        {k: v for k, v in plain["spec"].items() if k != "metrics"}
    assert "replicas" not in one(docs, "Deployment", "gateway")["spec"]


# -- the model tier ----------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_one_autoscaler_per_deployment_and_no_fixed_replicas_under_one(target, rendered):
    docs = rendered[target]
    for deployment in objects(docs, "Deployment"):
        owners = autoscalers_of(docs, deployment)
        assert len(owners) <= 1, f"{target}: {[(o['kind'], o['metadata']['name']) for o in owners]} all scale " \
                                 f"{deployment}: they would fight over its replicas"
        spec = one(docs, "Deployment", deployment)["spec"]
        # Where an autoscaler owns the replicas the manifest must not carry them: every apply would reset them.
        assert ("replicas" in spec) == (not owners), \
            f"{target}: Deployment/{deployment} replicas {spec.get('replicas')}, autoscalers {len(owners)}"
    scaled_objects = objects(docs, "ScaledObject")
    assert (KEDA_COMPONENT in components_of(target)) == bool(scaled_objects)
    assert (TFSERVING_COMPONENT in components_of(target)) == \
        ("tfserving" in objects(docs, "HorizontalPodAutoscaler"))


def test_both_model_tier_autoscalers_cannot_be_rendered_together(tmp_path):
    """Each removes spec.replicas from the tfserving Deployment: kustomize refuses the second removal."""
    folder = layered_kustomization(tmp_path / "both", "gpu", [TFSERVING_COMPONENT, KEDA_COMPONENT])
    r = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "replicas" in r.stderr, r.stderr
    assert ALTERNATIVES[KEDA_COMPONENT] == TFSERVING_COMPONENT, "test_k8s.py renders them apart"


@pytest.mark.parametrize("target", [t for t in TARGETS
                                    if {TFSERVING_COMPONENT, KEDA_COMPONENT} & set(components_of(t))])
def test_tfserving_scales_up_soon_and_down_slowly(target, rendered):
    (scaler,) = autoscalers_of(rendered[target], "tfserving")
    low, high = replica_range(scaler)
    assert low >= 2, "two TF Serving pods at least (the PDB lets one go, rollouts replace one at a time)"
    assert high > low
    b = behavior(scaler)
    down, up = b["scaleDown"], b["scaleUp"]
    # Scale-down: a 10-minute window (GPU nodes and model loading take minutes to get back),
    # then at most one pod per 5 minutes.
    assert down["stabilizationWindowSeconds"] >= 600
    assert down.get("selectPolicy", "Max") != "Disabled"
    for p in down["policies"]:
        per_minute = p["value"] / p["periodSeconds"] * 60
        assert (p["type"] == "Pods" and per_minute <= 0.5) or (p["type"] == "Percent" and per_minute <= 10), p
    # Scale-up: within about a minute, a few pods per period (new pods wait minutes for nodes
    # meanwhile the signal stays high).
    assert up["stabilizationWindowSeconds"] <= 120 < down["stabilizationWindowSeconds"]
    assert any(p["type"] == "Pods" and p["value"] >= 2 for p in up["policies"])
    assert all(p["periodSeconds"] <= 180 for p in up["policies"])


def test_keda_and_hpa_alternatives_agree(rendered):
    """The ScaledObject: the HPA's query (the adapter external rule, namespace written in),
    target, replica range and behaviour; a Value target, as the fraction is a ratio."""
    hpa_docs = rendered["gpu+components"]
    keda_docs = rendered[f"gpu+{KEDA_COMPONENT}"]
    (hpa,) = autoscalers_of(hpa_docs, "tfserving")
    (so,) = autoscalers_of(keda_docs, "tfserving")
    assert hpa["kind"] == "HorizontalPodAutoscaler" and so["kind"] == "ScaledObject"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["target"]["type"] == "Value"
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "Value"
    meta = trigger["metadata"]
    assert float(meta["threshold"]) == quantity(metric["external"]["target"]["value"])
    assert meta["serverAddress"].startswith("http")
    query = exposed(hpa_docs)["externalRules"][metric["external"]["metric"]["name"]]
    assert normalised(meta["query"]) == normalised(query)
    assert replica_range(so) == replica_range(hpa)
    assert behavior(so) == behavior(hpa)
    keda_hpa = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["name"]
    assert keda_hpa not in objects(keda_docs, "HorizontalPodAutoscaler"), "KEDA creates that HPA itself"


def strict(schema: dict) -> dict:
    """The API server prunes unknown fields of a CRD object silently (a typo'd field does nothing):
    reject them instead, as kubernetes-validate's strict mode does for built-in kinds."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    # metadata is `type: object` only in the CRD: the built-in ObjectMeta, not checked here.
    return schema


@pytest.mark.parametrize("target", [t for t in TARGETS if KEDA_COMPONENT in components_of(t)])
def test_scaled_object_matches_the_keda_crd_schema(target, rendered):
    import jsonschema

    schema = strict(yaml.safe_load(KEDA_SCHEMA.read_text()))
    validator = jsonschema.Draft7Validator(schema)
    (so,) = objects(rendered[target], "ScaledObject").values()
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(so)]
    assert not errors, "\n".join(errors)
    # The CRD's CEL rule (x-kubernetes-validations), which jsonschema does not run.
    assert so["spec"].get("minReplicaCount", 0) <= so["spec"].get("maxReplicaCount", 100)
    ref = so["spec"]["scaleTargetRef"]
    assert (ref.get("apiVersion", "apps/v1"), ref.get("kind", "Deployment")) == ("apps/v1", "Deployment")
    one(rendered[target], "Deployment", ref["name"])
    # The strict schema does catch a misspelt field (the API server would drop it silently).
    typo = copy.deepcopy(so)
    down = typo["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    down["stabilisationWindowSeconds"] = down.pop("stabilizationWindowSeconds")
    assert not validator.is_valid(typo)


# -- prometheus-adapter rules ------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_hpa_metrics_are_the_names_the_adapter_rules_expose(target, rendered):
    docs = rendered[target]
    names = exposed(docs)
    api = {"Pods": "rules", "Object": "rules", "External": "externalRules"}
    for hpa in objects(docs, "HorizontalPodAutoscaler").values():
        for m in hpa["spec"]["metrics"]:
            if m["type"] in api:
                wanted = m[m["type"].lower()]["metric"]["name"]
                assert wanted in names[api[m["type"]]], \
                    f"{target}: HPA/{hpa['metadata']['name']} asks for {m['type']} metric {wanted}; the adapter " \
                    f"rules rendered with it expose {names}"
    # Each component ships the rules its own HPA needs, and no rule without a user.
    components = components_of(target)
    assert set(names["rules"]) == ({BUSY_RATIO} if GATEWAY_COMPONENT in components else set())
    assert bool(names["externalRules"]) == (TFSERVING_COMPONENT in components)


def test_adapter_rules_are_well_formed(rendered):
    docs = rendered["gpu+components"]
    config = adapter_config(docs)
    assert config["rules"] and config["externalRules"]
    for kind, rules in config.items():
        for rule in rules:
            assert set(rule) <= RULE_KEYS and {"seriesQuery", "resources", "name", "metricsQuery"} <= set(rule)
            assert set(rule["resources"]) <= RESOURCES_KEYS and set(rule["name"]) <= {"matches", "as"}
            for label, target in rule["resources"].get("overrides", {}).items():
                assert set(target) <= {"group", "resource"} and target["resource"] == label, (label, target)
            overrides = set(rule["resources"]["overrides"])
            # Pods metrics are associated with pods through the namespace and pod labels (which the
            # PodMonitor and the usual kubernetes-pods relabelling put on every series);
            # external ones are filtered by the HPA's namespace.
            assert overrides == ({"namespace", "pod"} if kind == "rules" else {"namespace"})
            for label in overrides:
                assert f'{label}!=""' in rule["seriesQuery"], f"{label} must be present on the series"
            assert "<<.LabelMatchers>>" in rule["metricsQuery"].replace(" ", "")
            if kind == "rules":
                assert "<<.GroupBy>>" in rule["metricsQuery"].replace(" ", "")
            else:  # empty for external metrics: `by (<<.GroupBy>>, model)` would not parse
                assert "GroupBy" not in rule["metricsQuery"]
    # The exposed names are unique per API (the adapter's rules must be mutually exclusive).
    for kind in ("rules", "externalRules"):
        names = [exposed_name(r) for r in config[kind]]
        assert len(names) == len(set(names)), names


def all_queries(by_target: dict[str, list[dict]]) -> dict[str, str]:
    """Every PromQL expression that will run: the adapter's (placeholders filled in) and KEDA's."""
    out = {}
    for target in TARGETS:
        for kind, names in exposed(by_target[target]).items():
            for name, q in names.items():
                assert out.setdefault(f"{kind}:{name}", q) == q, f"{target}: {name} differs between targets"
        for so in objects(by_target[target], "ScaledObject").values():
            for t in so["spec"]["triggers"]:
                key, q = f"keda:{so['metadata']['name']}:{t.get('name', t['type'])}", t["metadata"]["query"]
                assert out.setdefault(key, q) == q, f"{target}: {key} differs between targets"
    assert any(k.startswith("rules:") for k in out) and any(k.startswith("externalRules:") for k in out) \
        and any(k.startswith("keda:") for k in out), sorted(out)
    return out


def record_name(key: str) -> str:
    return "check:" + re.sub(r"[^\w:]", "_", key)


@needs_promtool
def test_every_query_is_valid_promql(rendered, tmp_path):
    """Each query as a recording rule: ``promtool check rules`` parses every expression."""
    queries = all_queries(rendered)
    path = tmp_path / "autoscaling.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "autoscaling", "rules": [
        {"record": record_name(k), "expr": q} for k, q in queries.items()]}]}))
    r = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(queries)} rules found" in r.stdout, r.stdout


@needs_promtool
def test_queries_compute_the_busy_fraction(rendered, tmp_path):
    """``promtool test rules`` on made-up gateway series: two models with 4 slots each on two
    pods, a pod without slots yet, and a busy gateway of another namespace."""
    queries = all_queries(rendered)
    path = tmp_path / "autoscaling.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "autoscaling", "interval": "15s", "rules": [
        {"record": record_name(k), "expr": q} for k, q in queries.items()]}]}))
    busy = "classifier_batch_busy_seconds_total"
    # Busy fractions (rate / 4 slots): gateway-a digits 7/8, sentiment 1/8; gateway-b digits 1/4,
    # sentiment 1/2; gateway-c has no slots yet; the other namespace's gateway is saturated.
    fractions = {("classifier", "gateway-a", "digits"): 0.875, ("classifier", "gateway-a", "sentiment"): 0.125,
                 ("classifier", "gateway-b", "digits"): 0.25, ("classifier", "gateway-b", "sentiment"): 0.5,
                 ("classifier", "gateway-c", "digits"): 0.0, ("other", "gateway-z", "digits"): 1.0}
    series = []
    for (ns, pod, model), f in fractions.items():
        labels = f'namespace="{ns}",pod="{pod}",model="{model}",job="gateway"'
        slots = 0 if pod == "gateway-c" else 4
        series.append({"series": f"{busy}{{{labels}}}", "values": f"0+{f * slots * 15}x40"})
        series.append({"series": f"classifier_batch_slots{{{labels}}}", "values": f"{slots}x40"})
    # Per pod: its busiest model. Over the namespace: per model (7/8*4 + 1/4*4) / 8 slots = 9/16
    # for digits, (1/8*4 + 1/2*4) / 8 = 5/16 for sentiment: the busiest, 9/16.
    expected = {
        "rules": [{"labels": "{pod=\"gateway-a\"}", "value": 0.875}, {"labels": "{pod=\"gateway-b\"}", "value": 0.5}],
        "externalRules": [{"labels": "{}", "value": 0.5625}],
        "keda": [{"labels": "{}", "value": 0.5625}],
    }
    tests = [{"interval": "15s", "input_series": series, "promql_expr_test": [
        {"expr": record_name(k), "eval_time": "5m",
         "exp_samples": [{"labels": s["labels"].replace("{", f"{record_name(k)}{{", 1), "value": s["value"]}
                         for s in expected[k.split(":")[0]]]}
        for k in queries]}]
    test_file = tmp_path / "autoscaling_test.yml"
    test_file.write_text(yaml.safe_dump({"rule_files": [path.name], "evaluation_interval": "15s", "tests": tests}))
    r = subprocess.run([PROMTOOL, "test", "rules", test_file.name], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_queries_read_metrics_the_gateway_defines(rendered):
    """The series the queries read are ones serving/metrics.py exports (counters without _total there)."""
    source = METRICS_PY.read_text()
    names = set().union(*(metric_names(q) for q in all_queries(rendered).values()))
    assert names == {"classifier_batch_busy_seconds_total", "classifier_batch_slots"}, names
    for rule_kind in adapter_config(rendered["gpu+components"]).values():
        for rule in rule_kind:
            names.add(series_name(rule))
    missing = [n for n in sorted(names) if f'"{n.removesuffix("_total")}"' not in source]
    if missing:
        pytest.skip(f"serving/metrics.py does not define {missing} yet (being added with the flow-control metrics)")


# -- how the components are listed --------------------------------------------------------
def test_components_listed_in_the_gpu_overlay_itself_give_the_same_objects(tmp_path):
    """k8s/README.md: list components in the overlay's kustomization, or in one of your own on
    top of it. Overlay patches run after components: the gpu overlay's must not bring back
    tfserving's replicas (it leaves them to the base)."""
    for folder in ("k8s", "serving/tfserving", "deploy/grafana"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    for components in ([GATEWAY_COMPONENT, TFSERVING_COMPONENT], [GATEWAY_COMPONENT, KEDA_COMPONENT]):
        overlay = tmp_path / "k8s" / "overlays" / "gpu"
        kustomization = yaml.safe_load((K8S / "overlays" / "gpu" / "kustomization.yaml").read_text())
        kustomization["components"] = [f"../../components/{c}" for c in components]
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        inside = kustomize(overlay)
        on_top = kustomize(layered_kustomization(tmp_path / "on-top" / components[-1], "gpu", components))

        def key(d):
            return d["kind"], d["metadata"]["name"]

        assert sorted(inside, key=key) == sorted(on_top, key=key)
        assert len(autoscalers_of(inside, "tfserving")) == 1
        assert "replicas" not in one(inside, "Deployment", "tfserving")["spec"]
