"""Hostile inputs that used to hold the event loop, or escape as 500s with tracebacks (issue 22):
each answered at once with the error it is, while the gateway keeps answering everyone else.

Real gateways, both backends (the shared ``gw`` of tests/serving/conftest.py: `python -m serving`,
embedded and TF Serving):

- JSON nested deeper than the decoder allows, on /v1 (hot path) and V2 REST: 400 naming the
  limit, the keep-alive connection still usable (a second request on the same socket), no
  traceback in the gateway's log, at most a rate-limited WARNING;
- V2 BYTES tensors whose data do not fit their declared shape (1 MiB of zero-length elements
  for shape [1], raw over REST and gRPC ``raw_input_contents``, JSON, typed contents): 400 /
  INVALID_ARGUMENT from the shape alone; and while 4 clients send such a body over and over,
  /healthz, polled every 10 ms over a keep-alive connection, never waits more than 100 ms;
- /metrics, polled by 8 clients at once: rendered off the event loop and shared (the same
  text within ``metrics_cache_s``), /healthz stays responsive, and a client that reads the
  metrics after its own request finished sees it counted;
- ``GET /v1/models/`` with a forged Host: no redirect built from the Host header.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import types

import grpc
import httpx
import pytest

from serving.gen.inference import open_inference_grpc_pb2 as v2
from serving.gen.inference import open_inference_grpc_pb2_grpc as v2_grpc

MIB = 1024 * 1024
DEPTH = 5000  # levels of nesting ("[" * 5000): ~10 KB, far past the decoder's ~1,000
GOOD_TEXT = {"texts": ["A wonderful film, I loved it."]}
GOOD_V2 = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["A wonderful film."]}]}
GOOD_V2_JSON = json.dumps(GOOD_V2)
MAX_HEALTH_WAIT_S = 0.100  # the bound: no request holds the loop anywhere near this
LOAD_S = 3.0


def deep(depth: int = DEPTH) -> str:
    return "[" * depth + "]" * depth


# -- a keep-alive HTTP/1.1 connection by hand: proves the server kept the connection open ------------
class Connection:
    """One TCP connection to the gateway's REST port; requests go one after another over it."""

    def __init__(self, gw, timeout: float = 10):
        host, port = gw.rest.removeprefix("http://").split(":")
        self.host = f"{host}:{port}"
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.buf = b""

    def close(self):
        self.sock.close()

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict | None = None) -> tuple[int, dict, bytes]:
        head = [f"{method} {path} HTTP/1.1", f"host: {self.host}", f"content-length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {"content-type": "application/json"}).items()]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        while b"\r\n\r\n" not in self.buf:
            self._read()
        raw_head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        fields = dict(line.split(": ", 1) for line in lines[1:])
        fields = {k.lower(): v for k, v in fields.items()}
        n = int(fields.get("content-length", 0))
        while len(self.buf) < n:
            self._read()
        content, self.buf = self.buf[:n], self.buf[n:]
        return status, fields, content

    def _read(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the gateway closed the connection")
        self.buf += chunk


class Log:
    """What the gateway logs from now on (its log file: testkit's gateways log to .pytest_cache)."""

    def __init__(self, gw):
        self.path = gw.log_path
        self.start = self.path.stat().st_size if self.path else 0

    def new(self) -> str:
        if self.path is None:
            pytest.skip("the gateway does not log to a file here (no .pytest_cache)")
        time.sleep(0.2)  # lines of the last answers
        with open(self.path, "rb") as f:
            f.seek(self.start)
            return f.read().decode("utf-8", "replace")


# -- 1. nested JSON: 400, the connection kept, no traceback ----------------------------------------
DEEP_CASES = {
    # /v1 refuses an unknown field at its name, before reading its value (however deep)
    "/v1/sentiment:predict": (f'{{"texts": ["fine"], "extra": {deep()}}}', GOOD_TEXT),
    "/v1/digits:predict": (f'{{"images": [{deep()}]}}', {"images": [[[0] * 28] * 28]}),
    "/v2/models/sentiment_lstm/infer": (
        f'{{"inputs": [{{"name": "text", "datatype": "BYTES", "shape": [1], "data": {deep()}}}]}}', GOOD_V2),
    "/v2/models/sentiment_lstm/infer (unknown field)": (
        f'{{"inputs": [{{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["ok"]}}], "extra": {deep()}}}',
        GOOD_V2),
}


def test_deeply_nested_json_is_400_and_the_connection_stays_usable(gw):
    log = Log(gw)
    for case, (hostile, good) in DEEP_CASES.items():
        path = case.split(" ")[0]
        conn = Connection(gw)
        try:
            for _ in range(20):
                t0 = time.perf_counter()
                status, headers, content = conn.request("POST", path, hostile.encode())
                assert time.perf_counter() - t0 < 2
                assert status == 400, (case, status, content[:300])
                message = json.loads(content)["error"]
                message = message["message"] if isinstance(message, dict) else message
                expected = ("object contains unknown field extra" if case == "/v1/sentiment:predict"
                            else "nested deeper than the JSON decoder allows")
                assert expected in message, (case, message)
                assert headers.get("connection", "").lower() != "close", case
            status, _, content = conn.request("POST", path, json.dumps(good).encode())  # the same connection
            assert status == 200, (case, content[:300])
        finally:
            conn.close()
    text = log.new()
    assert "Traceback" not in text and '"level":"ERROR"' not in text, text[-3000:]
    # 80 such bodies, at most one rate-limited WARNING (a second if its 10 s window turned meanwhile)
    assert text.count("undecodable JSON body") <= 2, text[-3000:]


def test_the_fastapi_routes_answer_undecodable_json_as_the_hot_path_does(caplog):
    """In process, the FastAPI app alone (what serves /v1 with ``rest_hot_path=false``; the core a
    stand-in whose lifecycle only parses): the same 400s from the same decoder wrapper, logged as
    at most one WARNING, never an ERROR."""
    from serving.api.rest.app import create_app
    from serving.settings import Settings

    async def handle(protocol, endpoint, parse, render, **kw):
        await parse()
        raise AssertionError("the body should not have parsed")

    async def offload(fn, *args, heavy=True):
        return fn(*args)

    core = types.SimpleNamespace(settings=Settings(_env_file=None), record=lambda *a, **k: None, handle=handle,
                                 offload=offload)
    app = create_app(core)
    cases = [
        ("/v1/sentiment:predict", f'{{"texts": ["fine"], "x": {deep()}}}'.encode(), "body: object contains unknown field x"),
        ("/v1/digits:predict", f'{{"images": [{deep()}]}}'.encode(), "request body is nested deeper"),
        ("/v1/sentiment:predict", b'{"texts": ["\xff"]}', "body is not valid JSON (Invalid UTF-8 encoded string)"),
        ("/v1/sentiment:predict", b'{"texts": ["ok"], "version": 1e999}', "version: number out of range"),
        ("/v1/digits:predict", b'{"images_b64": ["AA=="], "model": 1e999}', "model: number out of range"),
    ]

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return [await c.post(path, content=body, headers={"content-type": "application/json"})
                    for path, body, _ in cases]

    with caplog.at_level(logging.WARNING):
        answers = asyncio.run(main())
    for (path, _, message), r in zip(cases, answers):
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(message), (path, r.text)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len([r for r in caplog.records if "undecodable JSON" in r.getMessage()]) <= 1


# -- 2. BYTES tensors that do not fit their shape: 400 from the shape alone ------------------------
def binary_body(shape: list[int], raw: bytes, name: str = "text") -> tuple[bytes, dict]:
    head = json.dumps({"inputs": [{"name": name, "datatype": "BYTES", "shape": shape,
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return head + raw, {"inference-header-content-length": str(len(head)), "content-type": "application/octet-stream"}


def zero_length_elements(total: int, shape=(1,)) -> tuple[bytes, dict]:
    """A body of ``total`` bytes (JSON header + raw): as many zero-length BYTES elements as fit."""
    probe = total - 1000  # a binary_data_size of as many digits as it will have
    raw_len = (total - (len(binary_body(list(shape), bytes(probe))[0]) - probe)) // 4 * 4
    body, headers = binary_body(list(shape), bytes(raw_len))
    assert total - 8 <= len(body) <= total
    return body, headers


def grpc_zero_length_elements(total: int) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name="sentiment_lstm")
    request.inputs.add(name="text", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(bytes((total - 64) // 4 * 4))
    assert len(request.SerializeToString()) <= total
    return request


def test_rest_bytes_data_that_do_not_fit_the_shape_are_400_at_once(gw):
    with httpx.Client(base_url=gw.rest, timeout=10) as c:
        body, headers = zero_length_elements(MIB)
        t0 = time.perf_counter()
        r = c.post("/v2/models/sentiment_lstm/infer", content=body, headers=headers)
        assert r.status_code == 400, r.text
        assert "bytes of data left after the 1 element of shape [1]" in r.json()["error"]
        assert time.perf_counter() - t0 < 1
        body, headers = binary_body([262144], bytes(MIB))  # the shape itself over the limit: 413, as /v1
        r = c.post("/v2/models/sentiment_lstm/infer", content=body, headers=headers)
        assert (r.status_code, r.json()["error"]) == (413, "too many texts: 262144 > max_items_per_request=1024")
        body, headers = binary_body([4], bytes(12))
        r = c.post("/v2/models/sentiment_lstm/infer", content=body, headers=headers)
        assert r.status_code == 400 and "holds 4 elements" in r.json()["error"] and "fewer than 16" in r.json()["error"]
        data = "[" + ",".join(['""'] * 300_000) + "]"  # JSON: 300,000 strings for shape [1]
        r = c.post("/v2/models/sentiment_lstm/infer", content=GOOD_V2_JSON.replace('["A wonderful film."]', data))
        assert r.status_code == 400 and "the data has at least 300000 strings" in r.json()["error"], r.text
        data = "[" + ",".join(["[]"] * 300_000) + "]"  # 300,000 empty rows for shape [1, 1]
        r = c.post("/v2/models/sentiment_lstm/infer",
                   content=GOOD_V2_JSON.replace("[1]", "[1, 1]").replace('["A wonderful film."]', data))
        assert r.status_code == 400 and r.json()["error"] == "inputs[0].data[0]: expected array of length 1", r.text
        data = "[" + ",".join(["0"] * 300_000) + "]"  # numbers: counted before decoding
        tensor = {"name": "token_ids", "datatype": "INT32", "shape": [1, 20], "data": "X"}
        r = c.post("/v2/models/sentiment_lstm/infer", content=json.dumps({"inputs": [tensor]}).replace('"X"', data))
        assert r.status_code == 400
        assert r.json()["error"] == "input 'token_ids': shape [1, 20] holds 20 elements, the data has 300000"
        r = c.post("/v2/models/sentiment_lstm/infer", json={**GOOD_V2, "parameters": {"x": [[[]]] * 1000}})
        assert r.status_code == 400 and r.json()["error"].startswith("parameters[...]: expected")  # scalars only


def test_grpc_bytes_data_that_do_not_fit_the_shape_are_invalid_argument_at_once(gw):
    with grpc.insecure_channel(gw.grpc) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(grpc_zero_length_elements(MIB), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "bytes of data left after the 1 element of shape [1]" in e.value.details()
        assert time.perf_counter() - t0 < 1
        request = v2.ModelInferRequest(model_name="sentiment_lstm")  # typed contents: counted, not converted
        request.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.extend([b""] * 262144)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == "input 'text': shape [1] holds 1 elements, the data has 262144"
        request = v2.ModelInferRequest(model_name="sentiment_lstm")
        request.inputs.add(name="text", datatype="BYTES", shape=[5000])
        request.raw_input_contents.append(bytes(20000))
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request, timeout=10)
        assert (e.value.code(), e.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                       "too many texts: 5000 > max_items_per_request=1024")


# The poller runs in a process of its own: in this one, the load's client threads (and, for the
# TF Serving backend, the stand-in's TensorFlow) hold the GIL for long stretches, and a poller
# thread here measured its own turn for the GIL (~340 ms once in CI), not the gateway's loop.
POLLER = """
import json, sys, threading, time
import httpx
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
times = []
with httpx.Client(base_url=sys.argv[1], timeout=10) as c:
    print("polling", flush=True)
    while not stop.is_set():
        t0 = time.perf_counter()
        status = c.get("/healthz").status_code
        times.append(time.perf_counter() - t0)
        if status != 200:
            times.append(f"status {status}")
            break
        time.sleep(0.010)
print(json.dumps(times), flush=True)
"""


class HealthPoller:
    """GET /healthz every 10 ms over one keep-alive connection, in a process of its own (POLLER);
    ``worst``: the longest any answer took."""

    def __init__(self, gw):
        self.gw, self.times = gw, []

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", POLLER, self.gw.rest], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "polling"
        return self

    def __exit__(self, *exc):
        out, _ = self.proc.communicate(input="", timeout=30)
        self.times = json.loads(out.strip().splitlines()[-1])
        assert all(isinstance(t, float) for t in self.times), self.times[-1]

    @property
    def worst(self) -> float:
        return max(self.times)


def under_load(gw, send, clients: int, seconds: float = LOAD_S) -> tuple[HealthPoller, list]:
    """``send(i)`` over and over in ``clients`` threads for ``seconds``, /healthz polled meanwhile."""
    stop, results, errors = threading.Event(), [], []

    def client(i):
        try:
            while not stop.is_set():
                results.append(send(i))
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    with HealthPoller(gw) as health:
        time.sleep(0.2)  # a few polls before the load
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors[:3]
    return health, results


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_bytes_payloads_that_do_not_fit_the_shape_do_not_hold_the_event_loop(gw, protocol):
    """4 clients send 1 MiB of zero-length BYTES elements for shape [1] over and over (at most
    inline_parse_bytes, so parsed on the event loop); /healthz keeps answering within 100 ms."""
    if protocol == "rest":
        body, headers = zero_length_elements(MIB)
        clients = [httpx.Client(base_url=gw.rest, timeout=30) for _ in range(4)]

        def send(i):
            return clients[i].post("/v2/models/sentiment_lstm/infer", content=body, headers=headers).status_code
    else:
        request = grpc_zero_length_elements(MIB)
        channels = [grpc.insecure_channel(gw.grpc) for _ in range(4)]
        stubs = [v2_grpc.GRPCInferenceServiceStub(ch) for ch in channels]

        def send(i):
            try:
                stubs[i].ModelInfer(request, timeout=30)
            except grpc.RpcError as e:
                return e.code()
            return "ok"
    try:
        health, results = under_load(gw, send, 4)
    finally:
        for x in clients if protocol == "rest" else channels:
            x.close()
    expected = 400 if protocol == "rest" else grpc.StatusCode.INVALID_ARGUMENT
    assert len(results) >= 20 and set(results) == {expected}, set(results)
    print(f"\n{protocol}: {len(results)} requests of 1 MiB in {LOAD_S:.0f} s; /healthz: {len(health.times)} polls, "
          f"worst {health.worst * 1000:.1f} ms")
    assert health.worst <= MAX_HEALTH_WAIT_S, f"/healthz waited {health.worst * 1000:.0f} ms"


# -- 3. /metrics: off the loop, shared, and never hiding a finished request --------------------------
def requests_counted(text: str, outcome: str) -> float:
    prefix = 'classifier_requests_total{endpoint="/v1/sentiment:predict",'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix) and 'protocol="rest"' in line and f'outcome="{outcome}"' in line)


def test_metrics_scrapes_are_shared_and_do_not_hold_the_event_loop(gw):
    clients = [httpx.Client(base_url=gw.rest, timeout=30) for _ in range(8)]
    try:
        def scrape(i):
            r = clients[i].get("/metrics")
            assert r.status_code == 200 and r.text.startswith("# HELP")
            return time.monotonic(), r.content

        health, results = under_load(gw, scrape, 8, seconds=2.0)
    finally:
        for c in clients:
            c.close()
    bodies = [body for _, body in results]
    distinct = len(set(bodies))
    print(f"\n/metrics: {len(bodies)} scrapes by 8 clients in 2 s, {distinct} distinct texts; /healthz: "
          f"{len(health.times)} polls, worst {health.worst * 1000:.1f} ms")
    assert len(bodies) >= 40
    # Nothing was counted meanwhile (/healthz is not a counted request): about one render per 0.5 s
    # (metrics_cache_s), shared by every scrape in between (before: every scrape rendered, ~120 texts).
    assert distinct <= 10, distinct
    assert max(len(b) for b in bodies) - min(len(b) for b in bodies) < 1000  # equal-ish: the same series
    assert health.worst <= MAX_HEALTH_WAIT_S, f"/healthz waited {health.worst * 1000:.0f} ms"
    # ... and a scrape after a request finished counts it, however soon after the last one
    with httpx.Client(base_url=gw.rest, timeout=10) as c:
        for _ in range(3):
            before = requests_counted(c.get("/metrics").text, "INVALID_ARGUMENT")
            assert c.post("/v1/sentiment:predict", json={"texts": [" "]}).status_code == 400
            assert requests_counted(c.get("/metrics").text, "INVALID_ARGUMENT") == before + 1


# -- 4. no redirect built from the Host header --------------------------------------------------------
def test_a_trailing_slash_is_not_redirected_to_the_host_the_client_names(gw):
    conn = Connection(gw)
    try:
        for path in ("/v1/models/", "/v2/health/live/", "/metrics/"):
            conn.host = "evil.example"
            status, headers, content = conn.request("GET", path, headers={})
            assert "location" not in headers and status == 404, (path, status, headers)
            error = json.loads(content)["error"]  # /v2 paths: the Open Inference Protocol's {"error": message}
            assert error == f"GET {path}: Not Found" if path.startswith("/v2/") else error["code"] == "NOT_FOUND"
    finally:
        conn.close()
    r = httpx.get(gw.rest + "/v1/models/", headers={"host": "evil.example"}, follow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers
