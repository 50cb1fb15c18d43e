"""Benchmark: the CLI (classifier-client over the gRPC stream) against the raw batched model call.

    python bench/client.py [--model sentiment_lstm] [--seconds 10] [--json bench/results/client.json] [-- CLI options]

(a) raw: the SavedModel's serving signature in-process on batches of 256 pre-tokenised
    reviews of the IMDB test split (bench/common.py's raw_ceiling) — the ceiling;
(b) the CLI: `classifier-client sentiment` over the full 25,000-review test split through a
    gateway on this machine (sharing its cores), from reading the file to the written output.
Prints both in texts/s and the ratio (b)/(a); the goal is >= 0.85.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import raw_ceiling, run_cli, save, split_file  # noqa: E402
from testkit.gateway import gateway_process  # noqa: E402


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
