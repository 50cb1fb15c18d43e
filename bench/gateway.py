"""Benchmark: the gateway against the raw batched model call, in one run on one machine.

    python bench/gateway.py [--model sentiment_lstm] [--seconds 10] [--json bench/results/gateway.json]

Measures, side by side:
  (a) raw: the SavedModel's serving signature called in-process on batches of
      256 pre-tokenised reviews -- the ceiling; and one call at batch 1 (the model's
      own latency for a lone text);
  (b) REST: single-text POST /v1/sentiment:predict at concurrency 1, 16, 64
      (load from `wrk`, a C load generator, so the client takes little CPU), and
      open-loop at half of the concurrency-64 rate (requests sent on a fixed
      schedule over keep-alive connections; latency counted from the scheduled time);
  (c) gRPC: ClassifySentiment with batches of 256 texts (4 concurrent calls), and the
      batch client (`classifier-client` over the gRPC stream) on the whole test split;
  (d) naive: FastAPI + one keras `model.predict` per request (bench/naive_app.py),
      single-text requests at concurrency 16;
  (e) the gateway's own cost: the same gateway over a backend that answers
      instantly (bench/instant_backend_gateway.py), single texts at concurrency 64,
      with the REST hot path and without it (rest_hot_path=false); the gateway
      process's CPU time per request is read from /proc.
Prints texts/s and p50/p99 latency for each and the ratio to (a), then every goal of
the performance issue next to its target.

``--base-root PATH`` (another checkout, e.g. ``git worktree add /tmp/base <commit>``) runs
only the cases that measure the gateway's own code -- REST single texts at concurrency 64,
gRPC batches of 256, and the gateway over the instant backend (CPU per request) -- for
that tree and this one, alternating, ``--rounds`` times, and prints them side by side.
``--tracing`` runs the same cases on this tree with OpenTelemetry tracing off, on for every
request, and on for 1 in 10 (OTEL_TRACES_EXPORTER=otlp, the SDK's default batch span processor,
exporting to an OTLP/gRPC sink in this process: testkit/otlp.py), side by side, with the
spans the sink received. Needs `wrk` (Debian: apt-get install wrk).
Every server runs on loopback on this machine, so client and server share its cores,
as they would on one node.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
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

from bench.common import (Http, grpc_batches, instant, load_texts, pct, process_cpu_seconds, raw_calls,  # noqa: E402
                          raw_ceiling, run_cli, save, wrk)
from testkit.gateway import free_port, gateway_process, stable_version, wait_until  # noqa: E402


def raw_batch1(model: str, texts: list[str], seconds: float) -> dict:
    """One text at a time: the model's own latency for a lone request."""
    return raw_calls(model, texts[:512], 1, seconds)


def naive(model: str, bodies_file: str, seconds: float, concurrency: int = 16) -> dict:
    port = free_port()
    env = {**os.environ, "NAIVE_MODEL_DIR": str(ROOT / "models" / model / str(stable_version(model)))}
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


