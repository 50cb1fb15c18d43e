"""Safe rollouts through real gateways on both backends: models.config reloads that are validated,
readiness that tells the truth about default versions, the embedded backend following the version
policy without a restart, the weighted canary and shadow scoring of the traffic file.

The repository is a temporary one holding shipped SavedModels (sentiment_lstm 1, 3 and 4, linked);
each gateway reads its own copy of models.config and traffic.json, written here as an operator
(or scripts/rollout.sh) would: a temporary file renamed over the old one.
"""

from __future__ import annotations

import os
import re
import time
import uuid

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from testkit.gateway import ROOT, WITHOUT_TENSORFLOW, gateway_process, metric_samples, wait_until
from testkit.standin import StandIn

MODEL = "sentiment_lstm"
TEXT = "a wonderful film with a moving story and great acting"


def config_text(versions, stable, canary=None) -> str:
    specific = " ".join(f"versions: {v}" for v in versions)
    labels = f'version_labels {{ key: "stable" value: {stable} }}'
    if canary is not None:
        labels += f' version_labels {{ key: "canary" value: {canary} }}'
    return (f'model_config_list {{ config {{ name: "{MODEL}" base_path: "/models/{MODEL}" model_platform: "tensorflow" '
            f"model_version_policy {{ specific {{ {specific} }} }} {labels} }} }}\n")


