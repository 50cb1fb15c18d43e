"""The stage's own promises: nginx is configured from the k8s Ingress annotations, and the stage
leaves no process behind, whether it is stopped with Ctrl-C or killed."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from stage import nginx
from testkit import prometheus
from testkit.gateway import ROOT

needs_nginx = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (make test-tools)")


def test_nginx_applies_the_ingress_annotations(tmp_path):
    rest, grpc = nginx.annotations(nginx.REST_INGRESS), nginx.annotations(nginx.GRPC_INGRESS)
    conf = nginx.render(18080, 18081, ["127.0.0.1:1", "127.0.0.1:2"], ["127.0.0.1:3"], tmp_path)
    rest_server, grpc_server = conf.split("server {")[1:3]
    assert f"client_max_body_size {rest['proxy-body-size']};" in rest_server
    assert f"proxy_read_timeout {rest['proxy-read-timeout']}s;" in rest_server
    assert f"proxy_send_timeout {rest['proxy-send-timeout']}s;" in rest_server
    assert "proxy_request_buffering off;" in rest_server
    assert f"proxy_next_upstream {rest['proxy-next-upstream']} non_idempotent;" in rest_server
    assert f"proxy_next_upstream_tries {rest['proxy-next-upstream-tries']};" in rest_server
    assert f"client_max_body_size {grpc['proxy-body-size']};" in grpc_server
    assert f"grpc_read_timeout {grpc['proxy-read-timeout']}s;" in grpc_server
    assert f"grpc_next_upstream {grpc['proxy-next-upstream']} non_idempotent;" in grpc_server
    # Every path the REST Ingress routes, and nothing else (/metrics, /healthz stay inside).
    for path, kind in nginx.routed_paths(nginx.REST_INGRESS):
        assert (f"location = {path} " if kind == "Exact" else f"location {path} ") in rest_server
    assert "/metrics" not in rest_server
    # No passive ejection (ingress-nginx balances in Lua): a gateway's 503 never takes it out.
    assert conf.count("max_fails=0;") == 3 and conf.count(" server 127.0.0.1:") == 3
    if shutil.which("nginx"):
        (tmp_path / "nginx.conf").write_text(conf)
        r = subprocess.run(["nginx", "-t", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr


def _start_stage(background: bool = False) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """``background``: started as a shell starts a background job, with SIGINT ignored."""
    proc = subprocess.Popen([sys.executable, "-m", "stage", "--gateways", "1", "--model-servers", "1",
                             "--models", "sentiment_lstm"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None)
    out = []
    for line in proc.stdout:
        out.append(line)
        if "Ctrl-C stops everything" in line:
            break
    else:
        raise AssertionError("".join(out))
    kids = psutil.Process(proc.pid).children(recursive=True)
    names = " ".join(k.name() for k in kids)
    assert "nginx" in names and "prometheus" in names and len(kids) >= 5, names  # + the worker, 2 Pythons
    assert "REST  http://127.0.0.1:" in "".join(out) and "gRPC  127.0.0.1:" in "".join(out)
    return proc, kids


def _gone(kids: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(kids, timeout=timeout)
    for k in alive:
        k.kill()
    return alive


@needs_nginx
@pytest.mark.stage
@pytest.mark.skipif(not prometheus.available(), reason=prometheus.MISSING)
@pytest.mark.parametrize("how", ["ctrl-c", "ctrl-c, started in the background", "sigkill"])
def test_the_stage_leaves_no_process_behind(how):
    proc, kids = _start_stage(background="background" in how)
    try:
        if how.startswith("ctrl-c"):
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0
            timeout = 5
        else:  # the orchestrator dies without a word: the kernel tells its children (PR_SET_PDEATHSIG)
            proc.kill()
            proc.wait(10)
            timeout = 40
        t = time.monotonic()
        alive = _gone(kids, timeout)
        assert not alive, f"left after {time.monotonic() - t:.0f} s: {[(k.pid, k.name()) for k in alive]}"
    finally:  # whatever failed above, nothing of this stage outlives the test
        proc.kill()
        _gone(kids, 40)
