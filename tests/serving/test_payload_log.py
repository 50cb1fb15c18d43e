"""Payload logging (serving/payload_log.py, README "Payload logging"): real gateway processes,
real HTTP and gRPC clients, the records read back from the destination (a file, stdout, a FIFO).

Four gateways, started together: ``full`` (every request, to a file, API keys on), ``sampled``
(a quarter of the request ids, texts redacted, to stdout), ``zero`` (sample rate 0) and
``blocked`` (a FIFO nobody reads, a queue of 4 records). The byte bound and write errors are
tested on the same PayloadLog class in this process."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import time

import grpc
import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from serving.gen.classifier.v1 import classifier_pb2 as pb
from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from serving.gen.inference import open_inference_grpc_pb2 as v2
from serving.gen.inference import open_inference_grpc_pb2_grpc as v2_grpc
from serving.kinds.text import SentimentPrediction, Texts
from serving.metrics import Metrics
from serving.payload_log import PayloadLog
from serving.request import Call, Predict, Result, request_id
from serving.settings import Settings
from testkit.gateway import ROOT, gateway_processes, metric_samples, served_versions, stable_version, wait_until

KEY = "pl-Secret-Key-8f3e1c"
AUTH = {"authorization": f"Bearer {KEY}"}
SENTIMENT, DIGITS = "/v1/sentiment:predict", "/v1/digits:predict"


@pytest.fixture(scope="module")
def gws(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("payload")
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)  # the sampled gateway's stdout is read from its log there
    one = '["sentiment_lstm"]'
    specs = {
        "full": dict(payload_log="true", payload_log_destination=tmp / "full.jsonl", api_keys=KEY,
                     models='["digits", "sentiment_lstm"]'),
        "sampled": dict(payload_log="true", payload_log_sample_rate=0.25, payload_log_redact_texts="true", models=one),
        "zero": dict(payload_log="true", payload_log_sample_rate=0, payload_log_destination=tmp / "zero.jsonl",
                     models=one),
        "blocked": dict(payload_log="true", payload_log_destination=fifo, payload_log_queue_records=4, models=one),
    }
    with gateway_processes(*specs.values()) as running:
        gws = dict(zip(specs, running))
        gws["full"].path, gws["zero"].path, gws["blocked"].path = tmp / "full.jsonl", tmp / "zero.jsonl", fifo
        yield gws


def records(path) -> list[dict]:
    """The payload records in ``path`` (other lines, e.g. a gateway's own logs on the same stream, left out)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            if "api" in r and "outputs" in r:
                out.append(r)
    return out


def wait_records(path, ids: set[str], timeout: float = 10) -> dict[str, list[dict]]:
    """Wait until every request id in ``ids`` has a record; the records by request id."""
    def found():
        by_id: dict[str, list[dict]] = {}
        for r in records(path):
            by_id.setdefault(r["request_id"], []).append(r)
        return by_id if ids <= set(by_id) else None

    return wait_until(found, timeout=timeout, interval=0.05)


def sampled(rid: str, rate: float) -> bool:
    """README's rule: logged when the first 8 bytes of SHA-256(request id) < rate * 2**64."""
    return int(hashlib.sha256(rid.encode()).hexdigest()[:16], 16) < rate * 2**64


def counters(gw) -> dict[str, float]:
    m = metric_samples(gw)
    return {"sampled": m[("classifier_payload_log_sampled_total", ())],
            "written": m[("classifier_payload_log_written_total", ())],
            "queue_full": m[("classifier_payload_log_dropped_total", (("reason", "queue_full"),))],
            "write_error": m[("classifier_payload_log_dropped_total", (("reason", "write_error"),))]}


def post(gw, path, body, rid, headers=AUTH, **kw):
    return httpx.post(gw.rest + path, json=body, headers={**headers, "x-request-id": rid}, timeout=30, **kw)


def test_records_of_all_four_apis_name_the_served_version_and_the_request(gws):
    gw = gws["full"]
    lstm, digits_v = stable_version("sentiment_lstm"), stable_version("digits")
    image = np.arange(28 * 28, dtype=np.float32).reshape(28, 28) % 256
    image_digest = hashlib.sha256(image.tobytes()).hexdigest()  # the 28x28 float32 pixels the model gets

    r = post(gw, SENTIMENT, {"texts": ["a wonderful film", "dull and awful"]}, "pl-rest-v1")
    assert r.status_code == 200, r.text
    rest_v1 = r.json()
    assert post(gw, DIGITS, {"images": [image.tolist()]}, "pl-rest-v1-digits").status_code == 200
    old = min(served_versions("sentiment_lstm"))  # not the default: the record names the version that served
    assert old != lstm
    assert post(gw, SENTIMENT, {"texts": ["older"], "version": old}, "pl-rest-v1-old").json()["model"]["version"] == old
    r = post(gw, "/v2/models/sentiment_lstm/infer",
             {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["what a film"]}]}, "pl-rest-v2")
    assert r.status_code == 200, r.text
    meta = (("authorization", f"Bearer {KEY}"),)
    with grpc.insecure_channel(gw.grpc) as channel:
        v1_stub, v2_stub = pb_grpc.ClassifierStub(channel), v2_grpc.GRPCInferenceServiceStub(channel)
        v1_stub.ClassifySentiment(pb.SentimentRequest(texts=["boring"]),
                                  metadata=(*meta, ("x-request-id", "pl-grpc-v1")), timeout=30)
        answers = list(v1_stub.StreamClassifySentiment(iter([pb.SentimentRequest(texts=["one"]),
                                                             pb.SentimentRequest(texts=["two", "three"])]),
                                                        metadata=(("x-api-key", KEY), ("x-request-id", "pl-stream")),
                                                        timeout=30))
        assert len(answers) == 2
        request = v2.ModelInferRequest(model_name="digits")
        request.inputs.add(name="image", datatype="FP32", shape=[1, 28, 28]).contents.fp32_contents.extend(
            image.reshape(-1).tolist())
        v2_stub.ModelInfer(request, metadata=(*meta, ("x-request-id", "pl-grpc-v2")), timeout=30)

    got = wait_records(gw.path, {"pl-rest-v1", "pl-rest-v1-digits", "pl-rest-v1-old", "pl-rest-v2", "pl-grpc-v1",
                                 "pl-stream", "pl-grpc-v2"})
    one = {rid: rs[0] for rid, rs in got.items()}
    where = {rid: (r["protocol"], r["api"], r["endpoint"], r["model"], r["version"], r["kind"], r["outcome"])
             for rid, r in one.items() if rid.startswith("pl-")}
    assert where == {
        "pl-rest-v1": ("rest", "v1", SENTIMENT, "sentiment_lstm", lstm, "text", "ok"),
        "pl-rest-v1-digits": ("rest", "v1", DIGITS, "digits", digits_v, "image", "ok"),
        "pl-rest-v1-old": ("rest", "v1", SENTIMENT, "sentiment_lstm", old, "text", "ok"),
        "pl-rest-v2": ("rest", "v2", "/v2/models/{name}/infer", "sentiment_lstm", lstm, "text", "ok"),
        "pl-grpc-v1": ("grpc", "v1", "ClassifySentiment", "sentiment_lstm", lstm, "text", "ok"),
        "pl-stream": ("grpc", "v1", "StreamClassifySentiment", "sentiment_lstm", lstm, "text", "ok"),
        "pl-grpc-v2": ("grpc", "v2", "ModelInfer", "digits", digits_v, "image", "ok"),
    }
    # Inputs and outputs as the client sent and got them; one record per message of a stream.
    r = one["pl-rest-v1"]
    assert r["items"] == 2 and r["inputs"] == [{"text": "a wonderful film"}, {"text": "dull and awful"}]
    assert r["outputs"] == [{"label": p["label"], "probabilities": p["probabilities"]} for p in rest_v1["predictions"]]
    assert r["latency_ms"] > 0 and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", r["time"])
    assert one["pl-rest-v2"]["inputs"] == [{"text": "what a film"}]
    assert [x["inputs"] for x in got["pl-stream"]] == [[{"text": "one"}], [{"text": "two"}, {"text": "three"}]]
    # An image is its digest and shape, never its pixels; the same image by any API, the same digest.
    for rid in ("pl-rest-v1-digits", "pl-grpc-v2"):
        assert one[rid]["inputs"] == [{"sha256": image_digest, "shape": [28, 28]}]
        out = one[rid]["outputs"][0]
        assert out["label"] == int(np.argmax(out["probabilities"])) and len(out["probabilities"]) == 10


