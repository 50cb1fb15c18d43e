"""The gRPC port is bounded (issue 22): a flood of idle TCP connections meets grpc_max_connections,
never the file-descriptor limit, so REST keeps answering throughout; connections that never finish
the HTTP/2 handshake are closed after grpc_handshake_timeout_s, established idle ones after
grpc_max_connection_idle_s; the caps are fitted to ``ulimit -n`` at start. Both backends, on real
gateway processes with lowered limits (so the test is quick)."""

from __future__ import annotations

import os
import socket
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from testkit.gateway import ROOT, WITHOUT_TENSORFLOW, gateway_process, wait_until

CAP, HANDSHAKE_S, IDLE_S = 64, 1.0, 1.0
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")  # + an empty SETTINGS frame


@pytest.fixture(scope="module", params=["embedded", "tfserving"])
def bounded(request):
    limits = dict(grpc_max_connections=CAP, grpc_handshake_timeout_s=HANDSHAKE_S, grpc_max_connection_idle_s=IDLE_S,
                  models='["sentiment_lstm"]')
    if request.param == "embedded":
        with gateway_process(**limits) as gw:
            yield gw
        return
    from testkit.standin import StandIn

    standin = StandIn(ROOT / "models", ["sentiment_lstm"])
    standin.start()
    try:
        with gateway_process(WITHOUT_TENSORFLOW, backend="tfserving", tfserving_address=standin.address,
                             models_config_file="", **limits) as gw:
            yield gw
    finally:
        standin.stop()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def closed_by_peer(s: socket.socket) -> bool:
    """True once the server closed ``s`` (whatever it wrote before is read and dropped)."""
    try:
        while True:
            if s.recv(65536) == b"":
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status


def test_idle_connection_flood_meets_the_cap_not_the_fd_limit_and_rest_keeps_answering(bounded):
    gw = bounded
    host, port = gw.grpc.rsplit(":", 1)
    before = open_fds(gw.process.pid)
    rest_gaps, stop = [], threading.Event()

    def probe():
        with httpx.Client(base_url=gw.rest, timeout=5) as c:
            last = time.perf_counter()
            while not stop.is_set():
                assert c.get("/healthz").status_code == 200
                now = time.perf_counter()
                rest_gaps.append(now - last)
                last = now
                time.sleep(0.01)

    t = threading.Thread(target=probe)
    t.start()
    socks = []
    try:
        for _ in range(5 * CAP):  # five times the cap, idle: no preface, nothing
            s = socket.create_connection((host, int(port)))
            s.setblocking(False)
            socks.append(s)
        time.sleep(0.3)
        held = open_fds(gw.process.pid) - before
        refused = sum(closed_by_peer(s) for s in socks)
        assert held <= CAP + 8, held  # file descriptors bounded by the cap
        assert refused >= 4 * CAP - 8, refused  # the rest were closed at once
        # Within the handshake timeout every idle one is closed too, and a fresh client gets in again.
        wait_until(lambda: all(closed_by_peer(s) for s in socks), HANDSHAKE_S + 5, 0.1)
        assert health(gw.grpc) == health_pb2.HealthCheckResponse.SERVING
        assert open_fds(gw.process.pid) - before <= 8
    finally:
        stop.set()
        t.join(10)
        for s in socks:
            s.close()
    assert max(rest_gaps) < 0.5, max(rest_gaps)  # REST answered throughout


def test_a_connection_that_stops_after_the_preface_is_closed_when_idle(bounded):
    host, port = bounded.grpc.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    s.sendall(PREFACE)
    s.setblocking(False)
    try:
        t0 = time.monotonic()
        wait_until(lambda: closed_by_peer(s), IDLE_S + HANDSHAKE_S + 5, 0.05)
        assert time.monotonic() - t0 < IDLE_S + HANDSHAKE_S + 5
    finally:
        s.close()


def test_caps_are_fitted_to_the_file_descriptor_limit():
    """A gateway started under `ulimit -n 600` lowers both caps to fit, and says so."""
    import resource
    import subprocess
    import sys

    code = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (600, 600));"
            "from serving.__main__ import fit_connection_caps; from serving.settings import Settings;"
            "s = fit_connection_caps(Settings(_env_file=None)); print(s.max_connections, s.grpc_max_connections)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    rest, grpc_cap = map(int, r.stdout.split())
    assert rest + grpc_cap <= 600 - 256 and rest > grpc_cap > 0
    assert "caps lowered" in r.stderr and "ulimit -n" in r.stderr
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 600  # (this process' own limit untouched)
