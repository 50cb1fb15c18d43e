"""The whole deployment on this machine (stage/): 2 gateways x 2 model servers behind nginx, with
Prometheus scraping all of them and deploy/alerts.yml loaded (time-scaled 20x: ``for: 10m`` is
30 s), under load from real REST and gRPC clients going through nginx, while processes are stopped
and killed, a version rolls out and the load crosses capacity.

Scenarios (issue 24), one stage shared in this order:
  1. steady light load (Locust, loadtests/, REST and gRPC users): loadtests/slo.toml holds, every
     process is scraped (up == 1), no alert fires;
  2. SIGTERM one gateway under load (a rolling update): 0 failed requests (nginx skips the closed
     listeners; the gateway's drain finishes what it took);
  3. SIGKILL one model server under load, restart it: 0 failed requests (round_robin skips it; a
     call it fails with UNAVAILABLE is retried by the gateway, on the other one); ModelServerDown
     fires and resolves; the restarted server takes work again;
  4. ramp past capacity: 429 + Retry-After through nginx, goodput >= 0.8 of the stage's capacity
     (measured first, same stage), LoadShedding fires (ModelSaturated reported), then both resolve;
  5. a rollout under load with scripts/rollout.sh on the stage's models.config (add version ->
     canary -> traffic -> promote -> remove the old one): 0 failed requests, every gateway ends
     serving the new stable;
  6. a broken models.config written mid-run: nothing changes for clients, ModelConfigReloadRejected
     fires, and resolves once the file is good again.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest

from stage.cluster import Stage
from stage.load import Load
from testkit import prometheus
from testkit.gateway import ROOT

pytestmark = [
    pytest.mark.stage,
    pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (make test-tools installs it)"),
    pytest.mark.skipif(not prometheus.available(), reason=prometheus.MISSING),
]
MODEL = "sentiment_lstm"
TIME_SCALE = 20


def wait_for(predicate, timeout: float, what: str, every: float = 0.5, explain=lambda: ""):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout:g} s: {what} {explain()}")


def alert_states(stage: Stage) -> str:
    """What the ramp's alerts read, for a failure message."""
    q = stage.prometheus.query
    return (f"alerts {[(r['metric']['alertname'], r['metric']['alertstate']) for r in q('ALERTS')]}; busy "
            f"{[r['value'][1] for r in q('sum by (instance) (rate(classifier_batch_busy_seconds_total[15s])) / sum by (instance) (classifier_batch_slots)')]}; "
            f"refusals/s {[r['value'][1] for r in q('sum by (instance) (rate(classifier_refusals_total[15s]))')]}")


def firing(stage: Stage) -> set[str]:
    return {r["metric"]["alertname"] for r in stage.prometheus.query('ALERTS{alertstate="firing"}')}


def up(stage: Stage) -> dict[str, float]:
    return {r["metric"]["instance"]: float(r["value"][1]) for r in stage.prometheus.query("up")}


def no_failures(stage: Stage, load: Load) -> str:
    """The assertion message: the first failures and the tail of nginx's error log."""
    errors = (stage.nginx.log.parent / "error.log") if stage.nginx else None
    tail = errors.read_text(errors="replace").splitlines()[-8:] if errors and errors.exists() else []
    return f"{len(load.failures)} failed: {load.failures[:5]}; nginx error.log: {tail}"


