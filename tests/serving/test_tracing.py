"""OpenTelemetry tracing (serving/tracing.py), end to end: a real gateway process (TF Serving backend, in a
process that cannot import TensorFlow) with the OTEL_* variables pointing at a real OTLP/gRPC receiver
(testkit/otlp.py), forwarding to the TF Serving stand-in, which records the traceparent it is sent.

Each request carries the client's W3C traceparent over one of the four adapters; the spans that arrive
must be in the client's trace, under the client's span, with the expected names and parents, and the
batch span must link every request it served. With tracing off (OTEL_TRACES_EXPORTER unset) the gateway
runs where the OpenTelemetry SDK and exporter cannot even be imported, and nothing is exported."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest

from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from serving.gen.inference import open_inference_grpc_pb2 as v2
from serving.gen.inference import open_inference_grpc_pb2_grpc as v2_grpc
from testkit.gateway import MODELS_CONFIG, ROOT, SHIPPED_MODELS, gateway_processes
from testkit.otlp import OtlpReceiver

# The tests with gateways: the stand-in loads the shipped models with TensorFlow in this process first.
slow = pytest.mark.slow

SERVER, CLIENT = 2, 3  # OTLP Span.SpanKind
ERROR = 2  # OTLP Status.StatusCode
# The lean gateway (no TensorFlow), where the OpenTelemetry SDK and exporter cannot be imported either.
WITHOUT_OTEL_SDK = [
    sys.executable, "-c",
    "import sys; sys.modules.update(tensorflow=None, keras=None, tensorflow_serving=None); "
    "sys.modules.update({m: None for m in ('opentelemetry.sdk', 'opentelemetry.exporter', 'opentelemetry.proto')}); "
    "from serving.__main__ import main; main()",
]
WITHOUT_TENSORFLOW = WITHOUT_OTEL_SDK[:2] + [WITHOUT_OTEL_SDK[2].replace(
    "sys.modules.update({m: None for m in ('opentelemetry.sdk', 'opentelemetry.exporter', 'opentelemetry.proto')}); ", "")]
BATCH_WAIT_US = 400_000  # concurrent requests join one batch (batch_wait_when_idle)


@pytest.fixture(scope="module")
def receiver():
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def off_receiver():
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def gateways(receiver, off_receiver):
    from testkit.standin import StandIn

    standin = StandIn(ROOT / "models", SHIPPED_MODELS, config=MODELS_CONFIG)
    standin.start()
    try:
        common = dict(backend="tfserving", tfserving_address=standin.address, batch_wait_when_idle=True,
                      max_batch_wait_us=BATCH_WAIT_US)
        on = dict(command=WITHOUT_TENSORFLOW, env=receiver.env(service_name="traced-gateway"), **common)
        off_env = receiver.env()  # every OTEL_* variable but the exporter: tracing stays off
        off_env.pop("OTEL_TRACES_EXPORTER")
        off_env["OTEL_EXPORTER_OTLP_ENDPOINT"] = off_receiver.endpoint
        off = dict(command=WITHOUT_OTEL_SDK, env=off_env, **common)
        with gateway_processes(on, off) as (traced, untraced):
            traced.standin = untraced.standin = standin
            yield traced, untraced
    finally:
        standin.stop()


@pytest.fixture(scope="module")
def gw(gateways):
    return gateways[0]


def new_parent(sampled: bool = True) -> tuple[str, str, str]:
    """A client's trace id, span id and its traceparent header."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def rest_v1(gw, traceparent: str, rid: str) -> None:
    r = httpx.post(gw.rest + "/v1/sentiment:predict", json={"texts": ["a fine film"]}, timeout=30,
                   headers={"traceparent": traceparent, "x-request-id": rid})
    assert r.status_code == 200, r.text


def rest_v2(gw, traceparent: str, rid: str) -> None:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a fine film"]}]}
    r = httpx.post(gw.rest + "/v2/models/sentiment_lstm/infer", json=body, timeout=30,
                   headers={"traceparent": traceparent, "x-request-id": rid})
    assert r.status_code == 200, r.text


def grpc_v1(gw, traceparent: str, rid: str) -> None:
    with grpc.insecure_channel(gw.grpc) as channel:
        pb_grpc.ClassifierStub(channel).ClassifySentiment(
            pb.SentimentRequest(texts=["a fine film"]), timeout=30,
            metadata=(("traceparent", traceparent), ("x-request-id", rid)))


