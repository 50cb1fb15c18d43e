"""A whole rollout under continuous load, on both backends, driven by scripts/rollout.sh as an operator
would: add version 4 -> wait until AVAILABLE -> canary 4 -> 10 % of default traffic -> 50 % (with
shadow scoring) -> analyze (a real Prometheus scraping the gateway) -> promote -> remove version 1.

REST and gRPC clients send requests without a version the whole time, each with a fresh routing key.
Done when: 0 failed requests, and in each phase the share of requests served by the canary matches its
configured weight within 4 standard deviations of a binomial draw of that phase's size (plus 3 points
for the requests that straddle a change of the traffic file, which each gateway sees within its poll).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict

import grpc
import httpx
import pytest

from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from testkit import prometheus
from testkit.gateway import ROOT, WITHOUT_TENSORFLOW, gateway_process, wait_until
from testkit.standin import StandIn

pytestmark = pytest.mark.slow
MODEL = "sentiment_lstm"
TEXTS = ["a wonderful film with a moving story", "dull, predictable and far too long"]
SCRIPT = ROOT / "scripts" / "rollout.sh"


def initial_config() -> str:
    return (f'model_config_list {{\n  config {{\n    name: "{MODEL}"\n    base_path: "/models/{MODEL}"\n'
            f'    model_platform: "tensorflow"\n    model_version_policy {{ specific {{ versions: 1 }} }}\n'
            f'    version_labels {{ key: "stable" value: 1 }}\n  }}\n}}\n')


class Load:
    """REST and gRPC clients in threads; every answer recorded under the phase it was sent in."""

    def __init__(self, gw):
        self.gw, self.phase = gw, "start"
        self.served: dict[str, Counter] = defaultdict(Counter)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._rest, daemon=True), threading.Thread(target=self._grpc, daemon=True)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _record(self, phase, version=None, failure=None):
        if failure:
            self.failures.append(f"{phase}: {failure}")
        else:
            self.served[phase][version] += 1

    def _rest(self):
        with httpx.Client(base_url=self.gw.rest, timeout=30) as c:
            while not self._stop.is_set():
                phase = self.phase
                try:
                    r = c.post("/v1/sentiment:predict", json={"texts": TEXTS}, headers={"x-routing-key": uuid.uuid4().hex})
                    if r.status_code == 200:
                        self._record(phase, r.json()["model"]["version"])
                    else:
                        self._record(phase, failure=f"REST {r.status_code} {r.text[:200]}")
                except httpx.HTTPError as e:
                    self._record(phase, failure=f"REST {type(e).__name__}: {e}")

    def _grpc(self):
        with grpc.insecure_channel(self.gw.grpc) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            while not self._stop.is_set():
                phase = self.phase
                try:
                    r = stub.ClassifySentiment(pb.SentimentRequest(texts=TEXTS), timeout=30,
                                               metadata=(("x-routing-key", uuid.uuid4().hex),))
                    self._record(phase, r.model.version)
                except grpc.RpcError as e:
                    self._record(phase, failure=f"gRPC {e.code().name}: {e.details()}")

    def run_phase(self, name: str, seconds: float) -> Counter:
        self.phase = name
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.05)
        self.phase = f"after {name}"
        return self.served[name]


@pytest.fixture(params=["embedded", "tfserving"])
def stage(request, tmp_path):
    folder = tmp_path / "config"
    folder.mkdir()
    repo = tmp_path / "models"
    (repo / MODEL).mkdir(parents=True)
    for v in (1, 4):
        (repo / MODEL / str(v)).symlink_to(ROOT / "models" / MODEL / str(v))
    config, traffic = folder / "models.config", folder / "traffic.json"
    config.write_text(initial_config())
    traffic.write_text("{}\n")
    common = dict(model_base_path=repo, models=f'["{MODEL}"]', models_config_file=config, models_config_poll_s=0.2,
                  max_batch_wait_us=0)
    standin = None
    try:
        if request.param == "tfserving":
            standin = StandIn(repo, [MODEL], config=config)
            standin.follow(0.2)
            standin.start()
            gw_cm = gateway_process(WITHOUT_TENSORFLOW, backend="tfserving", tfserving_address=standin.address,
                                    tfserving_poll_s=0.2, **common)
        else:
            gw_cm = gateway_process(**common)
        with gw_cm as gw:
            gw.config, gw.traffic, gw.backend = config, traffic, request.param
            yield gw
    finally:
        if standin:
            standin.stop()


def rollout(gw, *args, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "MODELS_CONFIG": str(gw.config), "TRAFFIC_FILE": str(gw.traffic), "GATEWAY_URL": gw.rest,
           "PYTHON": sys.executable, "PROMETHEUS_URL": getattr(gw, "prometheus_url", "")}
    r = subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env, timeout=180)
    if check:
        assert r.returncode == 0, f"rollout.sh {' '.join(map(str, args))}: {r.stdout}\n{r.stderr}"
    return r


def applied(gw, percent) -> bool:
    return httpx.get(gw.rest + "/v1/models", timeout=5).json()["models"][0]["traffic"]["canary_percent"] == percent


def within(counter: Counter, canary: int, percent: float) -> tuple[bool, str]:
    n = sum(counter.values())
    share = counter[canary] / n if n else 0.0
    p = percent / 100
    tolerance = 4 * (p * (1 - p) / max(n, 1)) ** 0.5 + 0.03
    return abs(share - p) <= tolerance, f"{counter[canary]}/{n} = {share:.3f} vs {p:.2f} +- {tolerance:.3f}"


@pytest.mark.skipif(not prometheus.available(), reason="prometheus is not installed (Debian: apt-get install prometheus)")
def test_add_canary_split_analyze_promote_remove_under_load(stage):
    gw = stage
    shares = {}
    with prometheus.PrometheusServer([gw.rest.removeprefix("http://")]) as prom, Load(gw) as load:
        gw.prometheus_url = prom.url
        load.run_phase("v1 only", 1.0)
        rollout(gw, "add-version", MODEL, 4)
        rollout(gw, "wait", MODEL, 4, 60)
        rollout(gw, "canary", MODEL, 4)
        for percent in (10, 50):
            rollout(gw, "traffic", MODEL, percent)
            if percent == 50:
                rollout(gw, "shadow", MODEL, 100)
            wait_until(lambda: applied(gw, percent), 30)
            counter = load.run_phase(f"{percent}%", 6.0)
            shares[percent] = within(counter, 4, percent)
        prom.wait_for_scrape(after=time.time())
        verdict = rollout(gw, "analyze", MODEL, "--window", "30s", "--prometheus", prom.url,
                          "--max-p99-ratio", "10", "--min-agreement", "0.5", "--max-label-share-delta", "0.5",
                          check=False)
        assert verdict.returncode == 0 and "PROMOTE" in verdict.stdout, verdict.stdout + verdict.stderr
        rollout(gw, "promote", MODEL)
        wait_until(lambda: applied(gw, 0) and httpx.get(gw.rest + "/v1/models").json()["models"][0]["default_version"] == 4, 30)
        rollout(gw, "remove-version", MODEL, 1)
        wait_until(lambda: [v["version"] for v in httpx.get(gw.rest + "/v1/models").json()["models"][0]["versions"]] == [4], 30)
        after = load.run_phase("promoted", 2.0)
    assert load.failures == [], load.failures[:10]
    for percent, (ok, how) in shares.items():
        assert ok, f"{percent}%: {how}"
    assert set(after) == {4} and set(load.served["v1 only"]) == {1}
    print(f"\n{gw.backend}: " + "; ".join(f"{p}%: {how}" for p, (_, how) in shares.items())
          + f"; requests: {sum(sum(c.values()) for c in load.served.values())}, failed: 0")