def rollout(stage: Stage, *args: str) -> str:
    env = {**os.environ, "MODELS_CONFIG": str(stage.models_config), "TRAFFIC_FILE": str(stage.traffic_file),
           "GATEWAY_URL": " ".join(f"http://127.0.0.1:{g.ports['rest']}" for g in stage.gateways),
           "POLL_SECONDS": "0.5"}
    r = subprocess.run([str(ROOT / "scripts" / "rollout.sh"), *args], env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, f"rollout.sh {' '.join(args)}: {r.stdout}{r.stderr}"
    return r.stdout


def served_versions(stage: Stage, n: int = 20) -> dict[str, Counter]:
    """The versions each gateway serves to requests that name none (direct, not through nginx)."""
    out = {}
    for g in stage.gateways:
        with httpx.Client(base_url=f"http://127.0.0.1:{g.ports['rest']}", timeout=30) as c:
            out[g.name] = Counter(c.post("/v1/sentiment:predict", json={"texts": ["fine"]}).json()["model"]["version"]
                                  for _ in range(n))
    return out


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    with Stage(gateways=2, model_servers=2, models=[MODEL, "digits"], workdir=tmp_path_factory.mktemp("stage"),
               alert_time_scale=TIME_SCALE) as st:
        yield st


def test_1_steady_load_meets_the_slo_everything_scraped_no_alert(stage, data_dir, tmp_path):
    """Locust (loadtests/locustfile.py, REST and gRPC users, every request type) through nginx for
    10 s at a light load, with loadtests/slo.toml: it exits 0 only when no request failed and every
    objective is met."""
    wait_for(lambda: len(up(stage)) == 4, 30, "Prometheus scrapes all four processes")
    r = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
         "-u", "6", "-r", "6", "-t", "10s", "--stop-timeout", "10", "--host", stage.rest, "--grpc-host", stage.grpc,
         "--data-dir", str(data_dir), "--sentiment-models", MODEL, "--slo-file", str(ROOT / "loadtests" / "slo.toml"),
         "--csv", str(tmp_path / "steady"), "--only-summary", "--loglevel", "WARNING"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert r.returncode == 0 and "all met" in r.stdout, output
    with open(tmp_path / "steady_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows.pop("Aggregated")
    assert int(total["Request Count"]) > 50 and int(total["Failure Count"]) == 0, output
    print(f"\nscenario 1: Locust, 6 users, 10 s: {total['Request Count']} requests, 0 failed, p50 "
          f"{total['50%']} ms, p99 {total['99%']} ms; " + ", ".join(f"{k} {v['Request Count']}" for k, v in rows.items()))
    assert {"sentiment x1", "ClassifySentiment x1", "StreamClassifySentiment 4x8", "digits x1"} <= set(rows), rows
    targets = up(stage)
    assert len(targets) == 4 and set(targets.values()) == {1.0}, targets
    assert firing(stage) == set()
    # Both model servers took work (round_robin over the two), through both gateways.
    served = stage.prometheus.query('sum by (instance) (tfserving_standin_predict_total{status="OK"})')
    assert len(served) == 2, served
    answered = stage.prometheus.query('sum by (instance) (classifier_requests_total{outcome="ok"})')
    assert len([r for r in answered if float(r["value"][1]) > 0]) == 2, answered


def test_2_sigterm_one_gateway_under_load_fails_nothing(stage):
    gw = stage.gateways[0]
    with Load(stage, rest=[1, 1, 32], grpc_clients=2) as load:
        time.sleep(2)
        before = load.answered
        gw.signal(signal.SIGTERM)
        assert gw.wait(60) == 0, gw.tail()
        time.sleep(3)
        after = load.answered
        stage.restart(gw)
        time.sleep(2)
    assert load.failures == [], no_failures(stage, load)
    assert after > before + 10, (before, after)  # the load went on through the other gateway
    # Out of nginx's rotation while it drained (readiness 503 within drain_settle_s), back once ready.
    ready = [names for _, names in stage.endpoints.changes]
    assert [g.name for g in stage.gateways if g is not gw] in ready, ready
    assert ready[-1] == [g.name for g in stage.gateways], ready


def test_3_sigkill_one_model_server_under_load_fails_nothing_and_alerts(stage):
    ms = stage.model_servers[0]
    instance = f"127.0.0.1:{ms.ports['metrics']}"
    with Load(stage, rate=4) as load:
        time.sleep(2)
        killed = time.monotonic()
        ms.signal(signal.SIGKILL)
        wait_for(lambda: "ModelServerDown" in firing(stage), 60, "ModelServerDown fires")
        fired = time.monotonic() - killed
        time.sleep(3)
        restarted = time.monotonic()
        stage.restart(ms)
        wait_for(lambda: "ModelServerDown" not in firing(stage), 60, "ModelServerDown resolves")
        # Recovery: the restarted server answers predictions again (gRPC reconnects with backoff).
        wait_for(lambda: stage.prometheus.value(
            f'sum(tfserving_standin_predict_total{{instance="{instance}", status="OK"}})') or 0, 120,
            "the restarted model server takes work again")
        recovered = time.monotonic() - restarted
    print(f"\nscenario 3: ModelServerDown fired {fired:.1f} s after the kill (for: 1m / {TIME_SCALE}); the model "
          f"server took work {recovered:.1f} s after its restart; {load.answered} answered, {len(load.failures)} failed")
    assert load.failures == [], no_failures(stage, load)


def test_4_past_capacity_refuses_with_retry_after_keeps_goodput_and_alerts(stage):
    # The stage's capacity: the best goodput of a few closed-loop steps up to the knee (8 clients
    # already see a few 429s here).
    capacity, steps = 0.0, {}
    for clients in (2, 4, 8):
        with Load(stage, rest=[64] * clients, grpc_clients=0, rate=0) as step:
            time.sleep(6)
        assert step.failures == [], no_failures(stage, step)
        steps[clients] = round(step.texts["all"] / step.seconds)
        capacity = max(capacity, steps[clients])
    with Load(stage, rest=[64] * 48, grpc_clients=4, rate=0) as load:
        t0 = time.monotonic()
        # LoadShedding (sustained refusals) must fire. ModelSaturated (busy slots) is reported, not
        # required: with the TF Serving backend the gateways' busy fraction swings (0.4-0.9 seen in CI
        # while shedding), so it fired in most runs here but stayed pending in one.
        wait_for(lambda: "LoadShedding" in firing(stage), 120, "LoadShedding fires",
                 explain=lambda: alert_states(stage))
        fired = time.monotonic() - t0
        with contextlib.suppress(AssertionError):  # reported below, not required
            wait_for(lambda: "ModelSaturated" in firing(stage), 30, "ModelSaturated fires")
        saturated = "firing" if "ModelSaturated" in firing(stage) else alert_states(stage)
        mark, texts_at_mark = time.monotonic(), load.texts["all"]
        time.sleep(10)
        goodput = (load.texts["all"] - texts_at_mark) / (time.monotonic() - mark)
    ended = time.monotonic()
    wait_for(lambda: not ({"ModelSaturated", "LoadShedding"} & firing(stage)), 120, "the alerts resolve")
    resolved = time.monotonic() - ended
    print(f"\nscenario 4: capacity {capacity:.0f} texts/s (steps: clients -> texts/s {steps}); 48 x 64-text REST + 4 gRPC clients: goodput "
          f"{goodput:.0f} texts/s = {goodput / capacity:.2f} x capacity; refused {dict(load.refused)}; LoadShedding "
          f"firing {fired:.0f} s into the ramp; ModelSaturated: {saturated}; resolved {resolved:.0f} s after it")
    assert load.failures == [], no_failures(stage, load)
    assert load.refused["REST 429"] > 0 and all(v.isdigit() and int(v) >= 1 for v in load.retry_after), load.retry_after[:5]
    assert goodput >= 0.8 * capacity, (goodput, capacity)


def test_5_rollout_under_load_fails_nothing_and_ends_on_the_new_stable(stage):
    assert {v for c in served_versions(stage, 5).values() for v in c} == {4}
    with Load(stage, rest=[1, 32], grpc_clients=1, rate=6) as load:
        rollout(stage, "add-version", MODEL, "3")
        rollout(stage, "wait", MODEL, "3", "60")
        rollout(stage, "canary", MODEL, "3")
        rollout(stage, "traffic", MODEL, "50")
        time.sleep(3)
        mixed = served_versions(stage)
        rollout(stage, "promote", MODEL)
        time.sleep(3)  # the gateways poll models.config and traffic.json every second
        rollout(stage, "remove-version", MODEL, "4")
        time.sleep(3)
    assert load.failures == [], no_failures(stage, load)
    assert all(set(c) <= {3, 4} for c in mixed.values()) and any(c[3] for c in mixed.values()), mixed
    final = served_versions(stage)
    assert all(c == Counter({3: 20}) for c in final.values()), final


def test_6_broken_models_config_changes_nothing_for_clients_and_alerts(stage):
    good = stage.models_config.read_text()
    with Load(stage, rest=[1, 32], grpc_clients=1, rate=6) as load:
        time.sleep(1)
        broken = stage.models_config.with_suffix(".tmp")
        broken.write_text(good.replace("model_config_list {", "model_config_list {{", 1))
        broken.replace(stage.models_config)
        wait_for(lambda: "ModelConfigReloadRejected" in firing(stage), 60, "ModelConfigReloadRejected fires")
        versions = served_versions(stage, 5)
        broken.write_text(good)
        broken.replace(stage.models_config)
        wait_for(lambda: "ModelConfigReloadRejected" not in firing(stage), 60, "ModelConfigReloadRejected resolves")
    assert load.failures == [], no_failures(stage, load)
    assert all(set(c) == {3} for c in versions.values()), versions
