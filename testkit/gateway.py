"""Start real gateways for tests: a subprocess (``python -m serving``) or in this process."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
MODELS_CONFIG = ROOT / "serving" / "tfserving" / "models.config"


def served_versions(model: str) -> list[int]:
    """The versions of a shipped model that models.config serves (its version policy)."""
    from serving.model_config import ModelsConfig
    from contract.layout import existing_versions

    return ModelsConfig(MODELS_CONFIG).policy(model).choose(existing_versions(ROOT / "models" / model))


def stable_version(model: str) -> int:
    """The version a request without a version gets: the 'stable' label of models.config."""
    from serving.model_config import ModelsConfig

    return ModelsConfig(MODELS_CONFIG).labels(model).get("stable") or served_versions(model)[-1]


def _ephemeral_ports() -> tuple[int, int]:
    try:
        lo, hi = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free loopback port *below* the ephemeral range: the kernel hands ephemeral ports to client
    sockets, and the suite opens thousands of those (connection floods), so a port chosen there could
    be taken by a client before the server binds it (the gateway then exits 3, 'address in use')."""
    lo, _ = _ephemeral_ports()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(10_000, lo) if lo > 11_000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def wait_until(predicate, timeout: float = 120, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout}s")


class Running:
    def __init__(self, rest_port: int, grpc_port: int):
        self.rest = f"http://127.0.0.1:{rest_port}"
        self.grpc = f"127.0.0.1:{grpc_port}"


# ``python -m serving`` in a process where ``import tensorflow`` (or keras) fails,
# as it would in the lean install: proves the gateway does not need TensorFlow.
WITHOUT_TENSORFLOW = [
    sys.executable, "-c",
    "import sys; sys.modules.update(tensorflow=None, keras=None, tensorflow_serving=None); "
    "from serving.__main__ import main; main()",
]


@contextmanager
def gateway_process(command: list[str] | None = None, wait_ready: bool = True, verify=None, drain_settle_s: float = 0,
                    env: dict[str, str] | None = None, **env_settings):
    """``python -m serving`` (or ``command``) in a subprocess on free loopback ports; waits for /readyz.

    ``verify`` (an ssl context or CA file): the gateway serves TLS (give tls_cert_file/tls_key_file);
    readiness is then awaited over https, and ``running.rest`` is the https URL.
    ``root``: another checkout whose gateway to run (benchmarks before/after); default this one.
    ``drain_settle_s`` is 0 unless given (no load balancer waits for the gateway's shutdown here:
    each stop would otherwise cost the default 5 s); the tests of draining give it.
    ``env``: environment variables given as they are (not settings), e.g. OTEL_* (testkit/otlp.py).
    The gateway's output goes to ``running.log_path`` (.pytest_cache/gateway-<rest port>.log) when
    .pytest_cache exists, else nowhere (``running.log_path`` None)."""
    spec = dict(command=command, wait_ready=wait_ready, verify=verify, drain_settle_s=drain_settle_s, env=env,
                **env_settings)
    with gateway_processes(spec) as (running,):
        yield running


@contextmanager
def gateway_processes(*specs: dict):
    """Several gateways at once: ``gateway_process(**spec)`` for each spec, all started before any is
    awaited (each start-up imports TensorFlow and loads the models: seconds of one core apiece, so
    on two cores two start in little more than the time of one); yields their ``Running``s in order,
    and stops them together."""
    started: list[Running] = []
    try:
        for spec in specs:
            started.append(_spawn(**spec))
        for running in started:
            running.wait_ready()
        yield started
    finally:
        _stop(started)


def _stop(started) -> None:
    """SIGTERM to every gateway, then wait for each (a kill after 20 s)."""
    started = list(started)
    for running in started:
        running.process.terminate()
    for running in started:
        try:
            running.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            running.process.kill()


