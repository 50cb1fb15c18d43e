"""Readiness, overload and model-less start, on a real gateway run in this process.

The backend here is the real embedded backend; the tests only hold it back at
chosen moments (before loading, inside a model call) to see what clients see.
"""

import asyncio
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.backends.embedded import EmbeddedBackend
from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from serving.settings import Settings
from testkit.gateway import ROOT, gateway_in_thread, queue_rows, wait_until


class HeldBackend(EmbeddedBackend):
    def __init__(self, settings):
        super().__init__(settings)
        self.may_load = threading.Event()
        self.may_predict = threading.Event()
        self.may_predict.set()
        self.calls = 0

    def sync(self, config):
        self.may_load.wait(60)
        return super().sync(config)

    def predict(self, model, version, batch, request_ids=()):
        self.calls += 1
        self.may_predict.wait(60)
        return super().predict(model, version, batch, request_ids)


def test_ready_only_after_load_and_warmup():
    settings = Settings(models=["sentiment_lstm"])
    backend = HeldBackend(settings)
    with gateway_in_thread(settings, backend) as gw:
        # Listed LOADING once TensorFlow is imported (seconds when this test runs first in its process).
        wait_until(lambda: backend.versions()["sentiment_lstm"], 60)
        r = httpx.get(gw.rest + "/readyz")
        assert r.status_code == 503
        assert r.json()["error"] == {"code": "UNAVAILABLE", "message": "model 'sentiment_lstm' version %d is LOADING"
                                     % min(backend.versions()["sentiment_lstm"])}  # the first one not loaded
        assert httpx.get(gw.rest + "/healthz").status_code == 200
        r = httpx.post(gw.rest + "/v1/sentiment:predict", json={"texts": ["good"]})
        assert r.status_code == 503 and "is not ready (LOADING)" in r.json()["error"]["message"]
        with grpc.insecure_channel(gw.grpc) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.ClassifierStub(ch).ClassifySentiment(pb.SentimentRequest(texts=["good"]))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            health = health_pb2_grpc.HealthStub(ch)
            wait_until(lambda: health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING, 10)
            v2_health = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
            assert health.Check(v2_health).status == health_pb2.HealthCheckResponse.NOT_SERVING
            # V2 model repository: the index says LOADING, a load request waits for the gateway's own
            r = httpx.post(gw.rest + "/v2/repository/index")
            assert {(m["state"], m["reason"]) for m in r.json()} == {("LOADING", "version state LOADING")}
            r = httpx.post(gw.rest + "/v2/repository/models/sentiment_lstm/load")
            assert r.status_code == 503 and r.json()["error"].startswith("model 'sentiment_lstm': its default version")
            assert "is LOADING" in r.json()["error"]

            backend.may_load.set()
            wait_until(lambda: httpx.get(gw.rest + "/readyz").status_code == 200, 60)
            # Ready means warmed: the warm-up calls ran before readiness flipped.
            assert backend.calls >= 3
            assert all(v.state == "AVAILABLE" for v in backend.versions()["sentiment_lstm"].values())
            wait_until(lambda: health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING, 10)
            assert health.Check(v2_health).status == health_pb2.HealthCheckResponse.SERVING
            assert httpx.post(gw.rest + "/v2/repository/models/sentiment_lstm/load").status_code == 200
        assert httpx.post(gw.rest + "/v1/sentiment:predict", json={"texts": ["good"]}).status_code == 200


def test_missing_model_keeps_the_service_unready_and_says_which(tmp_path):
    (tmp_path / "sentiment_lstm").symlink_to(ROOT / "models" / "sentiment_lstm")
    settings = Settings(models=["sentiment_lstm", "sentiment_bilstm"], model_base_path=tmp_path)
    with gateway_in_thread(settings) as gw:
        def unready_reason():
            r = httpx.get(gw.rest + "/readyz")
            return r.status_code == 503 and "sentiment_bilstm" in r.json()["error"]["message"] and r
        assert "no version found" in wait_until(unready_reason, 30).json()["error"]["message"]
        # The model that is there still answers; the missing one says so.
        wait_until(lambda: httpx.post(gw.rest + "/v1/sentiment:predict", json={"texts": ["good"]}).status_code == 200, 60)
        r = httpx.post(gw.rest + "/v1/sentiment:predict", json={"texts": ["good"], "model": "sentiment_bilstm"})
        assert r.status_code == 503 and "no version to serve" in r.json()["error"]["message"]


