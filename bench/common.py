"""What the benchmark scripts share: their inputs, the raw ceiling, the load generators and
helpers that more than one script uses. The scripts (bench/*.py) import this module, never
one another; it imports only the project's packages (testkit/, contract/, training/, serving/).

- inputs and outputs: ``load_texts``, ``pct``, ``save``;
- the raw ceiling: ``raw_calls``, ``raw_ceiling`` (the served version's signature in-process);
- load: ``wrk`` (single-text REST requests from `wrk`), ``grpc_batches`` (ClassifySentiment
  batches), ``Http`` (one raw keep-alive HTTP/1.1 connection), ``run_cli`` (classifier-client
  over the whole IMDB test split);
- the gateway's own cost: ``instant`` (the gateway over bench/instant_backend_gateway.py),
  ``process_cpu_seconds``;
- processes: ``process`` (a subprocess, stopped with SIGINT), ``wait_for`` (testkit's
  ``wait_until``, exiting with a message on timeout).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from testkit.gateway import free_port, stable_version, wait_until

ROOT = Path(__file__).resolve().parent.parent


# -- inputs and outputs ---------------------------------------------------------------------


def load_texts(n: int) -> list[str]:
    from training.data import load_imdb

    return load_imdb().test.x[:n]


def pct(values: list[float], q: float) -> float:
    return float(statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000) if len(values) > 1 else float("nan")


def save(path: str, results: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2))
    print(f"written {path}")


# -- the raw ceiling ------------------------------------------------------------------------


def raw_calls(model: str, texts: list[str], batch: int, seconds: float) -> dict:
    """The served version's signature called in-process on batches of ``batch`` pre-tokenised
    texts, one call after another for ``seconds``: texts/s and the latency of one call."""
    import tensorflow as tf

    from contract.repository import read_version

    v = read_version(ROOT / "models", model, stable_version(model))
    loaded = tf.saved_model.load(str(v.path))  # kept while its signature is called
    sig = loaded.signatures["serving_default"]
    batches = [v.preprocessor.encode_batch(texts[i : i + batch]) for i in range(0, len(texts) - batch + 1, batch)]
    for b in batches[:3]:
        sig(token_ids=tf.constant(b))
    lat, n, i, t0 = [], 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = batches[i % len(batches)]
        t = time.perf_counter()
        sig(token_ids=tf.constant(b))["probabilities"].numpy()
        lat.append(time.perf_counter() - t)
        n, i = n + len(b), i + 1
    dt = time.perf_counter() - t0
    return {"texts_per_s": n / dt, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "batch": batch, "version": v.version}


def raw_ceiling(model: str, texts: list[str], seconds: float) -> dict:
    """Batches of 256: the model's own limit."""
    return raw_calls(model, texts, 256, seconds)


# -- load generators ------------------------------------------------------------------------


WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = {}
local i = 0
init = function(args)
  local f = io.open(args[1], "r")
  for line in f:lines() do bodies[#bodies + 1] = line end
  f:close()
end
request = function()
  i = i % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
"""


def wrk(url: str, bodies_file: str, concurrency: int, seconds: float) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_LUA)
    threads = min(2, concurrency)
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{max(1, round(seconds))}s", "--latency", "--timeout", "10s",
         "-s", f.name, url, "--", bodies_file],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def lat(q):
        m = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[m.group(2)]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    texts = int(re.search(r"(\d+) requests in", out).group(1))  # one text per request
    return {"texts_per_s": rps, "texts": texts, "p50_ms": lat(50), "p99_ms": lat(99), "concurrency": concurrency,
            "non_2xx": int(errors.group(1)) if errors else 0}


def grpc_batches(target: str, model: str, texts: list[str], seconds: float, batch: int = 256, concurrency: int = 4) -> dict:
    import grpc

    from serving.gen.classifier.v1 import classifier_pb2 as pb
    from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc

    reqs = [pb.SentimentRequest(texts=texts[i : i + batch], model=model) for i in range(0, len(texts) - batch + 1, batch)]
    lat, counts, refused, stop = [], [0], [0], time.perf_counter() + seconds
    lock = threading.Lock()

    def worker(k):
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            i = k
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    stub.ClassifySentiment(reqs[i % len(reqs)])
                except grpc.RpcError as e:  # refused (queue full): wait as told, then retry
                    if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    pushback = dict(e.trailing_metadata() or ()).get("grpc-retry-pushback-ms", "10")
                    time.sleep(int(pushback) / 1000)
                    with lock:
                        refused[0] += 1
                    continue
                with lock:
                    lat.append(time.perf_counter() - t)
                    counts[0] += batch
                i += 1

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    return {"texts_per_s": counts[0] / (time.perf_counter() - t0), "texts": counts[0], "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
            "batch": batch, "concurrency": concurrency, "refused_and_retried": refused[0]}


class Http:
    """One keep-alive HTTP/1.1 connection that sends pre-encoded requests and reads answers unparsed."""

    def __init__(self, host: str, port: int):
        self.host, self.port, self.r, self.w = host, port, None, None

    async def post(self, request: bytes) -> tuple[int, dict]:
        if self.w is None:
            self.r, self.w = await asyncio.open_connection(self.host, self.port)
        self.w.write(request)
        head = (await self.r.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
        if "content-length" in headers:  # the gateway's answers all have one (no chunked encoding)
            await self.r.readexactly(int(headers["content-length"]))
        else:
            await self.r.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(head[0].split(" ", 2)[1]), headers

    def close(self) -> None:
        if self.w is not None:
            self.w.close()
        self.r = self.w = None


def split_file(tmp: Path) -> tuple[Path, list[str]]:
    """The IMDB test split as the CLI's JSONL input (text, label) in ``tmp``, and its texts."""
    from training.data import data_dir

    src, texts = tmp / "imdb_test.jsonl", []
    with gzip.open(data_dir() / "imdb_test.jsonl.gz", "rt", encoding="utf-8") as f, open(src, "w", encoding="utf-8") as o:
        for line in f:
            r = json.loads(line)
            texts.append(r["text"])
            o.write(json.dumps({"text": r["text"], "label": r["label"]}) + "\n")
    return src, texts


def run_cli(gw, model: str, runs: int = 3, cli_args=()) -> dict:
    """The CLI over the whole split through the running gateway ``gw``, ``runs`` times (best kept)."""
    tmp = Path(tempfile.mkdtemp())
    src, texts = split_file(tmp)
    out = tmp / "out.jsonl"
    cmd = [sys.executable, "-m", "classifier_client.cli", "sentiment", str(src), "--target", gw.grpc, "-o", str(out),
           "--model", model, "--quiet", *cli_args]
    (tmp / "warm.txt").write_text("warm up\n" * 2048)
    subprocess.run(cmd[:4] + [str(tmp / "warm.txt")] + cmd[5:], capture_output=True)  # warm the gateway up
    speeds = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if r.returncode:
            raise RuntimeError(f"classifier-client failed: {r.stderr}")
        assert out.read_bytes().count(b"\n") == len(texts)
        speeds.append(len(texts) / dt)
    return {"texts_per_s": max(speeds), "runs_texts_per_s": speeds, "texts": len(texts),
            "command": " ".join(["classifier-client"] + cmd[3:])}


# -- the gateway's own cost -----------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def instant(bodies_file: str, seconds: float, hot_path: bool = True, root: Path = ROOT, env: dict | None = None) -> dict:
    """The gateway of the tree at ``root`` over the instant backend under 64 wrk connections:
    req/s, latency, and the gateway's CPU per request (from /proc). ``env``: added to its environment."""
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(root / "bench" / "instant_backend_gateway.py")],
        env={**os.environ, **(env or {}), "BENCH_REST_PORT": str(port), "CLASSIFIER_REST_HOT_PATH": str(hot_path).lower()},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/sentiment:predict"
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200, 60)
        wrk(url, bodies_file, 64, 2)  # warm up
        cpu0 = process_cpu_seconds(proc.pid)
        result = wrk(url, bodies_file, 64, seconds)
        cpu = process_cpu_seconds(proc.pid) - cpu0
        result["gateway_cpu_us_per_request"] = cpu / max(result["texts"], 1) * 1e6
        result["hot_path"] = hot_path
        return result
    finally:
        proc.terminate()
        proc.wait(30)


# -- processes ------------------------------------------------------------------------------


def wait_for(predicate, timeout: float, what: str) -> None:
    """testkit's ``wait_until`` polling every 0.5 s; on timeout, exit with 'timed out waiting for <what>'."""
    try:
        wait_until(predicate, timeout, interval=0.5)
    except TimeoutError:
        raise SystemExit(f"timed out waiting for {what}") from None


@contextmanager
def process(cmd: list[str], env: dict | None = None, log: Path | None = None):
    """``cmd`` in a subprocess in the project root (``env`` added to this one's), output to ``log``
    or discarded; stopped with SIGINT (killed after 30 s) on leaving."""
    out = open(log, "w") if log else subprocess.DEVNULL
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield p
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
        if log:
            out.close()
