"""models.config in the gateway: version policies and labels, on both backends; and spreading
Predict calls over several TF Serving servers (round_robin).

The lean ModelServerConfig (protos/tensorflow_serving/config) is checked against TF Serving's
own; the label-aware version choice runs against real gateways (embedded, and TF Serving
backend against the stand-in) over a repository with two versions whose vocabularies differ.
"""

import os
import time

import grpc
import httpx
import pytest
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2 as official

from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from serving.gen.tensorflow_serving.config import model_server_config_pb2 as lean
from serving.model_config import ConfigError, ModelPolicy, ModelsConfig, Traffic, parse, parse_traffic, problems
from testkit.gateway import ROOT, WITHOUT_TENSORFLOW, gateway_process, wait_until
from tests.serving.backends.test_tfserving import TEXT, two_versions  # noqa: F401 - a fixture: v1 and a v2 with another vocabulary
from testkit.standin import StandIn

SHIPPED = ROOT / "serving" / "tfserving" / "models.config"


def config_text(stable: int, canary: int, versions=(1, 2)) -> str:
    specific = " ".join(f"versions: {v}" for v in versions)
    return f"""
model_config_list {{
  config {{
    name: "sentiment_lstm"
    base_path: "/models/sentiment_lstm"
    model_platform: "tensorflow"
    model_version_policy {{ specific {{ {specific} }} }}
    version_labels {{ key: "stable" value: {stable} }}
    version_labels {{ key: "canary" value: {canary} }}
  }}
}}
"""


# -- the lean messages and the parser --------------------------------------------------------------
def test_lean_messages_match_tf_servings_own():
    def fields(d):
        return {f.name: (f.number, f.type, f.message_type.full_name if f.message_type else None) for f in d.fields}

    for name in ("ModelServerConfig", "ModelConfigList", "ModelConfig"):
        ours, theirs = fields(getattr(lean, name).DESCRIPTOR), fields(getattr(official, name).DESCRIPTOR)
        assert ours.items() <= theirs.items(), name
    policy = lean.ModelConfig.DESCRIPTOR.fields_by_name["model_version_policy"].message_type
    theirs = official.ModelConfig.DESCRIPTOR.fields_by_name["model_version_policy"].message_type
    assert fields(policy).items() <= fields(theirs).items()
    for nested in ("Latest", "Specific"):
        assert fields(policy.nested_types_by_name[nested]).items() <= fields(theirs.nested_types_by_name[nested]).items()


def test_the_shipped_config_reads_the_same_with_lean_and_official_messages():
    text = SHIPPED.read_text()
    ours = parse(text)
    theirs = text_format.Parse(text, official.ModelServerConfig())
    assert set(ours) == {c.name for c in theirs.model_config_list.config}
    for c in theirs.model_config_list.config:
        assert ours[c.name].labels == dict(c.version_labels)
        assert ours[c.name].specific == tuple(c.model_version_policy.specific.versions)
    # Fields the lean subset leaves out are skipped, not an error.
    extra = ('model_config_list { config { name: "x" model_type: TENSORFLOW '
             'logging_config { sampling_config { sampling_rate: 0.5 } } version_labels { key: "stable" value: 3 } } }')
    text_format.Parse(extra, official.ModelServerConfig())  # valid for TF Serving
    assert parse(extra)["x"].labels == {"stable": 3}


def test_version_policies_choose_like_tf_serving():
    on_disk = [1, 2, 3, 5]
    assert ModelPolicy().choose(on_disk) == [5]
    assert ModelPolicy(latest=2).choose(on_disk) == [3, 5]
    assert ModelPolicy(all=True).choose(on_disk) == on_disk
    assert ModelPolicy(specific=(2, 5, 9)).choose(on_disk) == [2, 5]
    assert parse('model_config_list { config { name: "m" model_version_policy { latest { num_versions: 2 } } } }')["m"].latest == 2
    assert parse('model_config_list { config { name: "m" model_version_policy { all { } } } }')["m"].all


def touch(path):
    now = time.time_ns()
    os.utime(path, ns=(now, now + 5 * 10**9))  # a distinct mtime even within one clock tick


def test_config_is_reread_when_it_changes_and_a_broken_one_is_rejected(tmp_path):
    path = tmp_path / "models.config"
    path.write_text(config_text(1, 2))
    seen = []
    config = ModelsConfig(path, on_reload=lambda file, outcome: seen.append((file, outcome)))
    assert config.labels("sentiment_lstm") == {"stable": 1, "canary": 2} and config.generation == 1
    path.write_text(config_text(2, 2))
    touch(path)
    assert config.refresh() and config.labels("sentiment_lstm") == {"stable": 2, "canary": 2}
    for broken in ("model_config_list { config { name: ",  # half-written
                   "",  # truncated: names none of the models served now
                   config_text(stable=3, canary=2),  # a label outside the policy
                   config_text(1, 2).replace("sentiment_lstm", "other")):  # a model removed
        path.write_text(broken)
        touch(path)
        assert not config.refresh() and config.labels("sentiment_lstm") == {"stable": 2, "canary": 2}
        assert not config.valid("models_config") and config.error
    path.write_text(config_text(1, 2))
    touch(path)
    assert config.refresh() and config.valid("models_config") and config.generation == 3
    assert seen == [("models_config", "applied")] * 2 + [("models_config", "rejected")] * 4 + [("models_config", "applied")]
    path.unlink()
    assert not config.refresh() and config.labels("sentiment_lstm") == {"stable": 1, "canary": 2}  # gone: kept
    assert ModelsConfig(tmp_path / "missing.config").labels("sentiment_lstm") == {}
    assert ModelsConfig(None).policy("anything") == ModelPolicy()


