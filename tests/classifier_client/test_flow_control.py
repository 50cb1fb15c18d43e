"""classifier-client's flow control (classifier_client/flow.py) against real servers: a gateway with
tight admission limits (a small max_queue_items and max_queue_wait_s, so that chunks are refused
RESOURCE_EXHAUSTED / 429 with pushback, and refused for their own size), and small real gRPC and HTTP
servers written here that refuse as a test tells them to and record when each request arrived.

- (a) a whole-text job through the tight gateway completes, every row once and in order, and the
  refusals are reported by their own name;
- (b) an unknown model fails at once: NOT_FOUND, 0 retries (gRPC stream with large chunks, REST);
- (c) a refused chunk is not sent again before the server's pushback (grpc-retry-pushback-ms on the
  stream and on unary calls, a fractional Retry-After over REST);
- (d) the window of chunks in flight halves under refusals and grows back (seen by the server);
- (e) REST: the same policy through the tight gateway;
- (f) two jobs at once through the tight gateway both complete;
and the policy itself (Flow: AIMD, give-up rule, what is split, what is never retried).
"""

from __future__ import annotations

import asyncio
import gzip
import http.server
import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest

from tests.classifier_client.test_client import CLI, GATEWAY, run_cli
from testkit.gateway import ROOT, gateway_processes

RELAXED = {**GATEWAY, "models": '["sentiment_lstm"]'}
# Refuses a lot: a chunk of more than 128 windows for its own size (split; the client cuts chunks
# of ~256), a second one while one waits (the queue holds 128 rows), anything behind 0.05 s of work.
TIGHT = {**RELAXED, "max_queue_items": 128, "max_queue_wait_s": 0.05}
N = 240  # reviews per whole-text job (~1,500 windows)


@pytest.fixture(scope="module")
def gateways():
    with gateway_processes(RELAXED, TIGHT) as (relaxed, tight):
        yield relaxed, tight


@pytest.fixture(scope="module")
def reviews(data_dir, tmp_path_factory) -> Path:
    """The first N reviews of the IMDB test split as jsonl {"text", "label"}."""
    path = tmp_path_factory.mktemp("flow") / "reviews.jsonl"
    with gzip.open(data_dir / "imdb_test.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(N), f)]
    path.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def whole_text_reference(gateways, reviews) -> list[dict]:
    """The relaxed gateway's whole-text answers for the reviews (one request)."""
    texts = [json.loads(line)["text"] for line in reviews.read_text(encoding="utf-8").splitlines()]
    r = httpx.post(gateways[0].rest + "/v1/sentiment:predict", json={"texts": texts, "whole_text": True}, timeout=60)
    r.raise_for_status()
    return r.json()["predictions"]


def summary(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if "retries:" in line)


def assert_whole_text_rows(out: Path, reference: list[dict]) -> None:
    """Every input row once, in order, with the reference's answers."""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(reference)))
    assert [r["label"] for r in rows] == [p["label"] for p in reference]
    assert [r["windows"] for r in rows] == [p["windows"] for p in reference]
    assert [r["positive"] for r in rows] == pytest.approx([p["probabilities"]["positive"] for p in reference], abs=1e-5)


# -- (a), (d), (e), (f): the tight gateway ----------------------------------------------------------

def test_whole_text_job_through_a_tight_gateway_completes_in_order(gateways, reviews, whole_text_reference, tmp_path):
    out = tmp_path / "out.jsonl"
    p = run_cli("sentiment", reviews, "--target", gateways[1].grpc, "--whole-text", "-o", out, timeout=120)
    assert_whole_text_rows(out, whole_text_reference)
    line = summary(p.stderr)
    assert "RESOURCE_EXHAUSTED" in line and "UNAVAILABLE" not in line, line  # refusals, by their own name
    assert "chunks split" in line, line  # a 256-window chunk exceeds max_queue_items=128 by itself
    assert "; window " in line, line  # the window was cut under refusals


