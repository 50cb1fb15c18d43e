"""Load test for the gateway (Locust): REST and gRPC users sending real test-split data.

Users and traffic mix (class weight, then task weights within the class):

  RestUser (3)  "sentiment x1" 10 : "sentiment x32" 2 : "digits x1" 3        (POST, FastHttpUser)
  GrpcUser (1)  "ClassifySentiment x1" 3 : "ClassifyDigits x1" 1 : "StreamClassifySentiment 4x8" 1

Texts are random IMDB test reviews (imdb_test.jsonl.gz), images random MNIST test
digits (mnist.npz), spread over the sentiment models in --sentiment-models. A request
fails unless it succeeds with one well-formed prediction per input (a stream: one
response per chunk). gRPC calls are reported to Locust as request events with
request_type "grpc" (Locust's pattern for other protocols; grpc runs on gevent via
grpc.experimental.gevent.init_gevent()).

Shapes (--shape, env LOCUST_SHAPE): "none" (the default: -u/-r/-t as given), "ramp"
(a step ramp: --ramp-step-users more users every --ramp-step-s seconds for
--ramp-steps steps; prints per step users, req/s, texts/s, p50/p99 and the knee = the
highest-throughput step without failures whose p99 <= --knee-p99-ms, and writes
<csv>_steps.csv) or "spike" (--spike-base-users, then --spike-users for --spike-s, then
the base again; the same table per phase).

SLOs: at the end of a run the thresholds in --slo-file (default loadtests/slo.toml;
'' = none) are checked; a broken one is printed and the exit code is 1 (else 0). The
ramp fails only when it found no knee.

Make targets (start nothing; aim at HOST=http://localhost:8000 GRPC=localhost:50051):
make load-smoke, make load-ramp, make load-spike. By hand::

    locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 30s --host http://localhost:8000 \\
        --grpc-host localhost:50051 --csv bench/results/load/smoke --html bench/results/load/smoke.html
    locust -f loadtests/locustfile.py --headless --shape ramp --host http://localhost:8000 \\
        --csv bench/results/load/ramp --html bench/results/load/ramp.html

Data: --data-dir, or LOADTEST_DATA_DIR (or CLASSIFIER_DATA_DIR), default ../shared/data.
docker compose's locust service has neither the data nor grpcio/the generated stubs:
mount the data folder and set LOADTEST_DATA_DIR (a missing folder is a clear error at
start); gRPC users switch themselves off (a warning says so) when grpc or
serving/gen cannot be imported, and REST users run alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from locust import FastHttpUser, User, between, events, task
from locust.runners import WorkerRunner

import loaddata
import shapes
import slo

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
log = logging.getLogger("loadtest")

# --- gRPC: gevent-friendly grpc and the generated stubs (absent in the Locust image) ---
GRPC_ERROR = None
try:
    import grpc
    import grpc.experimental.gevent as grpc_gevent

    grpc_gevent.init_gevent()  # before any channel exists
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    from serving.gen.classifier.v1 import classifier_pb2 as pb
    from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
except Exception as e:  # noqa: BLE001 - any import problem just switches gRPC users off
    GRPC_ERROR = f"{type(e).__name__}: {e}"

BATCH = 32
STREAM_CHUNKS, STREAM_CHUNK = 4, 8
# Inputs per request name: (texts, images); for texts/s and images/s.
ITEMS = {
    "sentiment x1": (1, 0), f"sentiment x{BATCH}": (BATCH, 0), "digits x1": (0, 1),
    "ClassifySentiment x1": (1, 0), "ClassifyDigits x1": (0, 1),
    f"StreamClassifySentiment {STREAM_CHUNKS}x{STREAM_CHUNK}": (STREAM_CHUNKS * STREAM_CHUNK, 0),
}
SHAPES = ("none", "ramp", "spike")


@events.init_command_line_parser.add_listener
def _options(parser):
    g = parser.add_argument_group("classifier load test (loadtests/locustfile.py)")
    g.add_argument("--shape", choices=SHAPES, default="none", env_var="LOCUST_SHAPE",
                   help="load shape: none (-u/-r/-t), ramp (step ramp, reports the knee), spike")
    g.add_argument("--data-dir", default="", env_var="LOCUST_DATA_DIR",
                   help="folder with imdb_test.jsonl.gz and mnist.npz "
                   "(default: $LOADTEST_DATA_DIR, $CLASSIFIER_DATA_DIR, ../shared/data)")
    g.add_argument("--grpc-host", default="", env_var="LOCUST_GRPC_HOST",
                   help="gRPC target host:port (default: --host's host, port 50051)")
    g.add_argument("--sentiment-models",
                   default=os.environ.get("SENTIMENT_MODELS", "sentiment_lstm,sentiment_bilstm"),
                   help="comma-separated sentiment models the requests spread over")
    g.add_argument("--slo-file", default=str(HERE / "slo.toml"), env_var="LOCUST_SLO_FILE",
                   help="SLO thresholds checked at the end ('' = none)")
    g.add_argument("--knee-p99-ms", type=float, default=500.0, env_var="LOCUST_KNEE_P99_MS",
                   help="ramp: the knee's p99 bound (ms)")
    g.add_argument("--ramp-step-users", type=int, default=16, help="ramp: users added per step")
    g.add_argument("--ramp-steps", type=int, default=10, help="ramp: number of steps")
    g.add_argument("--ramp-step-s", type=float, default=15.0, help="ramp: seconds per step")
    g.add_argument("--step-settle-s", type=float, default=3.0,
                   help="ramp/spike: seconds after a user-count change before a step is measured")
    g.add_argument("--spike-base-users", type=int, default=8, help="spike: users before and after")
    g.add_argument("--spike-users", type=int, default=80, help="spike: users during the spike")
    g.add_argument("--spike-before-s", type=float, default=20.0, help="spike: seconds at the base before")
    g.add_argument("--spike-s", type=float, default=20.0, help="spike: seconds of the spike")
    g.add_argument("--spike-after-s", type=float, default=30.0, help="spike: seconds at the base after (recovery)")


def _shape_asked() -> str:
    """--shape must be known when the file is imported (Locust collects shape classes
    then, before it parses options): read it from argv / LOCUST_SHAPE here too."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--shape")
    ns, _ = p.parse_known_args()
    shape = ns.shape or os.environ.get("LOCUST_SHAPE") or "none"
    return shape if shape in SHAPES else "none"  # Locust's own parser reports a bad value