def test_validation_names_the_broken_rule(tmp_path):
    models = parse(config_text(stable=3, canary=2))
    assert problems(models) == ["model 'sentiment_lstm': label 'stable' points to version 3, which its version "
                                "policy does not serve (versions [1, 2])"]
    latest = parse('model_config_list { config { name: "m" model_version_policy { latest { num_versions: 1 } } '
                   'version_labels { key: "stable" value: 1 } } }')
    assert problems(latest) == []  # without the repository it cannot be known
    assert problems(latest, on_disk=lambda name: [1, 2]) == [
        "model 'm': label 'stable' points to version 1, which its version policy does not serve (versions [2])"]
    assert problems({}, previous=["m"])[0].startswith("model 'm' is served now but missing from the new config")
    with pytest.raises(ConfigError, match="configured twice"):
        parse('model_config_list { config { name: "m" } config { name: "m" } }')


def test_traffic_file(tmp_path):
    models = parse(config_text(1, 2))
    assert parse_traffic('{"sentiment_lstm": {"canary_percent": 10}}', models) == {
        "sentiment_lstm": Traffic(canary_percent=10.0)}
    for text, message in [('{"nope": {"canary_percent": 1}}', "model 'nope' is not in models.config"),
                          ('{"sentiment_lstm": {"canary_percent": 101}}', "canary_percent must be a number from 0 to 100"),
                          ('{"sentiment_lstm": {"canary_percent": true}}', "canary_percent must be a number"),
                          ('{"sentiment_lstm": {"weight": 5}}', "expected an object with canary_percent"),
                          ("[1]", "expected a JSON object"), ("{", "not JSON")]:
        with pytest.raises(ConfigError, match=message):
            parse_traffic(text, models)
    no_canary = parse(config_text(1, 2).replace('    version_labels {{ key: "canary" value: 2 }}\n', "")
                      .replace('version_labels { key: "canary" value: 2 }', ""))
    with pytest.raises(ConfigError, match="need a 'canary' label"):
        parse_traffic('{"sentiment_lstm": {"shadow_percent": 5}}', no_canary)
    config_path, traffic_path = tmp_path / "models.config", tmp_path / "traffic.json"
    config_path.write_text(config_text(1, 2))
    traffic_path.write_text('{"sentiment_lstm": {"canary_percent": 25, "shadow_percent": 5}}')
    config = ModelsConfig(config_path, traffic_path)
    assert config.split("sentiment_lstm") == Traffic(25.0, 5.0) and config.split("digits") == Traffic()
    traffic_path.write_text('{"sentiment_lstm": {"canary_percent": 250}}')
    touch(traffic_path)
    config.refresh()
    assert config.split("sentiment_lstm") == Traffic(25.0, 5.0) and not config.valid("traffic")


