"""Deployment files: Compose, Dockerfiles, Prometheus, .dockerignore.

No Docker engine needed. Checks that the files are valid (YAML, the Compose
Specification schema vendored by check-jsonschema, ``docker compose config`` when
a Compose CLI is installed) and that they agree with each other and with the code:
mounted paths exist, images are pinned, ports / env names / addresses / metrics
paths line up, the config files edited by scripts/rollout.sh are seen through folder
mounts, the gateway image has no TensorFlow, containers run as non-root,
and TF Serving's healthcheck really waits for every model to be AVAILABLE.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import yaml

from serving.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
BASE = "docker-compose.yml"
GPU = "docker-compose.gpu.yml"
COMPOSE_FILES = [BASE, GPU]
GATEWAY_DOCKERFILE = ROOT / "docker" / "gateway.Dockerfile"
TRAINER_DOCKERFILE = ROOT / "docker" / "trainer.Dockerfile"
DOCKERFILES = [GATEWAY_DOCKERFILE, TRAINER_DOCKERFILE]
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
ENV_PREFIX = "CLASSIFIER_"
DEFAULTS = {name: f.default for name, f in Settings.model_fields.items()}


# -- helpers ---------------------------------------------------------------------
def load(name: str) -> dict:
    with open(ROOT / name) as f:
        return yaml.safe_load(f)


def merge(base, override):
    """Compose-like merge, enough for a schema check: mappings merge, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(override)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load(BASE)


@pytest.fixture(scope="module")
def gpu(compose) -> dict:
    return merge(compose, load(GPU))


def services(doc: dict) -> dict:
    return doc["services"]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


def mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) for every volume entry, short or long syntax."""
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            # ${VAR:-default} in the source: its default stands for it (it holds a colon).
            parts = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", v).split(":")
            source, target = parts[0], parts[1]
            read_only = len(parts) > 2 and "ro" in parts[2].split(",")
        else:
            source, target, read_only = v.get("source", ""), v["target"], bool(v.get("read_only"))
        out.append((source, target, read_only))
    return out


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def host_path(service: dict, container_path: str) -> Path | None:
    """The host path a container path comes from, through the service's bind mounts."""
    p = PurePosixPath(container_path)
    for source, target, _ in mounts(service):
        if is_bind(source) and (p == PurePosixPath(target) or PurePosixPath(target) in p.parents):
            return (ROOT / source / p.relative_to(target)).resolve()
    return None


def container_ports(service: dict) -> set[int]:
    out = set()
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            out.add(int(p["target"]))
        else:
            out.add(int(str(p).split("/")[0].rsplit(":", 1)[-1]))
    return out


def flags(command: list[str]) -> dict[str, str]:
    out = {}
    for arg in command:
        if arg.startswith("--"):
            k, _, v = arg[2:].partition("=")
            out[k] = v
    return out


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\s*\n", " ", "\n".join(lines))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


PINNED_TAG = re.compile(r"^v?\d+\.\d+(\.\d+)*([-._][A-Za-z0-9._-]+)?$")


def assert_pinned(image: str, where: str):
    if "@sha256:" in image:
        return
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag, f"{where}: image {image!r} has no tag (that means :latest)"
    assert PINNED_TAG.match(tag) and "latest" not in tag, f"{where}: image {image!r} is not pinned to a version tag"


def healthcheck_script(service: dict) -> str:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:3] == ["bash", "-c"], test
    return test[3].replace("$$", "$")  # Compose's escape for a literal $


def models_config_names() -> list[str]:
    return re.findall(r'\bname:\s*"([^"]+)"', (ROOT / "serving/tfserving/models.config").read_text())


# -- validity --------------------------------------------------------------------
def compose_schema() -> dict:
    ref = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    return json.loads(ref.read_text())


