"""The hostile-client probe of issue 22, against a gateway: every payload in turn, with the gateway's
health watched throughout.

    python bench/hostile.py --backend embedded --backend tfserving   # starts each gateway itself
    python bench/hostile.py --rest http://127.0.0.1:8000 --grpc 127.0.0.1:50051 --pid PID   # a running one

For each attack it prints one row: the worst gap between answers of a REST ``/healthz`` probe
(keep-alive, every 10 ms), of a gRPC health probe on an established channel, how many gRPC health
checks on *fresh* connections failed (what a kubelet probe sees), the gateway's RSS and open file
descriptors before and after (needs ``--pid`` or a gateway this script started), and the statuses
the attacking clients got (any 5xx is a finding). Goals (issue 22): gaps <= 100 ms, RSS growth <=
100 MB under the header and connection attacks, no 5xx from any client input.

The attacks:
  grpc-idle      N idle TCP connections to the gRPC port (no preface), held --hold seconds
  rest-idle      N idle TCP connections to the REST port
  header-8mb     one request with an 8 MB header (x4 clients)
  headers-100k   one request with 100,000 headers (x4)
  header-stream  40 connections each streaming an endless header value
  slow-body      N connections sending a POST head, then 1 body byte every 2 s
  v2-bytes       V2 REST infer: 1 MiB of zero-length BYTES elements for shape [1] (x4)
  v2-bytes-grpc  the same through gRPC ModelInfer raw_input_contents (x4)
  deep-json      /v1/sentiment:predict and /v2 infer with JSON nested 5,000 deep (x4)
  metrics        8 clients polling /metrics
  whole-text     800 texts of 20,000 characters with whole_text (x2)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import socket
import struct
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.gen.inference import open_inference_grpc_pb2 as v2pb  # noqa: E402
from serving.gen.inference import open_inference_grpc_pb2_grpc as v2grpc  # noqa: E402

MODEL = "sentiment_lstm"


# -- what is measured ------------------------------------------------------------------------------
def rss_mb(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def fds(pid: int | None) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd")) if pid else None
    except OSError:
        return None


class Watch:
    """Health probes in threads while an attack runs: worst gaps between answers."""

    def __init__(self, rest: str, grpc_target: str):
        self.rest, self.grpc_target = rest, grpc_target
        self.stop = threading.Event()
        self.gaps = {"rest": 0.0, "grpc": 0.0}
        self.fresh = collections.Counter()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._rest, self._grpc, self._fresh)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(15)

    def _loop(self, name, call):
        last = time.perf_counter()
        while not self.stop.is_set():
            try:
                call()
                now = time.perf_counter()
                self.gaps[name] = max(self.gaps[name], now - last)
                last = now
            except Exception:  # noqa: BLE001 - a failed probe is a gap that keeps growing
                pass
            time.sleep(0.01)
        self.gaps[name] = max(self.gaps[name], time.perf_counter() - last - 0.01)

    def _rest(self):
        with httpx.Client(base_url=self.rest, timeout=5) as c:
            self._loop("rest", lambda: c.get("/healthz").raise_for_status())

    def _grpc(self):
        with grpc.insecure_channel(self.grpc_target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            self._loop("grpc", lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5))

    def _fresh(self):
        while not self.stop.wait(0.25):
            try:
                with grpc.insecure_channel(self.grpc_target) as ch:
                    health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                self.fresh["ok"] += 1
            except grpc.RpcError as e:
                self.fresh[e.code().name] += 1


# -- the attacks -----------------------------------------------------------------------------------
def _hostport(url: str) -> tuple[str, int]:
    host, port = url.split("://")[-1].rstrip("/").rsplit(":", 1)
    return host, int(port)


def raw_request(rest: str, data: bytes, read_timeout: float = 30) -> str:
    """Send ``data`` on a new connection; the status line's code, or what happened."""
    with socket.create_connection(_hostport(rest), timeout=read_timeout) as s:
        try:
            s.sendall(data)
        except OSError as e:
            return type(e).__name__
        try:
            head = s.recv(64)
        except OSError as e:
            return type(e).__name__
    return head.split(b" ")[1].decode() if head.startswith(b"HTTP/") else "closed"