def test_rest_job_through_a_tight_gateway_follows_the_same_policy(gateways, reviews, whole_text_reference, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(reviews.read_text().splitlines(keepends=True)[:120]))
    out = tmp_path / "out.jsonl"
    t0 = time.monotonic()
    p = run_cli("sentiment", small, "--rest", "--target", gateways[1].rest, "--whole-text", "-o", out, timeout=120)
    assert_whole_text_rows(out, whole_text_reference[:120])
    line = summary(p.stderr)
    assert "RESOURCE_EXHAUSTED" in line and "chunks split" in line and "; window " in line, line
    # The gateway's Retry-After is whole seconds (at least 1): every refusal costs the run >= 1 s.
    assert time.monotonic() - t0 >= 1.0


def test_two_jobs_at_once_through_a_tight_gateway_both_complete(gateways, reviews, whole_text_reference, tmp_path):
    outs = [tmp_path / f"out{k}.jsonl" for k in range(2)]
    procs = [subprocess.Popen([*CLI, "sentiment", str(reviews), "--target", gateways[1].grpc, "--whole-text", "-o", str(o)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for o in outs]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    for o in outs:
        assert_whole_text_rows(o, whole_text_reference)
    assert any("RESOURCE_EXHAUSTED" in summary(e) for e in errors), errors


# -- (b) what is never retried ---------------------------------------------------------------------

def test_an_unknown_model_fails_at_once_with_not_found_and_no_retry(gateways, data_dir, tmp_path):
    # Large chunks, several in flight: the gateway ends each stream NOT_FOUND while more chunks are
    # being written to it (the case where grpc.aio loses the server's status to "Internal error from Core").
    src = tmp_path / "many.jsonl"
    with gzip.open(data_dir / "imdb_test.jsonl.gz", "rt", encoding="utf-8") as f:
        src.write_text("".join(json.dumps({"text": json.loads(line)["text"]}) + "\n" for _, line in zip(range(4096), f)))
    relaxed = gateways[0]
    for extra in (["--target", relaxed.grpc, "--chunk-size", "1024"], ["--target", relaxed.grpc, "--chunk-size", "1024"],
                  ["--rest", "--target", relaxed.rest]):
        t0 = time.monotonic()
        p = run_cli("sentiment", src, *extra, "--model", "nope", "-o", tmp_path / "out.jsonl", check=False)
        assert p.returncode == 1, p.stderr
        assert "NOT_FOUND" in p.stderr and "nope" in p.stderr, p.stderr
        assert summary(p.stderr).split("retries: ")[1].startswith("0"), p.stderr  # no retry at all
        assert time.monotonic() - t0 < 10


# -- (c), (d): small real servers that refuse when told ---------------------------------------------

class Recorder:
    """What a test server saw: each request's arrival (time, its texts, requests in flight then),
    each refusal (time, texts); ``refuse(i)``: the pushback in seconds for the i-th request to
    arrive, or None to answer it. Each request is held ``hold_s`` first (so that the ones in
    flight overlap)."""

    def __init__(self, refuse, hold_s: float = 0.0):
        self.refuse, self.hold_s = refuse, hold_s
        self.lock = threading.Lock()
        self.arrivals: list[tuple[float, tuple, int]] = []
        self.refusals: list[tuple[float, tuple, float]] = []
        self.inflight = 0

    def arrive(self, texts) -> float | None:
        """Records the arrival, holds it; then the pushback (seconds) when it is refused, else None."""
        with self.lock:
            i = len(self.arrivals)
            self.inflight += 1
            self.arrivals.append((time.monotonic(), tuple(texts), self.inflight))
            pushback = self.refuse(i)
        time.sleep(self.hold_s)
        with self.lock:
            self.inflight -= 1
            if pushback is not None:
                self.refusals.append((time.monotonic(), tuple(texts), pushback))
        return pushback

    def check_pushback_waited(self, texts: list[str]) -> None:
        """Each refused text came back no sooner than its pushback, and every text was answered."""
        assert self.refusals, "the server refused nothing"
        for t, refused, pushback in self.refusals:
            later = [a for a, got, _ in self.arrivals if a > t and set(got) & set(refused)]
            assert later, f"a refused chunk was never sent again ({refused[0][:20]}...)"
            assert min(later) - t >= pushback, f"sent again {min(later) - t:.3f}s after a refusal with {pushback}s pushback"
        answered = {x for _, got, _ in self.arrivals for x in got}
        assert answered >= set(texts)


def fake_sentiment(texts) -> "pb.SentimentResponse":  # noqa: F821
    from serving.gen.classifier.v1 import classifier_pb2 as pb

    return pb.SentimentResponse(model=pb.ModelRef(name="fake", version=1), predictions=[
        pb.SentimentPrediction(label="positive", score=0.75, probabilities={"negative": 0.25, "positive": 0.75},
                               tokens=len(t.split()), windows=1) for t in texts])


class FakeGrpcServer:
    """A real grpc server (not the gateway) for classifier.v1.Classifier's sentiment calls, as Recorder says."""

    def __init__(self, recorder: Recorder):
        from serving.gen.classifier.v1 import classifier_pb2 as pb

        rec = self.recorder = recorder

        def handle(request, context):
            pushback = rec.arrive(request.texts)
            if pushback is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(int(pushback * 1000))),))
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full (test server); retry later")
            return fake_sentiment(request.texts)

        def stream(requests, context):
            for request in requests:
                yield handle(request, context)

        self.server = grpc.server(ThreadPoolExecutor(max_workers=32))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("classifier.v1.Classifier", {
            "ClassifySentiment": grpc.unary_unary_rpc_method_handler(
                handle, request_deserializer=pb.SentimentRequest.FromString,
                response_serializer=pb.SentimentResponse.SerializeToString),
            "StreamClassifySentiment": grpc.stream_stream_rpc_method_handler(
                stream, request_deserializer=pb.SentimentRequest.FromString,
                response_serializer=pb.SentimentResponse.SerializeToString),
        }),))
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop(0)


