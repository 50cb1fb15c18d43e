"""The TF Serving config files in serving/tfserving/ parse with TF Serving's protos.

A typo in these files would otherwise only show when the model server starts (or,
for models.config, at its next poll). ``models.config`` is checked with the official
``ModelServerConfig`` from the tensorflow-serving-api package. ``MonitoringConfig``
and ``BatchingParameters`` are not in that package: tests/serving/backends/protos/ holds copies of
them (same package, names and field numbers), compiled by protoc in a subprocess
(protoc's runtime and TensorFlow must not share a process) and loaded into a
private descriptor pool, so they never clash with TensorFlow's own registrations.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from tensorflow_serving.config import model_server_config_pb2

from serving.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
CONFIG_DIR = ROOT / "serving" / "tfserving"
MODELS_DIR = ROOT / "models"  # mounted read-only at /models in the TF Serving container
PROTO_DIR = Path(__file__).resolve().parent / "protos"
PROTOS = (
    "tensorflow_serving/config/monitoring_config.proto",
    "tensorflow_serving/servables/tensorflow/session_bundle_config.proto",
)
PROMETHEUS_PATH = "/monitoring/prometheus/metrics"
MAX_CPU_BATCH_THREADS = 64
MAX_CPU_BATCH_TIMEOUT_US = 2000
MAX_GPU_BATCH_TIMEOUT_US = 10_000


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings()


@pytest.fixture(scope="module")
def tfs(tmp_path_factory) -> dict[str, type]:
    """Message classes of the test copies in tests/serving/backends/protos/, from a private pool."""
    out = tmp_path_factory.mktemp("tfserving_protos") / "descriptors.pb"
    # google/protobuf/wrappers.proto ships with grpc_tools; locate it without importing it.
    wkt = Path(importlib.util.find_spec("grpc_tools").submodule_search_locations[0]) / "_proto"
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"--proto_path={PROTO_DIR}", f"--proto_path={wkt}",
        f"--descriptor_set_out={out}", "--include_imports", *PROTOS,
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=PROTO_DIR, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"protoc failed:\n{r.stdout}{r.stderr}"
    pool = descriptor_pool.DescriptorPool()
    for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:  # imports come first
        pool.Add(f)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{name}"))
        for name in ("MonitoringConfig", "BatchingParameters")
    }


def parse(path: Path, cls: type):
    return text_format.Parse(path.read_text(), cls())


def model_server_config() -> model_server_config_pb2.ModelServerConfig:
    return parse(CONFIG_DIR / "models.config", model_server_config_pb2.ModelServerConfig)


# -- models.config ------------------------------------------------------------------


def test_models_config_lists_exactly_the_gateway_models(settings):
    config = model_server_config()
    assert config.WhichOneof("config") == "model_config_list"
    names = [c.name for c in config.model_config_list.config]
    assert len(names) == len(set(names)), f"duplicate model: {names}"
    assert sorted(names) == sorted(settings.models)


def test_models_config_paths_platform_and_policy():
    for c in model_server_config().model_config_list.config:
        assert c.base_path == f"/models/{c.name}"
        assert c.model_platform == "tensorflow"
        assert c.model_version_policy.WhichOneof("policy_choice") == "specific", (
            f"{c.name}: versions must be listed explicitly (specific), so a canary is a decision"
        )
        versions = list(c.model_version_policy.specific.versions)
        assert versions and len(versions) == len(set(versions)), f"{c.name}: {versions}"
        for v in versions:
            assert (MODELS_DIR / c.name / str(v) / "saved_model.pb").is_file(), f"{c.name} version {v} is not exported"


def test_models_config_labels_point_at_served_versions():
    for c in model_server_config().model_config_list.config:
        labels = dict(c.version_labels)
        assert {"stable", "canary"} <= labels.keys(), f"{c.name}: labels {labels}"
        served = set(c.model_version_policy.specific.versions)
        for label, v in labels.items():
            # TF Serving refuses labels for versions it does not load
            # (unless --allow_version_labels_for_unavailable_models).
            assert v in served, f"{c.name}: label {label!r} -> {v}, not in specific {sorted(served)}"
            assert (MODELS_DIR / c.name / str(v) / "saved_model.pb").is_file()


# -- monitoring.config ----------------------------------------------------------------


def test_monitoring_config(tfs):
    m = parse(CONFIG_DIR / "monitoring.config", tfs["MonitoringConfig"])
    assert m.HasField("prometheus_config")
    assert m.prometheus_config.enable is True
    assert m.prometheus_config.path == PROMETHEUS_PATH


# -- batching parameters --------------------------------------------------------------


def check_batching(b, settings: Settings) -> None:
    for field in ("max_batch_size", "batch_timeout_micros", "num_batch_threads", "max_enqueued_batches"):
        assert b.HasField(field), f"{field} must be set explicitly"
    # TF Serving rejects a task larger than max_batch_size: one gateway batch must fit.
    assert b.max_batch_size.value >= settings.max_batch_size
    assert b.num_batch_threads.value >= 1
    assert b.max_enqueued_batches.value >= 1
    assert b.batch_timeout_micros.value >= 0
    sizes = list(b.allowed_batch_sizes)
    if sizes:  # TF Serving's requirements
        assert all(s > 0 for s in sizes)
        assert all(a < b_ for a, b_ in zip(sizes, sizes[1:])), f"allowed_batch_sizes not increasing: {sizes}"
        assert sizes[-1] == b.max_batch_size.value, "last allowed_batch_sizes entry must equal max_batch_size"


def test_batching_parameters_cpu(tfs, settings):
    b = parse(CONFIG_DIR / "batching_parameters.txt", tfs["BatchingParameters"])
    check_batching(b, settings)
    assert b.num_batch_threads.value <= MAX_CPU_BATCH_THREADS
    assert b.batch_timeout_micros.value <= MAX_CPU_BATCH_TIMEOUT_US
    # Online serving: bound queueing (the guide suggests about num_batch_threads).
    assert b.max_enqueued_batches.value <= 4 * b.num_batch_threads.value


def test_batching_parameters_gpu(tfs, settings):
    cpu = parse(CONFIG_DIR / "batching_parameters.txt", tfs["BatchingParameters"])
    gpu = parse(CONFIG_DIR / "batching_parameters.gpu.txt", tfs["BatchingParameters"])
    check_batching(gpu, settings)
    assert gpu.max_batch_size.value >= cpu.max_batch_size.value
    assert gpu.batch_timeout_micros.value <= MAX_GPU_BATCH_TIMEOUT_US
    assert gpu.pad_variable_length_inputs is False  # inputs are fixed-shape


# -- the parser catches typos -----------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "message", "field", "typo"),
    [
        ("models.config", None, "base_path", "base_pth"),
        ("monitoring.config", "MonitoringConfig", "enable", "enabel"),
        ("batching_parameters.txt", "BatchingParameters", "max_batch_size", "max_bach_size"),
        ("batching_parameters.gpu.txt", "BatchingParameters", "allowed_batch_sizes", "allowed_batch_size"),
    ],
)
def test_misspelled_field_is_a_parse_error(tfs, file, message, field, typo):
    cls = model_server_config_pb2.ModelServerConfig if message is None else tfs[message]
    text = (CONFIG_DIR / file).read_text()
    text_format.Parse(text, cls())  # the real file parses...
    lines = text.splitlines(keepends=True)
    i = next(i for i, line in enumerate(lines) if line.lstrip().startswith(field))
    lines[i] = lines[i].replace(field, typo, 1)  # ...a copy with one misspelled field does not
    with pytest.raises(text_format.ParseError, match=typo):
        text_format.Parse("".join(lines), cls())
