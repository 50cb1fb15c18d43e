"""The stage: real processes on loopback, started and stopped together.

- N model servers (stage/model_server.py), each reading the shared models/ and the stage's own
  models.config (a copy, in ``workdir/config/``, so that scripts/rollout.sh can edit it with
  ``MODELS_CONFIG``);
- M gateways (``python -m serving`` without TensorFlow, as the lean image runs it) with the
  TF Serving backend and ``round_robin`` over every model server (one gRPC target that lists
  them all, as the headless Service's DNS name does in k8s), reading the same models.config;
- nginx in front of the gateways (stage/nginx.py: the Ingress annotations' limits, timeouts and
  retry policy) for REST and gRPC, routing to the gateways whose readiness passes
  (:class:`Endpoints`: the Endpoints controller's part, as ingress-nginx follows a Service's
  ready endpoints), so a gateway that drains or restarts leaves and rejoins the rotation;
- Prometheus scraping every process with deploy/prometheus.yml's jobs (gateway, tfserving; the
  targets are the stage's) and deploy/alerts.yml's rules; with ``alert_time_scale`` S > 1 every
  range window and ``for:`` of those rules is divided by S (the tests use 20: ``for: 10m`` is 30 s,
  ``[5m]`` 15 s), so that an alert meant to fire after minutes fires within a test.

Every child runs in its own session (a Ctrl-C in the terminal reaches only the stage, which then
stops them in order: nginx, gateways (drained), model servers, Prometheus) and is told by the
kernel to stop if the stage itself dies (PR_SET_PDEATHSIG), so no process is left behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from serving.model_config import ModelsConfig
from stage import nginx
from testkit.gateway import WITHOUT_TENSORFLOW, free_port
from testkit.prometheus import MISSING as NO_PROMETHEUS, BINARY as PROMETHEUS_BINARY, PrometheusServer

ROOT = Path(__file__).resolve().parent.parent
MODELS_CONFIG = ROOT / "serving" / "tfserving" / "models.config"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus.yml"
ALERTS_YML = ROOT / "deploy" / "alerts.yml"
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # in the child, before exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Proc:
    """One child process of the stage."""

    name: str
    command: list[str]
    env: dict[str, str]
    log: Path
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    def start(self) -> Proc:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(self.command, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            self.process.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout) if self.process else None
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.alive:
            self.process.terminate()
        self.wait(timeout)

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _wait(what: str, ready, proc: Proc | None, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and not proc.alive:
            raise RuntimeError(f"{what} exited ({proc.process.returncode}):\n{proc.tail()}")
        try:
            if ready():
                return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready within {timeout:g} s" + (f":\n{proc.tail()}" if proc else ""))


def _accepts(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def stage_models_config(models: list[str], source: Path = MODELS_CONFIG) -> str:
    """A models.config serving ``models`` with the policies and labels ``source`` gives them."""
    config = ModelsConfig(source)
    blocks = []
    for name in models:
        p = config.policy(name)
        policy = ("specific { " + " ".join(f"versions: {v}" for v in p.specific) + " }" if p.specific
                  else "all {}" if p.all else f"latest {{ num_versions: {p.latest or 1} }}")
        labels = "".join(f'\n    version_labels {{ key: "{k}" value: {v} }}' for k, v in sorted(p.labels.items()))
        blocks.append(f'  config {{\n    name: "{name}"\n    base_path: "/models/{name}"\n'
                      f'    model_platform: "tensorflow"\n    model_version_policy {{ {policy} }}{labels}\n  }}\n')
    return "model_config_list {\n" + "".join(blocks) + "}\n"


_DURATION = re.compile(r"\[(\d+)([smh])\]|(for: )(\d+)([smh])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600}


def scaled_rules(text: str, scale: float, min_window_s: float = 5.0) -> str:
    """Alerting rules with every range window (``[5m]``) and every ``for:`` divided by ``scale``
    (windows no shorter than ``min_window_s``: a rate needs a few scrapes); 1: unchanged."""
    if scale == 1:
        return text

    def shorter(m: re.Match) -> str:
        if m.group(1):  # a range window
            seconds = max(min_window_s, int(m.group(1)) * _UNIT_S[m.group(2)] / scale)
            return f"[{round(seconds * 1000)}ms]"  # Prometheus durations are whole numbers of a unit
        return f"for: {round(int(m.group(4)) * _UNIT_S[m.group(5)] / scale * 1000)}ms"

    return _DURATION.sub(shorter, text)


class StagePrometheus(PrometheusServer):
    """Prometheus with deploy/prometheus.yml's jobs (names and metrics paths), the stage's targets
    for each, the alerting rules ``rules`` (deploy/alerts.yml, or its time-scaled copy), and a
    short scrape and evaluation interval."""

    popen_options = {"start_new_session": True, "preexec_fn": _die_with_parent}

    def __init__(self, jobs: dict[str, list[str]], scrape_interval: str, rules: Path, **kwargs):
        super().__init__(rule_files=[rules], scrape_interval=scrape_interval, **kwargs)
        self.jobs = jobs

    def config(self) -> dict:
        base = yaml.safe_load(PROMETHEUS_YML.read_text())
        scrape = []
        for job in base["scrape_configs"]:
            scrape.append({"job_name": job["job_name"], "metrics_path": job.get("metrics_path", "/metrics"),
                           "static_configs": [{"targets": self.jobs[job["job_name"]]}]})
        return {"global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval,
                           "scrape_timeout": self.scrape_interval},
                "rule_files": [str(p) for p in self.rule_files], "scrape_configs": scrape}


class Endpoints(threading.Thread):
    """The Endpoints controller's part in the stage: nginx routes to the gateways whose ``/readyz``
    passes. Each gateway is probed every ``period_s``; it leaves after ``failure_threshold`` failed
    probes in a row and comes back after one that passes (k8s/base/gateway.yaml's readinessProbe,
    faster); a change rewrites nginx.conf and reloads nginx (SIGHUP: new workers, the old ones finish
    what they have). With no gateway ready every one stays listed (nginx needs a server)."""

    def __init__(self, stage: Stage, period_s: float = 0.2, failure_threshold: int = 2):
        super().__init__(name="stage-endpoints", daemon=True)
        self.stage, self.period_s, self.failure_threshold = stage, period_s, failure_threshold
        self.ready = list(stage.gateways)
        self.changes: list[tuple[float, list[str]]] = []  # (time, the names of the ready gateways)
        self._failures = {g.name: 0 for g in stage.gateways}
        self._halt = threading.Event()

    def _probe(self, g: Proc) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{g.ports['rest']}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def run(self) -> None:
        while not self._halt.wait(self.period_s):
            ready = []
            for g in self.stage.gateways:
                ok = self._probe(g)
                self._failures[g.name] = 0 if ok else self._failures[g.name] + 1
                if ok or (g in self.ready and self._failures[g.name] < self.failure_threshold):
                    ready.append(g)
            if ready != self.ready:
                self.ready = ready
                self.changes.append((time.monotonic(), [g.name for g in ready]))
                self.stage._write_nginx_conf(ready or self.stage.gateways)
                self.stage.nginx.signal(signal.SIGHUP)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


class Stage:
    """M gateways x N model servers behind nginx, with Prometheus. ``with Stage(...) as st:``;
    ``st.rest`` / ``st.grpc`` are nginx's addresses, ``st.prometheus.url`` Prometheus's."""

    def __init__(self, gateways: int = 2, model_servers: int = 2, models: list[str] = ("sentiment_lstm",),
                 workdir: Path | None = None, scrape_interval: str = "1s", drain_settle_s: float = 1.0,
                 gateway_settings: dict | None = None, alert_time_scale: float = 1.0):
        self.n_gateways, self.n_model_servers, self.models = gateways, model_servers, list(models)
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="stage-")
        self.workdir = Path(workdir or self._tmp.name)
        self.scrape_interval, self.drain_settle_s = scrape_interval, drain_settle_s
        self.gateway_settings = gateway_settings or {}
        self.alert_time_scale = alert_time_scale
        self.model_servers: list[Proc] = []
        self.gateways: list[Proc] = []
        self.nginx: Proc | None = None
        self.endpoints: Endpoints | None = None
        self._nginx_ports: tuple[int, int] = (0, 0)
        self.prometheus: StagePrometheus | None = None
        self.rest = self.grpc = ""
        self.models_config = self.workdir / "config" / "models.config"
        self.traffic_file = self.models_config.parent / "traffic.json"

    # -- processes --------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLASSIFIER_")}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        return env

    def _model_server(self, i: int) -> Proc:
        port, metrics = free_port(), free_port()
        return Proc(f"model-server-{i}", [sys.executable, "-m", "stage.model_server", "--port", str(port),
                                          "--metrics-port", str(metrics), "--models-config", str(self.models_config)],
                    self._env(), self.workdir / f"model-server-{i}.log", {"grpc": port, "metrics": metrics})

    def _gateway(self, i: int, target: str) -> Proc:
        rest, grpc_port = free_port(), free_port()
        settings = {
            "host": "127.0.0.1", "rest_port": rest, "grpc_port": grpc_port, "backend": "tfserving",
            "tfserving_address": target, "tfserving_lb_policy": "round_robin", "tfserving_poll_s": 1.0,
            "models": json.dumps(self.models), "models_config_file": self.models_config,
            "model_base_path": ROOT / "models", "drain_settle_s": self.drain_settle_s, "access_log": "false",
            **self.gateway_settings,
        }
        env = self._env() | {f"CLASSIFIER_{k.upper()}": str(v) for k, v in settings.items()}
        return Proc(f"gateway-{i}", list(WITHOUT_TENSORFLOW), env, self.workdir / f"gateway-{i}.log",
                    {"rest": rest, "grpc": grpc_port})

    def start(self) -> Stage:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if not shutil.which("nginx"):
            raise RuntimeError("nginx is not installed (apt-get install nginx-light; `make test-tools` does it)")
        if not PROMETHEUS_BINARY:
            raise RuntimeError(NO_PROMETHEUS)
        self.models_config.parent.mkdir(parents=True, exist_ok=True)
        self.models_config.write_text(stage_models_config(self.models))
        self.traffic_file.write_text("{}\n")
        self.model_servers = [self._model_server(i).start() for i in range(self.n_model_servers)]
        target = "ipv4:" + ",".join(f"127.0.0.1:{m.ports['grpc']}" for m in self.model_servers)
        self.gateways = [self._gateway(i, target) for i in range(self.n_gateways)]
        rules = self.workdir / "alerts.yml"
        rules.write_text(scaled_rules(ALERTS_YML.read_text(), self.alert_time_scale))
        self.prometheus = StagePrometheus(
            {"gateway": [f"127.0.0.1:{g.ports['rest']}" for g in self.gateways],
             "tfserving": [f"127.0.0.1:{m.ports['metrics']}" for m in self.model_servers]},
            self.scrape_interval, rules).start()
        for m in self.model_servers:  # loading TensorFlow and the models: the slow part
            _wait(m.name, lambda m=m: _accepts(m.ports["grpc"]), m, 180)
        for g in self.gateways:
            g.start()
        for g in self.gateways:
            _wait(g.name, lambda g=g: httpx.get(f"http://127.0.0.1:{g.ports['rest']}/readyz", timeout=2).status_code == 200,
                  g, 120)
        self._start_nginx()

    def _write_nginx_conf(self, gateways: list[Proc]) -> Path:
        rest, grpc_port = self._nginx_ports
        prefix = self.workdir / "nginx"
        conf = prefix / "nginx.conf"
        tmp = conf.with_name("nginx.conf.tmp")
        tmp.write_text(nginx.render(rest, grpc_port, [f"127.0.0.1:{g.ports['rest']}" for g in gateways],
                                    [f"127.0.0.1:{g.ports['grpc']}" for g in gateways], prefix))
        os.replace(tmp, conf)
        return conf

    def _start_nginx(self) -> None:
        rest, grpc_port = self._nginx_ports = free_port(), free_port()
        prefix = self.workdir / "nginx"
        prefix.mkdir(exist_ok=True)
        conf = self._write_nginx_conf(self.gateways)
        self.nginx = Proc("nginx", ["nginx", "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"], self._env(),
                          prefix / "stdout.log", {"rest": rest, "grpc": grpc_port}).start()
        _wait("nginx", lambda: _accepts(rest) and _accepts(grpc_port), self.nginx, 20)
        self.rest, self.grpc = f"http://127.0.0.1:{rest}", f"127.0.0.1:{grpc_port}"
        self.endpoints = Endpoints(self)
        self.endpoints.start()

    def stop(self) -> None:
        """nginx first (no new requests), then the gateways (SIGTERM: they drain), the model servers,
        Prometheus; each gets SIGKILL if it has not exited within 30 s."""
        if self.endpoints:
            self.endpoints.stop()
        if self.nginx:
            self.nginx.signal(signal.SIGQUIT)  # nginx's graceful shutdown
            self.nginx.wait(10)
        for group in (self.gateways, self.model_servers):
            for p in group:
                p.signal(signal.SIGTERM)
            for p in group:
                p.wait(30)
        if self.prometheus:
            self.prometheus.stop()
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self) -> Stage:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- faults -----------------------------------------------------------------------------
    def restart(self, proc: Proc, timeout: float = 180) -> None:
        """Start ``proc`` again on the same ports (after a kill or a stop) and wait until it serves."""
        proc.wait(30)
        proc.start()
        if proc in self.model_servers:
            _wait(proc.name, lambda: _accepts(proc.ports["grpc"]), proc, timeout)
        else:
            _wait(proc.name, lambda: httpx.get(f"http://127.0.0.1:{proc.ports['rest']}/readyz", timeout=2).status_code == 200,
                  proc, timeout)

    # -- what a person reads ------------------------------------------------------------------
    def describe(self) -> str:
        lines = [f"REST  {self.rest}   (nginx; e.g. curl -H 'content-type: application/json' "
                 f"-d '{{\"texts\": [\"a fine film\"]}}' {self.rest}/v1/sentiment:predict)",
                 f"gRPC  {self.grpc}   (nginx, h2c)",
                 f"Prometheus  {self.prometheus.url}   (alerts: {self.prometheus.url}/alerts)",
                 f"models.config  {self.models_config}   (MODELS_CONFIG for scripts/rollout.sh)"]
        for g in self.gateways:
            lines.append(f"{g.name}  REST 127.0.0.1:{g.ports['rest']}  gRPC 127.0.0.1:{g.ports['grpc']}  "
                         f"pid {g.process.pid}  log {g.log}")
        for m in self.model_servers:
            lines.append(f"{m.name}  gRPC 127.0.0.1:{m.ports['grpc']}  metrics :{m.ports['metrics']}  "
                         f"pid {m.process.pid}  log {m.log}")
        return "\n".join(lines)