def grpc_v2(gw, traceparent: str, rid: str) -> None:
    request = v2.ModelInferRequest(model_name="sentiment_lstm", inputs=[v2.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[1], contents=v2.InferTensorContents(bytes_contents=[b"a fine film"]))])
    with grpc.insecure_channel(gw.grpc) as channel:
        v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=30, metadata=(("traceparent", traceparent), ("x-request-id", rid)))


ADAPTERS = {
    "rest /v1/sentiment:predict": rest_v1,
    "rest /v2/models/{name}/infer": rest_v2,
    "grpc ClassifySentiment": grpc_v1,
    "grpc ModelInfer": grpc_v2,
}


def spans_of(receiver, trace_id: str, names: set[str]) -> dict[str, list]:
    """The spans of one trace, by name, once every name in ``names`` arrived."""
    receiver.wait_for(lambda spans: names <= {s.name for s in spans if s.trace_id == trace_id})
    out: dict[str, list] = {}
    for s in receiver.trace(trace_id):
        out.setdefault(s.name, []).append(s)
    return out


@slow
@pytest.mark.parametrize("server_name", list(ADAPTERS))
def test_a_request_is_traced_under_the_clients_span_and_tf_serving_gets_its_traceparent(gw, receiver, server_name):
    trace_id, client_span, traceparent = new_parent()
    rid = f"trace-{secrets.token_hex(4)}"
    ADAPTERS[server_name](gw, traceparent, rid)
    by_name = spans_of(receiver, trace_id, {server_name, "admission", "preprocess", "queue", "predict", "batch"})
    [server] = by_name[server_name]
    assert server.parent_span_id == client_span and server.kind == SERVER
    assert server.service == "traced-gateway"
    assert server.attributes["classifier.request_id"] == rid
    assert server.attributes["classifier.model"] == "sentiment_lstm"
    assert server.attributes["classifier.outcome"] == "ok" and server.attributes["classifier.items"] == 1
    for name in ("admission", "preprocess", "queue", "predict", "batch"):
        [child] = by_name[name]
        assert child.parent_span_id == server.span_id, name
        assert server.start_ns <= child.start_ns <= child.end_ns <= server.end_ns, name
    [queue], [predict], [batch] = by_name["queue"], by_name["predict"], by_name["batch"]
    assert queue.end_ns <= predict.start_ns
    # The batch (here of this request alone) links the request's server span; its request's
    # predict span links the batch; TF Serving was called in the batch span's context.
    assert batch.kind == CLIENT and (trace_id, server.span_id) in [(t, s) for t, s, _ in batch.links]
    assert [(t, s) for t, s, _ in predict.links] == [(trace_id, batch.span_id)]
    assert batch.attributes["classifier.batch.requests"] == 1
    assert f"00-{trace_id}-{batch.span_id}-01" in gw.standin.traceparents


@slow
def test_the_batch_span_links_every_request_it_served(gw, receiver):
    clients = [new_parent() for _ in range(4)]
    start = threading.Barrier(len(clients))
    errors = []

    def send(i):
        start.wait()
        try:
            rest_v1(gw, clients[i][2], f"batched-{i}")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    servers = {}
    for trace_id, client_span, _ in clients:
        by_name = spans_of(receiver, trace_id, {"rest /v1/sentiment:predict", "predict"})
        [server] = by_name["rest /v1/sentiment:predict"]
        assert server.parent_span_id == client_span
        servers[trace_id] = server
    batches = receiver.wait_for(lambda spans: any(
        s.name == "batch" and {t for t, _, _ in s.links} & set(servers) for s in spans))
    batches = [s for s in batches if s.name == "batch" and {t for t, _, _ in s.links} & set(servers)]
    # Sent together within max_batch_wait_us: one model call served them all (its span in the first
    # request's trace), linked to each request's server span, with its request id.
    [batch] = batches
    assert sorted((t, s) for t, s, _ in batch.links) == sorted((t, s.span_id) for t, s in servers.items())
    assert sorted(a["classifier.request_id"] for _, _, a in batch.links) == [f"batched-{i}" for i in range(4)]
    assert batch.trace_id in servers and batch.parent_span_id == servers[batch.trace_id].span_id
    assert batch.attributes["classifier.batch.requests"] == 4 and batch.attributes["classifier.batch.rows"] == 4
    for trace_id in servers:
        predict = next(s for s in receiver.trace(trace_id) if s.name == "predict")
        assert predict.parent_span_id == servers[trace_id].span_id
        assert [(t, s) for t, s, _ in predict.links] == [(batch.trace_id, batch.span_id)]


