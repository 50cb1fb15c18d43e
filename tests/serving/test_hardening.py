"""The gateway against hostile clients and orchestrators (issue 8's numbered defects).

Real gateways on loopback: ``python -m serving`` subprocesses where signals or
the event loop's responsiveness matter, in-process gateways over the real
embedded backend where a test must hold a model call at a chosen moment.
Malformed gRPC messages (defect 6) are in test_grpc_fuzz.py; the smaller
conformance points (8) in test_conformance.py.
"""

import asyncio
import io
import json
import signal
import socket
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families

from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from serving.settings import Settings
from testkit.gateway import gateway_in_thread, gateway_processes, queue_rows, stable_version, wait_until
from tests.serving.test_gateway_lifecycle import HeldBackend

PREDICT = "/v1/sentiment:predict"


def samples(base: str) -> dict:
    text = httpx.get(base + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def big_digit_png(side: int) -> bytes:
    im = Image.new("L", (side, side), 255)
    ImageDraw.Draw(im).ellipse((side // 4, side // 8, 3 * side // 4, 7 * side // 8), outline=0, width=side // 12)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


# The gateway of the SIGTERM test (7.): it drains with a settle delay, and queues whatever it is sent.
SETTLE_S = 1.5
DRAINING = dict(models='["sentiment_lstm"]', drain_settle_s=SETTLE_S, drain_timeout_s=60,
                max_queue_wait_s=120, max_queue_items=100_000, request_timeout_s=120)


@pytest.fixture(scope="module")
def processes():
    """The module's gateway processes, started together (their start-ups overlap)."""
    defaults = dict(models='["sentiment_lstm", "digits"]', max_request_pixels=64_000_000)
    with gateway_processes(defaults, DRAINING) as (g, draining):
        yield {"gw": g, "draining": draining}


@pytest.fixture(scope="module")
def gw(processes):
    """One gateway for the tests that only need the defaults (and a larger pixel budget)."""
    return processes["gw"]


# -- 1. nothing heavy on the event loop -------------------------------------------------------
def test_decoding_big_images_does_not_stall_other_requests(gw):
    """8 images of 2000x2000 pixels (~0.1 s of decoding each) in one request: /healthz and gRPC
    health keep answering at once. Before, they waited for the whole decode (~0.8 s)."""
    import base64

    img = base64.b64encode(big_digit_png(2000)).decode()
    body = {"images_b64": [img] * 8}

    async def scenario():
        async with httpx.AsyncClient(base_url=gw.rest, timeout=60) as c, grpc.aio.insecure_channel(gw.grpc) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            await c.get("/healthz")
            await health.Check(health_pb2.HealthCheckRequest())
            t0 = time.perf_counter()
            heavy = asyncio.create_task(c.post("/v1/digits:predict", json=body))
            probes = []
            await asyncio.sleep(0.05)
            while not heavy.done():
                p0 = time.perf_counter()
                await c.get("/healthz")
                await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                probes.append(time.perf_counter() - p0)
                await asyncio.sleep(0.02)
            r = await heavy
            return r, time.perf_counter() - t0, probes

    r, heavy_s, probes = asyncio.run(scenario())
    assert r.status_code == 200, r.text
    assert [p["label"] for p in r.json()["predictions"]] == [0] * 8
    assert len(probes) >= 3, f"the heavy request took only {heavy_s:.2f}s"
    # Each probe is answered in a small fraction of the heavy request's time (the loop is free).
    assert max(probes) < heavy_s / 4, (max(probes), heavy_s)


def test_pixel_budgets_are_checked_from_headers_before_decoding(gw):
    import base64

    over_one = base64.b64encode(big_digit_png(2001)).decode()  # 4,004,001 > max_image_pixels=4,000,000
    r = httpx.post(gw.rest + "/v1/digits:predict", json={"images_b64": [over_one]}, timeout=30)
    assert r.status_code == 413
    assert "2001x2001 = 4004001 pixels > max_image_pixels=4000000" in r.json()["error"]["message"]
    img = base64.b64encode(big_digit_png(2000)).decode()  # 17 x 4M > max_request_pixels=64M
    r = httpx.post(gw.rest + "/v1/digits:predict", json={"images_b64": [img] * 17}, timeout=30)
    assert r.status_code == 413 and "> max_request_pixels=64000000" in r.json()["error"]["message"]
    with grpc.insecure_channel(gw.grpc) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.ClassifierStub(ch).ClassifyDigits(pb.DigitsRequest(images=[pb.Image(encoded=big_digit_png(2001))]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_image_pixels" in e.value.details()


# -- 3. metric labels are bounded ---------------------------------------------------------------
def test_client_chosen_names_do_not_grow_the_metrics(gw):
    before = len(httpx.get(gw.rest + "/metrics").content)
    with httpx.Client(base_url=gw.rest) as c, grpc.insecure_channel(gw.grpc) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        for i in range(300):
            assert c.post(PREDICT, json={"texts": ["x"], "model": f"model-{i}"}).status_code == 404
            assert c.get(f"/no/such/path/{i}").status_code == 404
        for i in range(100):
            with pytest.raises(grpc.RpcError):
                stub.ClassifySentiment(pb.SentimentRequest(texts=["x"], model=f"grpc-model-{i}"))
    m = samples(gw.rest)
    models = {dict(k[1]).get("model") for k in m if k[0] == "classifier_requests_total"}
    endpoints = {dict(k[1]).get("endpoint") for k in m if k[0] == "classifier_requests_total"}
    assert models <= {"", "unknown", "sentiment_lstm", "digits"}
    assert not any(e.startswith("/no/such") for e in endpoints) and "other" in endpoints
    assert m[("classifier_requests_total", (("endpoint", PREDICT), ("model", "unknown"), ("outcome", "NOT_FOUND"),
                                            ("protocol", "rest"), ("version", "")))] >= 300
    assert len(httpx.get(gw.rest + "/metrics").content) < before + 20_000


# -- 4. connection hygiene ------------------------------------------------------------------------
def _read_until_closed(sock: socket.socket, limit: float = 10) -> bytes:
    sock.settimeout(limit)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


@pytest.fixture(scope="module")
def strict_gw():
    settings = Settings(models=["sentiment_lstm"], http_header_timeout_s=0.5, http_body_timeout_s=0.5,
                        http_keepalive_timeout_s=0.5, max_connections=8, grpc_max_connection_idle_s=0.5,
                        drain_settle_s=0)
    with gateway_in_thread(settings) as g:
        wait_until(lambda: httpx.get(g.rest + "/readyz").status_code == 200, 60)
        yield g


def _connect(g) -> socket.socket:
    host, port = g.rest.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)))


def test_slow_or_idle_clients_are_timed_out(strict_gw):
    with _connect(strict_gw) as s:  # never sends anything
        assert b"408" in _read_until_closed(s).split(b"\r\n")[0]
    with _connect(strict_gw) as s:  # half a request head
        s.sendall(b"POST /v1/sentiment:predict HTTP/1.1\r\nHost: x\r\n")
        answer = _read_until_closed(s)
        assert answer.startswith(b"HTTP/1.1 408") and b"http_header_timeout_s=0.5" in answer
    with _connect(strict_gw) as s:  # a body that stops half-way
        s.sendall(b"POST /v1/sentiment:predict HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: 100\r\n\r\n{\"texts\": [")
        answer = _read_until_closed(s)
        assert b" 408 " in answer.split(b"\r\n")[0] and b"http_body_timeout_s=0.5" in answer
    with _connect(strict_gw) as s:  # the same on a /v2 path: the Open Inference Protocol's error shape
        s.sendall(b"POST /v2/models/sentiment_lstm/infer?x=1 HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: 100\r\n\r\n{\"inputs\": [")
        answer = _read_until_closed(s)
        assert b" 408 " in answer.split(b"\r\n")[0]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"error": "request body not received within http_body_timeout_s=0.5"}
    with _connect(strict_gw) as s:  # keep-alive, then idle: closed
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = _read_until_closed(s)
        assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1


def test_connection_cap_refuses_extra_connections_at_once(strict_gw):
    idle = [_connect(strict_gw) for _ in range(8)]
    try:
        time.sleep(0.1)
        with _connect(strict_gw) as extra:
            answer = _read_until_closed(extra, 5)
        assert answer.startswith(b"HTTP/1.1 503") and b"max_connections=8" in answer
    finally:
        for s in idle:
            s.close()
    # Once they are gone (closed, or timed out) new clients get in again.
    wait_until(lambda: httpx.get(strict_gw.rest + "/healthz").status_code == 200, 10)


def test_refused_grpc_calls_leave_no_reference_cycles(strict_gw):
    """A gRPC call refused with a ServiceError (unknown model, bad input; V2 and classifier.v1) ends
    without an exception through the handler's frames: no cycle holds the error and its frames
    until the loop's next garbage collection (with context.abort each refusal left ~50 objects in
    cycles; bursts of bad requests made 25,000 every 3 s, freed in ~100 ms stalls of the loop)."""
    import gc

    from serving.gen.inference import open_inference_grpc_pb2 as v2
    from serving.gen.inference import open_inference_grpc_pb2_grpc as v2_grpc
    from serving.errors import ServiceError

    with grpc.insecure_channel(strict_gw.grpc) as ch:
        stub, v2_stub = pb_grpc.ClassifierStub(ch), v2_grpc.GRPCInferenceServiceStub(ch)
        calls = [lambda: stub.ClassifySentiment(pb.SentimentRequest(texts=["good"], model="nope"), timeout=10),
                 lambda: stub.ClassifySentiment(pb.SentimentRequest(texts=[" "]), timeout=10),
                 lambda: v2_stub.ModelInfer(v2.ModelInferRequest(model_name="nope"), timeout=10)]
        for call in calls:  # warm: imports, first-call caches
            with pytest.raises(grpc.RpcError):
                call()
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            codes = set()
            for _ in range(20):
                for call in calls:
                    with pytest.raises(grpc.RpcError) as e:
                        call()
                    codes.add(e.value.code())
            gc.collect()
            held = [o for o in gc.garbage if isinstance(o, (ServiceError, grpc.aio.AbortError))
                    or (type(o).__name__ == "frame" and "/serving/" in o.f_code.co_filename)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert codes == {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}, codes
    assert held == [], f"{len(held)} objects of refused calls in reference cycles, e.g. {held[:3]}"


def test_grpc_idle_connections_are_closed(strict_gw):
    with grpc.insecure_channel(strict_gw.grpc) as ch:
        states = []
        ch.subscribe(states.append, try_to_connect=True)
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        wait_until(lambda: grpc.ChannelConnectivity.READY in states, 5)
        # grpc_max_connection_idle_s=0.5: the server sends GOAWAY, the channel goes idle.
        wait_until(lambda: states[-1] == grpc.ChannelConnectivity.IDLE, 10)


# -- 2 and 5. admission before work; work of clients that left is dropped ------------------------------
@pytest.fixture
def held():
    settings = Settings(models=["sentiment_lstm"], max_batch_size=256, max_queue_items=1024, max_batch_wait_us=0,
                        request_timeout_s=2.0, drain_settle_s=0.2, drain_timeout_s=0.5,
                        max_concurrent_batches=1)  # one call held in the model, the rest queued
    backend = HeldBackend(settings)
    backend.may_load.set()
    with gateway_in_thread(settings, backend) as g:
        wait_until(lambda: httpx.get(g.rest + "/readyz").status_code == 200, 60)
        g.backend = backend
        g.queue_rows = lambda: queue_rows(g, "sentiment_lstm")  # rows queued, admitted or in the model
        yield g
        backend.may_predict.set()


def texts(n: int) -> list[str]:
    return [f"review number {i}: a fine film with a good cast" for i in range(n)]


async def _until(predicate, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.01)


async def _fill_queue(held, c: httpx.AsyncClient) -> tuple[asyncio.Task, asyncio.Task]:
    """With the model held: a request of 256 texts held in the model, then one of 1,024 that fills
    the queue (max_queue_items 1024); returns both, still running."""
    calls = held.backend.calls
    first = asyncio.create_task(c.post(PREDICT, json={"texts": texts(256)}))
    await _until(lambda: held.backend.calls > calls)
    second = asyncio.create_task(c.post(PREDICT, json={"texts": texts(1024)}))
    await _until(lambda: held.queue_rows() == 256 + 1024)  # the first's rows in the model, the second's queued
    return first, second


def test_overload_is_refused_before_tokenising_with_retry_after(held):
    v = stable_version("sentiment_lstm")
    prep = held.backend.versions()["sentiment_lstm"][v].preprocessor
    encoded = []
    original = prep.encode
    prep.encode = lambda t: (encoded.append(t), original(t))[1]
    held.backend.may_predict.clear()

    async def scenario():
        async with httpx.AsyncClient(base_url=held.rest, timeout=30) as c, grpc.aio.insecure_channel(held.grpc) as ch:
            first, second = await _fill_queue(held, c)
            n = len(encoded)
            t0 = time.perf_counter()
            refused = await c.post(PREDICT, json={"texts": texts(1024)})
            refused_s = time.perf_counter() - t0
            assert len(encoded) == n, "the refused request was tokenised"
            call = pb_grpc.ClassifierStub(ch).ClassifySentiment(pb.SentimentRequest(texts=texts(8)))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call
            # Refused before the message is read, on both protocols: a call whose message never
            # comes, and a REST request whose body never comes, are answered at once.
            never = asyncio.Event()

            async def no_message():
                await never.wait()
                yield pb.SentimentRequest()

            unsent = ch.stream_unary("/classifier.v1.Classifier/ClassifySentiment",
                                     request_serializer=pb.SentimentRequest.SerializeToString)
            with pytest.raises(grpc.aio.AioRpcError) as unread:
                await unsent(no_message(), timeout=5)
            assert unread.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, unread.value
            reader, writer = await asyncio.open_connection(*held.rest.removeprefix("http://").split(":"))
            writer.write(f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: 1000000\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 429"), head
            writer.close()
            held.backend.may_predict.set()
            return refused, refused_s, e.value, await first, await second

    refused, refused_s, grpc_err, first, second = asyncio.run(scenario())
    m = samples(held.rest)
    assert m[("classifier_refusals_total", (("model", "sentiment_lstm"), ("reason", "queue_rows")))] == 4
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert "max_queue_items=1024" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert grpc_err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    pushback = dict(grpc_err.trailing_metadata())["grpc-retry-pushback-ms"]
    assert int(pushback) >= 1
    assert first.status_code == 200 and second.status_code == 200 and len(second.json()["predictions"]) == 1024


def test_refused_clients_are_told_to_wait_longer_the_more_are_refused_per_admission(held):
    """Issue 23 (3.): at 50x capacity every refused client was told "when the work ahead is done"
    (~0.2 s), so ~45 gRPC clients came back together, all but one were refused again, and each
    resent its 1.3 MB message: 135-170 refusals a second. The pushback now grows with refusals per
    admission (REST Retry-After too), up to max_retry_after_s (5 s), and admission itself is unchanged."""
    held.backend.may_predict.clear()

    async def scenario():
        async with httpx.AsyncClient(base_url=held.rest, timeout=30) as c, grpc.aio.insecure_channel(held.grpc) as ch:
            first, second = await _fill_queue(held, c)
            stub = pb_grpc.ClassifierStub(ch)
            pushbacks_ms, retry_after = [], []
            for i in range(30):
                if i % 3:
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await stub.ClassifySentiment(pb.SentimentRequest(texts=texts(8)))
                    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    pushbacks_ms.append(int(dict(e.value.trailing_metadata())["grpc-retry-pushback-ms"]))
                else:
                    r = await c.post(PREDICT, json={"texts": texts(8)})
                    assert r.status_code == 429
                    retry_after.append(int(r.headers["retry-after"]))
            held.backend.may_predict.set()
            answered = [await first, await second]
            after = await c.post(PREDICT, json={"texts": texts(8)})  # contention stretches waits, never refuses
            return pushbacks_ms, retry_after, answered, after

    pushbacks_ms, retry_after, answered, after = asyncio.run(scenario())
    assert pushbacks_ms[-1] >= 4 * pushbacks_ms[0], pushbacks_ms  # ~14x: 29 refused per 2 admitted
    assert all(p <= 5000 for p in pushbacks_ms), pushbacks_ms  # max_retry_after_s
    assert retry_after[0] == 1 and retry_after[-1] >= 2, retry_after  # whole seconds, at least 1
    assert [r.status_code for r in answered] == [200, 200] and after.status_code == 200


def test_work_of_clients_that_left_is_dropped_not_computed(held):
    held.backend.may_predict.clear()
    rows_seen = []
    predict = held.backend.predict
    held.backend.predict = lambda m, v, x, request_ids=(): (rows_seen.append(len(x)), predict(m, v, x, request_ids))[1]

    async def scenario():
        async with httpx.AsyncClient(base_url=held.rest, timeout=30) as c:
            calls = held.backend.calls
            first = asyncio.create_task(c.post(PREDICT, json={"texts": texts(256)}))
            await _until(lambda: held.backend.calls > calls)
            async with httpx.AsyncClient(base_url=held.rest, timeout=0.3) as impatient:
                gone = await asyncio.gather(*(impatient.post(PREDICT, json={"texts": texts(64)}) for _ in range(8)),
                                            return_exceptions=True)
            assert all(isinstance(r, httpx.TimeoutException) for r in gone)
            async with grpc.aio.insecure_channel(held.grpc) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await pb_grpc.ClassifierStub(ch).ClassifySentiment(pb.SentimentRequest(texts=texts(64)), timeout=0.3)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await _until(lambda: held.queue_rows() == 256)  # only the first's rows, in the model: nothing queued
            held.backend.may_predict.set()
            r = await first
            after = await c.post(PREDICT, json={"texts": texts(3)})
            return r, after

    first, after = asyncio.run(scenario())
    assert first.status_code == 200 and after.status_code == 200
    assert rows_seen == [256, 3], "rows of clients that left reached the model"
    m = samples(held.rest)
    assert m[("classifier_dropped_rows_total", (("model", "sentiment_lstm"), ("reason", "cancelled")))] == 8 * 64
    assert m[("classifier_dropped_rows_total", (("model", "sentiment_lstm"), ("reason", "deadline")))] == 64
    cancelled = ("classifier_requests_total", (("endpoint", PREDICT), ("model", "sentiment_lstm"),
                                               ("outcome", "CANCELLED"), ("protocol", "rest"),
                                               ("version", str(stable_version("sentiment_lstm")))))
    assert m[cancelled] == 8


def test_request_timeout_answers_503_and_drops_the_queued_rows(held):
    held.backend.may_predict.clear()

    async def scenario():
        async with httpx.AsyncClient(base_url=held.rest, timeout=30) as c:
            calls = held.backend.calls
            first = asyncio.create_task(c.post(PREDICT, json={"texts": texts(256)}))
            await _until(lambda: held.backend.calls > calls)
            late = await c.post(PREDICT, json={"texts": texts(10)})  # request_timeout_s=2
            held.backend.may_predict.set()
            await first
            return late

    late = asyncio.run(scenario())
    assert late.status_code == 503 and late.json()["error"]["code"] == "DEADLINE_EXCEEDED"
    assert "request_timeout_s=2" in late.json()["error"]["message"]
    m = samples(held.rest)
    assert m[("classifier_dropped_rows_total", (("model", "sentiment_lstm"), ("reason", "deadline")))] == 10


# -- 7. drain on SIGTERM ------------------------------------------------------------------------------
def test_sigterm_drains_in_flight_work_on_both_protocols_then_exits_cleanly(processes):
    settle = SETTLE_S
    g = processes["draining"]  # (DRAINING: its settings)
    body = json.dumps({"texts": texts(1024)}).encode()

    async def scenario():
        async with httpx.AsyncClient(base_url=g.rest, timeout=120,
                                     headers={"content-type": "application/json"}) as c, \
                httpx.AsyncClient(base_url=g.rest, timeout=120) as idle, \
                grpc.aio.insecure_channel(g.grpc) as ch:
            assert (await idle.get("/healthz")).status_code == 200  # a keep-alive connection, idle meanwhile
            stub = pb_grpc.ClassifierStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            rest_work = [asyncio.create_task(c.post(PREDICT, content=body)) for _ in range(20)]
            grpc_work = [asyncio.ensure_future(stub.ClassifySentiment(pb.SentimentRequest(texts=texts(1024))))
                         for _ in range(3)]
            stream = stub.StreamClassifySentiment(iter([pb.SentimentRequest(texts=texts(512))] * 4))
            stream_work = asyncio.create_task(_collect(stream))
            await _until(lambda: queue_rows(g, "sentiment_lstm") > 4096, 30)
            t_term = time.monotonic()
            g.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            ready = await c.get("/readyz")
            serving = (await health.Check(health_pb2.HealthCheckRequest())).status
            # Taken while balancers catch up (queued behind the work, answered when its turn comes).
            during_settle = asyncio.create_task(c.post(PREDICT, json={"texts": ["still taken while balancers catch up"]}))
            await asyncio.sleep(settle + 0.2 - (time.monotonic() - t_term))
            refused = await idle.post(PREDICT, json={"texts": ["too late"]})  # after the settle delay: refused
            refused_after = time.monotonic() - t_term
            with pytest.raises(httpx.ConnectError):  # and a new connection is not taken at all
                async with httpx.AsyncClient(base_url=g.rest, timeout=5) as fresh:
                    await fresh.get("/healthz")
            with pytest.raises(grpc.aio.AioRpcError) as grpc_refused:
                await stub.ClassifySentiment(pb.SentimentRequest(texts=["too late"]))
            results = await asyncio.gather(*rest_work, *grpc_work, stream_work, return_exceptions=True)
            return ready, serving, await during_settle, refused, refused_after, grpc_refused.value, results

    ready, serving, during_settle, refused, refused_after, grpc_refused, results = asyncio.run(scenario())
    assert ready.status_code == 503 and "draining" in ready.json()["error"]["message"]
    assert serving == health_pb2.HealthCheckResponse.NOT_SERVING
    assert during_settle.status_code == 200
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    assert refused.headers["connection"] == "close"  # not reused: it would be closed under the next request
    assert refused_after >= settle
    assert grpc_refused.code() == grpc.StatusCode.UNAVAILABLE
    assert [getattr(r, "status_code", None) for r in results[:20]] == [200] * 20
    assert all(isinstance(r, pb.SentimentResponse) and len(r.predictions) == 1024 for r in results[20:23]), results[20:23]
    # An open stream: every chunk it sent before the settle delay ended is answered; then it
    # ends UNAVAILABLE (the client resends the rest elsewhere) unless it finished first.
    answered, error = results[23]
    assert answered and set(answered) == {512}
    assert (len(answered) == 4 and error is None) or error.code() == grpc.StatusCode.UNAVAILABLE
    assert g.process.wait(timeout=60) == 0


async def _collect(stream) -> tuple[list[int], grpc.aio.AioRpcError | None]:
    answered = []
    try:
        async for r in stream:
            answered.append(len(r.predictions))
    except grpc.aio.AioRpcError as e:
        return answered, e
    return answered, None


def test_work_left_at_the_drain_timeout_is_answered_503_not_dropped(held):
    held.backend.may_predict.clear()

    async def scenario():
        async with httpx.AsyncClient(base_url=held.rest, timeout=30) as c, grpc.aio.insecure_channel(held.grpc) as ch:
            calls = held.backend.calls
            in_flight = asyncio.create_task(c.post(PREDICT, json={"texts": texts(256)}))
            await _until(lambda: held.backend.calls > calls)
            # Queued one after the other, so that the depth says each one is queued (the gauge
            # counts rows admitted and still being preprocessed too).
            queued = []
            for _ in range(3):
                queued.append(asyncio.create_task(c.post(PREDICT, json={"texts": texts(100)})))
                await _until(lambda n=len(queued): held.queue_rows() == 256 + 100 * n)
            queued_grpc = asyncio.ensure_future(pb_grpc.ClassifierStub(ch).ClassifySentiment(pb.SentimentRequest(texts=texts(5))))
            await _until(lambda: held.queue_rows() == 256 + 305)
            held.loop_call(held.gateway.request_stop)  # what SIGTERM does (drain_settle_s=0.2, drain_timeout_s=0.5)
            results = await asyncio.gather(in_flight, *queued, queued_grpc, return_exceptions=True)
            return results

    results = asyncio.run(scenario())
    held.backend.may_predict.set()
    assert [r.status_code for r in results[:4]] == [503] * 4
    assert all("shutting down" in r.json()["error"]["message"] for r in results[:4])
    assert isinstance(results[4], grpc.aio.AioRpcError) and results[4].code() == grpc.StatusCode.UNAVAILABLE
