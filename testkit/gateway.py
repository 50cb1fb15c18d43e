"""Start real gateways for tests: a subprocess (``python -m serving``) or in this process."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
def gateway_process(command: list[str] | None = None, wait_ready: bool = True, verify=None, **env_settings):
    """``python -m serving`` (or ``command``) in a subprocess on free loopback ports; waits for /readyz.

    ``verify`` (an ssl context or CA file): the gateway serves TLS (give tls_cert_file/tls_key_file);
    readiness is then awaited over https, and ``running.rest`` is the https URL."""
    rest, grpc_port = free_port(), free_port()
    env = {**os.environ, "CLASSIFIER_HOST": "127.0.0.1", "CLASSIFIER_REST_PORT": str(rest), "CLASSIFIER_GRPC_PORT": str(grpc_port)}
    env.update({f"CLASSIFIER_{k.upper()}": str(v) for k, v in env_settings.items()})
    log = open(ROOT / ".pytest_cache" / f"gateway-{rest}.log", "w") if (ROOT / ".pytest_cache").is_dir() else subprocess.DEVNULL
    proc = subprocess.Popen(command or [sys.executable, "-m", "serving"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    running = Running(rest, grpc_port)
    running.process = proc
    if verify is not None:
        running.rest = running.rest.replace("http://", "https://")
    try:
        def up(path):
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {proc.returncode}")
            return httpx.get(running.rest + path, timeout=2, verify=True if verify is None else verify).status_code == 200

        wait_until(lambda: up("/readyz" if wait_ready else "/healthz"))
        yield running
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def gateway_in_thread(settings, backend=None):
    """The same Gateway class, run in a thread of this process (to reach its backend)."""
    from serving.__main__ import Gateway

    settings = settings.model_copy(update={"host": "127.0.0.1", "rest_port": free_port(), "grpc_port": free_port()})
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
