"""Cost of whole-text scoring next to the default (last 20 tokens), measured side by side in
one run: a gateway (embedded backend) started here, gRPC ClassifySentiment calls of
--batch IMDB test reviews, --concurrency calls in flight, each mode for --seconds; and the
raw batched SavedModel call on the same rows (windows) in this process for the ceiling.

    python bench/whole_text.py [--model sentiment_lstm] [--seconds 10] [--batch 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import process, wait_for  # noqa: E402
from serving.gen.classifier.v1 import classifier_pb2 as pb  # noqa: E402
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc  # noqa: E402
from testkit.gateway import free_port, stable_version  # noqa: E402


async def drive(target: str, batches: list[list[str]], model: str, whole_text: bool, seconds: float,
                concurrency: int) -> dict:
    texts = windows = calls = 0
    latencies = []
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        end = time.perf_counter() + seconds

        async def worker(k: int):
            nonlocal texts, windows, calls
            i = k
            while time.perf_counter() < end:
                batch = batches[i % len(batches)]
                i += concurrency
                t0 = time.perf_counter()
                r = await stub.ClassifySentiment(pb.SentimentRequest(texts=batch, model=model, whole_text=whole_text))
                latencies.append(time.perf_counter() - t0)
                calls += 1
                texts += len(r.predictions)
                windows += sum(p.windows for p in r.predictions)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {"texts_per_s": texts / elapsed, "windows_per_s": windows / elapsed, "calls": calls,
            "windows_per_text": windows / max(texts, 1), "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": float(np.percentile(latencies, 99)) * 1000}


def raw_rows_per_s(model: str, rows: np.ndarray, seconds: float, batch: int = 256) -> float:
    import tensorflow as tf

    path = ROOT / "models" / model / str(stable_version(model))
    sig = tf.saved_model.load(str(path)).signatures["serving_default"]
    key = next(iter(sig.structured_input_signature[1]))
    sig(**{key: tf.constant(rows[:batch])})
    done, i, end = 0, 0, time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < end:
        x = rows[i:i + batch] if i + batch <= len(rows) else rows[:batch]
        i = (i + batch) % max(1, len(rows) - batch)
        sig(**{key: tf.constant(x)})
        done += len(x)
    return done / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sentiment_lstm")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--batch", type=int, default=64, help="texts per call")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--data-dir", default=os.environ.get("CLASSIFIER_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    with gzip.open(Path(a.data_dir) / "imdb_test.jsonl.gz", "rt", encoding="utf-8") as f:
        reviews = [json.loads(line)["text"] for _, line in zip(range(4096), f)]
    batches = [reviews[i:i + a.batch] for i in range(0, len(reviews) - a.batch + 1, a.batch)]
    rest, grpc_port = free_port(), free_port()
    env = {"CLASSIFIER_REST_PORT": str(rest), "CLASSIFIER_GRPC_PORT": str(grpc_port), "CLASSIFIER_HOST": "127.0.0.1",
           "CLASSIFIER_MODELS": json.dumps([a.model]), "CLASSIFIER_DRAIN_SETTLE_S": "0", "TF_CPP_MIN_LOG_LEVEL": "2",
           "CLASSIFIER_ACCESS_LOG": "false", "CLASSIFIER_MAX_QUEUE_WAIT_S": "5"}
    results = {}
    with process([sys.executable, "-m", "serving"], env):
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{rest}/readyz").status_code == 200, 180, "the gateway")
        target = f"127.0.0.1:{grpc_port}"
        asyncio.run(drive(target, batches[:4], a.model, True, 2, a.concurrency))  # warm both paths
        for mode, whole in (("default (last 20 tokens)", False), ("whole_text", True)):
            results[mode] = asyncio.run(drive(target, batches, a.model, whole, a.seconds, a.concurrency))
    from contract.repository import read_version

    mv = read_version(ROOT / "models", a.model, stable_version(a.model))
    stride = mv.whole_text_stride
    rows = np.array([w for t in reviews for w in mv.preprocessor.windows(t, stride, 32)], dtype=np.int32)
    results["raw SavedModel call, batch 256 (rows = windows)"] = {"windows_per_s": raw_rows_per_s(a.model, rows, a.seconds)}
    raw = results["raw SavedModel call, batch 256 (rows = windows)"]["windows_per_s"]
    print(f"{a.model} v{mv.version}, stride {stride}, gRPC calls of {a.batch} IMDB test reviews, {a.concurrency} in flight, "
          f"{a.seconds:g} s each (commit {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, cwd=ROOT).stdout.strip()})")
    print(f"{'mode':50} {'texts/s':>9} {'rows/s':>9} {'rows/text':>9} {'p50 ms':>8} {'p99 ms':>8} {'rows/s vs raw':>13}")
    for mode, r in results.items():
        print(f"{mode:50} {r.get('texts_per_s', float('nan')):9.0f} {r['windows_per_s']:9.0f} "
              f"{r.get('windows_per_text', float('nan')):9.2f} {r.get('p50_ms', float('nan')):8.1f} "
              f"{r.get('p99_ms', float('nan')):8.1f} {r['windows_per_s'] / raw:13.2f}")
    d, w = results["default (last 20 tokens)"], results["whole_text"]
    print(f"whole_text costs {d['texts_per_s'] / w['texts_per_s']:.1f}x the default per text "
          f"({w['windows_per_text']:.2f} windows per text)")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