def _spawn(command: list[str] | None = None, wait_ready: bool = True, verify=None, drain_settle_s: float = 0,
           root: Path = ROOT, env: dict[str, str] | None = None, **env_settings) -> Running:
    """Start one gateway process (see gateway_process) in the tree at ``root`` (another checkout's
    gateway for a benchmark: its ``python -m serving`` finds its own packages first);
    ``running.wait_ready()`` waits for it."""
    rest, grpc_port = free_port(), free_port()
    env_settings["drain_settle_s"] = drain_settle_s
    env = {**os.environ, **(env or {}), "CLASSIFIER_HOST": "127.0.0.1", "CLASSIFIER_REST_PORT": str(rest),
           "CLASSIFIER_GRPC_PORT": str(grpc_port)}
    env.update({f"CLASSIFIER_{k.upper()}": str(v) for k, v in env_settings.items()})
    log_path = ROOT / ".pytest_cache" / f"gateway-{rest}.log"
    log = open(log_path, "w") if log_path.parent.is_dir() else subprocess.DEVNULL
    proc = subprocess.Popen(command or [sys.executable, "-m", "serving"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    if log is not subprocess.DEVNULL:
        log.close()  # the child has its own copy
    running = Running(rest, grpc_port)
    running.process = proc
    running.log_path = log_path if log is not subprocess.DEVNULL else None
    if verify is not None:
        running.rest = running.rest.replace("http://", "https://")

    def up(path):
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}")
        return httpx.get(running.rest + path, timeout=2, verify=True if verify is None else verify).status_code == 200

    running.wait_ready = lambda: wait_until(lambda: up("/readyz" if wait_ready else "/healthz"))
    return running


@contextmanager
def gateway_in_thread(settings, backend=None, drain_settle_s: float | None = None):
    """The same Gateway class, run in a thread of this process (to reach its backend).

    ``drain_settle_s``: as given; else the settings' own where they were given one explicitly
    (``Settings(drain_settle_s=...)`` or CLASSIFIER_DRAIN_SETTLE_S), else 0, as for gateway_process."""
    from serving.__main__ import Gateway

    update = {"host": "127.0.0.1", "rest_port": free_port(), "grpc_port": free_port()}
    if drain_settle_s is not None:
        update["drain_settle_s"] = drain_settle_s
    elif "drain_settle_s" not in getattr(settings, "model_fields_set", ()):
        update["drain_settle_s"] = 0
    settings = settings.model_copy(update=update)
    gw = Gateway(settings, backend)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(gw.run(),), daemon=True)
    thread.start()
    running = Running(settings.rest_port, settings.grpc_port)
    running.core = gw.core
    running.gateway = gw
    running.loop_call = loop.call_soon_threadsafe
    try:
        wait_until(lambda: httpx.get(running.rest + "/healthz", timeout=2).status_code == 200, timeout=60)
        yield running
    finally:
        loop.call_soon_threadsafe(gw.stop)
        thread.join(timeout=30)


def metric_samples(running) -> dict[tuple[str, tuple], float]:
    """The gateway's /metrics: (sample name, sorted label items) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(running.rest + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def queue_rows(running, model: str) -> float:
    """The gateway's public queue depth of ``model``: its ``classifier_queue_rows`` gauge, rows queued,
    admitted or in the model (as of the last submit, drop or finished call; 0 before any)."""
    return metric_samples(running).get(("classifier_queue_rows", (("model", model),)), 0.0)


# -- the default gateway of each backend, and gateways shared by the tests that only read ---------

BACKENDS = ("embedded", "tfserving")
SHIPPED_MODELS = ["digits", "sentiment_lstm", "sentiment_bilstm"]


@contextmanager
def default_gateways(backends=BACKENDS):
    """A gateway with the default settings on each of ``backends``, started together (their start-ups
    overlap), as {backend: Running}: "embedded" (``python -m serving``); "tfserving", in a process
    that cannot import TensorFlow, forwarding to the TF Serving stand-in (testkit/standin.py) serving
    the shipped models as models.config says (``running.standin``; None for the embedded one)."""
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backends {sorted(unknown)}; known: {BACKENDS}")
    with ExitStack() as stack:
        started: dict[str, Running] = {}
        try:
            if "embedded" in backends:
                started["embedded"] = _spawn()
                started["embedded"].standin = None
            if "tfserving" in backends:
                from testkit.standin import StandIn

                # (loads the models in this process meanwhile the embedded gateway starts)
                standin = StandIn(ROOT / "models", SHIPPED_MODELS, config=MODELS_CONFIG)
                standin.start()
                stack.callback(standin.stop)
                started["tfserving"] = _spawn(WITHOUT_TENSORFLOW, backend="tfserving", tfserving_address=standin.address)
                started["tfserving"].standin = standin
            for running in started.values():
                running.wait_ready()
            yield started
        finally:
            _stop(started.values())


class SharedGateways:
    """The default gateway of every backend (:func:`default_gateways`), started together on first use
    and kept until :meth:`close`: for test modules that only read from them (no settings of their
    own, no change another module could see). Each logs to .pytest_cache/gateway-<rest port>.log."""

    def __init__(self):
        self._stack = ExitStack()
        self._running: dict[str, Running] | None = None

    def get(self, backend: str) -> Running:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; one of {BACKENDS}")
        if self._running is None:
            (ROOT / ".pytest_cache").mkdir(exist_ok=True)  # so that they log (see gateway_process)
            self._running = self._stack.enter_context(default_gateways())
        running = self._running[backend]
        if running.process.poll() is not None:
            raise RuntimeError(f"the shared {backend} gateway exited with {running.process.returncode} "
                               f"(an earlier test stopped it); its log: {running.log_path}")
        return running

    def close(self) -> None:
        self._running = None
        self._stack.close()