@pytest.mark.parametrize("name", COMPOSE_FILES + ["base+gpu"])
def test_compose_files_match_the_compose_spec_schema(name, compose, gpu):
    doc = gpu if name == "base+gpu" else load(name)
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_check_jsonschema_cli_accepts_the_compose_files():
    cli = Path(sys.executable).parent / "check-jsonschema"
    if not cli.exists():
        pytest.skip(f"check-jsonschema is not installed beside {sys.executable} (pip install check-jsonschema)")
    r = subprocess.run([str(cli), "--builtin-schema", "vendor.compose-spec", *COMPOSE_FILES], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        try:
            if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=20).returncode == 0:
                return ["docker", "compose"]
        except (OSError, subprocess.TimeoutExpired):
            pass
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.parametrize("files", [[BASE], [BASE, GPU]], ids=["base", "base+gpu"])
def test_docker_compose_config(files):
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Compose CLI: neither the `docker compose` plugin nor `docker-compose` is on PATH "
                    "(e.g. apt-get install docker-compose); schema validation above still ran")
    args = [*cli, "--profile", "load"] + [a for f in files for a in ("-f", f)] + ["config", "-q"]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{' '.join(args)}:\n{r.stdout}{r.stderr}"


# -- compose invariants ----------------------------------------------------------
@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_bind_mounted_paths_exist_and_named_volumes_are_declared(name, compose):
    doc = load(name)
    declared = set((compose.get("volumes") or {}) | (doc.get("volumes") or {}))
    for svc_name, svc in services(doc).items():
        for source, _target, _ in mounts(svc):
            if is_bind(source):
                assert (ROOT / source).exists(), f"{name}: {svc_name} mounts {source}, which is not there"
            else:
                assert source in declared, f"{name}: {svc_name} uses volume {source!r}, not declared"


def test_model_and_config_mounts_are_read_only(compose):
    for svc_name, svc in services(compose).items():
        for source, target, read_only in mounts(svc):
            if is_bind(source):
                assert read_only, f"{svc_name}: bind mount {source}:{target} should be :ro"


def test_every_image_is_pinned_to_a_version():
    for name in COMPOSE_FILES:
        for svc_name, svc in services(load(name)).items():
            if "image" in svc:
                assert_pinned(svc["image"], f"{name} {svc_name}")
            else:
                assert "build" in svc, f"{name}: {svc_name} has neither image nor build"
    for path in DOCKERFILES:
        stages = set()
        froms = [args for ins, args in dockerfile(path) if ins == "FROM"]
        assert froms, f"{path.name}: no FROM"
        for args in froms:
            words = [w for w in args.split() if not w.startswith("--")]
            image = words[0]
            if image not in stages and image != "scratch":
                assert "$" not in image, f"{path.name}: FROM {image} is not a literal, pinned image"
                assert_pinned(image, path.name)
            if len(words) >= 3 and words[1].upper() == "AS":
                stages.add(words[2])


def test_gpu_override_is_the_same_release_and_only_swaps_the_batching_file(compose):
    base_svc, gpu_svc = services(compose)["tfserving"], services(load(GPU))["tfserving"]
    assert gpu_svc["image"] == base_svc["image"] + "-gpu"
    base_flags, gpu_flags = flags(base_svc["command"]), flags(gpu_svc["command"])
    assert gpu_flags.pop("batching_parameters_file") == "/config/batching_parameters.gpu.txt"
    assert base_flags.pop("batching_parameters_file") == "/config/batching_parameters.txt"
    assert gpu_flags == base_flags
    devices = gpu_svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


@pytest.mark.parametrize("which", ["base", "base+gpu"])
def test_tfserving_config_flags_point_at_mounted_files(which, compose, gpu):
    svc = services(compose if which == "base" else gpu)["tfserving"]
    f = flags(svc["command"])
    for flag in ("model_config_file", "batching_parameters_file", "monitoring_config_file"):
        path = host_path(svc, f[flag])
        assert path is not None, f"--{flag}={f[flag]} is not under any bind mount of tfserving"
        assert path.is_file(), f"--{flag}={f[flag]} is {path}, which does not exist"
        assert path.is_relative_to(ROOT / "serving" / "tfserving"), path
    assert f["enable_batching"] == "true" and f["enable_model_warmup"] == "true"
    assert f["model_config_file_poll_wait_seconds"] == "60"


def test_tfserving_models_are_mounted_and_listed_everywhere(compose):
    svc = services(compose)["tfserving"]
    text = (ROOT / "serving/tfserving/models.config").read_text()
    for base_path in re.findall(r'\bbase_path:\s*"([^"]+)"', text):
        path = host_path(svc, base_path)
        assert path is not None and path.is_dir(), f"models.config base_path {base_path} is not a mounted model dir"
    names = models_config_names()
    assert sorted(names) == sorted(DEFAULTS["models"]), "models.config and Settings.models disagree"
    script = healthcheck_script(svc)
    loop = re.search(r"for m in ([\w\s]+?); do", script)
    assert loop and sorted(loop.group(1).split()) == sorted(names), "the healthcheck must wait for every model"