def test_full_queue_is_refused_at_once_and_nothing_in_flight_is_lost():
    settings = Settings(models=["sentiment_lstm"], max_queue_items=8, max_batch_size=8, max_items_per_request=8,
                        max_batch_wait_us=0, max_concurrent_batches=1)  # one call in the model, the next queued
    backend = HeldBackend(settings)
    backend.may_load.set()
    with gateway_in_thread(settings, backend) as gw:
        wait_until(lambda: httpx.get(gw.rest + "/readyz").status_code == 200, 60)
        backend.may_predict.clear()
        calls_before = backend.calls

        async def scenario():
            async with httpx.AsyncClient(timeout=60, base_url=gw.rest) as c:
                post = lambda n: c.post("/v1/sentiment:predict", json={"texts": ["good movie"] * n})  # noqa: E731
                first = asyncio.create_task(post(8))  # taken by the worker, held inside the model call
                while backend.calls == calls_before:
                    await asyncio.sleep(0.01)
                second = asyncio.create_task(post(8))  # fills the queue
                while queue_rows(gw, "sentiment_lstm") < 16:  # the 8 rows in the model + 8 queued
                    await asyncio.sleep(0.01)
                refused = await post(1)
                async with grpc.aio.insecure_channel(gw.grpc) as ch:
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await pb_grpc.ClassifierStub(ch).ClassifySentiment(pb.SentimentRequest(texts=["x"]))
                backend.may_predict.set()
                return refused, e.value, await first, await second

        refused, grpc_err, first, second = asyncio.run(scenario())
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
        assert "max_queue_items=8" in refused.json()["error"]["message"]
        assert grpc_err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert first.status_code == 200 and len(first.json()["predictions"]) == 8
        assert second.status_code == 200 and len(second.json()["predictions"]) == 8


def test_requests_in_the_last_moments_of_a_drain_get_a_status_not_a_reset():
    """Clients hammering a gateway over keep-alive REST connections and gRPC channels while it drains
    and exits: each request gets an answer (200, 503 / OK, UNAVAILABLE) or a refused connection once
    it is gone, never a reset of a request already sent (httpx ReadError / RemoteProtocolError) or
    CANCELLED."""
    import collections
    import signal

    from testkit.gateway import ROOT, WITHOUT_TENSORFLOW, gateway_process
    from testkit.standin import StandIn

    standin = StandIn(ROOT / "models", ["sentiment_lstm"])
    standin.start()
    outcomes = collections.Counter()
    stop = threading.Event()
    try:
        with gateway_process(WITHOUT_TENSORFLOW, backend="tfserving", tfserving_address=standin.address,
                             models_config_file="", models='["sentiment_lstm"]', drain_settle_s=0.3,
                             drain_timeout_s=2) as gw:
            def rest():
                with httpx.Client(base_url=gw.rest, timeout=5) as c:
                    while not stop.is_set():
                        try:
                            outcomes[f"REST {c.post('/v1/sentiment:predict', json={'texts': ['good']}).status_code}"] += 1
                        except httpx.ConnectError:
                            outcomes["REST refused"] += 1
                            time.sleep(0.01)
                        except httpx.HTTPError as e:
                            outcomes[f"REST {type(e).__name__}"] += 1

            def rpc():
                with grpc.insecure_channel(gw.grpc) as ch:
                    stub = pb_grpc.ClassifierStub(ch)
                    while not stop.is_set():
                        try:
                            stub.ClassifySentiment(pb.SentimentRequest(texts=["good"]), timeout=5)
                            outcomes["gRPC OK"] += 1
                        except grpc.RpcError as e:
                            outcomes[f"gRPC {e.code().name}"] += 1
                            time.sleep(0.01)

            threads = [threading.Thread(target=f) for f in (rest, rest, rest, rest, rpc, rpc)]
            for t in threads:
                t.start()
            time.sleep(1)
            gw.process.send_signal(signal.SIGTERM)
            assert gw.process.wait(20) == 0
            time.sleep(0.3)
            stop.set()
            for t in threads:
                t.join(10)
    finally:
        stop.set()
        standin.stop()
    # gRPC: a call that reaches the server in the instant its listener stops can still end CANCELLED
    # (grpc core cancels calls it had not handed to the application yet): seen once in ~10 runs, 1 of
    # ~250 calls. REST: no reset at all.
    assert outcomes.pop("gRPC CANCELLED", 0) <= 1, outcomes
    assert set(outcomes) <= {"REST 200", "REST 503", "REST refused", "gRPC OK", "gRPC UNAVAILABLE"}, outcomes
    assert outcomes["REST 200"] and outcomes["gRPC OK"] and outcomes["REST refused"], outcomes