class FakeRestServer:
    """A real HTTP server (not the gateway) for POST /v1/sentiment:predict: 429 with a fractional
    Retry-After when Recorder says, else 200 with an answer per text."""

    def __init__(self, recorder: Recorder):
        rec = recorder

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                texts = json.loads(self.rfile.read(int(self.headers["content-length"])))["texts"]
                pushback = rec.arrive(texts)
                if pushback is not None:
                    self.reply(429, {"error": {"code": "RESOURCE_EXHAUSTED", "message": "queue full (test server)"}},
                               {"retry-after": f"{pushback:g}"})
                    return
                self.reply(200, {"model": {"name": "fake", "version": 1}, "predictions": [
                    {"label": "positive", "score": 0.75, "probabilities": {"negative": 0.25, "positive": 0.75},
                     "tokens": 1, "unknown_tokens": 0, "windows": 1} for _ in texts]})

            def reply(self, status, body, headers=None):
                data = json.dumps(body).encode()
                self.send_response(status)
                for k, v in {"content-type": "application/json", "content-length": str(len(data)), **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def texts_file(tmp_path: Path, n: int) -> tuple[Path, list[str]]:
    texts = [f"text number {i} of the test" for i in range(n)]
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts) + "\n")
    return path, texts


PUSHBACK_S = 0.3


def refuse_some(i: int) -> float | None:
    """Refuse every eighth of the first 32 requests (the others, answered meanwhile, leave a client
    free to send the refused chunk again too soon)."""
    return PUSHBACK_S if i < 32 and i % 8 == 0 else None