SHAPE = _shape_asked()
if SHAPE == "ramp":
    class StepRampShape(shapes.StepRamp):
        pass
elif SHAPE == "spike":
    class SpikeShape(shapes.Spike):
        pass

SAMPLES: loaddata.Samples | None = None
MODELS: list[str] = []


@events.init.add_listener
def _init(environment, **_kw):
    global SAMPLES
    o = environment.parsed_options
    if o is None:
        return
    MODELS[:] = [m for m in o.sentiment_models.split(",") if m]
    if not isinstance(environment.runner, WorkerRunner) and environment.shape_class is not None:
        environment.shape_class.recorder = shapes.StepRecorder(environment, lambda name: ITEMS.get(name, (0, 0)))
    if o.slo_file:
        environment.slo = slo.load(o.slo_file, o.shape)  # a bad file fails now, not after the run
    SAMPLES = loaddata.Samples(loaddata.resolve_dir(o.data_dir or None))  # DataMissing exits with the fix
    if GRPC_ERROR:
        log.warning("gRPC users are off (%s): install grpcio and run from the project checkout (serving/gen/)",
                    GRPC_ERROR)


def _group(message: str) -> str:
    """Numbers out of error messages ("~0.11s of work ahead"), so Locust groups them as one error."""
    return re.sub(r"(?<![\d.])\d+\.\d+(?![\d.])", "#", message)


def _sentiment_ok(predictions, n: int) -> str | None:
    if len(predictions) != n:
        return f"{len(predictions)} predictions for {n} texts"
    for p in predictions:
        if p["label"] not in ("negative", "positive"):
            return f"label {p['label']!r}"
    return None


def _digits_ok(predictions, n: int) -> str | None:
    if len(predictions) != n:
        return f"{len(predictions)} predictions for {n} images"
    for p in predictions:
        if not 0 <= int(p["label"]) <= 9:
            return f"label {p['label']!r}"
    return None