def mount_of(service: dict, container_path: str) -> tuple[str, str, bool] | None:
    """The bind mount through which a container sees a path (the deepest one, as in Docker)."""
    p = PurePosixPath(container_path)
    found = [(source, target, ro) for source, target, ro in mounts(service)
             if is_bind(source) and (p == PurePosixPath(target) or PurePosixPath(target) in p.parents)]
    return max(found, key=lambda m: len(PurePosixPath(m[1]).parts), default=None)


@pytest.mark.parametrize("which", ["base", "base+gpu"])
def test_hot_reloaded_config_files_are_seen_through_a_folder_mount(which, compose, gpu):
    """scripts/rollout.sh replaces models.config and traffic.json by renaming a new file over the
    old one. A bind mount of the file itself pins the old inode: the container would never see an
    edit. So TF Serving's --model_config_file and the gateway's models.config and traffic file must
    be reached through a mount of their folder, serving/tfserving/, and nothing mounts one of its
    files alone."""
    doc = compose if which == "base" else gpu
    tfs, gw = services(doc)["tfserving"], services(doc)["gateway"]
    env = environment(gw)
    assert "CLASSIFIER_TRAFFIC_FILE" in env, "the gateway must read the traffic file scripts/rollout.sh edits"
    files = [(tfs, "tfserving", flags(tfs["command"])["model_config_file"], "models.config"),
             (gw, "gateway", env["CLASSIFIER_MODELS_CONFIG_FILE"], "models.config"),
             (gw, "gateway", env["CLASSIFIER_TRAFFIC_FILE"], "traffic.json")]
    for svc, name, path, file in files:
        m = mount_of(svc, path)
        assert m is not None, f"{name}: {path} is under no bind mount"
        source, target, _ = m
        assert PurePosixPath(target) == PurePosixPath(path).parent and (ROOT / source).is_dir(), \
            f"{name}: {source}:{target} is not the folder of {path}: an edit (a rename) would never be seen"
        assert host_path(svc, path) == ROOT / "serving" / "tfserving" / file and host_path(svc, path).is_file(), path
    assert (PurePosixPath(env["CLASSIFIER_MODELS_CONFIG_FILE"]).parent
            == PurePosixPath(env["CLASSIFIER_TRAFFIC_FILE"]).parent), "one folder, as in the ConfigMap"
    for name, svc in services(doc).items():
        for source, target, _ in mounts(svc):
            path = (ROOT / source).resolve()
            assert not (is_bind(source) and path.is_file() and path.is_relative_to(ROOT / "serving" / "tfserving")), \
                f"{name}: {source}:{target} mounts one file of serving/tfserving/: edits by rename are never seen"


def test_gateway_ports_and_env_agree_with_settings(compose):
    gw = services(compose)["gateway"]
    env = environment(gw)
    for key in env:
        assert key.startswith(ENV_PREFIX), key
        assert key[len(ENV_PREFIX):].lower() in Settings.model_fields, f"{key} is not a Settings field"
    # The values must also be valid settings.
    settings = Settings(**{k[len(ENV_PREFIX):].lower(): v for k, v in env.items()})
    assert settings.backend == "tfserving"
    rest = int(env.get("CLASSIFIER_REST_PORT", DEFAULTS["rest_port"]))
    grpc_port = int(env.get("CLASSIFIER_GRPC_PORT", DEFAULTS["grpc_port"]))
    assert (rest, grpc_port) == (8000, 50051)
    assert container_ports(gw) == {rest, grpc_port}
    assert f"127.0.0.1:{rest}/readyz" in " ".join(gw["healthcheck"]["test"])
    # The models directory the gateway reads vocabularies from is mounted there.
    assert any(target == env["CLASSIFIER_MODEL_BASE_PATH"] and Path(ROOT / src).resolve() == ROOT / "models"
               for src, target, _ in mounts(gw) if is_bind(src))
    assert gw["depends_on"]["tfserving"]["condition"] == "service_healthy"