@pytest.mark.parametrize("mode", ["stream", "unary", "rest"])
def test_a_refused_chunk_waits_the_servers_pushback(mode, tmp_path):
    src, texts = texts_file(tmp_path, 120)
    rec = Recorder(refuse_some, hold_s=0.02)
    server = FakeRestServer(rec) if mode == "rest" else FakeGrpcServer(rec)
    with server:
        target = ["--rest", "--target", server.url] if mode == "rest" else ["--target", server.target]
        p = run_cli("sentiment", src, *target, *(["--unary"] if mode == "unary" else []), "--chunk-size", "5",
                    "-o", tmp_path / "out.jsonl", timeout=60)
    rec.check_pushback_waited(texts)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(texts)))
    assert f"retries: {len(rec.refusals)} (RESOURCE_EXHAUSTED {len(rec.refusals)};" in summary(p.stderr), p.stderr


def test_the_window_halves_under_refusals_and_grows_back(tmp_path):
    """Six refusals at the start, then every chunk answered (each held 100 ms so that the ones in flight
    overlap): the server sees 4 chunks at once at first, 1 at a time after the refusals, 4 again later."""
    from classifier_client import AsyncClient, Options

    texts = [f"text {i}" for i in range(240)]
    rec = Recorder(lambda i: 0.1 if i < 6 else None, hold_s=0.1)  # long enough for 4 streams to open under load

    async def run(target):
        async with AsyncClient(options=Options(targets=[target], chunk_size=4, window=4)) as client:
            out = [x for s, chunk, r in [t async for t in client.stream_sentiment(texts)] for x in chunk]
        return out, client.stats

    with FakeGrpcServer(rec) as server:
        out, stats = asyncio.run(run(server.target))
    assert out == texts
    inflight = [n for _, _, n in rec.arrivals]
    first_answered = 6
    assert max(inflight[:4]) == 4  # the window's start: --window
    assert inflight[first_answered] == 1  # after the refusals: one at a time
    assert max(inflight[first_answered:first_answered + 3]) <= 2
    assert max(inflight[-20:]) == 4  # grown back to the ceiling
    f = stats.flow
    assert (f.window_min, f.window_max, f.window) == (1, 4, 4)
    cuts = [w for _, w, why in f.changes if why == "cut"]
    raises = [w for _, w, why in f.changes if why == "raise"]
    assert cuts == [2, 1] and raises == [2, 3, 4], f.changes  # halved per refusal burst, +1 per window of answers
    assert stats.retries == {"RESOURCE_EXHAUSTED": 6}


# -- the policy (classifier_client.flow.Flow) ---------------------------------------------------------

class _C:
    def __init__(self, n: int):
        self.items, self.strikes, self.refusals = ["x"] * n, 0, 0


