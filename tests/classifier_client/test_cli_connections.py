"""classifier-client's connection options against real gateways (subprocesses): several ``--target``,
gRPC name syntax (``dns:///``, ``ipv4:``), TLS (``--ca``, ``--tls``), ``--api-key`` and ``--header``.

Small inputs (a few dozen IMDB reviews) and module-scoped gateways serving only sentiment_lstm."""

from __future__ import annotations

import gzip
import json
import ssl
from pathlib import Path

import httpx
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from tests.classifier_client.test_client import GATEWAY, run_cli
from testkit.gateway import ROOT, free_port, gateway_processes, wait_until
from tests.serving.test_conformance import log_path

SETTINGS = {**GATEWAY, "models": '["sentiment_lstm"]'}
N = 40  # reviews per run
KEY = "cli-key-1"


@pytest.fixture(scope="module")
def reviews(data_dir, tmp_path_factory) -> Path:
    """The first N reviews of the IMDB test split as jsonl {"text", "label"}."""
    path = tmp_path_factory.mktemp("conn") / "reviews.jsonl"
    with gzip.open(data_dir / "imdb_test.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(N), f)]
    path.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A certificate of a throwaway CA (trustme) for 127.0.0.1 and localhost (server.pem, server.key),
    that CA (ca.pem) and another CA (wrong_ca.pem)."""
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    (d / "server.pem").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(d / "server.key"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(d / "wrong_ca.pem"))
    return d


@pytest.fixture(scope="module")
def gateways(certs):
    """The module's four gateways, started together (their start-ups overlap): two plain ones, one
    serving TLS with the certificate of ``certs``, one that wants an API key (KEY or 'other-key').
    Their logs are kept (gateway_process writes .pytest_cache/gateway-<port>.log when that folder
    exists, as on a fresh clone it may not)."""
    (ROOT / ".pytest_cache").mkdir(exist_ok=True)
    with_tls = dict(SETTINGS, tls_cert_file=certs / "server.pem", tls_key_file=certs / "server.key",
                    verify=ssl.create_default_context(cafile=str(certs / "ca.pem")))
    with_key = dict(SETTINGS, api_keys=f"{KEY},other-key")
    with gateway_processes(SETTINGS, SETTINGS, with_tls, with_key) as (a, b, tls, keyed):
        tls.ca, tls.wrong_ca = certs / "ca.pem", certs / "wrong_ca.pem"
        yield {"pair": (a, b), "tls": tls, "keyed": keyed}


@pytest.fixture(scope="module")
def pair(gateways):
    """Two plain gateways."""
    return gateways["pair"]


@pytest.fixture(scope="module")
def reference(pair, reviews, tmp_path_factory) -> bytes:
    """The output of a run against one target (the first gateway)."""
    out = tmp_path_factory.mktemp("ref") / "out.jsonl"
    run_cli("sentiment", reviews, "--target", pair[0].grpc, "-o", out, "-q")
    data = out.read_bytes()
    assert [json.loads(line)["index"] for line in data.splitlines()] == list(range(N))
    return data


def port(address: str) -> str:
    return address.rsplit(":", 1)[1]


def metric(gw, name: str, **labels) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``, from the gateway's /metrics."""
    text = httpx.get(gw.rest + "/metrics", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def work(gw, endpoint: str) -> tuple[float, float]:
    """(ok gRPC requests to ``endpoint``, sentiment items classified) so far."""
    return (metric(gw, "classifier_requests_total", protocol="grpc", endpoint=endpoint, outcome="ok"),
            metric(gw, "classifier_items_total", model="sentiment_lstm"))


def delta(before: dict, gws, endpoint: str) -> list[tuple[float, float]]:
    return [tuple(x - y for x, y in zip(work(gw, endpoint), before[i])) for i, gw in enumerate(gws)]


def assert_clean_failure(p, code: int = 1) -> str:
    """Exit ``code``, the reason on stderr (last lines), no Python traceback; returns stderr."""
    assert p.returncode == code, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    assert p.stdout == "", p.stdout
    return p.stderr


# -- 1. several --target ------------------------------------------------------------------------

def test_several_targets_share_the_stream_and_give_the_one_target_output(pair, reviews, reference, tmp_path):
    endpoint = "StreamClassifySentiment"
    before = {i: work(gw, endpoint) for i, gw in enumerate(pair)}
    out = tmp_path / "out.jsonl"
    # chunks of 2, one in flight per stream: 20 chunks over the two streams (one per target)
    p = run_cli("sentiment", reviews, "--target", pair[0].grpc, "--target", pair[1].grpc, "-o", out,
                "--chunk-size", 2, "--window", 1)
    assert out.read_bytes() == reference
    (req_a, items_a), (req_b, items_b) = delta(before, pair, endpoint)
    assert req_a > 0 and req_b > 0, f"both gateways should have served stream chunks: {req_a}, {req_b}"
    assert items_a > 0 and items_b > 0
    if "retries: 0" in p.stderr:  # no chunk sent twice: every row classified exactly once, by one of them
        assert (req_a + req_b, items_a + items_b) == (N / 2, N), p.stderr


def test_several_targets_take_unary_calls_in_turn(pair, reviews, reference, tmp_path):
    endpoint = "ClassifySentiment"
    before = {i: work(gw, endpoint) for i, gw in enumerate(pair)}
    out = tmp_path / "out.jsonl"
    p = run_cli("sentiment", reviews, "--unary", "--target", pair[0].grpc, "--target", pair[1].grpc, "-o", out,
                "--chunk-size", 4)
    assert out.read_bytes() == reference
    if "retries: 0" not in p.stderr:
        pytest.skip(f"calls were retried (a loaded machine?), the split is not exact: {p.stderr}")
    assert delta(before, pair, endpoint) == [(5, 20), (5, 20)], "10 calls round-robin: 5 to each target"


# -- 2. gRPC name syntax ------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["dns:///127.0.0.1:{port}", "dns:127.0.0.1:{port}", "ipv4:127.0.0.1:{port}",
                                  "ipv4:///127.0.0.1:{port}"])