def test_gateway_reaches_tfserving_on_its_grpc_port(compose):
    host, _, port = environment(services(compose)["gateway"])["CLASSIFIER_TFSERVING_ADDRESS"].rpartition(":")
    assert host in services(compose), f"{host} is not a compose service"
    tfs = services(compose)[host]
    assert port == flags(tfs["command"])["port"]
    assert int(port) in container_ports(tfs)
    assert int(flags(tfs["command"])["rest_api_port"]) in container_ports(tfs)


def test_locust_service_runs_the_mounted_locustfile_against_the_gateway(compose):
    svc = services(compose)["locust"]
    assert svc.get("profiles") == ["load"]
    cmd = svc["command"]
    cmd = cmd.split() if isinstance(cmd, str) else cmd
    path = host_path(svc, cmd[cmd.index("-f") + 1])
    assert path is not None and path.is_file() and path == ROOT / "loadtests" / "locustfile.py"
    url = cmd[cmd.index("--host") + 1]
    m = re.fullmatch(r"http://([\w-]+):(\d+)", url)
    assert m and m.group(1) == "gateway" and int(m.group(2)) in container_ports(services(compose)["gateway"])


# -- prometheus ------------------------------------------------------------------
def test_prometheus_scrapes_compose_services_on_their_metrics_paths(compose):
    prom = yaml.safe_load(PROMETHEUS.read_text())
    assert prom["global"]["scrape_interval"] == "15s"
    svc = services(compose)["prometheus"]
    assert host_path(svc, "/etc/prometheus/prometheus.yml") == PROMETHEUS
    rest_api_port = flags(services(compose)["tfserving"]["command"])["rest_api_port"]
    monitoring = (ROOT / "serving/tfserving/monitoring.config").read_text()
    monitoring_path = (re.findall(r'\bpath:\s*"([^"]+)"', monitoring) or ["/monitoring/prometheus/metrics"])[0]
    assert '@app.get("/metrics"' in (ROOT / "serving/api/rest/app.py").read_text()
    expected = {f"gateway:{DEFAULTS['rest_port']}": "/metrics", f"tfserving:{rest_api_port}": monitoring_path}
    seen = {}
    for job in prom["scrape_configs"]:
        for target in (t for sc in job.get("static_configs", []) for t in sc["targets"]):
            host, _, port = target.rpartition(":")
            assert host in services(compose), f"scrape target {target}: no such compose service"
            assert int(port) in container_ports(services(compose)[host]), f"scrape target {target}: port not served"
            seen[target] = job.get("metrics_path", "/metrics")
    assert seen == expected


# -- dockerfiles -----------------------------------------------------------------
def last_user(path: Path) -> str | None:
    users = [args for ins, args in dockerfile(path) if ins == "USER"]
    return users[-1] if users else None


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_non_root(path):
    user = last_user(path)
    assert user, f"{path.name}: no USER (runs as root)"
    assert user.split(":")[0] not in ("root", "0"), f"{path.name}: USER {user}"


def test_gateway_image_installs_the_serve_storage_and_tracing_extras_only_and_never_tensorflow():
    instructions = dockerfile(GATEWAY_DOCKERFILE)
    installs = [seg.strip() for ins, args in instructions if ins == "RUN"
                for seg in re.split(r"&&|;|\|\|", args) if "pip install" in seg]
    assert installs, "the gateway Dockerfile installs nothing"
    for seg in installs:
        # storage: fsspec/s3fs/gcsfs for `python -m serving pull` (k8s/components/models-from-s3);
        # tracing: the OpenTelemetry SDK, imported only when OTEL_TRACES_EXPORTER=otlp.
        assert re.findall(r"\.\[([^\]]*)\]", seg) == ["serve,storage,tracing"], \
            f"must install '.[serve,storage,tracing]' only: {seg}"
        assert "tensorflow" not in seg.lower(), seg
        assert "-e " not in seg and "--editable" not in seg, f"the image needs a real install: {seg}"
    copies = [args for ins, args in instructions if ins == "COPY" and "--from" not in args]
    copied = {w.rstrip("/") for args in copies for w in args.split()[:-1]}
    assert copied == {"pyproject.toml", "README.md", "contract", "serving"}, copied
    env = " ".join(args for ins, args in instructions if ins == "ENV")
    assert "CLASSIFIER_BACKEND=tfserving" in env
    exposed = {int(p) for ins, args in instructions if ins == "EXPOSE" for p in args.split()}
    assert exposed == {DEFAULTS["rest_port"], DEFAULTS["grpc_port"]}
    assert any(ins == "HEALTHCHECK" and "/readyz" in args for ins, args in instructions)
    cmd = [json.loads(args) for ins, args in instructions if ins == "CMD"][-1]
    assert cmd in (["python", "-m", "serving"], ["classifier-gateway"])
    # pyproject's readme must be in the image for the install to work.
    assert 'readme = "README.md"' in (ROOT / "pyproject.toml").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ("serve", "storage"):
        assert not [r for r in extras[extra] if r.lower().startswith(("tensorflow", "keras"))], extra


