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
from testkit.gateway import gateway_process  # noqa: E402


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

    _, texts = split_file(Path(tempfile.mkdtemp()))
    results = {"model": a.model, "texts": len(texts), "cpus": os.cpu_count()}
    results["a_raw_batched_model_call"] = raw_ceiling(a.model, texts, a.seconds)
    with gateway_process(models=json.dumps([a.model]), max_queue_wait_s=a.max_queue_wait_s) as gw:
        try:
            cli = run_cli(gw, a.model, a.runs, a.cli_args)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
    results["b_cli_grpc_stream_full_split"] = cli
    ceiling = results["a_raw_batched_model_call"]["texts_per_s"]
    results["ratio"] = cli["texts_per_s"] / ceiling
    print(f"{'(a) raw batched model call (256)':<40}{ceiling:>10.0f} texts/s")
    print(f"{'(b) classifier-client, full split':<40}{cli['texts_per_s']:>10.0f} texts/s  (runs: "
          + ", ".join(f"{x:.0f}" for x in cli["runs_texts_per_s"]) + ")")
    print(f"{'ratio (b)/(a)':<40}{results['ratio']:>10.2f}  (goal >= 0.85)")
    if a.json:
        save(a.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
