"""Benchmark: the stage's capacity by shape, M gateways x N model servers, in one run on this machine.

    python bench/stage_capacity.py [--shapes 1x1 1x2 2x1 2x2] [--clients 1 2 4 8 16] [--seconds 6]
                                   [--size 64] [--json bench/results/stage_capacity.json]

For each shape, a fresh stage (stage/: nginx, M gateways with the TF Serving backend, N model servers
= the TF Serving stand-in, Prometheus) serving sentiment_lstm, then closed-loop steps of REST clients
through nginx, each posting --size-text requests back to back for --seconds (a 429's Retry-After is
honoured x 1.0-1.2). Per step: texts/s answered, p50/p99 of the answers, refusals. The knee is the
step with the most texts/s among those with under 1 % refused; its texts/s and p99 make the table.
First, for scale, the raw batched SavedModel call in this process (bench/common.py's raw ceiling).

Everything shares this machine's 2 cores: the load generator, nginx, Prometheus, every gateway and
model server. Past one process of each, more processes only divide the same two cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import load_texts, raw_ceiling, save  # noqa: E402
from stage.cluster import Stage  # noqa: E402
from stage.load import Load  # noqa: E402


def step(stage: Stage, clients: int, size: int, seconds: float) -> dict:
    with Load(stage, rest=[size] * clients, grpc_clients=0, rate=0) as load:
        time.sleep(seconds)
    lat = sorted(x for v in load.latency.values() for x in v)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    sent = len(lat) + sum(load.refused.values()) + len(load.failures)
    return {"clients": clients, "texts_per_s": load.texts["all"] / load.seconds, "p50_ms": pct(0.5),
            "p99_ms": pct(0.99), "answered": len(lat), "refused": sum(load.refused.values()),
            "failed": len(load.failures), "refused_ratio": sum(load.refused.values()) / max(1, sent)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["1x1", "1x2", "2x1", "2x2"], help="GATEWAYSxMODEL_SERVERS")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--seconds", type=float, default=6)
    p.add_argument("--size", type=int, default=64, help="texts per request")
    p.add_argument("--raw-seconds", type=float, default=5, help="length of the raw SavedModel call measurement")
    p.add_argument("--json")
    a = p.parse_args(argv)
    results = {"size": a.size, "seconds": a.seconds, "shapes": {}}
    results["raw"] = raw = raw_ceiling("sentiment_lstm", load_texts(2048), a.raw_seconds)
    print(f"raw SavedModel call in this process (batches of 256, pre-tokenised): {raw['texts_per_s']:.0f} texts/s",
          flush=True)
    for shape in a.shapes:
        m, n = map(int, shape.split("x"))
        with Stage(gateways=m, model_servers=n, models=["sentiment_lstm"]) as stage:
            step(stage, 2, a.size, 2)  # warm up every process
            steps = [step(stage, c, a.size, a.seconds) for c in a.clients]
        ok = [s for s in steps if s["refused_ratio"] < 0.01 and not s["failed"]] or steps
        knee = max(ok, key=lambda s: s["texts_per_s"])
        results["shapes"][shape] = {"steps": steps, "knee": knee}
        print(f"\n{m} gateway(s) x {n} model server(s), {a.size}-text REST requests through nginx")
        print(f"{'clients':>8}{'texts/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'refused':>9}{'failed':>8}")
        for s in steps:
            print(f"{s['clients']:>8}{s['texts_per_s']:>10.0f}{s['p50_ms']:>9.0f}{s['p99_ms']:>9.0f}"
                  f"{s['refused']:>9}{s['failed']:>8}")
        print(f"knee: {knee['clients']} clients, {knee['texts_per_s']:.0f} texts/s, p99 {knee['p99_ms']:.0f} ms",
              flush=True)
    print(f"\n{'shape':<8}{'knee texts/s':>14}{'/ raw':>7}{'p99 ms':>9}{'clients':>9}")
    for shape, r in results["shapes"].items():
        k = r["knee"]
        print(f"{shape:<8}{k['texts_per_s']:>14.0f}{k['texts_per_s'] / raw['texts_per_s']:>7.2f}{k['p99_ms']:>9.0f}"
              f"{k['clients']:>9}")
    if a.json:
        save(a.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