def test_grpc_name_syntax_targets(pair, reviews, reference, form, tmp_path):
    out = tmp_path / "out.jsonl"
    run_cli("sentiment", reviews, "--target", form.format(port=port(pair[0].grpc)), "-o", out, "-q")
    assert out.read_bytes() == reference


def test_one_target_of_several_addresses_is_balanced_round_robin(pair, reviews, reference, tmp_path):
    """``ipv4:A,B``: one channel, two backends, the round_robin policy spreads the calls."""
    endpoint = "ClassifySentiment"
    before = {i: work(gw, endpoint) for i, gw in enumerate(pair)}
    target = "ipv4:" + ",".join(gw.grpc for gw in pair)
    out = tmp_path / "out.jsonl"
    run_cli("sentiment", reviews, "--unary", "--target", target, "-o", out, "--chunk-size", 1, "--window", 1, "-q")
    assert out.read_bytes() == reference
    (req_a, _), (req_b, _) = delta(before, pair, endpoint)
    assert req_a > 0 and req_b > 0, f"round_robin should use both addresses: {req_a}, {req_b}"


def test_an_unreachable_target_is_a_clear_error(reviews):
    target = f"127.0.0.1:{free_port()}"  # nobody listens there
    p = run_cli("sentiment", reviews, "--target", target, "--retries", 0, check=False)
    err = assert_clean_failure(p)
    assert f"could not reach the gateway at {target}: UNAVAILABLE" in err, err


@pytest.mark.parametrize("api", ["grpc", "rest"])
def test_a_refused_port_is_reported_after_a_few_attempts_not_all_retries(reviews, api):
    """With the default --retries (10) and nothing ever answered, a refused connection ends the run
    after --connect-retries (2) more attempts: it took 11 attempts and ~15 s."""
    port = free_port()
    target = f"127.0.0.1:{port}" if api == "grpc" else f"http://127.0.0.1:{port}"
    p = run_cli("sentiment", reviews, "--target", target, *(["--rest"] if api == "rest" else []), check=False)
    err = assert_clean_failure(p)
    assert f"could not reach the gateway at {target}: UNAVAILABLE" in err, err
    assert "giving up: 3 attempts could not connect, nothing answered yet" in err, err
    assert "retries: 2 (UNAVAILABLE 2" in err, err


# -- 3. TLS -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls(gateways):
    """A gateway serving TLS with a certificate of a throwaway CA (trustme) for 127.0.0.1 and localhost;
    ``ca`` the CA file, ``wrong_ca`` another CA's."""
    return gateways["tls"]


@pytest.mark.parametrize("extra", [[], ["--unary"], ["--tls"]], ids=["stream", "unary", "with-tls-flag"])
def test_tls_with_the_ca(tls, reviews, reference, extra, tmp_path):
    out = tmp_path / "out.jsonl"
    run_cli("sentiment", reviews, "--target", f"localhost:{port(tls.grpc)}", "--ca", tls.ca, "-o", out, "-q", *extra)
    assert out.read_bytes() == reference