def test_check_config_command(tmp_path):
    import subprocess
    import sys

    new, old = tmp_path / "new.config", tmp_path / "old.config"
    old.write_text(SHIPPED.read_text())
    new.write_text(SHIPPED.read_text().replace('key: "stable" value: 2', 'key: "stable" value: 7'))
    run = lambda *a: subprocess.run([sys.executable, "-m", "serving", "check-config", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, cwd=ROOT, timeout=60)
    ok = run(old, "--previous", old, "--models", ROOT / "models",
             "--traffic", ROOT / "serving" / "tfserving" / "traffic.json")
    assert ok.returncode == 0 and "digits: versions [1, 2]" in ok.stdout, ok.stderr
    bad = run(new, "--previous", old)
    assert bad.returncode == 1
    assert "model 'digits': label 'stable' points to version 7, which its version policy does not serve" in bad.stderr
    empty = tmp_path / "empty.config"
    empty.write_text("")
    r = run(empty, "--previous", old)
    assert r.returncode == 1 and "'sentiment_lstm' is served now but missing from the new config" in r.stderr


# -- version labels through real gateways, both backends ---------------------------------------------
@pytest.fixture(scope="module", params=["embedded", "tfserving"])
def labelled(request, two_versions, tmp_path_factory):  # noqa: F811
    config = tmp_path_factory.mktemp("config") / "models.config"
    config.write_text(config_text(stable=1, canary=2))
    common = dict(model_base_path=two_versions, models='["sentiment_lstm"]', models_config_file=config, drain_settle_s=0)
    if request.param == "embedded":
        with gateway_process(**common) as gw:
            gw.config = config
            yield gw
        return
    standin = StandIn(two_versions, ["sentiment_lstm"])
    standin.start()
    try:
        with gateway_process(WITHOUT_TENSORFLOW, backend="tfserving", tfserving_address=standin.address,
                             tfserving_poll_s=0.1, **common) as gw:
            gw.config = config
            yield gw
    finally:
        standin.stop()


def predict(gw, **body):
    return httpx.post(gw.rest + "/v1/sentiment:predict", json={"texts": [TEXT], **body}, timeout=30)


def served_version(gw, **body) -> int:
    r = predict(gw, **body)
    assert r.status_code == 200, r.text
    return r.json()["model"]["version"]


def move_labels(gw, stable: int, canary: int) -> None:
    gw.config.write_text(config_text(stable, canary))
    now = time.time_ns()
    os.utime(gw.config, ns=(now, now + 5 * 10**9))  # a distinct mtime even within one clock tick


def test_labels_choose_the_version_and_stable_is_the_default(labelled):
    models = {m["name"]: m for m in httpx.get(labelled.rest + "/v1/models").json()["models"]}
    lstm = models["sentiment_lstm"]
    assert lstm["labels"] == {"stable": 1, "canary": 2} and lstm["default_version"] == 1
    assert {v["version"]: v["labels"] for v in lstm["versions"]} == {1: ["stable"], 2: ["canary"]}
    assert served_version(labelled) == 1  # stable, although 2 is newer
    assert served_version(labelled, version_label="canary") == 2
    assert served_version(labelled, version_label="stable") == 1
    assert served_version(labelled, version=2) == 2
    with grpc.insecure_channel(labelled.grpc) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        assert stub.ClassifySentiment(pb.SentimentRequest(texts=[TEXT], version_label="canary")).model.version == 2
        assert stub.ClassifySentiment(pb.SentimentRequest(texts=[TEXT])).model.version == 1
        with pytest.raises(grpc.RpcError) as e:
            stub.ClassifySentiment(pb.SentimentRequest(texts=[TEXT], version_label="beta"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    r = predict(labelled, version_label="beta")
    assert r.status_code == 404 and r.json()["error"]["message"] == (
        "model 'sentiment_lstm' has no version label 'beta'; labels: ['canary', 'stable']")
    r = predict(labelled, version=1, version_label="canary")
    assert r.status_code == 400 and "give version or version_label, not both" in r.json()["error"]["message"]


def test_promote_and_roll_back_by_moving_the_stable_label(labelled):
    try:
        move_labels(labelled, stable=2, canary=2)  # promote
        wait_until(lambda: served_version(labelled) == 2, 10)
        move_labels(labelled, stable=1, canary=2)  # roll back
        wait_until(lambda: served_version(labelled) == 1, 10)
    finally:
        move_labels(labelled, stable=1, canary=2)


# -- several TF Serving servers behind one address -------------------------------------------------------
def test_calls_are_spread_over_every_tf_serving_and_survive_one_leaving():
    models = ROOT / "models"
    a, b = StandIn(models, ["sentiment_lstm"]), StandIn(models, ["sentiment_lstm"])
    a.start()
    b.start()
    try:
        address = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"  # what dns:///tfserving-headless resolves to
        with gateway_process(WITHOUT_TENSORFLOW, backend="tfserving", tfserving_address=address,
                             models='["sentiment_lstm"]', max_batch_wait_us=0, drain_settle_s=0) as gw:
            with httpx.Client(base_url=gw.rest, timeout=30) as c:
                for _ in range(20):
                    assert c.post("/v1/sentiment:predict", json={"texts": [TEXT]}).status_code == 200
                assert len(a.calls) >= 5 and len(b.calls) >= 5, (len(a.calls), len(b.calls))
                a.stop()
                before = len(b.calls)
                statuses = [c.post("/v1/sentiment:predict", json={"texts": [TEXT]}).status_code for _ in range(20)]
                assert statuses == [200] * 20
                assert len(b.calls) - before >= 20  # b took every call (retries included)
    finally:
        a.stop()
        b.stop()


def test_tf_serving_recycling_connections_costs_no_request():
    """TF Serving runs with --grpc_channel_arguments=grpc.max_connection_age_ms=300000 (compose and k8s) so that
    gateways re-resolve DNS and find new pods; each recycled connection (GOAWAY) must cost no client error."""
    standin = StandIn(ROOT / "models", ["sentiment_lstm"])
    standin.start(options=[("grpc.max_connection_age_ms", 300), ("grpc.max_connection_age_grace_ms", 1000)])
    try:
        with gateway_process(WITHOUT_TENSORFLOW, backend="tfserving", tfserving_address=standin.address,
                             models='["sentiment_lstm"]', max_batch_wait_us=0, drain_settle_s=0) as gw:
            deadline = time.monotonic() + 3  # about ten connection lifetimes
            statuses = []
            with httpx.Client(base_url=gw.rest, timeout=30) as c:
                while time.monotonic() < deadline:
                    statuses.append(c.post("/v1/sentiment:predict", json={"texts": [TEXT]}).status_code)
            assert len(statuses) > 20 and set(statuses) == {200}, statuses
    finally:
        standin.stop()