@slow
def test_a_refused_request_ends_its_spans_in_error_and_an_unsampled_one_is_not_exported(gw, receiver):
    unsampled, _, traceparent = new_parent(sampled=False)
    rest_v1(gw, traceparent, "not-sampled")
    trace_id, client_span, traceparent = new_parent()
    r = httpx.post(gw.rest + "/v1/sentiment:predict", json={"texts": ["x" * 10] * 100_000}, timeout=30,
                   headers={"traceparent": traceparent})
    assert r.status_code == 413, r.text
    by_name = spans_of(receiver, trace_id, {"rest /v1/sentiment:predict"})
    [server] = by_name["rest /v1/sentiment:predict"]
    assert server.parent_span_id == client_span and server.status_code == ERROR
    assert server.attributes["classifier.outcome"] == "PAYLOAD_TOO_LARGE"
    assert "max_items_per_request" in server.status_message
    # The unsampled request (sent first, its spans would have been exported first) left none.
    assert receiver.trace(unsampled) == []
    assert f"-{unsampled}-" not in " ".join(p or "" for p in gw.standin.traceparents)


@slow
def test_rows_dropped_from_the_queue_end_their_queue_span_in_error(gw, receiver):
    # The client's deadline (0.2 s) passes while its rows wait for the batch window (0.4 s).
    trace_id, client_span, traceparent = new_parent()
    with grpc.insecure_channel(gw.grpc) as channel, pytest.raises(grpc.RpcError) as e:
        pb_grpc.ClassifierStub(channel).ClassifySentiment(pb.SentimentRequest(texts=["too late"]), timeout=0.2,
                                                          metadata=(("traceparent", traceparent),))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    by_name = spans_of(receiver, trace_id, {"grpc ClassifySentiment", "queue"})
    [server], [queue] = by_name["grpc ClassifySentiment"], by_name["queue"]
    assert server.parent_span_id == client_span and server.status_code == ERROR
    assert queue.parent_span_id == server.span_id and queue.status_code == ERROR
    assert queue.attributes["classifier.dropped"] in ("deadline", "cancelled")  # the gateway's timer or the client's cancel
    assert "batch" not in by_name and "predict" not in by_name


@slow
def test_a_request_without_traceparent_starts_its_own_trace(gw, receiver):
    r = httpx.post(gw.rest + "/v1/sentiment:predict", json={"texts": ["no parent"]}, timeout=30,
                   headers={"x-request-id": "no-parent-1"})
    assert r.status_code == 200
    spans = receiver.wait_for(lambda spans: any(s.attributes.get("classifier.request_id") == "no-parent-1" for s in spans))
    [server] = [s for s in spans if s.attributes.get("classifier.request_id") == "no-parent-1"]
    assert server.parent_span_id == "" and server.name == "rest /v1/sentiment:predict"


@slow
def test_with_tracing_off_no_exporter_is_configured(gateways, off_receiver):
    _, gw = gateways
    # This gateway cannot import the OpenTelemetry SDK or exporter (WITHOUT_OTEL_SDK), and serves.
    for send in ADAPTERS.values():
        trace_id, _, traceparent = new_parent()
        send(gw, traceparent, "untraced")
        assert f"-{trace_id}-" not in " ".join(p or "" for p in gw.standin.traceparents)
    time.sleep(0.5)  # ten times the OTEL_BSP_SCHEDULE_DELAY it was given
    assert off_receiver.requests == 0 and off_receiver.count == 0


def test_tracing_off_unless_the_exporter_is_otlp():
    from serving import tracing

    assert tracing.configure({}) is False
    assert tracing.configure({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}) is False
    assert tracing.configure({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) is False
    assert not tracing.enabled()
    with tracing.request("rest", "/x") as span:
        assert span is None


@pytest.mark.parametrize("env, message", [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin' is not supported"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
     "OTEL_TRACES_SAMPLER_ARG='2'"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER='sometimes'"),
])
def test_a_tracing_configuration_it_cannot_serve_stops_the_gateway_with_its_reason(env, message):
    r = subprocess.run(WITHOUT_TENSORFLOW, cwd=ROOT, env={**os.environ, **env, "CLASSIFIER_BACKEND": "tfserving"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stdout + r.stderr, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
