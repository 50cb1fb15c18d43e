"""serving/logs.py: the JSON and text line formats and the buffered writer; a real gateway's text log."""

import io
import json
import logging
import time
from urllib.parse import quote

import httpx

from serving.logs import BufferedHandler, JsonLines, RequestIdFilter, TextLines, escape_controls
from testkit.gateway import gateway_process, wait_until


def logger(stream, interval_s=60.0):
    h = BufferedHandler(stream, interval_s)
    h.addFilter(RequestIdFilter())
    h.setFormatter(JsonLines())
    log = logging.Logger(f"test-{id(stream)}")
    log.addHandler(h)
    return log, h


def test_json_lines_keep_the_keys_their_order_and_the_extra_fields():
    out = io.StringIO()
    log, h = logger(out)
    log.info("rest %s %s", "/v1/sentiment:predict", "ok",
             extra={"protocol": "rest", "model": "sentiment_lstm", "version": 1, "items": 3, "latency_ms": 1.25,
                    "odd": object()})
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("failed")
    h.close()
    first, second = [json.loads(line) for line in out.getvalue().splitlines()]
    assert list(first)[:5] == ["time", "level", "name", "message", "request_id"]
    assert first["message"] == "rest /v1/sentiment:predict ok" and first["level"] == "INFO"
    assert first["request_id"] == "-"
    assert {k: first[k] for k in ("protocol", "model", "version", "items", "latency_ms")} == {
        "protocol": "rest", "model": "sentiment_lstm", "version": 1, "items": 3, "latency_ms": 1.25}
    assert first["odd"].startswith("<object object")  # not JSON: written as its str()
    assert second["level"] == "ERROR" and "ValueError: bad" in second["exc_info"]
    time.strptime(first["time"].split(",")[0], "%Y-%m-%d %H:%M:%S")


def test_info_lines_wait_for_the_interval_and_warnings_go_at_once():
    out = io.StringIO()
    log, h = logger(out, interval_s=0.05)
    log.info("one")
    assert out.getvalue() == ""  # buffered
    deadline = time.monotonic() + 5
    while not out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert json.loads(out.getvalue())["message"] == "one"
    slow_out = io.StringIO()
    log2, h2 = logger(slow_out, interval_s=60)
    log2.info("queued")
    log2.warning("now")
    assert [json.loads(x)["message"] for x in slow_out.getvalue().splitlines()] == ["queued", "now"]
    log2.info("at close")
    h2.close()
    assert json.loads(slow_out.getvalue().splitlines()[-1])["message"] == "at close"
    h.close()


def test_no_line_is_lost_when_threads_log_while_it_writes():
    import threading

    out = io.StringIO()
    log, h = logger(out, interval_s=0.001)  # the writer thread runs all the time

    def spam(k):
        for i in range(2000):
            log.info("t%d-%d", k, i)

    threads = [threading.Thread(target=spam, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    h.close()
    messages = [json.loads(line)["message"] for line in out.getvalue().splitlines()]
    assert len(messages) == 8000 and len(set(messages)) == 8000


def test_text_lines_escape_every_control_character_one_record_one_line():
    out = io.StringIO()
    h = BufferedHandler(out, 60)
    h.addFilter(RequestIdFilter())
    h.setFormatter(TextLines("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    log = logging.Logger("test-text-lines")
    log.addHandler(h)
    log.info("rest %s UNAUTHENTICATED",
             "/v1/x\n2026-01-01 00:00:00,000 INFO serving.access [-] forged\r\x1b[2K\x00\x7f\x85\u2028\u2029\tend é\\n")
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        log.exception("failed")
    h.close()
    first, second = out.getvalue().split("\n")[:-1]  # exactly two lines, each a record
    assert out.getvalue().count("\n") == 2 and len(out.getvalue().splitlines()) == 2
    assert first.endswith("rest /v1/x\\n2026-01-01 00:00:00,000 INFO serving.access [-] forged\\r\\x1b[2K\\x00\\x7f"
                          "\\x85\\u2028\\u2029\\tend é\\n UNAUTHENTICATED")
    assert " ERROR test-text-lines [-] failed\\nTraceback (most recent call last):\\n" in second
    assert second.endswith("ValueError: bad\\nvalue")
    assert escape_controls("plain text, é, \\ and all") == "plain text, é, \\ and all"


def test_a_request_cannot_forge_a_text_log_line():
    """Issue 22: with log_format=text, a path with %0a (refused 401, logged as it came) wrote a
    second line of the attacker's choosing into the log. Now every control character is escaped."""
    forged = "2026-01-01 00:00:00,000 INFO serving.access [-] rest /v1/sentiment:predict ok"
    path = "/v1/x%0a" + quote(forged) + "%0d%0aFORGED-CR%c2%85FORGED-NEL%e2%80%a8FORGED-LS%1b[2K"
    with gateway_process(log_format="text", api_keys="k1", models='["sentiment_lstm"]') as gw:
        assert gw.log_path is not None
        r = httpx.get(gw.rest + path, timeout=10)
        assert r.status_code == 401
        r = httpx.get(gw.rest + "/v1/models", headers={"x-request-id": "ok-then"}, timeout=10)  # a later record
        assert r.status_code == 401
        wait_until(lambda: "ok-then" in gw.log_path.read_text(), timeout=10, interval=0.05)
        log = gw.log_path.read_text(encoding="utf-8")
    lines = log.splitlines()  # splits at \n, \r, NEL, U+2028... too
    assert not [line for line in lines if line.startswith((forged[:10], "FORGED"))], log
    rejected = [line for line in lines if "UNAUTHENTICATED" in line and "/v1/x" in line]
    assert len(rejected) == 1, log
    assert ("rest /v1/x\\n" + forged + "\\r\\nFORGED-CR\\x85FORGED-NEL\\u2028FORGED-LS\\x1b[2K UNAUTHENTICATED") in rejected[0]
    assert not any(c in log.replace("\n", "") for c in "\r\x1b\x85\u2028")
