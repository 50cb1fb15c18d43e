"""The REST port's limits on request heads and bodies (issue 22; serving/api/rest/connections.py).

Real sockets against real gateways: the shared default gateway of each backend (``gw``: the
default limits, http_max_header_bytes=65536, http_max_headers=100,
http_max_header_line_bytes=16384, http_min_body_bytes_per_s=1024 after
http_body_rate_grace_s=5), and a gateway process of this module with the body limits lowered
(``tight``: grace 1 s, http_body_deadline_s=3, max_connections=32) so that the tests stay short
and its memory can be read in /proc. Before, an 8 MB header, 100,000 headers or a 17 KiB line
were answered 200, a client streaming an endless header grew the gateway's memory by what it
sent, and a body trickling one byte at a time (each byte re-arming http_body_timeout_s) held
its connection, and with enough of them every slot, for ever.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from testkit.gateway import gateway_process, wait_until

GRACE_S, DEADLINE_S, MAX_CONNECTIONS = 1.0, 3.0, 32
DIGITS = "/v1/digits:predict"


@pytest.fixture(scope="module")
def tight():
    with gateway_process(models='["digits"]', http_body_rate_grace_s=GRACE_S, http_body_deadline_s=DEADLINE_S,
                         max_connections=MAX_CONNECTIONS) as g:
        yield g


# -- raw HTTP over a socket ----------------------------------------------------------------------
def connect(g, timeout: float = 10) -> socket.socket:
    host, port = g.rest.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_to_close(s: socket.socket, timeout: float = 10) -> tuple[bytes, bool]:
    """What the server sends until it closes the connection; and whether it did close it
    (end of stream or reset) within ``timeout``."""
    s.settimeout(timeout)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return out, False
    return out, True


def status_and_message(answer: bytes) -> tuple[int, str]:
    assert answer, "no answer"
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]["message"] if body.startswith(b"{\"error\"") else body.decode()


def in_background(work) -> threading.Thread:
    """Run ``work()`` in a daemon thread, ignoring the server closing on us (it may refuse half-way)."""

    def run():
        try:
            work()
        except OSError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def send_in_background(s: socket.socket, *parts: bytes) -> threading.Thread:
    """Send ``parts`` from a thread."""

    def send():
        for part in parts:
            s.sendall(part)

    return in_background(send)


def ask(g, head: bytes, *body: bytes, timeout: float = 10) -> tuple[int, str, bool]:
    """Send a request (head, then body parts, from a thread); the status and error message
    answered, and whether the connection was closed after it."""
    with connect(g) as s:
        send_in_background(s, head, *body)
        answer, closed = read_to_close(s, timeout)
    assert answer, "no answer"
    return (*status_and_message(answer), closed)


def get_healthz_with(headers: list[bytes]) -> bytes:
    fields = b"".join(h + b"\r\n" for h in headers)
    return b"GET /healthz HTTP/1.1\r\nHost: x\r\nconnection: close\r\n" + fields + b"\r\n"


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


# -- 1. request heads: 431 ------------------------------------------------------------------------
def test_an_8mb_header_is_refused_431_and_the_connection_closed(gw):
    t0 = time.monotonic()
    status, message, closed = ask(gw, get_healthz_with([b"x-big: " + b"a" * (8 << 20)]))
    took = time.monotonic() - t0
    assert status == 431 and closed, (status, message)
    assert "larger than http_max_header_bytes=65536" in message or "http_max_header_line_bytes=16384" in message
    assert took < 3, took
    print(f"8 MB header: 431 after {took * 1000:.0f} ms ({message})")
    # many lines each under http_max_header_line_bytes, over http_max_header_bytes in all
    status, message, closed = ask(gw, get_healthz_with([b"x-%d: %s" % (i, b"a" * 8000) for i in range(10)]))
    assert status == 431 and closed and "request headers larger than http_max_header_bytes=65536" in message, message


def test_too_many_header_fields_are_refused_431(gw):
    status, message, closed = ask(gw, get_healthz_with([b"x-%d: y" % i for i in range(100_000)]))
    assert status == 431 and closed, (status, message)
    # (100,000 fields are over both limits; the first one met is named)
    assert "http_max_headers=100" in message or "http_max_header_bytes=65536" in message
    status, message, closed = ask(gw, get_healthz_with([b"x-%d: y" % i for i in range(99)]))  # + host, connection
    assert status == 431 and "more than http_max_headers=100 header fields" in message and closed
    status, message, _ = ask(gw, get_healthz_with([b"x-%d: y" % i for i in range(98)]))  # 100 fields: fine
    assert status == 200, message


def test_a_header_line_over_16_kib_is_refused_431(gw):
    line = b"x-long: " + b"a" * (16 * 1024)
    status, message, closed = ask(gw, get_healthz_with([line]))
    assert status == 431 and closed and "http_max_header_line_bytes=16384" in message, message
    assert ask(gw, get_healthz_with([line[:16 * 1024 - 100]]))[0] == 200  # under the limit: fine
    # the request line too
    status, message, closed = ask(gw, b"GET /healthz?" + b"q" * (17 * 1024) + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 431 and closed and "http_max_header_line_bytes=16384" in message, message


ENDLESS = {"value": b"a" * 65536, "lines": b"".join(b"x-%02d: %s\r\n" % (i, b"b" * 1016) for i in range(64))}


def stream_endless_heads(g, kind: str, stop: threading.Event, refusals: list, sent: list[int]) -> None:
    """Until ``stop``: open a connection and send a request head without end (``kind`` "value":
    one header value; "lines": header lines of 1 KiB), 64 KiB per send; when the gateway stops
    taking it, read its answer into ``refusals`` and start again. ``sent[0]``: bytes sent."""
    while not stop.is_set():
        try:
            with connect(g, timeout=5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + (b"x-endless: " if kind == "value" else b""))
                try:
                    while not stop.is_set():
                        s.sendall(ENDLESS[kind])
                        sent[0] += len(ENDLESS[kind])
                except OSError:
                    pass
                answer, _ = read_to_close(s, 2)
                if answer:
                    refusals.append(status_and_message(answer))
        except OSError:
            pass


def test_memory_stays_flat_while_clients_stream_endless_headers(tight):
    """16 clients stream request heads that never end, as fast as the gateway reads (64 KiB per
    send), reconnecting when refused, for 4 s: half of them one header value without end, half
    header lines of 1 KiB without end. The gateway's RSS stays within 20 MB of what it was, and
    /healthz keeps answering, and at once after. Before, the gateway kept every byte (httptools
    joins a header's pieces; uvicorn keeps every field): +233 MB in these 4 s, /healthz stalled 5 s."""
    pid = tight.process.pid
    refusals, sent, stop = {"value": [], "lines": []}, [0], threading.Event()
    for _ in range(3):  # warm up the refusal path before taking the baseline
        ask(tight, get_healthz_with([b"x: " + b"a" * 200_000]))
        ask(tight, get_healthz_with([b"x-%d: %s" % (i, b"a" * 1000) for i in range(90)]))
    before = rss_kb(pid)
    rss = [before]

    def sample():  # (in a thread of its own: a probe may wait on a stalled gateway)
        while not stop.wait(0.05):
            rss.append(rss_kb(pid))

    threads = [threading.Thread(target=stream_endless_heads, args=(tight, kind, stop, refusals[kind], sent),
                                daemon=True) for kind in ("value", "lines") * 8]
    threads.append(threading.Thread(target=sample, daemon=True))
    for t in threads:
        t.start()
    probes, t_end = [], time.monotonic() + 4
    try:
        while time.monotonic() < t_end:
            p0 = time.monotonic()
            try:
                probes.append((httpx.get(tight.rest + "/healthz", timeout=5).status_code, time.monotonic() - p0))
            except httpx.HTTPError as e:
                probes.append((type(e).__name__, time.monotonic() - p0))
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    after = rss_kb(pid)
    peak = max(*rss, after)
    print(f"RSS {before / 1024:.0f} MB before, peak {peak / 1024:.0f} MB, {after / 1024:.0f} MB after; "
          f"{sent[0] / 2**20:.0f} MiB of headers sent, {sum(map(len, refusals.values()))} refusals; "
          f"/healthz x{len(probes)}, slowest {max(p[1] for p in probes) * 1000:.0f} ms")
    assert peak - before < 20 * 1024, (before, peak)
    assert probes and all(code == 200 for code, _ in probes), probes
    assert httpx.get(tight.rest + "/healthz", timeout=2).status_code == 200  # and at once after
    assert refusals["value"] and all(s == 431 and "http_max_header_line_bytes=16384" in m for s, m in refusals["value"])
    assert refusals["lines"] and all(s == 431 and "larger than http_max_header_bytes=65536" in m
                                     for s, m in refusals["lines"]), refusals["lines"][:3]


# -- 2. request bodies: 408 -------------------------------------------------------------------------
def post_head(path: str = DIGITS, length: int = 1000) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {length}\r\n\r\n").encode()


def trickle(s: socket.socket, every_s: float, size: int = 1, stop: threading.Event | None = None) -> threading.Thread:
    """Send ``size`` bytes every ``every_s`` until the connection fails or ``stop`` is set."""
    stop = stop or threading.Event()

    def send():
        while not stop.is_set():
            s.sendall(b" " * size)
            stop.wait(every_s)

    return in_background(send)


def test_a_body_trickling_in_is_408_with_the_defaults(gw):
    """One byte every second: each arrives well within http_body_timeout_s (30 s), but after
    http_body_rate_grace_s (5 s) the average is far below 1 KiB/s: 408 and closed, at ~5 s."""
    with connect(gw, timeout=30) as s:
        s.sendall(post_head("/v1/sentiment:predict"))
        t0 = time.monotonic()
        trickle(s, 1.0)
        answer, closed = read_to_close(s, 15)
        took = time.monotonic() - t0
    assert answer, f"nothing answered within {took:.1f}s"
    status, message = status_and_message(answer)
    print(f"1 B/s body, defaults: {status} after {took:.2f} s ({message})")
    assert status == 408 and closed and "http_min_body_bytes_per_s=1024" in message, message
    assert 4.5 < took < 8, took


def test_a_slow_body_is_408_after_the_grace(tight):
    with connect(tight) as s:
        s.sendall(post_head())
        t0 = time.monotonic()
        trickle(s, 0.2)
        answer, closed = read_to_close(s, 10)
        took = time.monotonic() - t0
    status, message = status_and_message(answer)
    print(f"5 B/s body, grace {GRACE_S:g} s: {status} after {took:.2f} s ({message})")
    assert status == 408 and closed and "http_min_body_bytes_per_s=1024" in message, message
    assert GRACE_S - 0.1 < took < GRACE_S + 2, took


def test_a_body_over_the_deadline_is_408_however_steady(tight):
    """4 KiB every 0.2 s (20 KiB/s: above the rate, no gap near http_body_timeout_s) of a 1 MB
    body: the whole body is not in within http_body_deadline_s=3: 408."""
    with connect(tight) as s:
        s.sendall(post_head(length=1_000_000))
        t0 = time.monotonic()
        trickle(s, 0.2, size=4096)
        answer, closed = read_to_close(s, 10)
        took = time.monotonic() - t0
    status, message = status_and_message(answer)
    print(f"20 KiB/s body, deadline {DEADLINE_S:g} s: {status} after {took:.2f} s ({message})")
    assert status == 408 and closed and f"http_body_deadline_s={DEADLINE_S:g}" in message, message
    assert DEADLINE_S - 0.1 < took < DEADLINE_S + 2, took


def test_slow_bodies_cannot_hold_every_connection_slot(tight):
    """max_connections=32 slow bodies: a fresh /healthz is refused 503 while they hold every
    slot, and is answered again once the rate check has refused them (grace + a little; a
    refused connection still lingering gives up its slot to a new one). Before: 503 for as
    long as they trickle (each byte re-armed http_body_timeout_s)."""
    wait_until(lambda: httpx.get(tight.rest + "/healthz").status_code == 200, 10)
    stop = threading.Event()
    slow = []
    try:
        for _ in range(MAX_CONNECTIONS):
            s = connect(tight)
            s.sendall(post_head())
            trickle(s, 0.3, stop=stop)
            slow.append(s)
        t0 = time.monotonic()
        full = httpx.get(tight.rest + "/healthz", timeout=5)
        assert full.status_code == 503 and "max_connections=32" in full.json()["error"]["message"]
        wait_until(lambda: httpx.get(tight.rest + "/healthz", timeout=2).status_code == 200, GRACE_S + 2, 0.05)
        took = time.monotonic() - t0
        answers = [read_to_close(s, 5) for s in slow]
    finally:
        stop.set()
        for s in slow:
            s.close()
    print(f"{MAX_CONNECTIONS} slow bodies: /healthz answered again after {took:.2f} s")
    assert took < GRACE_S + 2
    assert all(closed and status_and_message(a)[0] == 408 for a, closed in answers)
    assert httpx.get(tight.rest + "/healthz").status_code == 200


def test_large_bodies_at_normal_speed_still_work(tight):
    """An 8 MB JSON body (1,000 digit images, padded with whitespace) over loopback: 200; and a
    1.5 MB one sent at 1 MB/s (64 KiB chunks: ~1.5 s, past the grace, above the rate) too."""
    image = [[(x * y) % 256 for x in range(28)] for y in range(28)]
    body = json.dumps({"images": [image] * 1000}).encode()
    body += b" " * (8_000_000 - len(body))
    t0 = time.monotonic()
    r = httpx.post(tight.rest + DIGITS, content=body, headers={"content-type": "application/json"}, timeout=60)
    fast = time.monotonic() - t0
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1000, r.text[:300]

    body = json.dumps({"images": [image] * 250}).encode()
    body += b" " * (1_500_000 - len(body))

    def paced():
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]
            time.sleep(65536 / 1e6)

    t0 = time.monotonic()
    r = httpx.post(tight.rest + DIGITS, content=paced(), headers={"content-type": "application/json",
                                                                   "content-length": str(len(body))}, timeout=60)
    slow = time.monotonic() - t0
    assert r.status_code == 200 and len(r.json()["predictions"]) == 250, r.text[:300]
    assert slow > GRACE_S
    print(f"8 MB body: 200 in {fast:.2f} s at full speed; 1.5 MB at 1 MB/s: 200 in {slow:.2f} s")