def test_failed_requests_are_logged_with_their_error_code(gws):
    gw = gws["full"]
    assert post(gw, SENTIMENT, {"texts": []}, "pl-empty").status_code == 400
    assert post(gw, SENTIMENT, {"texts": ["x"], "model": "no_such_model"}, "pl-unknown").status_code == 404
    with grpc.insecure_channel(gw.grpc) as channel:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.ClassifierStub(channel).ClassifySentiment(
                pb.SentimentRequest(texts=["fine"], version=999),
                metadata=(("x-api-key", KEY), ("x-request-id", "pl-nover")), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    got = wait_records(gw.path, {"pl-empty", "pl-unknown", "pl-nover"})
    fields = {rid: (rs[0]["outcome"], rs[0]["model"], rs[0]["version"], rs[0]["inputs"], rs[0]["outputs"])
              for rid, rs in got.items() if rid in ("pl-empty", "pl-unknown", "pl-nover")}
    assert fields == {"pl-empty": ("INVALID_ARGUMENT", "sentiment_lstm", stable_version("sentiment_lstm"), [], None),
                      "pl-unknown": ("NOT_FOUND", "no_such_model", None, [{"text": "x"}], None),
                      "pl-nover": ("NOT_FOUND", "sentiment_lstm", None, [{"text": "fine"}], None)}


def test_no_credential_or_header_reaches_the_log(gws):
    gw = gws["full"]
    assert post(gw, SENTIMENT, {"texts": ["keys stay out"]}, "pl-key-bearer").status_code == 200
    assert post(gw, SENTIMENT, {"texts": ["keys stay out"]}, "pl-key-x", headers={"x-api-key": KEY}).status_code == 200
    # Refused before any handler (no key, a wrong key): not a model request, no record.
    assert post(gw, SENTIMENT, {"texts": ["no key"]}, "pl-nokey", headers={}).status_code == 401
    assert post(gw, SENTIMENT, {"texts": ["wrong"]}, "pl-badkey", headers={"x-api-key": KEY + "x"}).status_code == 401
    wait_records(gw.path, {"pl-key-bearer", "pl-key-x"})
    time.sleep(0.3)  # the writer's next batch, if there were records of the refused requests
    text = gw.path.read_text()
    assert KEY not in text and "Bearer" not in text and "authorization" not in text.lower()
    assert "x-api-key" not in text and '"headers"' not in text
    ids = {r["request_id"] for r in records(gw.path)}
    assert "pl-nokey" not in ids and "pl-badkey" not in ids
    assert set(records(gw.path)[0]) == {"time", "request_id", "protocol", "api", "endpoint", "model", "version", "kind",
                                        "items", "outcome", "latency_ms", "inputs", "outputs"}


def test_a_partial_rate_logs_the_share_of_request_ids_the_hash_picks_with_texts_redacted(gws):
    gw = gws["sampled"]
    ids = [f"share-{i}" for i in range(200)]
    texts = {rid: f"private words {rid} zqx" for rid in ids}
    with httpx.Client(timeout=30) as client:
        for rid in ids:
            r = client.post(gw.rest + SENTIMENT, json={"texts": [texts[rid]]}, headers={"x-request-id": rid})
            assert r.status_code == 200
    want = {rid for rid in ids if sampled(rid, 0.25)}
    assert 30 <= len(want) <= 70  # the documented rule picks about a quarter of these ids
    got = wait_records(gw.log_path, want)
    assert set(got) == want  # exactly those: the sample is the same on every run and every gateway
    for rid in want:
        t = texts[rid].encode()
        assert got[rid][0]["inputs"] == [{"sha256": hashlib.sha256(t).hexdigest(), "chars": len(texts[rid])}]
        assert got[rid][0]["outputs"][0]["label"] in ("negative", "positive")
    assert "private words" not in gw.log_path.read_text()  # on the stream the records share with the gateway's logs
    c = counters(gw)
    assert (c["sampled"], c["written"], c["queue_full"], c["write_error"]) == (len(want), len(want), 0, 0)


def test_rate_zero_writes_nothing(gws):
    gw = gws["zero"]
    for i in range(20):
        assert post(gw, SENTIMENT, {"texts": ["not logged"]}, f"zero-{i}", headers={}).status_code == 200
    with grpc.insecure_channel(gw.grpc) as channel:
        pb_grpc.ClassifierStub(channel).ClassifySentiment(pb.SentimentRequest(texts=["nor this"]), timeout=30)
    time.sleep(0.3)
    assert not gw.path.exists()
    assert counters(gw) == {"sampled": 0, "written": 0, "queue_full": 0, "write_error": 0}


def test_a_writer_that_cannot_keep_up_drops_and_counts_instead_of_blocking(gws):
    """The destination is a FIFO nobody reads: the writer blocks opening it, 4 records fill the
    queue, the rest are dropped and counted; every request is answered meanwhile. Once a reader
    comes, the 4 queued records are written."""
    gw = gws["blocked"]
    slowest = 0.0
    with httpx.Client(timeout=30) as client:
        for i in range(30):
            t0 = time.perf_counter()
            r = client.post(gw.rest + SENTIMENT, json={"texts": [f"text {i}"]}, headers={"x-request-id": f"blk-{i}"})
            slowest = max(slowest, time.perf_counter() - t0)
            assert r.status_code == 200
    assert slowest < 2.0, slowest  # a blocking log would hang the first request past its queue
    assert counters(gw) == {"sampled": 30, "written": 0, "queue_full": 26, "write_error": 0}

    with fifo_reader(gw.path) as records:
        assert [r["request_id"] for r in records(4)] == ["blk-0", "blk-1", "blk-2", "blk-3"]
        wait_until(lambda: counters(gw)["written"] == 4, timeout=10)


@contextlib.contextmanager
def fifo_reader(path):
    """A reader on the FIFO ``path``, kept open in the block: ``records(n)`` waits for the first
    ``n`` lines and returns them as JSON."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    data = bytearray()

    def records(n: int) -> list[dict]:
        def enough():
            try:
                data.extend(os.read(fd, 1 << 16))
            except BlockingIOError:
                pass
            return data.count(b"\n") >= n

        wait_until(enough, timeout=10, interval=0.02)
        return [json.loads(line) for line in bytes(data).splitlines()]
    try:
        yield records
    finally:
        os.close(fd)


def readme_jq_join() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Payload logging", 1)[1].split("\n### ", 1)[0]
    block = next(b for b in re.findall(r"```sh\n(.*?)```", section, flags=re.S) if "jq" in b)
    return block


def test_the_readme_join_gives_live_accuracy_per_version(gws, tmp_path):
    """The README's jq join of the payload log with ground truth that arrives later, run as written."""
    gw = gws["full"]
    texts = ["a wonderful , moving film", "dull , boring and far too long", "great acting", "awful plot",
             "i loved it", "a waste of time"]
    truth = ["positive", "negative", "negative", "negative", "positive", "positive"]  # not all what the model says
    old, new = min(served_versions("sentiment_lstm")), stable_version("sentiment_lstm")
    hits = {old: [], new: []}
    for i in range(0, len(texts), 2):  # the middle request to the older version
        version = old if i == 2 else new
        r = post(gw, SENTIMENT, {"texts": texts[i:i + 2], "version": version}, f"join-{i}")
        hits[version] += [p["label"] == t for p, t in zip(r.json()["predictions"], truth[i:i + 2])]
    wait_records(gw.path, {f"join-{i}" for i in range(0, len(texts), 2)})
    lines = [json.dumps({"request_id": f"join-{i - i % 2}", "index": i % 2, "label": label})
             for i, label in enumerate(truth)]
    (tmp_path / "truth.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "payloads.jsonl").write_text("\n".join(json.dumps(r) for r in records(gw.path)
                                                       if r["request_id"].startswith("join-")) + "\n")
    r = subprocess.run(["bash", "-c", readme_jq_join()], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows == [{"model": "sentiment_lstm", "version": v, "items": len(hits[v]),
                     "accuracy": sum(hits[v]) / len(hits[v])} for v in sorted(hits)]  # per version, oldest first


# -- the queue and the writer, in this process (the same PayloadLog class a gateway runs) -------------

def _call(text: str) -> Call:
    preds = [SentimentPrediction("positive", 0.9, {"negative": 0.1, "positive": 0.9}, 3, 0, 1)]
    return Call("rest", SENTIMENT, "sentiment_lstm", 4, 1, request=Predict("text", Texts([text])),
                result=Result("sentiment_lstm", 4, preds, np.array([[0.1, 0.9]], np.float32)))


def _log(pl: PayloadLog, rid: str, text: str) -> None:
    token = request_id.set(rid)
    try:
        pl.log(_call(text), 0.002)
    finally:
        request_id.reset(token)


def test_payload_logging_is_off_by_default_and_its_settings_are_checked():
    s = Settings(_env_file=None)
    assert (s.payload_log, s.payload_log_sample_rate, s.payload_log_destination) == (False, 1.0, "stdout")
    for bad in ({"payload_log_sample_rate": 1.5}, {"payload_log_sample_rate": -0.1}, {"payload_log_queue_records": 0}):
        with pytest.raises(ValidationError) as e:
            Settings(_env_file=None, **bad)
        assert next(iter(bad)) in str(e.value)


def test_the_byte_bound_drops_a_record_too_large_for_the_room_left(tmp_path):
    """Writer stuck on a FIFO: a record larger than payload_log_queue_bytes is dropped, small ones
    behind it still fit; once a reader comes the small ones are written, in order."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    s = Settings(_env_file=None, payload_log=True, payload_log_destination=str(fifo), payload_log_queue_bytes=4096)
    pl = PayloadLog(s, Metrics(s.models))
    _log(pl, "small-1", "short")
    _log(pl, "big", "x" * 5000)
    _log(pl, "small-2", "short too")
    m = pl.metrics
    assert (m.payload_sampled._value.get(), m.payload_dropped.labels("queue_full")._value.get()) == (3, 1)
    with fifo_reader(fifo) as records:
        assert [r["request_id"] for r in records(2)] == ["small-1", "small-2"]
        pl.close()
    assert m.payload_written._value.get() == 2


def test_a_destination_that_cannot_be_opened_counts_write_errors_and_is_retried(tmp_path):
    path = tmp_path / "later" / "payloads.jsonl"  # its folder does not exist yet
    s = Settings(_env_file=None, payload_log=True, payload_log_destination=str(path))
    pl = PayloadLog(s, Metrics(s.models))
    m = pl.metrics
    for i in range(3):
        _log(pl, f"lost-{i}", "text")
    wait_until(lambda: m.payload_dropped.labels("write_error")._value.get() == 3, timeout=10, interval=0.02)
    path.parent.mkdir()
    _log(pl, "kept", "text")
    pl.close()
    assert [r["request_id"] for r in records(path)] == ["kept"]
    assert (m.payload_written._value.get(), m.payload_dropped.labels("queue_full")._value.get()) == (1, 0)
