"""Benchmark: the gateway against the raw batched model call, in one run on one machine.

    python bench/gateway.py [--model sentiment_lstm] [--seconds 10] [--json bench/results/gateway.json]

Measures, side by side:
  (a) raw: the SavedModel's serving signature called in-process on batches of
      256 pre-tokenised reviews — the ceiling;
  (b) REST: single-text POST /v1/sentiment:predict at concurrency 1, 16, 64
      (load from `wrk`, a C load generator, so the client takes little CPU);
  (c) gRPC: ClassifySentiment with batches of 256 texts (4 concurrent calls);
  (d) naive: FastAPI + one keras `model.predict` per request (bench/naive_app.py),
      single-text requests at concurrency 16;
  (e) the gateway's own cost: the same gateway over a backend that answers
      instantly (bench/instant_backend_gateway.py), single texts at concurrency 64.
Prints texts/s and p50/p99 latency for each, and the ratio to (a). Needs `wrk`
(Debian: apt-get install wrk). Every server runs on loopback on this machine,
so client and server share its cores, as they would on one node.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.gateway import free_port, gateway_process, wait_until  # noqa: E402


def load_texts(n: int) -> list[str]:
    from training.data import load_imdb

    return load_imdb().test.x[:n]


def raw_ceiling(model: str, texts: list[str], seconds: float) -> dict:
    import tensorflow as tf

    from serving.repository import read_version, versions_on_disk

    v = read_version(ROOT / "models", model, versions_on_disk(ROOT / "models", model)[-1])
    sig = tf.saved_model.load(str(v.path)).signatures["serving_default"]
    batches = [v.preprocessor.encode_batch(texts[i : i + 256]) for i in range(0, len(texts) - 255, 256)]
    for b in batches[:3]:
        sig(token_ids=tf.constant(b))
    lat, n, t0 = [], 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in batches:
            t = time.perf_counter()
            sig(token_ids=tf.constant(b))["probabilities"].numpy()
            lat.append(time.perf_counter() - t)
            n += len(b)
    dt = time.perf_counter() - t0
    return {"texts_per_s": n / dt, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "batch": 256, "version": v.version}


def pct(values: list[float], q: float) -> float:
    return float(statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000) if len(values) > 1 else float("nan")


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
    lat, counts, stop = [], [0], time.perf_counter() + seconds
    lock = threading.Lock()

    def worker(k):
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            i = k
            while time.perf_counter() < stop:
                t = time.perf_counter()
                stub.ClassifySentiment(reqs[i % len(reqs)])
                with lock:
                    lat.append(time.perf_counter() - t)
                    counts[0] += batch
                i += 1

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    return {"texts_per_s": counts[0] / (time.perf_counter() - t0), "texts": counts[0], "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
            "batch": batch, "concurrency": concurrency}


def naive(model: str, bodies_file: str, seconds: float, concurrency: int = 16) -> dict:
    from serving.repository import versions_on_disk

    port = free_port()
    env = {**os.environ, "NAIVE_MODEL_DIR": str(ROOT / "models" / model / str(versions_on_disk(ROOT / "models", model)[-1]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "naive_app:app", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT / "bench", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        import httpx

        url = f"http://127.0.0.1:{port}/v1/sentiment:predict"
        wait_until(lambda: httpx.post(url, json={"texts": ["warm up"]}, timeout=30).status_code == 200, 120)
        return wrk(url, bodies_file, concurrency, seconds)
    finally:
        proc.terminate()
        proc.wait(30)


def instant(bodies_file: str, seconds: float) -> dict:
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "instant_backend_gateway.py")],
        env={**os.environ, "BENCH_REST_PORT": str(port)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/sentiment:predict"
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200, 60)
        result = wrk(url, bodies_file, 64, seconds)
        return result
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sentiment_lstm")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "gateway.json"))
    a = p.parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    texts = load_texts(4096)
    bodies = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
    for t in texts:
        bodies.write(json.dumps({"texts": [t], "model": a.model}) + "\n")
    bodies.close()

    results = {"model": a.model, "seconds_each": a.seconds, "cpus": os.cpu_count()}
    results["a_raw_batched_model_call"] = raw_ceiling(a.model, texts, a.seconds)
    with gateway_process() as gw:
        url = gw.rest + "/v1/sentiment:predict"
        wrk(url, bodies.name, 16, 2)  # warm the server up
        for c in (1, 16, 64):
            results[f"b_rest_single_text_c{c}"] = wrk(url, bodies.name, c, a.seconds)
        results["c_grpc_batches_256"] = grpc_batches(gw.grpc, a.model, texts, a.seconds)
    results["d_naive_fastapi_predict_per_request_c16"] = naive(a.model, bodies.name, a.seconds)
    results["e_gateway_over_instant_backend_c64"] = instant(bodies.name, a.seconds)

    ceiling = results["a_raw_batched_model_call"]["texts_per_s"]
    naive_tps = results["d_naive_fastapi_predict_per_request_c16"]["texts_per_s"]
    print(f"{'case':<42}{'texts/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'vs (a)':>8}{'vs (d)':>8}")
    for k, v in results.items():
        if isinstance(v, dict):
            v["ratio_to_raw"] = v["texts_per_s"] / ceiling
            v["ratio_to_naive"] = v["texts_per_s"] / naive_tps
            print(f"{k:<42}{v['texts_per_s']:>10.0f}{v['p50_ms']:>9.2f}{v['p99_ms']:>9.2f}"
                  f"{v['ratio_to_raw']:>8.2f}{v['ratio_to_naive']:>8.1f}")
    save(a.json, results)
    return 0


def save(path: str, results: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2))
    print(f"written {path}")


if __name__ == "__main__":
    raise SystemExit(main())
