"""Benchmark: the CLI (classifier-client over the gRPC stream) against the raw batched model call.

    python bench/client.py [--whole-text] [--jobs 2] [--model sentiment_lstm] [--seconds 10] [--runs 3]
                           [--json bench/results/client.json] [-- CLI options]

(a) raw: the SavedModel's serving signature in-process on batches of 256 rows, one call after
    another — the ceiling. Last 20 tokens (default): pre-tokenised IMDB test reviews, one row each
    (bench/common.py's raw_ceiling). ``--whole-text``: the same windows the gateway makes of the
    reviews (contract/ text preprocessing: every review's 20-token windows, stride and cap as
    served), rows/s ÷ windows per review of the split = reviews/s;
(b) the CLI: `classifier-client sentiment` over the full 25,000-review test split through a
    gateway on this machine (sharing its cores), from reading the file to the written output, with
    the default settings of both (the gateway's max_queue_wait_s=0.1, the client's window and chunks);
    ``--jobs 2``: two CLI processes at once over the split (each its own output): each one's texts/s
    over the time both ran (the slope of their output files' rows, polled every 50 ms, over the
    middle 80 % of that time), how evenly they shared (the slower over the faster), and their sum.
Prints (a) and (b) side by side in texts/s and the goals: (b)/(a) >= 0.9 for last-20 jobs, >= 0.85
for whole-text jobs; with --jobs 2 also both finish and share within 20 %.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import raw_ceiling, run_cli, save, split_file  # noqa: E402
from testkit.gateway import gateway_process, stable_version  # noqa: E402

GOAL = {False: 0.9, True: 0.85}  # CLI / raw, by whole text
FAIR = 0.8  # two jobs: the slower one's texts/s over the faster one's, at least (within 20 %)


def raw_windows_ceiling(model: str, texts: list[str], seconds: float, batch: int = 256) -> dict:
    """The raw batched call on the windows the gateway makes of ``texts`` (whole text): rows/s,
    and reviews/s = rows/s ÷ the split's windows per review."""
    import numpy as np
    import tensorflow as tf

    from contract.repository import read_version
    from contract.whole_text import MAX_WINDOWS

    v = read_version(ROOT / "models", model, stable_version(model))
    stride = v.whole_text_stride
    rows = [w for t in texts for w in v.preprocessor.windows(t, stride, MAX_WINDOWS)]
    per_text = len(rows) / len(texts)
    rows = np.asarray(rows, dtype=np.int32)
    loaded = tf.saved_model.load(str(v.path))
    sig = loaded.signatures["serving_default"]
    key = next(iter(sig.structured_input_signature[1]))
    batches = [rows[i:i + batch] for i in range(0, len(rows) - batch + 1, batch)]
    for b in batches[:3]:
        sig(**{key: tf.constant(b)})
    done, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = batches[i % len(batches)]
        sig(**{key: tf.constant(b)})["probabilities"].numpy()
        done, i = done + len(b), i + 1
    rows_per_s = done / (time.perf_counter() - t0)
    return {"texts_per_s": rows_per_s / per_text, "rows_per_s": rows_per_s, "windows_per_text": per_text,
            "stride": stride, "batch": batch, "version": v.version}


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def run_jobs(gw, model: str, src: Path, n_texts: int, jobs: int, cli_args=()) -> dict:
    """``jobs`` CLI processes at once over the split; their output files are polled every 50 ms, so
    each one's rows over the time all of them ran are known."""
    tmp = Path(tempfile.mkdtemp())
    outs = [tmp / f"out{k}.jsonl" for k in range(jobs)]
    cmds = [[sys.executable, "-m", "classifier_client.cli", "sentiment", str(src), "--target", gw.grpc, "-o", str(o),
             "--model", model, *cli_args] for o in outs]  # not --quiet: their summary lines (retries, window)
    samples: list[tuple[float, list[int]]] = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            samples.append((time.perf_counter(), [_lines(o) for o in outs]))
            time.sleep(0.05)

    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in cmds]
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    ends, errors = [0.0] * jobs, [""] * jobs
    pending = set(range(jobs))
    while pending:
        for k in list(pending):
            if procs[k].poll() is not None:
                ends[k] = time.perf_counter()
                errors[k] = procs[k].stderr.read()
                pending.discard(k)
        time.sleep(0.02)
    stop.set()
    poller.join()
    samples.append((time.perf_counter(), [_lines(o) for o in outs]))
    both_until = min(ends)  # every job ran from (about) t0 until the first one ended

    def rows_at(t: float) -> list[int]:
        last = [0] * jobs
        for ts, counts in samples:
            if ts > t:
                break
            last = counts
        return last

    # Rows are written in input order, so a chunk waiting out a pushback holds back the ones after it
    # (up to the run's chunks ahead) and they come out in a burst: the rate while all ran is the
    # slope of a least-squares line through each job's written rows over the middle 80 % of that time.
    overlap = both_until - t0
    window = [(t - t0, c) for t, c in samples if 0.1 * overlap <= t - t0 <= 0.9 * overlap]

    def slope(k: int) -> float:
        xs, ys = [t for t, _ in window], [c[k] for _, c in window]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-12)

    each = [slope(k) for k in range(jobs)]
    results = {
        "jobs": jobs, "overlap_s": overlap, "texts_per_s_while_all_ran": each,
        "rows_written_when_the_first_ended": rows_at(both_until),
        "fairness": min(each) / max(each) if max(each) else 0.0,
        "sum_texts_per_s": sum(each),
        "completed": [p.returncode == 0 and _lines(o) == n_texts for p, o in zip(procs, outs)],
        "seconds": [e - t0 for e in ends],
        "exit": [p.returncode for p in procs],
        "summaries": [next((line for line in e.splitlines() if "retries:" in line), e.strip()[-300:]) for e in errors],
        "command": " ".join(["classifier-client"] + cmds[0][3:]),
    }
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sentiment_lstm")
    p.add_argument("--whole-text", action="store_true", help="whole-text jobs (the raw ceiling on the same windows)")
    p.add_argument("--jobs", type=int, default=1, help="CLI processes at once (2: fairness and their sum)")
    p.add_argument("--seconds", type=float, default=10, help="duration of the raw measurement")
    p.add_argument("--runs", type=int, default=3, help="CLI runs over the full split (the best is kept; with "
                   "--jobs, runs of the jobs together, the one with the best sum kept)")
    p.add_argument("--json", default=None)
    p.add_argument("--max-queue-wait-s", type=float, default=0.1,
                   help="the gateway's max_queue_wait_s (default: the gateway's own default)")
    p.add_argument("cli_args", nargs="*", help="extra CLI options (after --)")
    a = p.parse_args(argv)

    src, texts = split_file(Path(tempfile.mkdtemp()))
    cli_args = [*(["--whole-text"] if a.whole_text else []), *a.cli_args]
    mode = "whole text" if a.whole_text else "last 20 tokens"
    results = {"model": a.model, "texts": len(texts), "cpus": os.cpu_count(), "mode": mode, "jobs": a.jobs}
    raw = raw_windows_ceiling(a.model, texts, a.seconds) if a.whole_text else raw_ceiling(a.model, texts, a.seconds)
    results["a_raw_batched_model_call"] = raw
    with gateway_process(models=json.dumps([a.model]), max_queue_wait_s=a.max_queue_wait_s) as gw:
        try:
            if a.jobs == 1:
                results["b_cli_grpc_stream_full_split"] = run_cli(gw, a.model, a.runs, cli_args)
            else:
                warm = Path(tempfile.mkdtemp()) / "warm.jsonl"  # warm the gateway up, as run_cli does
                warm.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:2048]))
                subprocess.run([sys.executable, "-m", "classifier_client.cli", "sentiment", str(warm), "--target", gw.grpc,
                                "-o", str(warm.with_suffix(".out")), "--model", a.model, "-q", *cli_args], cwd=ROOT)
                runs = [run_jobs(gw, a.model, src, len(texts), a.jobs, cli_args) for _ in range(a.runs)]
                results["b_cli_jobs_at_once"] = max(runs, key=lambda r: (all(r["completed"]), r["sum_texts_per_s"]))
                results["b_cli_jobs_at_once"]["all_runs"] = [
                    {k: r[k] for k in ("texts_per_s_while_all_ran", "fairness", "sum_texts_per_s", "completed")} for r in runs]
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
    ceiling, goal = raw["texts_per_s"], GOAL[a.whole_text]
    verdict = lambda ok: "MET" if ok else "NOT MET"  # noqa: E731
    print(f"{a.model}, {mode}, {len(texts):,} IMDB test reviews, {os.cpu_count()} CPUs; gateway and client defaults"
          + (f" (+ {' '.join(a.cli_args)})" if a.cli_args else ""))
    what = f"(a) raw batched model call (256 rows{', windows' if a.whole_text else ''})"
    print(f"{what:<52}{ceiling:>10.0f} texts/s"
          + (f"  ({raw['rows_per_s']:.0f} rows/s, {raw['windows_per_text']:.2f} windows/review)" if a.whole_text else ""))
    lines = []
    if a.jobs == 1:
        cli = results["b_cli_grpc_stream_full_split"]
        results["ratio"] = cli["texts_per_s"] / ceiling
        print(f"{'(b) classifier-client, full split':<52}{cli['texts_per_s']:>10.0f} texts/s  (runs: "
              + ", ".join(f"{x:.0f}" for x in cli["runs_texts_per_s"]) + ")")
        print(f"{'ratio (b)/(a)':<52}{results['ratio']:>10.2f}")
        lines.append((f"(b)/(a) >= {goal}", results["ratio"] >= goal))
    else:
        j = results["b_cli_jobs_at_once"]
        for k, (tps, s, code) in enumerate(zip(j["texts_per_s_while_all_ran"], j["seconds"], j["exit"])):
            print(f"{f'(b{k + 1}) job {k + 1}, while all ran':<52}{tps:>10.0f} texts/s  (finished in {s:.1f}s, exit {code})")
        results["ratio"] = j["sum_texts_per_s"] / ceiling
        print(f"{'(b) sum of the jobs while all ran':<52}{j['sum_texts_per_s']:>10.0f} texts/s  (over {j['overlap_s']:.1f}s)")
        print(f"{'sum (b)/(a)':<52}{results['ratio']:>10.2f}")
        print(f"{'fairness: slowest / fastest job':<52}{j['fairness']:>10.2f}")
        for k, line in enumerate(j["summaries"]):
            print(f"  job {k + 1}: {line}")
        if len(j["all_runs"]) > 1:
            print("  all runs (texts/s each, fairness, sum): " + "; ".join(
                f"{'/'.join(f'{x:.0f}' for x in r['texts_per_s_while_all_ran'])}, {r['fairness']:.2f}, {r['sum_texts_per_s']:.0f}"
                for r in j["all_runs"]))
        lines.append((f"all {a.jobs} jobs complete (exit 0, every row)", all(j["completed"])))
        lines.append((f"fair: within 20 % of each other (slowest/fastest >= {FAIR})", j["fairness"] >= FAIR))
        lines.append((f"sum (b)/(a) >= {goal}", results["ratio"] >= goal))
    results["goals"] = {name: ok for name, ok in lines}
    for name, ok in lines:
        print(f"goal: {name:<62}{verdict(ok)}")
    if a.json:
        save(a.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