def test_tls_over_rest_with_the_ca(tls, reviews, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    run_cli("sentiment", reviews, "--rest", "--target", f"https://localhost:{port(tls.rest)}", "--ca", tls.ca,
            "-o", out, "-q")
    assert [json.loads(x)["label"] for x in out.read_text().splitlines()] == \
        [json.loads(x)["label"] for x in reference.decode().splitlines()]


@pytest.mark.parametrize("case", ["plaintext", "wrong-ca", "system-roots", "wrong-ca-unary", "wrong-ca-127.0.0.1"])
def test_tls_without_the_right_ca_fails_clearly(tls, reviews, case, tmp_path):
    host = "127.0.0.1" if case.endswith("127.0.0.1") else "localhost"
    target = f"{host}:{port(tls.grpc)}"
    options = {"plaintext": [], "system-roots": ["--tls"]}.get(case, ["--ca", tls.wrong_ca])
    if case.endswith("unary"):
        options.append("--unary")
    out = tmp_path / "out.jsonl"
    p = run_cli("sentiment", reviews, "--target", target, *options, "--retries", 1, "-o", out, check=False)
    err = assert_clean_failure(p)
    assert f"could not reach the gateway at {target}: UNAVAILABLE" in err, err
    hint = err.rstrip().splitlines()[-1]
    assert "--ca" in hint, err  # what to do about it
    if case.endswith("127.0.0.1"):  # one address, so gRPC's own message names the handshake failure too
        assert "CERTIFICATE_VERIFY_FAILED" in err, err
    assert out.read_text() == ""


def test_tls_over_rest_with_a_wrong_ca_fails_clearly(tls, reviews):
    p = run_cli("sentiment", reviews, "--rest", "--target", f"https://localhost:{port(tls.rest)}", "--ca", tls.wrong_ca,
                "--retries", 0, check=False)
    err = assert_clean_failure(p)
    assert "UNAVAILABLE" in err and "CERTIFICATE_VERIFY_FAILED" in err, err


def test_a_missing_ca_file_is_a_usage_error(tls, reviews, tmp_path):
    p = run_cli("sentiment", reviews, "--target", tls.grpc, "--ca", tmp_path / "nope.pem", check=False)
    err = assert_clean_failure(p, code=2)
    assert "nope.pem" in err, err


# -- 4. API keys and headers --------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed(gateways):
    """A gateway that wants an API key (KEY or 'other-key'); its log is kept."""
    return gateways["keyed"]


@pytest.mark.parametrize("extra", [[], ["--unary"]], ids=["stream", "unary"])
def test_the_right_api_key_passes(keyed, reviews, reference, extra, tmp_path):
    out = tmp_path / "out.jsonl"
    run_cli("sentiment", reviews, "--target", keyed.grpc, "--api-key", KEY, "-o", out, "-q", *extra)
    assert out.read_bytes() == reference


def test_the_right_api_key_passes_over_rest(keyed, reviews, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    run_cli("sentiment", reviews, "--rest", "--target", keyed.rest, "--api-key", "other-key", "-o", out, "-q")
    assert [json.loads(x)["label"] for x in out.read_text().splitlines()] == \
        [json.loads(x)["label"] for x in reference.decode().splitlines()]


@pytest.mark.parametrize("case", ["wrong-key", "wrong-key-unary", "no-key", "wrong-key-rest"])
def test_a_wrong_or_missing_api_key_fails_clearly(keyed, reviews, case, tmp_path):
    options = [] if case == "no-key" else ["--api-key", "not-the-key"]
    if case.endswith("unary"):
        options.append("--unary")
    target = keyed.grpc
    if case.endswith("rest"):
        options.append("--rest")
        target = keyed.rest
    out = tmp_path / "out.jsonl"
    p = run_cli("sentiment", reviews, "--target", target, *options, "-o", out, check=False)
    err = assert_clean_failure(p)
    last = err.rstrip().splitlines()[-1]
    assert "the server refused: UNAUTHENTICATED" in last, err
    assert ("missing API key" if case == "no-key" else "invalid API key") in last, err
    assert out.read_text() == ""


def test_a_header_is_sent_as_metadata(keyed, reviews, reference, tmp_path):
    """``--header x-api-key=KEY`` is the other way the gateway takes a key: it gets through only if sent."""
    out = tmp_path / "out.jsonl"
    run_cli("sentiment", reviews, "--target", keyed.grpc, "--header", f"x-api-key={KEY}", "-o", out, "-q")
    assert out.read_bytes() == reference


def test_a_request_id_header_reaches_the_access_log(keyed, reviews, tmp_path):
    log = log_path(keyed)
    assert log.is_file(), log
    rid = f"cli-conn-{tmp_path.name}"
    # upper case on the command line: gRPC metadata keys are lower case, the client lowers them
    run_cli("sentiment", reviews, "--target", keyed.grpc, "--api-key", KEY, "--header", f"X-Request-Id={rid}",
            "--chunk-size", 10, "--streams", 1, "-q")

    def records():
        found = [r for r in map(json.loads, filter(lambda x: x.startswith("{"), log.read_text().splitlines()))
                 if r.get("name") == "serving.access" and r.get("request_id") == rid]
        return found if len(found) >= 4 else None

    found = wait_until(records, timeout=10)
    assert [(r["endpoint"], r["outcome"], r["items"]) for r in found] == [("StreamClassifySentiment", "ok", 10)] * 4


def test_a_malformed_header_is_a_usage_error(keyed, reviews):
    p = run_cli("sentiment", reviews, "--target", keyed.grpc, "--header", "no-equals-sign", check=False)
    err = assert_clean_failure(p, code=2)
    assert "--header 'no-equals-sign': expected KEY=VALUE" in err, err