def test_flow_policy():
    from classifier_client.errors import ClientError
    from classifier_client.flow import Flow
    from classifier_client.protocol import StreamStats

    now = [0.0]
    stats = StreamStats()
    f = Flow(4, retries=2, give_up_s=30, stats=stats, clock=lambda: now[0])
    refused = ClientError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", 0.5)
    tickets = [f.sent() for _ in range(4)]
    assert not f.can_send()
    delays = [f.failed(t, refused, _C(8)).delay for t in tickets]  # one burst: one cut
    assert f.limit == 2 and all(0.5 <= d <= 0.6 for d in delays)
    for _ in range(10):  # refusals with pushback are not failures: no give-up
        f.failed(f.sent(), refused, _C(8))
    assert f.limit == 1
    f.answered(f.sent())
    assert f.limit == 2
    f.answered(f.sent()), f.answered(f.sent())
    assert f.limit == 3
    # UNAVAILABLE: counted; one chunk at a time (a probe) until something is answered; gives up after `retries`.
    down = ClientError(grpc.StatusCode.UNAVAILABLE, "connection refused")
    f.failed(f.sent(), down, _C(8))
    probe = f.sent()
    assert f.limit == 3 and not f.can_send()
    f.failed(probe, down, _C(8))
    with pytest.raises(ClientError, match="giving up: 3 failed attempts"):
        f.failed(f.sent(), down, _C(8))
    # Never retried, whatever the budget: NOT_FOUND, INVALID_ARGUMENT (unless a size limit: split).
    for code, message in ((grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
                          (grpc.StatusCode.INVALID_ARGUMENT, "texts[3] is empty")):
        with pytest.raises(ClientError) as e:
            Flow(4).failed(1, ClientError(code, message), _C(8))
        assert e.value.code == code
    too_many = ClientError(grpc.StatusCode.INVALID_ARGUMENT,
                           "too many windows: 512 texts make 6000 windows > max_windows_per_request=4096")
    assert Flow(4).failed(1, too_many, _C(512)).split
    with pytest.raises(ClientError):
        Flow(4).failed(1, too_many, _C(1))  # one text: nothing left to split
    own = ClientError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full (0 rows waiting + 600 > max_queue_items=256)", 0.1)
    assert Flow(4).failed(1, own, _C(80)).split
    # Whole text: a chunk refused three times while alone in flight is split (its own work may be
    # what the gateway refuses), or four times in all.
    g, chunk = Flow(4, split_refused=True), _C(80)
    assert [g.failed(g.sent(), refused, chunk).split for _ in range(3)] == [False, False, True]
    g, chunk = Flow(4, split_refused=True), _C(80)
    g.sent(), g.sent()  # two other chunks in flight meanwhile
    assert [g.failed(g.sent(), refused, chunk).split for _ in range(4)] == [False, False, False, True]
    assert not Flow(4).failed(1, refused, _C(80)).split  # last 20 tokens: rows are counted exactly, no split
    # Time: no chunk answered for give_up_s, refusals included.
    h = Flow(4, give_up_s=30, clock=lambda: now[0])
    now[0] += 31
    with pytest.raises(ClientError, match="no chunk answered for 31s"):
        h.failed(h.sent(), refused, _C(8))
    assert stats.retries["RESOURCE_EXHAUSTED"] == 14 and stats.retries["UNAVAILABLE"] == 2  # the last one was not retried


def test_retry_after_values():
    from email.utils import formatdate

    from classifier_client.rest import retry_after_s

    assert retry_after_s("0.25") == 0.25 and retry_after_s("2") == 2.0 and retry_after_s(None) is None
    assert retry_after_s("soon") is None
    assert 8 <= retry_after_s(formatdate(time.time() + 10, usegmt=True)) <= 10


def test_while_calls_fail_only_the_first_chunk_given_back_probes():
    """An outage (every call UNAVAILABLE, as while a gateway restarts): after the first window of
    chunks fails, only the earliest chunk is tried again, each time after its backoff; the later
    ones wait instead of failing at once and using up the retries (what made a run give up during
    a gateway restart). Once calls pass, every chunk is answered, in order."""
    from classifier_client.errors import ClientError
    from classifier_client.flow import Flow
    from classifier_client.stream import ordered_calls

    attempts: list[tuple[float, int]] = []

    async def scenario():
        loop = asyncio.get_running_loop()
        recover_at = loop.time() + 0.6

        async def call(items):
            attempts.append((loop.time(), items[0]))
            if loop.time() < recover_at:
                raise ClientError(grpc.StatusCode.UNAVAILABLE, "gateway restarting")
            return items

        # retries: enough that the 0.6 s outage cannot use them up (full jitter: ~25 ms per attempt on
        # average, 30 attempts sometimes fit in 0.6 s, and the run gave up once in CI)
        flow = Flow(4, retries=200, backoff_base_s=0.02, backoff_cap_s=0.05)
        out = [(s, chunk) async for s, chunk, _ in ordered_calls(call, range(100), 10, flow)]
        return recover_at, out

    recover_at, out = asyncio.run(scenario())
    assert [s for s, _ in out] == list(range(0, 100, 10)) and sum(len(c) for _, c in out) == 100
    during = [first for t, first in attempts if t < recover_at]
    # Chunk 0 probes again and again; the later chunks of the first window may have gone out once
    # each before the first failure was known, never again.
    assert during.count(0) >= 5, during
    assert all(during.count(first) <= 1 for first in (10, 20, 30)) and set(during) <= {0, 10, 20, 30}, during