def idle_connections(target: tuple[str, int], n: int, hold: float, statuses: collections.Counter) -> None:
    socks = []
    for _ in range(n):
        try:
            socks.append(socket.create_connection(target, timeout=5))
        except OSError as e:
            statuses[f"connect {type(e).__name__}"] += 1
    statuses["opened"] += len(socks)
    time.sleep(hold)
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            while True:
                if s.recv(65536) == b"":
                    closed += 1
                    break
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    statuses["closed by the gateway"] += closed


def header_stream(rest: str, seconds: float, statuses: collections.Counter) -> None:
    with socket.create_connection(_hostport(rest), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-long: ")
        chunk, end = b"a" * 65536, time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                s.sendall(chunk)
            statuses["stream not cut"] += 1
        except OSError:
            statuses["cut"] += 1
            return
        try:
            head = s.recv(64)
            statuses[head.split(b" ")[1].decode() if head.startswith(b"HTTP/") else "closed"] += 1
        except OSError as e:
            statuses[type(e).__name__] += 1


def slow_body(rest: str, seconds: float, statuses: collections.Counter) -> None:
    try:
        s = socket.create_connection(_hostport(rest), timeout=5)
    except OSError as e:
        statuses[f"connect {type(e).__name__}"] += 1
        return
    with s:
        s.sendall(b"POST /v1/sentiment:predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: 100000\r\n\r\n")
        end = time.monotonic() + seconds
        s.settimeout(2)
        while time.monotonic() < end:
            try:
                s.sendall(b" ")
                head = s.recv(64)
                statuses[head.split(b" ")[1].decode() if head.startswith(b"HTTP/") else "closed"] += 1
                return
            except socket.timeout:
                continue
            except OSError as e:
                statuses[type(e).__name__] += 1
                return
        statuses["still open"] += 1


def repeat(fn, clients: int, seconds: float, statuses: collections.Counter) -> None:
    end = time.monotonic() + seconds

    def run():
        while time.monotonic() < end:
            statuses[fn()] += 1

    ts = [threading.Thread(target=run) for _ in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def post(rest: str, path: str, body: bytes) -> str:
    try:
        r = httpx.post(rest + path, content=body, headers={"content-type": "application/json"}, timeout=30)
        return str(r.status_code)
    except httpx.HTTPError as e:
        return type(e).__name__


def v2_bytes_body() -> bytes:
    n = 1024 * 1024 // 4  # zero-length elements: 4 bytes of length each
    raw = struct.pack("<I", 0) * n
    return raw


def attacks(rest: str, grpc_target: str, n: int, hold: float, seconds: float) -> dict:
    deep = b'{"texts": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    deep_v2 = b'{"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [1], "data": ' + b"[" * 5000 + b"]" * 5000 + b"}]}"
    zero_elements = json.dumps({"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [1],
                                            "data": [""] * (1024 * 1024 // 3)}]}).encode()
    huge = json.dumps({"texts": ["word " * 4000] * 800, "whole_text": True}).encode()
    raw = v2_bytes_body()

    def grpc_bytes():
        with grpc.insecure_channel(grpc_target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            req = v2pb.ModelInferRequest(model_name=MODEL)
            t = req.inputs.add(name="texts", datatype="BYTES", shape=[1])
            assert t
            req.raw_input_contents.append(raw)
            try:
                v2grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)
                return "OK"
            except grpc.RpcError as e:
                return e.code().name

    def threads(fn, k, *args):
        def run(statuses):
            ts = [threading.Thread(target=fn, args=(*args, statuses)) for _ in range(k)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        return run

    g_host, g_port = grpc_target.rsplit(":", 1)
    return {
        "grpc-idle": lambda st: idle_connections((g_host, int(g_port)), n, hold, st),
        "rest-idle": lambda st: idle_connections(_hostport(rest), n, hold, st),
        "header-8mb": lambda st: repeat(lambda: raw_request(
            rest, b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (8 << 20) + b"\r\n\r\n"), 4, seconds, st),
        "headers-100k": lambda st: repeat(lambda: raw_request(
            rest, b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"x-h: 1\r\n" * 100_000 + b"\r\n"), 4, seconds, st),
        "header-stream": threads(header_stream, 40, rest, seconds),
        "slow-body": threads(slow_body, min(n, 1000), rest, max(seconds, 30)),
        "v2-bytes": lambda st: repeat(lambda: post(rest, f"/v2/models/{MODEL}/infer", zero_elements), 4, seconds, st),
        "v2-bytes-grpc": lambda st: repeat(grpc_bytes, 4, seconds, st),
        "deep-json": lambda st: repeat(lambda: post(rest, "/v1/sentiment:predict", deep) + " / "
                                       + post(rest, f"/v2/models/{MODEL}/infer", deep_v2), 4, seconds, st),
        "metrics": lambda st: repeat(lambda: str(httpx.get(rest + "/metrics", timeout=30).status_code), 8, seconds, st),
        "whole-text": lambda st: repeat(lambda: post(rest, "/v1/sentiment:predict", huge), 2, seconds, st),
    }


def probe(rest: str, grpc_target: str, pid: int | None, only: list[str], n: int, hold: float, seconds: float) -> list[dict]:
    rows = []
    for name, attack in attacks(rest, grpc_target, n, hold, seconds).items():
        if only and name not in only:
            continue
        statuses: collections.Counter = collections.Counter()
        before = (rss_mb(pid), fds(pid))
        peak = [before[0] or 0.0, before[1] or 0]
        sampling = threading.Event()

        def sample():
            while not sampling.wait(0.1):
                peak[0] = max(peak[0], rss_mb(pid) or 0.0)
                peak[1] = max(peak[1], fds(pid) or 0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        with Watch(rest, grpc_target) as w:
            attack(statuses)
            time.sleep(0.3)
        sampling.set()
        sampler.join()
        rows.append({"attack": name, "seconds": round(time.perf_counter() - t0, 1),
                     "rest_gap_ms": round(w.gaps["rest"] * 1000), "grpc_gap_ms": round(w.gaps["grpc"] * 1000),
                     "fresh_grpc_health": dict(w.fresh),
                     "rss_mb": [before[0] and round(before[0]), round(peak[0]) if pid else None, rss_mb(pid) and round(rss_mb(pid))],
                     "fds": [before[1], peak[1] if pid else None, fds(pid)],
                     "statuses": dict(statuses),
                     "5xx": sum(v for k, v in statuses.items() if any(p.startswith("5") for p in k.split(" / ")))})
        print(format_row(rows[-1]), flush=True)
        time.sleep(1)
    return rows


def format_row(r: dict) -> str:
    fresh = r["fresh_grpc_health"]
    bad = sum(v for k, v in fresh.items() if k != "ok")
    return (f"{r['attack']:<14} {r['seconds']:>6} s  /healthz gap {r['rest_gap_ms']:>5} ms  gRPC health gap "
            f"{r['grpc_gap_ms']:>5} ms  fresh gRPC health failed {bad}/{sum(fresh.values())}  RSS MB "
            f"{r['rss_mb'][0]}->{r['rss_mb'][1]} (peak)->{r['rss_mb'][2]}  fds {r['fds'][0]}->{r['fds'][1]}->{r['fds'][2]}"
            f"  5xx {r['5xx']}  statuses {r['statuses']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", action="append", choices=["embedded", "tfserving"], default=[],
                   help="start a gateway with this backend (default settings) and probe it; repeatable")
    p.add_argument("--rest", help="a running gateway's REST base URL")
    p.add_argument("--grpc", help="a running gateway's gRPC address")
    p.add_argument("--pid", type=int, help="the running gateway's process id (for RSS and fds)")
    p.add_argument("--only", action="append", default=[], help="run only these attacks (repeatable)")
    p.add_argument("--connections", type=int, default=4000, help="connections of the idle and slow-body attacks")
    p.add_argument("--hold", type=float, default=10, help="seconds the idle connections are held")
    p.add_argument("--seconds", type=float, default=5, help="seconds each request attack runs")
    p.add_argument("--json", type=Path, help="write the rows here")
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the probe's own sockets
    results = {}
    if a.rest:
        print(f"gateway at {a.rest} / {a.grpc}")
        results["running"] = probe(a.rest, a.grpc, a.pid, a.only, a.connections, a.hold, a.seconds)
    with ExitStack() as stack:
        from testkit.gateway import default_gateways

        if a.backend:
            gateways = stack.enter_context(default_gateways(tuple(a.backend)))
            for backend, gw in gateways.items():
                print(f"\n{backend} gateway (default settings) at {gw.rest} / {gw.grpc}, pid {gw.process.pid}")
                results[backend] = probe(gw.rest, gw.grpc, gw.process.pid, a.only, a.connections, a.hold, a.seconds)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