def test_trainer_image_installs_train_and_reads_data_from_a_volume():
    instructions = dockerfile(TRAINER_DOCKERFILE)
    froms = [args for ins, args in instructions if ins == "FROM"]
    assert froms[-1].split()[0].startswith("tensorflow/tensorflow:") and froms[-1].split()[0].endswith("-gpu")
    assert any(ins == "RUN" and "pip install" in args and ".[train]" in args for ins, args in instructions)
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(args for ins, args in instructions if ins == "ENV")))
    data_dir = env["CLASSIFIER_DATA_DIR"]
    volumes = [v for ins, args in instructions if ins == "VOLUME" for v in json.loads(args)]
    assert data_dir in volumes
    assert [json.loads(args) for ins, args in instructions if ins == "ENTRYPOINT"][-1] == ["python", "-m", "training"]
    assert "CLASSIFIER_DATA_DIR" in (ROOT / "training/data.py").read_text()


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest():
    lines = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")}
    for needed in (".venv", ".git", "bench/results", ".pytest_cache", "models/*/.tmp-*"):
        assert needed in lines, f".dockerignore lacks {needed}"
    assert any("__pycache__" in ln for ln in lines)
    for kept in ("pyproject.toml", "README.md", "training", "serving", "*", "*.md", "*.toml"):
        assert kept not in lines, f".dockerignore must not exclude {kept}"


# -- the tfserving healthcheck, run against a fake TF Serving REST API -------------
def fake_status(state: str | None, version: int = 1) -> tuple[int, dict]:
    if state is None:
        return 404, {"error": "Servable not found for request: Latest(x)"}
    return 200, {"model_version_status": [
        {"version": str(version), "state": state, "status": {"error_code": "OK", "error_message": ""}}]}


@pytest.fixture()
def fake_tfserving():
    states: dict[str, str | None] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.removeprefix("/v1/models/")
            code, body = fake_status(states.get(name))
            data = json.dumps(body, indent=1).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield server.server_address[1], states
    finally:
        server.shutdown()
        server.server_close()


def model_states(case: str, names: list[str]) -> dict:
    """What the fake TF Serving reports per model for a healthcheck case: all AVAILABLE but one."""
    states = {n: "AVAILABLE" for n in names}
    if case == "one loading":
        states[names[-1]] = "LOADING"
    elif case == "one missing":
        states[names[0]] = None
    elif case == "one failed":
        states[names[1]] = "END"
    return states


@pytest.mark.skipif(not (shutil.which("bash") and shutil.which("grep")), reason="the healthcheck script needs bash and grep")
@pytest.mark.parametrize("case,healthy", [
    ("all available", True),
    ("one loading", False),
    ("one missing", False),
    ("one failed", False),
])
def test_tfserving_healthcheck_passes_only_when_every_model_is_available(case, healthy, compose, fake_tfserving):
    port, states = fake_tfserving
    states.update(model_states(case, DEFAULTS["models"]))
    script = healthcheck_script(services(compose)["tfserving"])
    rest_api_port = flags(services(compose)["tfserving"]["command"])["rest_api_port"]
    assert f"/dev/tcp/127.0.0.1/{rest_api_port}" in script
    script = script.replace(f"/dev/tcp/127.0.0.1/{rest_api_port}", f"/dev/tcp/127.0.0.1/{port}")
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=10)
    assert (r.returncode == 0) == healthy, f"{case}: rc={r.returncode} {r.stderr}"
