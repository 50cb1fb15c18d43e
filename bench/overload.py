"""Benchmark: the gateway at 4x its capacity with large requests, in one run on one machine.

    python bench/overload.py [--model sentiment_lstm] [--seconds 20] [--times 4 50] [--grpc] [--json PATH]

  1. capacity: the SavedModel's serving signature called in-process on batches of
     256 pre-tokenised reviews (bench/common.py's raw ceiling, bench/gateway.py's case (a)),
     in texts/s;
  2. the gateway (`python -m serving`, embedded backend, this model only);
  3. service time: the median latency of one 1,024-text REST request, sent one at a time;
  4. overload, for each factor of --times (default 4): N clients (offered load N x 1024 /
     service time = that many times capacity, at least 4; or --clients N) post 1,024-text
     requests in a closed loop for --warmup + --seconds (only the
     last --seconds count), with a client timeout; a 429 / RESOURCE_EXHAUSTED carrying
     Retry-After / grpc-retry-pushback-ms makes that client sleep so long (at most 1 s)
     times a random 1.0-1.2 (--retry-jitter 0.2), as classifier_client does;
  5. per status: count, p50/p99 latency; goodput (texts in 200s per second) / capacity.
Ends with each goal next to its target: goodput >= 80 % of capacity, p99 of admitted
requests <= 2x service time, 429s answered in <= 50 ms (p99).

Why the jitter: clients that wait exactly what they are told come back together. All
clients refused in the same moment (at the start, or behind one slow batch) retry in
the same few milliseconds, a wave of ~30 x 1.3 MB that the gateway reads and answers one
after another; the last of a wave was answered 65-140 ms after its head arrived
(timed inside the gateway), while a separate process sleeping 1 ms at a time saw no
stall over 10 ms (not the machine), and the GIL switch interval made no difference.
``--retry-jitter 0`` reproduces those waves.

The load generator shares the 2 cores with the gateway, so it is kept cheap: requests
are encoded once and sent over raw asyncio streams on uvloop (HTTP/1.1 keep-alive, answers
not parsed; gRPC: bytes in and out, no protobuf). Its CPU use is printed with the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import Http, load_texts, pct, raw_ceiling, save  # noqa: E402
from classifier_client.flow import PUSHBACK_JITTER  # noqa: E402
from testkit.gateway import gateway_process  # noqa: E402

BATCH = 1024
PATH = "/v1/sentiment:predict"
GRPC_METHOD = "/classifier.v1.Classifier/ClassifySentiment"


def http_requests(host: str, port: int, model: str, texts: list[str]) -> list[bytes]:
    out = []
    for i in range(0, len(texts) - BATCH + 1, BATCH):
        body = json.dumps({"texts": texts[i : i + BATCH], "model": model}).encode()
        out.append(f"POST {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return out


def retry_after(value) -> float:
    """Seconds to wait before retrying a refused request: Retry-After (seconds form), at most 1 s."""
    try:
        return min(max(float(value), 0.0), 1.0)
    except (TypeError, ValueError):  # absent, or an HTTP date
        return 0.0


async def http_call(conn: Http, request: bytes, timeout: float) -> tuple[str, float]:
    status, headers = await asyncio.wait_for(conn.post(request), timeout)
    return str(status), retry_after(headers.get("retry-after"))


async def grpc_call(call, request: bytes, timeout: float) -> tuple[str, float]:
    import grpc

    try:
        await call(request, timeout=timeout)
        return "OK", 0.0
    except grpc.aio.AioRpcError as e:
        md = dict(e.trailing_metadata() or ())
        pushback = md.get("grpc-retry-pushback-ms")
        wait = retry_after(int(pushback) / 1000) if pushback else retry_after(md.get("retry-after"))
        return e.code().name, wait


async def closed_loop(kind: str, gw, requests: list[bytes], clients: int, a) -> dict:
    """`clients` closed-loop clients for a.warmup + a.seconds; latencies by status of the answers that
    arrived in the last a.seconds (requests still in flight at the end are counted, not timed)."""
    import grpc

    host, port = gw.rest.removeprefix("http://").split(":")
    timeout, lat, started, channels = a.timeout, {}, {}, []
    t_from = time.perf_counter() + a.warmup
    t_end = t_from + a.seconds

    async def client(k: int) -> None:
        if kind == "rest":
            conn = Http(host, int(port))
            call, reset = (lambda req: http_call(conn, req, timeout)), conn.close
        else:
            ch = grpc.aio.insecure_channel(gw.grpc, options=[("grpc.max_receive_message_length", 64 << 20)])
            channels.append(ch)
            stub = ch.unary_unary(GRPC_METHOD)  # no (de)serializers: bytes in, bytes out
            call, reset = (lambda req: grpc_call(stub, req, timeout)), (lambda: None)
        i = k
        try:
            while (t := time.perf_counter()) < t_end:  # and until cancelled at t_end (wait_for may swallow that)
                started[k] = t
                try:
                    status, wait = await call(requests[i % len(requests)])
                except asyncio.TimeoutError:
                    status, wait = "timeout", 0.0
                    reset()
                except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                    status, wait = f"error {type(e).__name__}", 0.0
                    reset()
                del started[k]
                if t_from <= (now := time.perf_counter()) < t_end:
                    lat.setdefault(status, []).append(now - t)
                i += 1
                if wait and not a.no_retry_after and status in ("429", "RESOURCE_EXHAUSTED"):
                    await asyncio.sleep(wait * random.uniform(1.0, 1.0 + a.retry_jitter))
        finally:
            reset()

    tasks = [asyncio.create_task(client(k)) for k in range(clients)]
    await asyncio.sleep(a.warmup + a.seconds)
    unfinished = len(started)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()
    return {"lat": lat, "unfinished_at_end": unfinished}


def summarise(run: dict, seconds: float, capacity: float, service_s: float, ok: str, refused: str) -> dict:
    lat = run.pop("lat")
    good = lat.get(ok, [])
    r = {
        "counts": {k: len(v) for k, v in sorted(lat.items())},
        "latency_ms": {k: [pct(v, 50), pct(v, 99)] for k, v in sorted(lat.items())},
        "unfinished_at_end": run["unfinished_at_end"],
        "goodput_texts_per_s": len(good) * BATCH / seconds,
        "ok_p50_ms": pct(good, 50), "ok_p99_ms": pct(good, 99),
        "refused_p50_ms": pct(lat.get(refused, []), 50), "refused_p99_ms": pct(lat.get(refused, []), 99),
    }
    r["goodput_ratio"] = r["goodput_texts_per_s"] / capacity
    r["ok_p99_over_service_time"] = r["ok_p99_ms"] / (service_s * 1000)
    refusals = len(lat.get(refused, []))
    r["goals"] = [  # goal, target, measured, met (None: nothing to judge)
        ["goodput / capacity", ">= 0.80", f"{r['goodput_ratio']:.2f}", r["goodput_ratio"] >= 0.8],
        [f"p99 of {ok}s / service time", "<= 2.0", f"{r['ok_p99_over_service_time']:.2f}", r["ok_p99_over_service_time"] <= 2],
        [f"p99 of {refused}s", "<= 50 ms", f"{r['refused_p99_ms']:.1f} ms" if refusals > 1 else f"{refusals} refused",
         r["refused_p99_ms"] <= 50 if refusals > 1 else None],
    ]
    return r


def run_phase(kind, gw, requests, a, clients, capacity, service_s) -> dict:
    import psutil

    cpu_s = lambda proc: sum(proc.cpu_times()[:2])  # noqa: E731 - user + system, all threads
    me, server = psutil.Process(), psutil.Process(gw.process.pid)
    c0, s0, t0 = cpu_s(me), cpu_s(server), time.perf_counter()
    run = asyncio.run(closed_loop(kind, gw, requests, clients, a))
    wall = time.perf_counter() - t0
    ok, refused = ("200", "429") if kind == "rest" else ("OK", "RESOURCE_EXHAUSTED")
    r = summarise(run, a.seconds, capacity, service_s, ok, refused)
    r.update(clients=clients, client_cores=(cpu_s(me) - c0) / wall, gateway_cores=(cpu_s(server) - s0) / wall)
    return r


def print_phase(name: str, r: dict) -> None:
    print(f"\n{name}: {r['clients']} clients x {BATCH} texts, closed loop; client {r['client_cores']:.2f} cores, "
          f"gateway {r['gateway_cores']:.2f} cores; {r['unfinished_at_end']} requests unfinished at the end")
    print(f"{'status':<28}{'count':>8}{'p50 ms':>10}{'p99 ms':>10}")
    for status, n in r["counts"].items():
        p = r["latency_ms"][status]
        print(f"{status:<28}{n:>8}{p[0]:>10.1f}{p[1]:>10.1f}")
    print(f"goodput {r['goodput_texts_per_s']:.0f} texts/s = {r['goodput_ratio']:.2f} x capacity; "
          f"p99 of admitted = {r['ok_p99_over_service_time']:.2f} x service time")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sentiment_lstm")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--warmup", type=float, default=3, help="overload runs this long before measuring")
    p.add_argument("--raw-seconds", type=float, default=10, help="length of the capacity measurement")
    p.add_argument("--times", type=float, nargs="+", default=[4.0],
                   help="offered load as multiples of capacity, one phase each (e.g. 4 50)")
    p.add_argument("--clients", type=int, help="clients instead of --times (one phase)")
    p.add_argument("--timeout", type=float, default=30, help="client timeout per request, s")
    p.add_argument("--no-retry-after", action="store_true", help="retry refused requests at once")
    p.add_argument("--retry-jitter", type=float, default=PUSHBACK_JITTER[1] - 1,
                   help="a refused client waits Retry-After x uniform(1, 1 + this); 0: exactly (retry waves)")
    p.add_argument("--grpc", action="store_true", help="also overload over gRPC (ClassifySentiment)")
    p.add_argument("--json", help="write the figures here")
    return p.parse_args(argv)


def service_time(host: str, port: int, requests: list[bytes], timeout: float, n: int = 5) -> float:
    """The median latency of ``n`` lone requests, sent one at a time after one to warm up (s)."""

    async def sequential() -> list[float]:
        conn, out = Http(host, port), []
        for i in range(n + 1):  # the first one warms up
            t = time.perf_counter()
            status, _ = await http_call(conn, requests[i % len(requests)], timeout)
            if status != "200":
                raise SystemExit(f"a lone {BATCH}-text request was answered {status}: is the gateway broken?")
            out.append(time.perf_counter() - t)
        conn.close()
        return out[1:]

    return statistics.median(asyncio.run(sequential()))


def grpc_requests(model: str, texts: list[str]) -> list[bytes]:
    from serving.gen.classifier.v1 import classifier_pb2 as pb

    return [pb.SentimentRequest(texts=texts[i : i + BATCH], model=model).SerializeToString()
            for i in range(0, len(texts) - BATCH + 1, BATCH)]


def print_goals(results: dict, kinds) -> None:
    print(f"\n{'goal':<50}{'target':>10}{'measured':>14}{'':>10}")
    for kind in kinds:
        for goal, target, measured, met in results[kind]["goals"]:
            verdict = "n/a" if met is None else "MET" if met else "NOT MET"
            print(f"{kind + ': ' + goal:<50}{target:>10}{measured:>14}{verdict:>10}")


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass

    texts = load_texts(8 * BATCH)
    results = {"model": a.model, "seconds": a.seconds, "batch": BATCH, "retry_after_honoured": not a.no_retry_after,
               "retry_jitter": a.retry_jitter}
    results["capacity"] = raw = raw_ceiling(a.model, texts, a.raw_seconds)
    capacity = raw["texts_per_s"]
    print(f"capacity (raw SavedModel call, batches of 256): {capacity:.0f} texts/s (p50 {raw['p50_ms']:.1f} ms per batch)")

    with gateway_process(models=json.dumps([a.model])) as gw:
        host, port = gw.rest.removeprefix("http://").split(":")
        rest_reqs = http_requests(host, int(port), a.model, texts)
        service_s = service_time(host, int(port), rest_reqs, a.timeout)
        results["service_time_ms"] = service_s * 1000
        print(f"service time of one {BATCH}-text request (median of 5, one client): {service_s * 1000:.0f} ms")
        kinds = {"rest": rest_reqs}
        if a.grpc:
            kinds["grpc"] = grpc_requests(a.model, texts)
        loads = [a.clients] if a.clients else [max(4, math.ceil(x * capacity * service_s / BATCH)) for x in a.times]
        phases = []
        for clients in loads:
            offered = clients * BATCH / service_s / capacity
            for kind, reqs in kinds.items():
                name = f"{kind}@{offered:.0f}x"
                print(f"{name}: {clients} clients offer {offered:.1f} x capacity", flush=True)
                results[name] = run_phase(kind, gw, reqs, a, clients, capacity, service_s)
                results[name]["offered_x_capacity"] = offered
                phases.append(name)
                time.sleep(min(30, clients * service_s / 4))  # let the gateway finish what is queued

    for name in phases:
        print_phase(f"{name} overload", results[name])
    print_goals(results, phases)
    if a.json:
        save(a.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
