"""The circuit breaker toward TF Serving (issue 22): real gateways (no TensorFlow) against the stand-in.

A TF Serving that hangs or is gone: after tfserving_breaker_failures calls in a row time out or
find it unavailable, requests fail at once (503 UNAVAILABLE with Retry-After) and /readyz and gRPC
health say why; after tfserving_breaker_open_s one probe call goes through, and the gateway serves
again once TF Serving answers. The breaker's rules with a fake clock are at the end.
"""

import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.errors import Unavailable
from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from testkit.gateway import ROOT, WITHOUT_TENSORFLOW, gateway_process, wait_until
from testkit.standin import StandIn

TEXT = "A wonderful film, the acting was great and I loved every minute of the story."
TIMEOUT_S, FAILURES, OPEN_S = 0.5, 3, 2.0
HANG_S = 3.0  # the stand-in's delay: well over TIMEOUT_S, and its sleeping handlers end soon after
FAST_S = 0.1


class CountingStandIn(StandIn):
    """The stand-in, counting the Predict calls that reach it (before its delay)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reached = 0
        self.lose_polls = 0  # the next this many GetModelStatus calls end UNAVAILABLE

    def Predict(self, request, context):
        self.reached += 1
        return super().Predict(request, context)

    def GetModelStatus(self, request, context):
        if self.lose_polls > 0:
            self.lose_polls -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset (a test)")
        return super().GetModelStatus(request, context)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """sentiment_lstm versions 1 and 2 (two versions: two batchers, so two Predicts at once)."""
    base = tmp_path_factory.mktemp("repo")
    (base / "sentiment_lstm").mkdir()
    for v in ("1", "2"):
        (base / "sentiment_lstm" / v).symlink_to(ROOT / "models" / "sentiment_lstm" / v)
    return base


@pytest.fixture(scope="module")
def standin(repo):
    s = CountingStandIn(repo, ["sentiment_lstm"])
    s.start()
    yield s
    s.delay_s = 0
    s.stop()


def _gateway(standin, repo, failures: int):
    return gateway_process(WITHOUT_TENSORFLOW, backend="tfserving", tfserving_address=standin.address,
                           model_base_path=repo, models='["sentiment_lstm"]', models_config_file="",
                           tfserving_timeout_s=TIMEOUT_S, tfserving_retries=0, tfserving_poll_s=0.2,
                           tfserving_breaker_failures=failures, tfserving_breaker_open_s=OPEN_S)


@pytest.fixture(scope="module")
def gw(standin, repo):
    with _gateway(standin, repo, FAILURES) as running:
        running.http = httpx.Client(base_url=running.rest, timeout=10)
        yield running
        running.http.close()


@pytest.fixture
def healthy(gw, standin):
    """Each test starts from a TF Serving that answers and a closed breaker."""
    standin.delay_s = 0
    if standin.server is None:
        standin.start()
    wait_until(lambda: predict(gw).status_code == 200 and readyz(gw).status_code == 200, timeout=10)
    yield gw
    standin.delay_s = 0
    if standin.server is None:
        standin.start()


def predict(gw, **body):
    return gw.http.post("/v1/sentiment:predict", json={"texts": [TEXT], **body})


def timed_predict(gw, **body):
    t0 = time.perf_counter()
    r = predict(gw, **body)
    return r, time.perf_counter() - t0


def readyz(gw):
    return gw.http.get("/readyz")


def trip(gw, standin) -> float:
    """Hang the stand-in and send FAILURES requests (each times out): the breaker opens. Returns
    when the hang began (perf_counter)."""
    standin.delay_s = HANG_S
    t0 = time.perf_counter()
    for _ in range(FAILURES):
        r, took = timed_predict(gw)
        assert r.status_code == 504 and r.json()["error"]["code"] == "DEADLINE_EXCEEDED", r.text
        assert took >= TIMEOUT_S * 0.9
    return t0


def assert_fails_fast(gw, *words):
    r, took = timed_predict(gw)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "UNAVAILABLE"
    message = r.json()["error"]["message"]
    assert "circuit breaker open" in message and all(w in message for w in words), message
    assert 1 <= int(r.headers["retry-after"]) <= OPEN_S
    assert took < FAST_S, f"took {took:.3f} s"
    return took


def test_a_hanging_tf_serving_opens_the_breaker_and_requests_fail_fast(healthy, standin):
    gw = healthy
    t0 = trip(gw, standin)
    reached = standin.reached
    took = assert_fails_fast(gw, "3 consecutive TF Serving failures", "DEADLINE_EXCEEDED")
    print(f"first fast failure {time.perf_counter() - t0:.2f} s after the hang began ({took * 1000:.1f} ms)")
    r = readyz(gw)
    assert r.status_code == 503 and "circuit breaker open" in r.json()["error"]["message"], r.text
    print(f"/readyz 503 {time.perf_counter() - t0:.2f} s after the hang began")

    with grpc.insecure_channel(gw.grpc) as ch:
        t = time.perf_counter()
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.ClassifierStub(ch).ClassifySentiment(pb.SentimentRequest(texts=[TEXT]), timeout=10)
        assert time.perf_counter() - t < FAST_S * 3  # (includes the channel's connect)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "circuit breaker open" in e.value.details()
        assert 0 < int(dict(e.value.trailing_metadata())["grpc-retry-pushback-ms"]) <= OPEN_S * 1000
        health = health_pb2_grpc.HealthStub(ch)
        wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                   == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=OPEN_S / 2)
    assert standin.reached == reached  # none of these reached TF Serving


def test_one_probe_after_open_s_a_failed_probe_opens_it_again(healthy, standin):
    gw = healthy
    trip(gw, standin)
    time.sleep(OPEN_S)  # half-open: readiness holds (else no call would come to probe with)
    assert readyz(gw).status_code == 200
    reached = standin.reached
    results = {}

    def call(version):
        results[version] = timed_predict(gw, version=version)

    # Two versions: two batchers, two Predicts at once; only one goes to TF Serving.
    threads = [threading.Thread(target=call, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert standin.reached == reached + 1
    (probe, probe_s), (refused, refused_s) = sorted(results.values(), key=lambda rt: rt[0].status_code, reverse=True)
    assert probe.status_code == 504 and probe_s >= TIMEOUT_S * 0.9, probe.text
    assert refused.status_code == 503 and refused_s < FAST_S, refused.text
    assert "half-open" in refused.json()["error"]["message"] and "retry-after" in refused.headers
    # The probe failed: open again, for OPEN_S.
    assert_fails_fast(gw, "DEADLINE_EXCEEDED")
    assert readyz(gw).status_code == 503
    assert standin.reached == reached + 1


def test_tf_serving_answers_again_a_probe_closes_the_breaker(healthy, standin):
    gw = healthy
    trip(gw, standin)
    standin.delay_s = 0
    t0 = time.perf_counter()
    assert_fails_fast(gw)  # still open: TF Serving is not asked before OPEN_S
    r = readyz(gw)
    assert r.status_code == 503 and "retrying in" in r.json()["error"]["message"]
    wait_until(lambda: predict(gw).status_code == 200, timeout=OPEN_S + 3, interval=0.05)
    print(f"served again {time.perf_counter() - t0:.2f} s after TF Serving recovered (open_s={OPEN_S})")
    assert time.perf_counter() - t0 >= OPEN_S * 0.9
    assert readyz(gw).status_code == 200
    for _ in range(FAILURES + 1):  # closed: the count starts again
        assert predict(gw).status_code == 200


def test_lost_status_polls_fail_readiness_but_no_request(healthy, standin):
    """Two polls in a row end UNAVAILABLE (fewer than the breaker's FAILURES), as when the pod a
    headless Service's address pointed at was just killed: readiness fails until a poll answers,
    but the versions keep their state, so requests are still served (they were refused with
    "version N is not ready (UNAVAILABLE)" until the next poll answered)."""
    gw = healthy
    standin.lose_polls = 2
    wait_until(lambda: standin.lose_polls < 2, timeout=3, interval=0.01)
    r = predict(gw)
    assert r.status_code == 200, r.text
    r = readyz(gw)  # the second poll fails 0.2 s after the first: readiness still names it
    assert r.status_code == 503 and "UNAVAILABLE: connection reset (a test)" in r.json()["error"]["message"], r.text
    wait_until(lambda: readyz(gw).status_code == 200, timeout=3, interval=0.05)


def test_tf_serving_gone_opens_the_breaker_and_back_closes_it(healthy, standin):
    gw = healthy
    t0 = time.perf_counter()
    standin.stop()
    # The status polls (every 0.2 s) fail too: the breaker opens without any request.
    wait_until(lambda: "circuit breaker open" in readyz(gw).text, timeout=3, interval=0.05)
    print(f"/readyz names the breaker {time.perf_counter() - t0:.2f} s after TF Serving went away")
    assert readyz(gw).status_code == 503 and "UNAVAILABLE" in readyz(gw).json()["error"]["message"]
    # The failed polls also marked the versions UNAVAILABLE: the core refuses before the backend.
    r, took = timed_predict(gw)
    assert r.status_code == 503 and r.json()["error"]["code"] == "UNAVAILABLE" and took < FAST_S, r.text
    assert "not ready (UNAVAILABLE)" in r.json()["error"]["message"]
    time.sleep(OPEN_S + 0.5)  # failing polls keep it open: no client call is spent on a probe
    r = readyz(gw)
    assert r.status_code == 503 and "circuit breaker open" in r.json()["error"]["message"], r.text

    standin.start()  # same port
    t1 = time.perf_counter()
    wait_until(lambda: readyz(gw).status_code == 200, timeout=OPEN_S + 4, interval=0.05)
    wait_until(lambda: predict(gw).status_code == 200, timeout=3, interval=0.05)
    print(f"served again {time.perf_counter() - t1:.2f} s after TF Serving came back (open_s={OPEN_S})")
    assert gw.process.poll() is None


def test_breaker_off_keeps_calling_tf_serving(healthy, standin, repo):
    """tfserving_breaker_failures=0: every request waits for TF Serving (the old behaviour), while
    a gateway with the breaker, beside it, fails fast."""
    with _gateway(standin, repo, 0) as off:
        off.http = httpx.Client(base_url=off.rest, timeout=10)
        with off.http:
            assert predict(off).status_code == 200
            trip(healthy, standin)
            assert_fails_fast(healthy)
            reached = standin.reached
            for _ in range(FAILURES + 1):
                r, took = timed_predict(off)
                assert r.status_code == 504 and took >= TIMEOUT_S * 0.9, r.text
                assert "retry-after" not in r.headers
            assert standin.reached == reached + FAILURES + 1
            assert readyz(off).status_code == 200  # TF Serving's status still answers
            standin.delay_s = 0
            wait_until(lambda: predict(off).status_code == 200, timeout=HANG_S + 2)


# -- the breaker's rules, with a fake clock --------------------------------------------------

def breaker(failures=3, open_s=2.0):
    from serving.backends.breaker import Breaker

    clock = [0.0]
    b = Breaker(failures, open_s, probe_s=0.5, address="tfs:8500", clock=lambda: clock[0])
    return b, clock


def test_breaker_counts_failures_in_a_row_and_an_answer_resets():
    b, clock = breaker()
    b.failed("DEADLINE_EXCEEDED: a")
    b.failed("UNAVAILABLE: b", poll=True)
    b.answered()  # a Predict answered: both counts start again
    b.failed("DEADLINE_EXCEEDED: c")
    b.failed("DEADLINE_EXCEEDED: d")
    b.poll_answered()  # TF Serving's status answers while its Predicts hang: still counted
    assert b.before_call() == 0 and b.state() == "closed" and b.refusal() is None
    b.failed("DEADLINE_EXCEEDED: e")
    assert b.state() == "open"
    with pytest.raises(Unavailable) as e:
        b.before_call()
    assert e.value.retry_after_s == 2.0 and e.value.http_status == 503 and e.value.code == "UNAVAILABLE"
    assert "3 consecutive TF Serving failures at tfs:8500 (last: DEADLINE_EXCEEDED: e)" in e.value.message
    clock[0] = 1.5
    assert b.refusal().endswith("retrying in 0.5 s")


def test_breaker_sporadic_poll_failures_do_not_add_up():
    b, _ = breaker()
    for _ in range(10):
        b.failed("DEADLINE_EXCEEDED: poll", poll=True)
        b.failed("DEADLINE_EXCEEDED: poll", poll=True)
        b.poll_answered()
    assert b.state() == "closed"


def test_breaker_half_open_lets_one_probe_through():
    b, clock = breaker()
    for _ in range(3):
        b.failed("UNAVAILABLE: x")
    clock[0] = 2.0
    assert b.state() == "half_open" and b.refusal() is None  # ready: a call may come to probe with
    probe = b.before_call()
    assert probe
    with pytest.raises(Unavailable, match="half-open"):
        b.before_call()
    b.failed("DEADLINE_EXCEEDED: probe", probe)
    assert b.state() == "open" and b.refusal() is not None
    clock[0] = 3.9
    b.failed("UNAVAILABLE: poll", poll=True)  # a failing poll while open: open for open_s again
    clock[0] = 4.5
    assert b.state() == "open"
    clock[0] = 5.9
    probe = b.before_call()
    b.release(probe)  # ended without an answer either way: the next call probes
    probe = b.before_call()
    b.answered(probe)
    assert b.state() == "closed" and b.failures == 0 and b.before_call() == 0


def test_breaker_off():
    b, _ = breaker(failures=0)
    for _ in range(100):
        b.failed("UNAVAILABLE: x")
    assert b.state() == "closed" and b.before_call() == 0 and b.refusal() is None