def open_loop(host: str, port: int, bodies_file: str, rate: float, seconds: float, connections: int = 128) -> dict:
    """Requests sent at ``rate`` per second on a fixed schedule (not waiting for answers), over
    up to ``connections`` keep-alive connections; a request's latency counts from its
    scheduled time, so a stalled server is not hidden by a client that waits for it."""
    bodies = [line.strip().encode() for line in open(bodies_file, encoding="utf-8") if line.strip()]
    requests = [(f"POST /v1/sentiment:predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]
    # This process holds TensorFlow (the raw ceiling): a full garbage collection of its objects
    # takes ~0.1 s and would stall the client, not the server. No collections while it sends.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        return asyncio.run(send_on_schedule(host, port, requests, rate, seconds, connections))
    finally:
        gc.enable()
        gc.unfreeze()


async def send_on_schedule(host: str, port: int, requests: list[bytes], rate: float, seconds: float, connections: int) -> dict:
    """open_loop's sender: ``rate * seconds`` of ``requests`` (in turn), each at its scheduled time."""
    free = collections.deque(Http(host, port) for _ in range(connections))  # FIFO: all stay in use
    lat, errors, late = [], [0], [0]
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.1
    n = int(rate * seconds)
    tasks = []

    async def one(conn, req, scheduled):
        for attempt in (1, 2):  # a connection the server closed while idle is reopened once
            try:
                status, _ = await conn.post(req)
                if status != 200:
                    errors[0] += 1
                break
            except (OSError, asyncio.IncompleteReadError):
                conn.close()
                if attempt == 2:
                    errors[0] += 1
        lat.append(loop.time() - scheduled)
        free.append(conn)

    for i in range(n):
        scheduled = start + i / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        while not free:  # every connection busy: the request waits (counted in its latency)
            late[0] += 1
            await asyncio.sleep(0.0005)
        tasks.append(asyncio.ensure_future(one(free.popleft(), requests[i % len(requests)], scheduled)))
    await asyncio.gather(*tasks)
    elapsed = loop.time() - start
    for c in free:
        c.close()
    return {"texts_per_s": len(lat) / elapsed, "offered_per_s": rate, "texts": len(lat), "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99), "errors": errors[0], "waited_for_a_connection": late[0]}


def cli_full_split(gw, model: str, runs: int = 2) -> dict:
    """``classifier-client sentiment`` over the whole IMDB test split through ``gw`` (gRPC stream)."""
    return run_cli(gw, model, runs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sentiment_lstm")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "gateway.json"))
    p.add_argument("--base-root", type=Path, help="also run another tree's gateway, side by side (see above)")
    p.add_argument("--rounds", type=int, default=3, help="with --base-root or --tracing: alternating rounds of each")
    p.add_argument("--tracing", action="store_true", help="the gateway's own cost with tracing off and on (see above)")
    a = p.parse_args(argv)
    if a.tracing and a.json == p.get_default("json"):
        a.json = str(ROOT / "bench" / "results" / "gateway_tracing.json")
    if not shutil.which("wrk"):
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    texts = load_texts(4096)
    bodies = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
    for t in texts:
        bodies.write(json.dumps({"texts": [t], "model": a.model}) + "\n")
    bodies.close()
    if a.base_root:
        return compare_trees(a.base_root.resolve(), a.model, texts, bodies.name, a.seconds, a.rounds, a.json)
    if a.tracing:
        return compare_tracing(a.model, texts, bodies.name, a.seconds, a.rounds, a.json)

    results = {"model": a.model, "seconds_each": a.seconds, "cpus": os.cpu_count()}
    results["a_raw_batched_model_call"] = raw_ceiling(a.model, texts, a.seconds)
    results["a_raw_model_call_batch_1"] = raw_batch1(a.model, texts, min(a.seconds, 5))
    with gateway_process() as gw:
        url = gw.rest + "/v1/sentiment:predict"
        wrk(url, bodies.name, 16, 2)  # warm the server up
        for c in (1, 16, 64):
            results[f"b_rest_single_text_c{c}"] = wrk(url, bodies.name, c, a.seconds)
        half = results["b_rest_single_text_c64"]["texts_per_s"] / 2
        results["b_rest_single_text_open_loop_half_c64_rate"] = open_loop("127.0.0.1", int(gw.rest.rsplit(":", 1)[1]),
                                                                          bodies.name, half, a.seconds)
        results["c_grpc_batches_256"] = grpc_batches(gw.grpc, a.model, texts, a.seconds)
        results["c_batch_client_full_split"] = cli_full_split(gw, a.model)
    results["d_naive_fastapi_predict_per_request_c16"] = naive(a.model, bodies.name, a.seconds)
    results["e_gateway_over_instant_backend_c64"] = instant(bodies.name, a.seconds)
    results["e_gateway_over_instant_backend_c64_no_hot_path"] = instant(bodies.name, a.seconds, hot_path=False)

    ceiling = results["a_raw_batched_model_call"]["texts_per_s"]
    naive_tps = results["d_naive_fastapi_predict_per_request_c16"]["texts_per_s"]
    print(f"{'case':<48}{'texts/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'vs (a)':>8}{'vs (d)':>8}")
    for k, v in results.items():
        if isinstance(v, dict):
            v["ratio_to_raw"] = v["texts_per_s"] / ceiling
            v["ratio_to_naive"] = v["texts_per_s"] / naive_tps
            print(f"{k:<48}{v['texts_per_s']:>10.0f}{v.get('p50_ms', float('nan')):>9.2f}{v.get('p99_ms', float('nan')):>9.2f}"
                  f"{v['ratio_to_raw']:>8.2f}{v['ratio_to_naive']:>8.1f}")
    results["goals"] = goals(results)
    print(f"\ngoals (raw ceiling in this run: {ceiling:,.0f} texts/s at batch 256; "
          f"batch-1 call p50 {results['a_raw_model_call_batch_1']['p50_ms']:.2f} ms)")
    print(f"{'goal':<58}{'figure':>12}{'target':>12}  met")
    for g in results["goals"]:
        print(f"{g['goal']:<58}{g['figure']:>12.3g}{g['op'] + format(g['target'], '.3g'):>12}  {'yes' if g['met'] else 'NO'}")
    save(a.json, results)
    return 0


def tree_cases(root: Path, model: str, texts: list[str], bodies_file: str, seconds: float, env: dict | None = None,
               counted=None) -> dict:
    """The gateway of the tree at ``root`` (its own ``python -m serving``): REST c64, gRPC batches, instant backend.
    ``env``: added to the gateways' environment; ``counted()``: a count read before and after each case
    (the spans an OTLP sink received), as ``spans`` in its result. The REST and gRPC cases also give the
    gateway process's CPU per text (``gateway_cpu_us_per_text``: less sensitive to other load than throughput)."""
    out = {}

    def measure(case, fn, *args, pid=None, **kw):
        before = counted() if counted else 0
        cpu0 = process_cpu_seconds(pid) if pid else 0.0
        out[case] = fn(*args, **kw)
        if pid:
            out[case]["gateway_cpu_us_per_text"] = (process_cpu_seconds(pid) - cpu0) / max(out[case]["texts"], 1) * 1e6
        if counted:
            time.sleep(0.5)  # what was exported at the end of the case
            out[case]["spans"] = counted() - before

    with gateway_process(root=root, env=env) as gw:
        url = gw.rest + "/v1/sentiment:predict"
        wrk(url, bodies_file, 16, 2)
        measure("rest_single_text_c64", wrk, url, bodies_file, 64, seconds, pid=gw.process.pid)
        measure("grpc_batches_256", grpc_batches, gw.grpc, model, texts, seconds, pid=gw.process.pid)
    measure("instant_backend_c64", instant, bodies_file, seconds, root=root, env=env)
    return out


COMPARED = (("rest_single_text_c64", "texts_per_s"), ("rest_single_text_c64", "p99_ms"),
            ("rest_single_text_c64", "gateway_cpu_us_per_text"),
            ("grpc_batches_256", "texts_per_s"), ("grpc_batches_256", "p99_ms"), ("grpc_batches_256", "gateway_cpu_us_per_text"),
            ("instant_backend_c64", "texts_per_s"), ("instant_backend_c64", "gateway_cpu_us_per_request"))


def compare(variants: dict[str, dict], model: str, texts: list[str], bodies_file: str, seconds: float, rounds: int,
            counted=None) -> tuple[dict, dict]:
    """``tree_cases`` of each variant (its keyword arguments), alternating, ``rounds`` times; prints the medians
    side by side, then each other variant over the first. Returns (runs, medians)."""
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, kw in variants.items():
            runs[name].append(tree_cases(model=model, texts=texts, bodies_file=bodies_file, seconds=seconds,
                                         counted=counted, **kw))
            print(f"round {r + 1}/{rounds} {name} done", flush=True)
    a, *others = variants
    print(f"\n{'case (median of ' + str(rounds) + ' rounds)':<44}" + "".join(f"{n:>12}" for n in variants)
          + "".join(f"{b + '/' + a:>14}" for b in others))
    table = {}
    for case, field in COMPARED:
        med = {name: sorted(run[case][field] for run in runs[name])[rounds // 2] for name in variants}
        table[f"{case} {field}"] = med
        print(f"{case + ' ' + field:<44}" + "".join(f"{med[n]:>12.1f}" for n in variants)
              + "".join(f"{med[b] / med[a]:>14.3f}" for b in others))
    return runs, table


def compare_trees(base: Path, model: str, texts: list[str], bodies_file: str, seconds: float, rounds: int,
                  json_path: str) -> int:
    runs, table = compare({"base": {"root": base}, "this": {"root": ROOT}}, model, texts, bodies_file, seconds, rounds)
    save(json_path, {"base": str(base), "this": str(ROOT), "seconds_each": seconds, "rounds": runs, "medians": table})
    return 0


def compare_tracing(model: str, texts: list[str], bodies_file: str, seconds: float, rounds: int, json_path: str) -> int:
    """This tree's gateway with tracing off, on for every request, and on for 1 request in 10 (the client sends no
    traceparent: the sampler decides), the SDK's default batch span processor, exporting to an OTLP/gRPC sink
    in this process that counts the spans it receives."""
    from testkit.otlp import OtlpReceiver

    with OtlpReceiver(keep=False) as sink:
        on = sink.env(schedule_delay_ms=None)
        variants = {"off": {"root": ROOT}, "on": {"root": ROOT, "env": on},
                    "on_10pct": {"root": ROOT, "env": {**on, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                                       "OTEL_TRACES_SAMPLER_ARG": "0.1"}}}
        runs, table = compare(variants, model, texts, bodies_file, seconds, rounds, counted=lambda: sink.count)
    print("\nspans received while each case ran (its warm-up included; median of the rounds)")
    for name in ("on", "on_10pct"):
        for case in dict(COMPARED):
            spans = sorted(run[case]["spans"] for run in runs[name])[rounds // 2]
            print(f"  {name + ' ' + case:<42}{spans:>10}")
    save(json_path, {"seconds_each": seconds, "rounds": runs, "medians": table})
    return 0


# The issue's figure for the gateway over an instant backend before this work (req/s).
INSTANT_BEFORE = 2472


def goals(r: dict) -> list[dict]:
    raw = r["a_raw_batched_model_call"]["texts_per_s"]
    c64, half = r["b_rest_single_text_c64"], r["b_rest_single_text_open_loop_half_c64_rate"]
    inst = r["e_gateway_over_instant_backend_c64"]
    rows = [
        ("REST single text, 64 clients / raw batched call", c64["texts_per_s"] / raw, ">=", 0.60),
        ("REST p99 at half that rate, open loop (ms)", half["p99_ms"], "<=", 50.0),
        ("REST 1 client p50 - model batch-1 p50 (ms)",
         r["b_rest_single_text_c1"]["p50_ms"] - r["a_raw_model_call_batch_1"]["p50_ms"], "<=", 1.0),
        ("gateway CPU per single-text REST request (us)", inst["gateway_cpu_us_per_request"], "<=", 100.0),
        (f"instant backend req/s / {INSTANT_BEFORE} (the issue's figure)", inst["texts_per_s"] / INSTANT_BEFORE, ">=", 2.5),
        ("gRPC batches of 256 / raw", r["c_grpc_batches_256"]["texts_per_s"] / raw, ">=", 0.9),
        ("batch client, full split / raw", r["c_batch_client_full_split"]["texts_per_s"] / raw, ">=", 0.9),
    ]
    return [{"goal": g, "figure": f, "op": op, "target": t, "met": f >= t if op == ">=" else f <= t} for g, f, op, t in rows]


if __name__ == "__main__":
    raise SystemExit(main())