class RestUser(FastHttpUser):
    weight = 3
    wait_time = between(0.05, 0.25)

    def on_start(self):
        self.rng = random.Random()

    def _post(self, path: str, body: dict, name: str, n: int, ok):
        with self.client.post(path, json=body, name=name, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {_group((resp.text or '')[:200])}")
                return
            try:
                problem = ok(resp.json()["predictions"], n)
            except (ValueError, KeyError, TypeError) as e:
                problem = f"bad response body ({type(e).__name__}): {(resp.text or '')[:200]}"
            if problem:
                resp.failure(problem)
            else:
                resp.success()

    def _sentiment(self, n: int):
        body = {"texts": SAMPLES.texts(self.rng, n), "model": self.rng.choice(MODELS)}
        self._post("/v1/sentiment:predict", body, f"sentiment x{n}", n, _sentiment_ok)

    @task(10)
    def sentiment_one(self):
        self._sentiment(1)

    @task(2)
    def sentiment_batch(self):
        self._sentiment(BATCH)

    @task(3)
    def digits_one(self):
        images = [loaddata.as_rows(img) for img in SAMPLES.images(self.rng, 1)]
        self._post("/v1/digits:predict", {"images": images}, "digits x1", 1, _digits_ok)


class GrpcUser(User):
    """Each call is timed and reported with environment.events.request.fire(request_type="grpc")."""

    weight = 1
    wait_time = between(0.05, 0.25)
    timeout_s = 30.0

    def on_start(self):
        self.rng = random.Random()
        o = self.environment.parsed_options
        target = (o.grpc_host if o else "") or f"{urlparse(self.environment.host or 'http://localhost').hostname}:50051"
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.ClassifierStub(self.channel)

    def on_stop(self):
        self.channel.close()

    def _call(self, name: str, call, check):
        start = time.perf_counter()
        length, exception = 0, None
        try:
            answer = call()
            length = sum(m.ByteSize() for m in answer) if isinstance(answer, list) else answer.ByteSize()
            problem = check(answer)
            if problem:
                exception = AssertionError(problem)
        except grpc.RpcError as e:
            exception = RuntimeError(f"{e.code().name}: {_group(e.details() or '')}")  # picklable
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=(time.perf_counter() - start) * 1000,
            response_length=length, exception=exception, context={},
        )

    @staticmethod
    def _check_sentiment(n):
        return lambda r: _sentiment_ok([{"label": p.label} for p in r.predictions], n)

    @task(3)
    def classify_sentiment(self):
        req = pb.SentimentRequest(texts=SAMPLES.texts(self.rng, 1), model=self.rng.choice(MODELS))
        self._call("ClassifySentiment x1", lambda: self.stub.ClassifySentiment(req, timeout=self.timeout_s),
                   self._check_sentiment(1))

    @task(1)
    def classify_digits(self):
        req = pb.DigitsRequest(images=[pb.Image(raw=img) for img in SAMPLES.images(self.rng, 1)])
        self._call("ClassifyDigits x1", lambda: self.stub.ClassifyDigits(req, timeout=self.timeout_s),
                   lambda r: _digits_ok([{"label": p.label} for p in r.predictions], 1))

    @task(1)
    def stream_sentiment(self):
        model = self.rng.choice(MODELS)
        chunks = [pb.SentimentRequest(texts=SAMPLES.texts(self.rng, STREAM_CHUNK), model=model)
                  for _ in range(STREAM_CHUNKS)]

        def check(answers):
            if len(answers) != STREAM_CHUNKS:
                return f"{len(answers)} responses for {STREAM_CHUNKS} chunks"
            for a in answers:
                problem = self._check_sentiment(STREAM_CHUNK)(a)
                if problem:
                    return problem
            return None

        self._call(f"StreamClassifySentiment {STREAM_CHUNKS}x{STREAM_CHUNK}",
                   lambda: list(self.stub.StreamClassifySentiment(iter(chunks), timeout=self.timeout_s)), check)


if GRPC_ERROR:
    GrpcUser.abstract = True


def _run_stats(environment) -> dict[str, dict]:
    def one(e):
        d = {"requests": e.num_requests, "failures": e.num_failures}
        if e.num_requests:
            d.update({k: e.get_response_time_percentile(q) for k, q in slo.PERCENTILES.items()})
        return d

    out = {name: one(e) for (name, _method), e in environment.stats.entries.items()}
    out[shapes.AGGREGATED] = one(environment.stats.total)
    return out


@events.quitting.add_listener
def _report(environment, **_kw):
    if isinstance(environment.runner, WorkerRunner) or environment.parsed_options is None:
        return
    o = environment.parsed_options
    code = None
    recorder = getattr(environment.shape_class, "recorder", None)
    if recorder is not None:
        recorder.finish()
        ramp = o.shape == "ramp"
        print(f"\n=== {o.shape}: per {'step' if ramp else 'phase'} (measured after {o.step_settle_s:g} s settle) ===")
        print(recorder.table(o.knee_p99_ms if ramp else None, "step" if ramp else "phase"), flush=True)
        if o.csv_prefix:
            recorder.write_csv(f"{o.csv_prefix}_steps.csv")
        if ramp:
            code = 0 if recorder.knee(o.knee_p99_ms) else 1
    thresholds = getattr(environment, "slo", None)
    if thresholds is not None:
        broken = slo.check(thresholds, _run_stats(environment))
        enforce = thresholds.get("enforce", True)
        if broken:
            print(f"\nSLO ({o.slo_file}, shape {o.shape}) broken{'' if enforce else ' (reported only)'}:")
            print("\n".join(f"  - {b}" for b in broken), flush=True)
        else:
            print(f"\nSLO ({o.slo_file}, shape {o.shape}): all met", flush=True)
        if enforce:
            code = 1 if broken else (code or 0)
    if code is not None:
        environment.process_exit_code = code
