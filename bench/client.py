"""Benchmark: the CLI (classifier-client over the gRPC stream) against the raw batched model call.

    python bench/client.py [--model sentiment_lstm] [--seconds 10] [--json bench/results/client.json] [-- CLI options]

(a) raw: the SavedModel's serving signature in-process on batches of 256 pre-tokenised
    reviews of the IMDB test split (bench/gateway.py's raw_ceiling) — the ceiling;
(b) the CLI: `classifier-client sentiment` over the full 25,000-review test split through a
    gateway on this machine (sharing its cores), from reading the file to the written output.
Prints both in texts/s and the ratio (b)/(a); the goal is >= 0.85.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway import raw_ceiling, save  # noqa: E402
from tests.gateway import gateway_process  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sentiment_lstm")
    p.add_argument("--seconds", type=float, default=10, help="duration of the raw measurement")
    p.add_argument("--runs", type=int, default=3, help="CLI runs over the full split (the best is kept)")
    p.add_argument("--json", default=None)
    p.add_argument("--max-queue-wait-s", type=float, default=0.1,
                   help="the gateway's max_queue_wait_s (default: the gateway's own default)")
    p.add_argument("cli_args", nargs="*", help="extra CLI options (after --)")
    a = p.parse_args(argv)

    from training.data import data_dir

    tmp = Path(tempfile.mkdtemp())
    src, out = tmp / "imdb_test.jsonl", tmp / "out.jsonl"
    texts = []
    with gzip.open(data_dir() / "imdb_test.jsonl.gz", "rt", encoding="utf-8") as f, open(src, "w", encoding="utf-8") as o:
        for line in f:
            r = json.loads(line)
            texts.append(r["text"])
            o.write(json.dumps({"text": r["text"], "label": r["label"]}) + "\n")

    results = {"model": a.model, "texts": len(texts), "cpus": os.cpu_count()}
    results["a_raw_batched_model_call"] = raw_ceiling(a.model, texts, a.seconds)
    runs = []
    with gateway_process(models=json.dumps([a.model]), max_queue_wait_s=a.max_queue_wait_s) as gw:
        cmd = [sys.executable, "-m", "classifier_client.cli", "sentiment", str(src), "--target", gw.grpc, "-o", str(out),
               "--model", a.model, "--quiet", *a.cli_args]
        (tmp / "warm.txt").write_text("warm up\n" * 2048)
        subprocess.run(cmd[:4] + [str(tmp / "warm.txt")] + cmd[5:], capture_output=True)  # warm the gateway up
        for _ in range(a.runs):
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            dt = time.perf_counter() - t0
            if r.returncode:
                print(r.stderr, file=sys.stderr)
                return 1
            assert out.read_bytes().count(b"\n") == len(texts)
            runs.append(len(texts) / dt)
    results["b_cli_grpc_stream_full_split"] = {"texts_per_s": max(runs), "runs_texts_per_s": runs,
                                               "command": " ".join(["classifier-client"] + cmd[3:])}
    ceiling = results["a_raw_batched_model_call"]["texts_per_s"]
    results["ratio"] = max(runs) / ceiling
    print(f"{'(a) raw batched model call (256)':<40}{ceiling:>10.0f} texts/s")
    print(f"{'(b) classifier-client, full split':<40}{max(runs):>10.0f} texts/s  (runs: "
          + ", ".join(f"{x:.0f}" for x in runs) + ")")
    print(f"{'ratio (b)/(a)':<40}{results['ratio']:>10.2f}  (goal >= 0.85)")
    if a.json:
        save(a.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
