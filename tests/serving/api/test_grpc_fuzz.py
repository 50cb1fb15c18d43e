"""The gRPC API fed malformed protobuf bytes: INVALID_ARGUMENT, never UNKNOWN/INTERNAL, and the server stays up.

One real gateway (``python -m serving``, the default one the read-only modules share). Raw bytes go through
``channel.unary_unary``/``stream_stream`` with no serializer, so what the server
parses is exactly what the test wrote: hypothesis-drawn bytes (fixed seed), a
small protobuf-wire-format generator, and hand-made cases (truncated messages,
wrong wire types, lying lengths, invalid UTF-8 in proto3 strings, over-long
varints, deeply nested groups).

The oracle for "malformed" is the local protobuf runtime: if
``<RequestType>.FromString(data)`` raises, the server must answer
INVALID_ARGUMENT; if it parses, the request is merely odd and any ordinary
status will do (OK, INVALID_ARGUMENT for empty texts, NOT_FOUND for a random
model name, ...). UNKNOWN and INTERNAL are never acceptable. Afterwards the
gateway must still answer, must not have logged a traceback, and must have
logged the burst of malformed calls in a bounded (rate-limited) number of lines.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import event, example, given
from hypothesis import strategies as st

from serving.gen.classifier.v1 import classifier_pb2 as pb
from tests.fuzzing import fixed_seed

SERVICE = "/classifier.v1.Classifier/"
UNARY = {"ClassifySentiment": pb.SentimentRequest, "ClassifyDigits": pb.DigitsRequest}
STREAM = "StreamClassifySentiment"
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
CALL_TIMEOUT_S = 15

VALID_SENTIMENT = pb.SentimentRequest(
    texts=["A great movie, great acting!", "Terrible. Not worth it.", "café ΟΔΟΣ 10/10 👍"], model="sentiment_lstm"
).SerializeToString()
VALID_DIGITS = pb.DigitsRequest(images=[pb.Image(raw=bytes(range(256)) * 3 + bytes(16))], model="digits").SerializeToString()




# -- the gateway --------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(shared_gateways):
    # The default embedded gateway, shared by the modules that only read from it (tests/serving/conftest.py);
    # it logs to .pytest_cache/gateway-<restport>.log (log_path), read below: the whole of it, whatever
    # other modules sent it before, must be free of tracebacks.
    running = shared_gateways.get("embedded")
    assert running.log_path is not None and running.log_path.exists()
    return running


@pytest.fixture(scope="module")
def channel(gw):
    with grpc.insecure_channel(gw.grpc) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


def unary(channel, method: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    call = channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
    try:
        call(data, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def stream(channel, chunks: list[bytes]) -> tuple[int, grpc.StatusCode, str]:
    """(responses received, final status, details) of one StreamClassifySentiment call."""
    call = channel.stream_stream(SERVICE + STREAM, request_serializer=None, response_deserializer=None)
    got = 0
    try:
        for _ in call(iter(chunks), timeout=CALL_TIMEOUT_S):
            got += 1
    except grpc.RpcError as e:
        return got, e.code(), e.details() or ""
    return got, grpc.StatusCode.OK, ""


def malformed(cls, data: bytes) -> bool:
    """The oracle: does the protobuf runtime refuse to parse ``data`` as ``cls``?"""
    try:
        cls.FromString(data)
    except DecodeError:
        return True
    return False


def _summary(problems: list[str], calls: int, shown: int = 12) -> str:
    more = f"\n... and {len(problems) - shown} more" if len(problems) > shown else ""
    return f"{len(problems)} of {calls} calls wrong:\n" + "\n".join(problems[:shown]) + more


def problem(method: str, data: bytes, code: grpc.StatusCode, details: str, bad: bool) -> str | None:
    """None if ``code`` is acceptable for ``data``, else a line saying what is wrong."""
    if code in NEVER or (bad and code != grpc.StatusCode.INVALID_ARGUMENT):
        shown = data if len(data) <= 48 else data[:48] + b"...(%d bytes)" % len(data)
        return f"{method}({shown!r}) [{'malformed' if bad else 'parses'}] -> {code.name}: {details[:160]}"
    return None


# -- wire-format building blocks ----------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint((field << 3) | wire_type)


def ld(field: int, body: bytes) -> bytes:
    """A length-delimited field with an honest length."""
    return tag(field, 2) + varint(len(body)) + body


@st.composite
def wire_messages(draw, depth: int = 0) -> bytes:
    """Protobuf-wire-shaped bytes: plausible tags for fields 0..3 (and odd ones), every
    wire type, honest or lying lengths, over-long varints, nested messages and groups."""
    out = b""
    for _ in range(draw(st.integers(0, 5))):
        field = draw(st.one_of(st.sampled_from([1, 1, 2, 3]), st.sampled_from([0, 4, 15, 2**29 - 1, 2**29, 2**32])))
        wt = draw(st.sampled_from([0, 2, 2, 2, 1, 5, 3, 4, 6, 7]))
        out += tag(field, wt)
        if wt == 0:
            out += draw(st.one_of(
                st.integers(0, 2**64 - 1).map(varint),
                st.integers(10, 24).map(lambda k: b"\xff" * k + b"\x01"),  # over-long
                st.integers(1, 12).map(lambda k: b"\x80" * k),  # unterminated
            ))
        elif wt == 1:
            out += draw(st.binary(min_size=0, max_size=8))
        elif wt == 5:
            out += draw(st.binary(min_size=0, max_size=4))
        elif wt == 2:
            body = draw(st.one_of(
                st.text(max_size=20).map(lambda s: s.encode("utf-8")),
                st.binary(max_size=24),
                st.sampled_from([b"\xff\xfe", b"\xed\xa0\x80", b"\xc0\xaf", b"\xe2\x82", b"ok\x80"]),
                wire_messages(depth + 1) if depth < 3 else st.just(b""),
            ))
            lie = draw(st.sampled_from([0, 0, 0, 0, 1, 7, -1, 2**31, 2**62]))
            out += varint(max(0, len(body) + lie)) + body
        elif wt == 3 and depth < 3:
            out += draw(wire_messages(depth + 1))
            if draw(st.integers(0, 3)):
                out += tag(field, 4)  # the matching end-group tag (sometimes left out)
    return out


@st.composite
def mutated_valid(draw) -> bytes:
    data = bytearray(draw(st.sampled_from([VALID_SENTIMENT, VALID_DIGITS])))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["set", "cut", "insert"]))
        if op == "set":
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at:]
            if not data:
                break
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=6))
    return bytes(data)


fuzz_bytes = st.one_of(st.binary(max_size=120), wire_messages(), mutated_valid())


# -- hand-made malformed (and odd-but-valid) messages -------------------------


def hand_made() -> dict[str, bytes]:
    cases: dict[str, bytes] = {}
    for cut in sorted({*range(0, len(VALID_SENTIMENT), 3), len(VALID_SENTIMENT) - 1}):
        cases[f"sentiment cut at {cut}"] = VALID_SENTIMENT[:cut]
    for cut in sorted({*range(1, len(VALID_DIGITS), 61), 2, 3, 4, len(VALID_DIGITS) - 1}):
        cases[f"digits cut at {cut}"] = VALID_DIGITS[:cut]
    texts = ld(1, b"good")
    cases.update({
        # wrong wire type for a known field (parsed as an unknown field by proto3) ...
        "texts as varint": tag(1, 0) + varint(1),
        "texts as fixed32": tag(1, 5) + b"\0\0\0\0",
        "texts as fixed64": tag(1, 1) + b"\0" * 8,
        "texts as empty group": tag(1, 3) + tag(1, 4),
        "model as varint": texts + tag(2, 0) + varint(5),
        "version as bytes": texts + ld(3, b"ab"),
        "image as varint": tag(1, 0) + varint(7),
        "image.raw as varint": ld(1, tag(1, 0) + varint(1)),
        # ... and wire types that do not exist, or a group that never started / never ends.
        "wire type 6": tag(1, 6),
        "wire type 7": texts + tag(2, 7) + b"\0",
        "end group without start": tag(1, 4),
        "group never ended": texts + tag(15, 3) + texts,
        "group ended by another field": tag(15, 3) + tag(14, 4),
        "field number 0": tag(0, 0) + b"\0",
        "field number 0 length-delimited": tag(0, 2) + b"\0",
        "field number 2**29": tag(2**29, 0) + b"\0",
        # a length-delimited field claiming more bytes than there are
        "texts claims 16 bytes, has 2": tag(1, 2) + varint(16) + b"ab",
        "texts claims 2**32-1 bytes": tag(1, 2) + varint(2**32 - 1) + b"ab",
        "texts claims 2**63 bytes": tag(1, 2) + varint(2**63) + b"ab",
        "model claims 5 bytes after valid texts": texts + tag(2, 2) + varint(5) + b"abc",
        "image claims 16 bytes": tag(1, 2) + varint(16) + b"\x0a\x01",
        "image.raw claims 784 bytes, has 3": ld(1, tag(1, 2) + varint(784) + b"abc"),
        "image.raw longer than its image": ld(1, tag(1, 2) + varint(10) + b"abc") + b"defghij",
        "length varint unterminated": tag(1, 2) + b"\x80\x80\x80",
        # proto3 strings must be UTF-8
        "texts invalid UTF-8 ff fe": ld(1, b"\xff\xfe"),
        "texts UTF-8 surrogate": ld(1, b"\xed\xa0\x80"),
        "texts overlong UTF-8": ld(1, b"\xc0\xaf"),
        "texts truncated UTF-8": ld(1, "é".encode()[:1]),
        "second text invalid UTF-8": texts + ld(1, b"bad \xff"),
        "model invalid UTF-8": texts + ld(2, b"\xff\xfe"),
        "digits model invalid UTF-8": ld(1, ld(1, bytes(784))) + ld(2, b"\xfe\xff"),
        # varints
        "version: 10-byte varint (-1)": texts + tag(3, 0) + b"\xff" * 9 + b"\x01",
        "version: 11-byte varint": texts + tag(3, 0) + b"\xff" * 10 + b"\x01",
        "version: 30-byte varint": texts + tag(3, 0) + b"\x80" * 29 + b"\x01",
        "version: unterminated varint": texts + tag(3, 0) + b"\xff" * 40,
        "tag: 11-byte varint": b"\x8a" + b"\x80" * 9 + b"\x01" + b"\x04good",
        "tag: all ff": b"\xff" * 16,
        # deep nesting (the runtime's recursion limit is 100)
        "50 nested groups": tag(15, 3) * 50 + tag(15, 4) * 50,
        "200 nested groups": tag(15, 3) * 200 + tag(15, 4) * 200,
        "10000 open groups": tag(15, 3) * 10_000,
        "200 nested messages in an unknown field": _nested(200),
        # big enough to be parsed off the event loop (inline_parse_bytes, 64 KiB)
        "100 KiB text then a lying field": ld(1, b"x" * 100_000) + tag(2, 2) + varint(1000),
        "200 KiB of 0xff": b"\xff" * 200_000,
        "texts claims 300 KB, has 200 KB": tag(1, 2) + varint(300_000) + b"y" * 200_000,
        "200 KiB text with one bad byte": ld(1, b"z" * 100_000 + b"\xff" + b"z" * 100_000),
    })
    return cases


def _nested(depth: int) -> bytes:
    body = b""
    for _ in range(depth):
        body = ld(15, body)
    return body


HAND_MADE = hand_made()


def test_the_oracle_sees_the_hand_made_cases_as_intended():
    """Self-check: the cases the brief calls malformed really are, for the protobuf runtime."""
    for name in ("texts invalid UTF-8 ff fe", "texts UTF-8 surrogate", "model invalid UTF-8",
                 "texts claims 16 bytes, has 2", "version: 11-byte varint", "200 nested groups", "wire type 6"):
        assert malformed(pb.SentimentRequest, HAND_MADE[name]), name
    assert malformed(pb.DigitsRequest, HAND_MADE["digits model invalid UTF-8"])
    assert malformed(pb.DigitsRequest, HAND_MADE["image.raw claims 784 bytes, has 3"])
    # Cut inside a field: malformed; cut between fields: a shorter, valid message.
    cuts = [HAND_MADE[k] for k in HAND_MADE if k.startswith("sentiment cut at")]
    assert any(malformed(pb.SentimentRequest, c) for c in cuts)
    assert any(not malformed(pb.SentimentRequest, c) for c in cuts)
    assert not malformed(pb.SentimentRequest, HAND_MADE["texts as varint"])  # proto3: an unknown field


# -- the tests ------------------------------------------------------------------


@pytest.mark.parametrize("method", list(UNARY))
def test_hand_made_malformed_messages_are_invalid_argument(channel, method):
    cls = UNARY[method]
    problems = []
    for name, data in HAND_MADE.items():
        code, details = unary(channel, method, data)
        p = problem(method, data, code, details, malformed(cls, data))
        if p:
            problems.append(f"{name}: {p}")
    assert not problems, _summary(problems, len(HAND_MADE))


def test_hand_made_malformed_chunks_end_the_stream_with_invalid_argument(channel):
    problems = []
    for name, data in HAND_MADE.items():
        bad = malformed(pb.SentimentRequest, data)
        # Two good chunks first: their answers stand, then the bad one ends the call.
        got, code, details = stream(channel, [VALID_SENTIMENT, VALID_SENTIMENT, data])
        p = problem(STREAM, data, code, details, bad)
        if p:
            problems.append(f"{name}: {p}")
        elif bad and got != 2:
            problems.append(f"{name}: {got} responses before the malformed chunk's error, expected 2")
    assert not problems, _summary(problems, len(HAND_MADE))


@fixed_seed(200)
@given(data=fuzz_bytes)
@example(data=b"\x0a\x02\xff\xfe")
def test_fuzzed_bytes_classify_sentiment(channel, data):
    _check_unary(channel, "ClassifySentiment", data)


@fixed_seed(200)
@given(data=fuzz_bytes)
@example(data=b"\x0a\x10ab")
def test_fuzzed_bytes_classify_digits(channel, data):
    _check_unary(channel, "ClassifyDigits", data)


def _check_unary(channel, method: str, data: bytes) -> None:
    bad = malformed(UNARY[method], data)
    code, details = unary(channel, method, data)
    event(f"{'malformed' if bad else 'parses'} -> {code.name}")
    p = problem(method, data, code, details, bad)
    assert p is None, p


@fixed_seed(200)
@given(chunks=st.lists(fuzz_bytes, min_size=1, max_size=3), lead=st.integers(0, 2))
@example(chunks=[b"\x0a\x02\xff\xfe"], lead=1)
def test_fuzzed_bytes_stream_classify_sentiment(channel, chunks, lead):
    chunks = [VALID_SENTIMENT] * lead + chunks
    first_bad = next((i for i, c in enumerate(chunks) if malformed(pb.SentimentRequest, c)), None)
    got, code, details = stream(channel, chunks)
    event(f"{'malformed' if first_bad is not None else 'parses'} -> {code.name}")
    if first_bad is None:
        p = problem(STREAM, b"|".join(chunks), code, details, False)
        assert p is None, p
        return
    # Chunks before the first malformed one may be answered or may end the call with an
    # ordinary error of their own (e.g. empty texts); the malformed one is never answered.
    assert code not in NEVER, f"{STREAM}({chunks!r}) -> {code.name}: {details[:160]}"
    assert got <= first_bad
    if got == first_bad:  # every earlier chunk was answered: the call ended on the malformed one
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{STREAM}({chunks!r}) -> {code.name}: {details[:160]}"


# -- the aftermath: still up, no tracebacks, bounded logging --------------------


def _log_lines(path: Path, start: int = 0) -> list[str]:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read().decode("utf-8", "replace").splitlines()


_LEVEL = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b")
_MALFORMED = re.compile(r"undecodable|malformed|not a valid|deserializ|DecodeError|parsing message", re.IGNORECASE)


def _level(line: str) -> str | None:
    """WARNING/ERROR/CRITICAL for a text or JSON log line, else None."""
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if isinstance(record, dict):
        level = str(record.get("level") or record.get("levelname") or "").upper()
        return level if level in ("WARNING", "ERROR", "CRITICAL") else None
    m = _LEVEL.search(line)
    return m.group(1) if m else None


def test_a_burst_of_malformed_calls_logs_a_bounded_number_of_lines(gw, channel):
    time.sleep(0.3)  # let earlier calls' lines reach the file
    start = gw.log_path.stat().st_size
    burst = [
        ("ClassifySentiment", b"\x0a\x02\xff\xfe"),
        ("ClassifySentiment", b"\x0a\x10ab"),
        ("ClassifyDigits", b"\x0a\x10ab"),
        ("ClassifyDigits", b"\xff" * 12),
    ]
    codes = []
    for i in range(75):  # 300 unary calls
        for method, data in burst:
            codes.append(unary(channel, method, data + bytes([i % 7]) * (i % 3))[0])
    for _ in range(30):  # and 30 streams ending on a malformed chunk
        codes.append(stream(channel, [VALID_SENTIMENT, b"\x0a\x02\xff\xfe"])[1])
    time.sleep(0.5)
    lines = _log_lines(gw.log_path, start)
    traceback = [line for line in lines if "Traceback" in line]
    loud = [line for line in lines if _level(line)]
    about_it = [line for line in loud if _MALFORMED.search(line)]
    assert not traceback, f"{len(traceback)} tracebacks for {len(codes)} malformed calls, e.g.:\n" + "\n".join(lines[:30])
    assert len(about_it) < 20, f"{len(about_it)} WARNING+ lines about malformed messages for {len(codes)} calls:\n" + "\n".join(about_it[:10])
    assert len(loud) < 20, f"{len(loud)} WARNING+ lines for {len(codes)} malformed calls:\n" + "\n".join(loud[:10])
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}, {c.name for c in codes}


def test_the_gateway_is_still_up_and_logged_no_traceback(gw, channel):
    code, details = unary(channel, "ClassifySentiment", pb.SentimentRequest(texts=["A wonderful film"]).SerializeToString())
    assert code == grpc.StatusCode.OK, details
    reply = channel.unary_unary(SERVICE + "ClassifySentiment", request_serializer=None, response_deserializer=None)(
        VALID_SENTIMENT, timeout=CALL_TIMEOUT_S
    )
    response = pb.SentimentResponse.FromString(reply)
    assert len(response.predictions) == 3 and {p.label for p in response.predictions} <= {"negative", "positive"}
    got, code, _ = stream(channel, [VALID_SENTIMENT] * 2)
    assert (got, code) == (2, grpc.StatusCode.OK)
    assert gw.process.poll() is None, f"gateway exited with {gw.process.returncode}"
    time.sleep(0.3)
    lines = _log_lines(gw.log_path)
    tracebacks = [i for i, line in enumerate(lines) if "Traceback" in line]
    assert not tracebacks, f"{len(tracebacks)} tracebacks in {gw.log_path}; the first:\n" + "\n".join(
        lines[max(0, tracebacks[0] - 1) : tracebacks[0] + 12]
    )
