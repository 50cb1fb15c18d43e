"""The flow-control signals lead shedding (issue 23, problem 1): under a ramp of real clients
against a real gateway, scraped by a real Prometheus, the autoscaling signal (the busy fraction
of the model's batch slots, as prometheus-adapter computes it for the HPA) crosses its target
before the first refusal, while the old signal (queue rows against the row limit) never comes
near its alert; every refusal is counted by reason and model.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time

import httpx
import pytest

from testkit.gateway import ROOT, gateway_process, metric_samples
from testkit.prometheus import prometheus_server

MODEL = "sentiment_lstm"
pytestmark = pytest.mark.slow

# The HPA's target (k8s: averageValue of classifier_batch_busy_ratio) and the query behind it
# (prometheus-adapter's metricsQuery, here over all pods of the one gateway).
BUSY_TARGET = 0.6
BUSY = ("sum(rate(classifier_batch_busy_seconds_total{model=%r}[3s])) / sum(classifier_batch_slots{model=%r})"
        % (MODEL, MODEL))


def _texts(n: int) -> list[str]:
    with gzip.open(ROOT.parent / "shared" / "data" / "imdb_test.jsonl.gz", "rt") as f:
        return [json.loads(line)["text"][:400] for line, _ in zip(f, range(n))]


async def _ramp(url: str, bodies: list[bytes], step_s: float, max_clients: int, after_refusals_s: float) -> dict:
    """Closed-loop clients, one more every ``step_s``, each honouring Retry-After; stops
    ``after_refusals_s`` after the first 429 (or at ``max_clients``). Returns the answers by
    status (with the Unix time of each) and the 429s' messages."""
    out: dict = {"statuses": {}, "messages": [], "first_refusal": None}
    stop = asyncio.Event()

    async def client(k: int, http: httpx.AsyncClient) -> None:
        i = k
        while not stop.is_set():
            r = await http.post(url, content=bodies[i % len(bodies)], headers={"content-type": "application/json"})
            i += 1
            out["statuses"].setdefault(r.status_code, []).append(time.time())
            if r.status_code == 429:
                out["first_refusal"] = out["first_refusal"] or time.time()
                out["messages"].append(r.json()["error"]["message"])
                await asyncio.sleep(float(r.headers["retry-after"]))

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=max_clients)) as http:
        tasks = []
        while len(tasks) < max_clients:
            tasks.append(asyncio.create_task(client(len(tasks), http)))
            await asyncio.sleep(step_s)
            if out["first_refusal"] and time.time() > out["first_refusal"] + after_refusals_s:
                break
        if not out["first_refusal"]:
            await asyncio.sleep(after_refusals_s)
        stop.set()
        await asyncio.gather(*tasks)
    return out


def test_busy_fraction_crosses_its_target_before_the_first_refusal_and_refusals_are_counted():
    texts = _texts(2048)
    bodies = [json.dumps({"texts": texts[i:i + 64], "model": MODEL}).encode() for i in range(0, len(texts), 64)]
    with prometheus_server(scrape_interval="1s") as prom, gateway_process(models=json.dumps([MODEL])) as gw:
        prom.set_targets([gw.rest.removeprefix("http://")])
        prom.wait_for_scrape()
        start = time.time()
        # 2.5 s per step: under the full suite's load the gateway is slow enough that 3 clients are
        # refused, and Prometheus (1 s scrapes, a 3 s rate) needs the steps before that to see it.
        run = asyncio.run(_ramp(gw.rest + "/v1/sentiment:predict", bodies, step_s=2.5, max_clients=48,
                                after_refusals_s=4))
        end = time.time()
        samples = metric_samples(gw)
        prom.wait_for_scrape()

        assert run["first_refusal"], f"the ramp never reached a refusal: {sorted(run['statuses'])}"
        busy = [(float(t), float(v)) for t, v in prom.query_range(BUSY, start, end + 2, 0.5)[0]["values"]]
        crossed = next((t for t, v in busy if v >= BUSY_TARGET), None)
        print(f"busy fraction (t from start: value): {[(round(t - start, 1), round(v, 2)) for t, v in busy]}; "
              f"first 429 at {run['first_refusal'] - start:.1f} s; statuses "
              f"{ {k: len(v) for k, v in run['statuses'].items()} }")
        assert crossed is not None and crossed < run["first_refusal"], (
            f"busy fraction crossed {BUSY_TARGET} at {crossed and crossed - start}, first refusal at "
            f"{run['first_refusal'] - start:.1f} s")

        # Every refusal counted, by its reason (here: the estimated work ahead).
        refused = len(run["statuses"].get(429, []))
        assert all("of work ahead" in m for m in run["messages"])
        assert samples[("classifier_refusals_total", (("model", MODEL), ("reason", "work_ahead")))] == refused
        assert samples[("classifier_refusals_total", (("model", MODEL), ("reason", "queue_rows")))] == 0
        assert samples[("classifier_queue_wait_limit_seconds", (("model", MODEL),))] == 0.1
        # The work ahead was past the limit at some scrape while shedding (what admission compared).
        peak = prom.value(f"max_over_time(classifier_queue_work_ahead_seconds{{model={MODEL!r}}}[{int(end - start) + 5}s])")
        assert peak is not None and peak > 0
        # The old saturation signal stayed far below its alert (80 % of the row limit) while shedding.
        rows = prom.value(f"max_over_time((classifier_queue_rows / classifier_queue_limit_rows)[{int(end - start) + 5}s:1s])")
        assert rows < 0.8
