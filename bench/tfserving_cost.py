"""Benchmark: what the gateway itself costs per text with the TF Serving backend.

    python bench/tfserving_cost.py [--model sentiment_lstm] [--seconds 10] [--json bench/results/tfserving_cost.json]

1. End to end: the TF Serving stand-in (real SavedModels, official servicer
   classes) in one process, the gateway with CLASSIFIER_BACKEND=tfserving in
   another, started so that it cannot import TensorFlow. Load: gRPC
   ClassifySentiment batches of 256 texts (4 concurrent calls) and, when `wrk`
   is installed, REST single-text requests at concurrency 64. The gateway
   process's CPU time (user + system, all threads, from /proc) is divided by the
   texts it answered: that is validation, tokenisation, batching, proto
   encoding/decoding, gRPC/HTTP and response building, with no model compute.
2. The parts, in this process, per text: validation + tokenisation (the
   version's TextPreprocessor), PredictRequest encoding (lean protos,
   tensor_content) and PredictResponse decoding, for batches of 256.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import grpc_batches, load_texts, process_cpu_seconds, save, wrk  # noqa: E402
from testkit.gateway import WITHOUT_TENSORFLOW, free_port, gateway_process  # noqa: E402


def parts(model: str, texts: list[str], seconds: float = 1.0) -> dict:
    import numpy as np

    from serving.gen.tensorflow_serving.apis import predict_pb2
    from contract.repository import read_version, versions_on_disk
    from serving.backends.tensors import from_tensor_proto, to_tensor_proto

    v = read_version(ROOT / "models", model, versions_on_disk(ROOT / "models", model)[-1])
    batch = texts[:256]

    def tokenise():
        ids = []
        for t in batch:  # the core's checks, then the version's preprocessor
            if not isinstance(t, str) or len(t) > 20_000 or not t.strip():
                raise ValueError
            ids.append(v.preprocessor.encode(t).ids)
        return np.array(ids, dtype=np.int32)

    ids = tokenise()

    def encode():
        r = predict_pb2.PredictRequest()
        r.model_spec.name, r.model_spec.signature_name = model, "serving_default"
        r.model_spec.version.value = v.version
        r.inputs["token_ids"].CopyFrom(to_tensor_proto(ids))
        r.output_filter.append("probabilities")
        return r.SerializeToString()

    response = predict_pb2.PredictResponse()
    response.outputs["probabilities"].CopyFrom(to_tensor_proto(np.random.default_rng(0).random((256, 2), dtype=np.float32)))
    wire = response.SerializeToString()

    def decode():
        return from_tensor_proto(predict_pb2.PredictResponse.FromString(wire).outputs["probabilities"])

    out = {}
    for name, fn in [("validate_and_tokenise", tokenise), ("encode_predict_request", encode), ("decode_predict_response", decode)]:
        fn()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            n += 1
        out[f"{name}_us_per_text"] = (time.perf_counter() - t0) / n / len(batch) * 1e6
    return out


def end_to_end(model: str, texts: list[str], seconds: float, bodies_file: str | None) -> dict:
    port = free_port()
    standin = subprocess.Popen([sys.executable, str(ROOT / "bench" / "standin_server.py"), str(port), model],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    results = {}
    try:
        assert "stand-in on" in standin.stdout.readline()
        with gateway_process(WITHOUT_TENSORFLOW, backend="tfserving", tfserving_address=f"127.0.0.1:{port}",
                             models=json.dumps([model])) as gw:
            pid = gw.process.pid
            grpc_batches(gw.grpc, model, texts, 2)  # warm up

            def measure(name, run):
                c0, s0 = process_cpu_seconds(pid), process_cpu_seconds(standin.pid)
                r = run()
                c1, s1 = process_cpu_seconds(pid), process_cpu_seconds(standin.pid)
                n = r["texts"]
                r["gateway_cpu_us_per_text"] = (c1 - c0) / n * 1e6
                r["standin_cpu_us_per_text"] = (s1 - s0) / n * 1e6
                results[name] = r

            measure("grpc_batches_256", lambda: grpc_batches(gw.grpc, model, texts, seconds))
            if bodies_file:
                url = gw.rest + "/v1/sentiment:predict"
                measure("rest_single_text_c64", lambda: wrk(url, bodies_file, 64, seconds))
    finally:
        standin.terminate()
        standin.wait(30)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sentiment_lstm")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "tfserving_cost.json"))
    a = p.parse_args(argv)
    texts = load_texts(4096)
    bodies_file = None
    if shutil.which("wrk"):
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
            for t in texts:
                f.write(json.dumps({"texts": [t], "model": a.model}) + "\n")
        bodies_file = f.name
    else:
        print("wrk not found (apt-get install wrk): REST case skipped", file=sys.stderr)
    results = {"model": a.model, "seconds_each": a.seconds, "cpus": os.cpu_count(),
               "parts": parts(a.model, texts), **end_to_end(a.model, texts, a.seconds, bodies_file)}
    print("gateway's own work per text, in-process (batches of 256):")
    for k, v in results["parts"].items():
        print(f"  {k:<40}{v:>8.2f} us")
    print(f"{'end to end (gateway -> TF Serving stand-in)':<44}{'texts/s':>9}{'p50 ms':>9}{'gw CPU us/text':>16}{'stand-in CPU us/text':>22}")
    for k, v in results.items():
        if isinstance(v, dict) and "texts_per_s" in v:
            print(f"  {k:<42}{v['texts_per_s']:>9.0f}{v['p50_ms']:>9.2f}{v['gateway_cpu_us_per_text']:>16.1f}"
                  f"{v['standin_cpu_us_per_text']:>22.1f}")
    save(a.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