def write_atomically(path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    base = tmp_path_factory.mktemp("repo")
    (base / MODEL).mkdir()
    for v in (1, 3, 4):
        (base / MODEL / str(v)).symlink_to(ROOT / "models" / MODEL / str(v))
    return base


class Deployment:
    """A gateway (and, for the TF Serving backend, a stand-in following the same models.config)."""

    def __init__(self, backend, repo, folder):
        self.backend, self.repo, self.folder = backend, repo, folder
        self.config, self.traffic = folder / "models.config", folder / "traffic.json"

    def write(self, versions, stable, canary=None, canary_percent=0, shadow_percent=0):
        if canary is not None or canary_percent or shadow_percent:
            write_atomically(self.traffic, f'{{"{MODEL}": {{"canary_percent": {canary_percent}, '
                                           f'"shadow_percent": {shadow_percent}}}}}\n')
        write_atomically(self.config, config_text(versions, stable, canary))

    def ready(self) -> httpx.Response:
        return httpx.get(self.gw.rest + "/readyz", timeout=5)


@pytest.fixture(scope="module", params=["embedded", "tfserving"])
def deployment(request, repo, tmp_path_factory):
    d = Deployment(request.param, repo, tmp_path_factory.mktemp(f"config-{request.param}"))
    d.write([1, 4], stable=1, canary=4)
    common = dict(model_base_path=repo, models=f'["{MODEL}"]', models_config_file=d.config,
                  models_config_poll_s=0.2, max_batch_wait_us=0)
    if request.param == "embedded":
        with gateway_process(**common) as gw, httpx.Client(base_url=gw.rest, timeout=30) as d.client:
            d.gw = gw
            yield d
        return
    standin = StandIn(repo, [MODEL], config=d.config)
    standin.follow(0.2)
    standin.start()
    try:
        with gateway_process(WITHOUT_TENSORFLOW, backend="tfserving", tfserving_address=standin.address,
                             tfserving_poll_s=0.2, **common) as gw, httpx.Client(base_url=gw.rest, timeout=30) as d.client:
            d.gw = gw
            yield d
    finally:
        standin.stop()


@pytest.fixture
def restore(deployment):
    yield deployment
    deployment.write([1, 4], stable=1, canary=4)
    wait_until(lambda: deployment.ready().status_code == 200 and served(deployment) == 1, 60)


def predict(d, key=None, **body) -> httpx.Response:
    headers = {"x-routing-key": key} if key else {}
    return d.client.post("/v1/sentiment:predict", json={"texts": [TEXT], **body}, headers=headers)


def served(d, key=None, **body) -> int:
    r = predict(d, key, **body)
    assert r.status_code == 200, r.text
    return r.json()["model"]["version"]


def grpc_health(d) -> int:
    with grpc.insecure_channel(d.gw.grpc) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


# -- 1. a label pointing at a version that is not loaded: not ready, with the reason ------------------
def test_a_default_version_that_is_not_loaded_makes_the_gateway_not_ready(restore):
    d = restore
    assert d.ready().status_code == 200
    wait_until(lambda: grpc_health(d) == health_pb2.HealthCheckResponse.SERVING, 5)
    d.write([1, 4, 5], stable=5, canary=4)  # valid (5 is in the policy), but there is no version 5 to load
    wait_until(lambda: d.ready().status_code == 503, 30)
    reason = d.ready().json()["error"]["message"]
    assert "model 'sentiment_lstm': its default version, the 'stable' label's version 5, is not loaded" in reason
    wait_until(lambda: grpc_health(d) == health_pb2.HealthCheckResponse.NOT_SERVING, 5)  # polled every 0.2 s
    assert metric_samples(d.gw)[("classifier_ready", ())] == 0
    r = predict(d)
    assert r.status_code == 503 and "points to version 5, which is not loaded" in r.json()["error"]["message"]
    assert served(d, version=4) == 4  # what is loaded still answers when asked for


# -- 3. (gateway side) a truncated or broken file is rejected, the previous one stays ---------------------
def test_a_broken_or_empty_models_config_changes_nothing_for_clients(restore):
    d = restore
    before = metric_samples(d.gw).get(
        ("classifier_model_config_reloads_total", (("file", "models_config"), ("outcome", "rejected"))), 0)
    for broken in ("", "model_config_list { config { name: ", config_text([1, 4], stable=3)):
        write_atomically(d.config, broken)
        wait_until(lambda: metric_samples(d.gw)[("classifier_model_config_valid", (("file", "models_config"),))] == 0, 30)
        assert [served(d, key=str(k)) for k in range(20)] == [1] * 20  # the canary (newest) gets nothing
        assert d.ready().status_code == 200
        d.write([1, 4], stable=1, canary=4)
        wait_until(lambda: metric_samples(d.gw)[("classifier_model_config_valid", (("file", "models_config"),))] == 1, 30)
    samples = metric_samples(d.gw)
    rejected = samples[("classifier_model_config_reloads_total", (("file", "models_config"), ("outcome", "rejected")))]
    assert rejected - before == 3
    assert samples[("classifier_model_config_last_reload_success_timestamp_seconds", (("file", "models_config"),))] > time.time() - 60
    log = d.gw.log_path.read_text() if d.gw.log_path else ""
    assert "models_config" in log and "rejected, the previous one stays" in log and "'stable' points to version 3" in log


# -- 5. the weighted canary and shadow scoring -------------------------------------------------------
def test_weighted_canary_splits_by_routing_key_and_shadow_scores(restore):
    d = restore
    d.write([1, 4], stable=1, canary=4, canary_percent=25, shadow_percent=100)
    wait_until(lambda: httpx.get(d.gw.rest + "/v1/models").json()["models"][0]["traffic"]["canary_percent"] == 25, 30)
    keys = [f"user-{i}" for i in range(400)]
    first = {k: served(d, key=k) for k in keys}
    share = sum(v == 4 for v in first.values()) / len(keys)
    assert abs(share - 0.25) < 0.065, share  # 3 standard deviations of 400 draws
    assert all(served(d, key=k) == first[k] for k in keys[:40])  # a key keeps its version
    assert served(d, version_label="stable") == 1 and served(d, version=1) == 1  # named versions are not split
    with grpc.insecure_channel(d.gw.grpc) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        got = {k: stub.ClassifySentiment(pb.SentimentRequest(texts=[TEXT]), metadata=(("x-routing-key", k),)).model.version
               for k in keys[:40]}
    assert got == {k: first[k] for k in keys[:40]}  # the same split over gRPC
    models = httpx.get(d.gw.rest + "/v1/models").json()["models"][0]
    assert models["traffic"] == {"canary_percent": 25.0, "configured_canary_percent": 25.0, "shadow_percent": 100.0,
                                 "canary_version": 4}

    def shadow_items():
        s = metric_samples(d.gw)
        return sum(v for (name, labels), v in s.items() if name == "classifier_shadow_items_total")

    wait_until(lambda: shadow_items() > 0, 30)
    s = metric_samples(d.gw)
    by_version = {dict(lb)["version"]: v for (name, lb), v in s.items()
                  if name == "classifier_requests_total" and dict(lb)["endpoint"] == "/v1/sentiment:predict"
                  and dict(lb)["outcome"] == "ok"}
    assert by_version["4"] >= sum(v == 4 for v in first.values()) and by_version["1"] >= 300
    shadow_labels = {(dict(lb)["version"], dict(lb)["label"]): v for (name, lb), v in s.items()
                     if name == "classifier_shadow_labels_total"}
    assert {v for v, _ in shadow_labels} == {"1", "4"}
    assert s[("classifier_model_version_label", (("label", "canary"), ("model", MODEL), ("version", "4")))] == 1
    assert s[("classifier_canary_percent", (("model", MODEL),))] == 25
    scored = s[("classifier_shadow_requests_total", (("model", MODEL), ("outcome", "scored")))]
    items = shadow_items()
    assert scored >= 1 and items >= scored
    assert 0 <= s[("classifier_shadow_probability_abs_diff_total", (("model", MODEL),))] / items <= 1


def test_the_canary_gets_nothing_until_it_is_available(restore):
    d = restore
    d.write([1, 4, 5], stable=1, canary=5, canary_percent=100)  # no version 5 on disk
    wait_until(lambda: httpx.get(d.gw.rest + "/v1/models").json()["models"][0]["labels"].get("canary") == 5, 30)
    assert {served(d, key=str(k)) for k in range(20)} == {1}
    assert d.ready().status_code == 200  # the canary is not the default


# -- 2. the embedded backend follows the version policy -------------------------------------------------
def rss_mb(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def test_versions_added_to_the_policy_are_loaded_and_removed_ones_unloaded(restore):
    d = restore

    def state(version):
        versions = {v["version"]: v["state"] for v in httpx.get(d.gw.rest + "/v1/models").json()["models"][0]["versions"]}
        return versions.get(version)

    assert predict(d, version=3).status_code == 404
    rss = []
    for cycle in range(3 if d.backend == "embedded" else 1):
        d.write([1, 3, 4], stable=1, canary=4)
        wait_until(lambda: state(3) == "AVAILABLE", 60)
        assert served(d, version=3) == 3
        d.write([1, 4], stable=1, canary=4)
        wait_until(lambda: state(3) is None, 60)
        r = predict(d, version=3)
        assert r.status_code == 404 and "has no version 3; loaded versions: [1, 4]" in r.json()["error"]["message"]
        rss.append(rss_mb(d.gw.process.pid))
    if d.backend == "embedded":
        log = d.gw.log_path.read_text() if d.gw.log_path else ""
        assert "loaded sentiment_lstm/3" in log and "unloaded sentiment_lstm/3" in log
        print(f"gateway RSS after each add/remove cycle of sentiment_lstm v3: {[round(x) for x in rss]} MB")
        assert rss[-1] - rss[0] < 100, rss  # no version's memory kept per cycle


def test_an_invalid_models_config_at_start_keeps_the_gateway_unready_until_fixed(repo, tmp_path):
    config = tmp_path / "models.config"
    config.write_text(config_text([1, 4], stable=3))  # a label outside the policy: TF Serving would not start
    with gateway_process(WITHOUT_TENSORFLOW, wait_ready=False, backend="tfserving", tfserving_address="127.0.0.1:1",
                         model_base_path=repo, models=f'["{MODEL}"]', models_config_file=config,
                         models_config_poll_s=0.2) as gw:
        def reason():
            r = httpx.get(gw.rest + "/readyz", timeout=5)
            return r.status_code == 503 and r.json()["error"]["message"]

        # (the first answers may name the backend's first poll, still under way)
        expected = "label 'stable' points to version 3, which its version policy does not serve"
        assert expected in wait_until(lambda: expected in (reason() or "") and reason(), 30)
        samples = metric_samples(gw)
        assert samples[("classifier_model_config_valid", (("file", "models_config"),))] == 0
        assert samples[("classifier_model_config_reloads_total", (("file", "models_config"), ("outcome", "rejected")))] == 1
        config.write_text(config_text([1, 4], stable=1))  # fixed: now the (absent) TF Serving is what is missing
        assert "TF Serving at 127.0.0.1:1" in wait_until(lambda: "TF Serving" in (reason() or "") and reason(), 30)
        assert metric_samples(gw)[("classifier_model_config_valid", (("file", "models_config"),))] == 1


def test_shadow_work_is_skipped_while_real_rows_wait(repo, tmp_path):
    """Shadow scoring is the first work shed: a default request answered while another request's rows
    wait for the model gets no shadow score; once nothing waits, the next one does."""
    import threading

    from serving.settings import Settings
    from testkit.gateway import gateway_in_thread
    from tests.serving.test_gateway_lifecycle import HeldBackend

    config, traffic = tmp_path / "models.config", tmp_path / "traffic.json"
    config.write_text(config_text([1, 4], stable=1, canary=4))
    traffic.write_text(f'{{"{MODEL}": {{"shadow_percent": 100}}}}')
    settings = Settings(models=[MODEL], model_base_path=repo, models_config_file=config, max_batch_wait_us=0,
                        max_concurrent_batches=1, tf_intra_op_threads=0)
    backend = HeldBackend(settings)
    backend.may_load.set()
    with gateway_in_thread(settings, backend) as gw, httpx.Client(base_url=gw.rest, timeout=30) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 60)

        def shadow(outcome):
            return metric_samples(gw).get(("classifier_shadow_requests_total", (("model", MODEL), ("outcome", outcome))), 0)

        assert c.post("/v1/sentiment:predict", json={"texts": [TEXT]}).status_code == 200
        wait_until(lambda: shadow("scored") == 1, 10)
        backend.may_predict.clear()
        calls = backend.calls
        answers = []
        first = threading.Thread(target=lambda: answers.append(c.post("/v1/sentiment:predict", json={"texts": [TEXT]})))
        first.start()
        wait_until(lambda: backend.calls == calls + 1, 10)  # the first request's batch is in the model
        second = threading.Thread(target=lambda: answers.append(
            httpx.post(gw.rest + "/v1/sentiment:predict", json={"texts": [TEXT] * 3}, timeout=30)))
        second.start()
        wait_until(lambda: metric_samples(gw)[("classifier_queue_rows", (("model", MODEL),))] == 4, 10)  # 3 wait
        backend.may_predict.set()
        first.join(30)
        second.join(30)
        assert [a.status_code for a in answers] == [200, 200]
        wait_until(lambda: shadow("skipped") >= 1 and shadow("scored") == 2, 10)  # the first skipped, the second scored
        assert shadow("failed") == 0
