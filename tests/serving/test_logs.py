"""serving/logs.py: the JSON line format and the buffered writer."""

import io
import json
import logging
import time

from serving.logs import BufferedHandler, JsonLines, RequestIdFilter


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
