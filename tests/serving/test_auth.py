"""API-key authentication: the key store, the REST middleware and the gRPC interceptor,
each behind a real server on loopback, and once end to end through the gateway."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
from contextlib import contextmanager

import grpc
import httpx
import pytest
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from serving.auth import MISSING, ApiKeyInterceptor, ApiKeyMiddleware, ApiKeys, key_from_headers
from serving.settings import Settings
from testkit.gateway import ROOT, free_port, gateway_process, wait_until


def bump(path, seconds=10):
    """Move the file's mtime on, so a change is seen even within the clock's granularity."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


# --- ApiKeys -----------------------------------------------------------------------------


def test_env_keys_and_disabled_by_default():
    assert not ApiKeys.from_settings(Settings(_env_file=None)).enabled
    keys = ApiKeys.from_settings(Settings(_env_file=None, api_keys=" k1, ,k2 "))
    assert keys.enabled
    assert keys.check("k1") and keys.check("k2")
    assert not keys.check("k3") and not keys.check("") and not keys.check(None) and not keys.check("k1,k2")


def test_keys_are_held_only_as_digests():
    secrets = ["plain-secret-1", "plain-secret-2"]
    keys = ApiKeys(secrets)
    held = repr(vars(keys)) + repr([getattr(keys, a, None) for a in dir(keys)])
    assert not any(s in held for s in secrets)
    assert keys.check("plain-secret-2")


def test_file_keys_with_comments_reload_and_revocation(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# the team's keys\nalpha\n\n   beta  \n#gamma\n")
    keys = ApiKeys.from_settings(Settings(_env_file=None, api_keys="envkey", api_keys_file=f))
    assert keys.check("alpha") and keys.check("beta") and keys.check("envkey")
    assert not keys.check("gamma") and not keys.check("#gamma") and not keys.check("# the team's keys")

    keys = ApiKeys(["envkey"], f, reload_interval_s=0)
    f.write_text("beta\ngamma\n")  # alpha revoked, gamma added
    bump(f)
    assert keys.check("gamma") and keys.check("beta") and keys.check("envkey")
    assert not keys.check("alpha")


def test_reload_is_checked_at_most_once_per_interval(tmp_path):
    f = tmp_path / "keys"
    f.write_text("alpha\n")
    keys = ApiKeys([], f, reload_interval_s=3600)
    keys.check("alpha")  # the first check stats the file; the next hour none does
    f.write_text("beta\n")
    bump(f)
    assert keys.check("alpha") and not keys.check("beta")


def test_empty_file_enables_auth_and_lets_nobody_in(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# nobody yet\n")
    keys = ApiKeys([], f)
    assert keys.enabled and not keys.check("") and not keys.check("anything")


def test_missing_file_at_start_raises(tmp_path):
    with pytest.raises(RuntimeError, match="api_keys_file .*missing.* cannot be read"):
        ApiKeys.from_settings(Settings(_env_file=None, api_keys="k", api_keys_file=tmp_path / "missing"))


def test_unreadable_file_keeps_last_keys_and_warns_once(tmp_path, caplog):
    f = tmp_path / "keys"
    f.write_text("alpha\n")
    keys = ApiKeys([], f, reload_interval_s=0)
    f.unlink()
    f.mkdir()  # there, but it cannot be read as a file (even by root)
    with caplog.at_level(logging.WARNING, logger="serving.auth"):
        assert all(keys.check("alpha") for _ in range(5))
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert "alpha" not in caplog.text and "cannot be read" in caplog.text
    f.rmdir()
    f.write_text("beta\n")  # readable again: new keys, and a later failure warns again
    assert keys.check("beta") and not keys.check("alpha")
    f.unlink()
    f.mkdir()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="serving.auth"):
        assert keys.check("beta")
    assert len(caplog.records) == 1


def test_a_deleted_file_revokes_its_keys_and_the_env_keys_stay(tmp_path, caplog):
    """Issue 22: deleting the keys file used to keep its keys (revocation by deletion did nothing)."""
    f = tmp_path / "keys"
    f.write_text("alpha\n")
    keys = ApiKeys(["envkey"], f, reload_interval_s=0)
    assert keys.check("alpha")
    f.unlink()
    with caplog.at_level(logging.WARNING, logger="serving.auth"):
        assert not keys.check("alpha") and keys.check("envkey") and not keys.check("alpha")
    assert [r.levelname for r in caplog.records] == ["WARNING"]  # once
    assert "is gone: its 1 key(s) are revoked, the 1 key(s) of api_keys stay" in caplog.text and "alpha" not in caplog.text
    only_file = tmp_path / "only"
    only_file.write_text("solo\n")
    alone = ApiKeys([], only_file, reload_interval_s=0)
    only_file.unlink()
    assert alone.enabled and not alone.check("solo")  # still on: nobody gets in
    f.write_text("beta\n")  # back: read again
    assert keys.check("beta") and not keys.check("alpha")


def test_a_byte_order_mark_is_dropped(tmp_path):
    f = tmp_path / "keys"
    f.write_bytes(b"\xef\xbb\xbfalpha\r\n# cl\xc3\xa9 de l'\xc3\xa9quipe\r\nbeta\r\n")  # as Windows Notepad saves it
    keys = ApiKeys([], f)
    assert keys.check("alpha") and keys.check("beta") and not keys.check("\ufeffalpha")


@pytest.mark.parametrize("content, line, flaw", [
    ("alpha\ncl\u00e9-secr\u00e8te\n", 2, "a non-ASCII character"),
    ("# keys\n\nalpha\nsecret part\n", 4, "a space or tab inside"),
    ("alpha\nsecret\x1bpart\n", 2, "a control character"),
    ("alpha\nsecret\u2028part\n", 2, "a non-ASCII character"),
    ("alpha\n\ufeffsecretpart\n", 2, "a non-ASCII character"),
    (b"alpha\nbeta\nsecret\xffpart\n", 3, None),
])
def test_impossible_keys_are_refused_at_start_and_on_reload(tmp_path, caplog, content, line, flaw):
    """Issue 22: a key no client can present (non-ASCII: headers are Latin-1, gRPC metadata ASCII;
    whitespace or control characters inside) was accepted and silently never matched. At start it
    is an error; on a reload the previous keys stay, with an ERROR naming the line, never the key."""
    f = tmp_path / "keys"
    write = f.write_bytes if isinstance(content, bytes) else lambda c: f.write_text(c, encoding="utf-8")
    write(content)
    with pytest.raises(RuntimeError) as e:
        ApiKeys([], f)
    message = str(e.value)
    assert f"line {line}" in message and (flaw is None or flaw in message) and "secret" not in message
    if flaw is None:
        assert "not valid UTF-8" in message
    f.write_text("alpha\nbeta\n")
    keys = ApiKeys([], f, reload_interval_s=0)
    write(content)
    bump(f)
    with caplog.at_level(logging.INFO, logger="serving.auth"):
        assert keys.check("alpha") and keys.check("beta")  # the previous keys stay
        assert keys.check("alpha")  # the same version is not read (nor logged) again
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and f"line {line}" in errors[0].getMessage() and "not applied" in errors[0].getMessage()
    assert "secret" not in caplog.text
    f.write_text("gamma\n")  # fixed: applied
    bump(f, 20)
    assert keys.check("gamma") and not keys.check("alpha")


def test_impossible_env_keys_are_refused_at_start():
    with pytest.raises(RuntimeError, match="api_keys: key 2 .* has a non-ASCII character") as e:
        ApiKeys.from_settings(Settings(_env_file=None, api_keys="k1,cl\u00e9"))
    assert "cl\u00e9" not in str(e.value)
    with pytest.raises(RuntimeError, match="key 1 .* a space or tab inside"):
        ApiKeys(["in side"])


def test_key_from_headers():
    assert key_from_headers([(b"authorization", b"Bearer k1")]) == "k1"
    assert key_from_headers([(b"authorization", b"bEaReR   k1 ")]) == "k1"
    assert key_from_headers([(b"x-api-key", b"k2")]) == "k2"
    assert key_from_headers([(b"authorization", b"Basic abc"), (b"x-api-key", b"k2")]) == "k2"
    assert key_from_headers([(b"x-api-key", b"k2"), (b"authorization", b"Bearer k1")]) == "k1"
    assert key_from_headers((("authorization", "Bearer k1"), ("user-agent", "grpc"))) == "k1"
    assert key_from_headers((("x-api-key", "k2"),)) == "k2"
    assert key_from_headers([(b"authorization", b"Bearer")]) is None
    assert key_from_headers([]) is None and key_from_headers(None) is None


# --- REST middleware, served by uvicorn ----------------------------------------------------


@contextmanager
def uvicorn_server(app):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=20, interval=0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def rest_app():
    async def hello(request):
        return PlainTextResponse(f"hello {request.method}")

    inner = Starlette(routes=[Route("/v1/x", hello, methods=["GET", "POST", "OPTIONS"]), Route("/healthz", hello),
                              Route("/v2/models/x/infer", hello, methods=["POST"])])
    rejected = []
    app = ApiKeyMiddleware(inner, ApiKeys(["k1", "k2"]), public_paths=["/healthz"], on_reject=rejected.append)
    with uvicorn_server(app) as url:
        yield url, rejected


def test_rest_missing_or_wrong_key_is_401(rest_app):
    url, rejected = rest_app
    rejected.clear()
    for headers, message in [({}, MISSING), ({"x-api-key": "nope"}, "invalid API key"),
                             ({"authorization": "Bearer nope"}, "invalid API key"), ({"authorization": "Basic azE="}, MISSING)]:
        r = httpx.post(url + "/v1/x", headers=headers, json={})
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.headers["content-type"] == "application/json"
        assert r.json() == {"error": {"code": "UNAUTHENTICATED", "message": message}}
        assert "nope" not in r.text
    assert rejected == ["/v1/x"] * 4


def test_rest_v2_paths_get_the_open_inference_protocol_error_shape(rest_app):
    url, rejected = rest_app
    rejected.clear()
    r = httpx.post(url + "/v2/models/x/infer", json={})
    assert (r.status_code, r.headers["www-authenticate"]) == (401, "Bearer")
    assert r.json() == {"error": MISSING}  # what tritonclient and the kserve client read
    assert httpx.post(url + "/v2/models/x/infer", headers={"x-api-key": "k1"}).text == "hello POST"
    assert rejected == ["/v2/models/x/infer"]


def test_rest_valid_key_public_path_and_options_pass(rest_app):
    url, _ = rest_app
    assert httpx.post(url + "/v1/x", headers={"authorization": "Bearer k1"}).text == "hello POST"
    assert httpx.post(url + "/v1/x", headers={"Authorization": "bearer k2"}).status_code == 200
    assert httpx.get(url + "/v1/x", headers={"x-api-key": "k2"}).text == "hello GET"
    assert httpx.get(url + "/healthz").text == "hello GET"
    assert httpx.options(url + "/v1/x").text == "hello OPTIONS"


def test_rest_disabled_passes_everything():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    transport = httpx.ASGITransport(app=ApiKeyMiddleware(app, ApiKeys([]), public_paths=[]))

    async def get():
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/anything")

    assert asyncio.run(get()).text == "ok"


# --- gRPC interceptor, served by grpc.aio ---------------------------------------------------

UNARY, STREAM = "/test.Echo/Unary", "/test.Echo/Stream"


@pytest.fixture(scope="module")
def grpc_target():
    async def unary(request, context):
        return b"echo:" + request

    async def stream(requests, context):
        async for r in requests:
            yield b"echo:" + r

    loop = asyncio.new_event_loop()
    ready, stop = threading.Event(), None
    port = free_port()

    async def serve():
        nonlocal stop
        stop = asyncio.Event()
        interceptor = ApiKeyInterceptor(ApiKeys(["k1", "k2"]), Settings(_env_file=None).public_grpc_methods)
        server = grpc.aio.server(interceptors=[interceptor])
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream)})])
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await stop.wait()
        await server.stop(0)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(20)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)


def call(channel, metadata=None):
    """The unary and the stream-stream method, each with ``metadata``: their answers, or the error."""
    out = []
    try:
        out.append(channel.unary_unary(UNARY)(b"a", metadata=metadata, timeout=10))
    except grpc.RpcError as e:
        out.append(e)
    try:
        out.append(list(channel.stream_stream(STREAM)(iter([b"b", b"c"]), metadata=metadata, timeout=10)))
    except grpc.RpcError as e:
        out.append(e)
    return out


@pytest.mark.parametrize("metadata, details", [(None, MISSING), ((("x-api-key", "nope"),), "invalid API key"),
                                               ((("authorization", "Bearer nope"),), "invalid API key")])
def test_grpc_without_valid_key_is_unauthenticated(grpc_target, metadata, details):
    for e in call(grpc_target, metadata):
        assert isinstance(e, grpc.RpcError), e
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and e.details() == details


@pytest.mark.parametrize("metadata", [(("authorization", "Bearer k1"),), (("authorization", "bearer k2"),), (("x-api-key", "k2"),)])
def test_grpc_with_valid_key_is_ok(grpc_target, metadata):
    assert call(grpc_target, metadata) == [b"echo:a", [b"echo:b", b"echo:c"]]


def test_grpc_health_is_public_and_unknown_methods_reveal_nothing(grpc_target):
    stub = health_pb2_grpc.HealthStub(grpc_target)
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        grpc_target.unary_unary("/test.Echo/Nope")(b"x", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        grpc_target.unary_unary("/test.Echo/Nope")(b"x", metadata=(("x-api-key", "k1"),), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


# --- End to end through the gateway (needs the wiring in serving/api/rest/app.py and serving/api/grpc/server.py) ---


def test_gateway_requires_keys():
    from serving.gen.classifier.v1 import classifier_pb2 as pb
    from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc

    with gateway_process(api_keys="k1,k2", models="[\"sentiment_lstm\"]", docs_public="false") as gw:
        for path in ("/docs", "/redoc", "/openapi.json"):  # docs_public false: the docs need a key too
            assert httpx.get(gw.rest + path, timeout=30).status_code == 401, path
        assert httpx.get(gw.rest + "/openapi.json", headers={"x-api-key": "k1"}, timeout=30).status_code == 200
        body = {"texts": ["good"]}
        r = httpx.post(gw.rest + "/v1/sentiment:predict", json=body, timeout=30)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "UNAUTHENTICATED" and r.headers["www-authenticate"] == "Bearer"
        r = httpx.post(gw.rest + "/v1/sentiment:predict", json=body, headers={"x-api-key": "k2"}, timeout=30)
        assert r.status_code == 200, r.text
        assert httpx.get(gw.rest + "/healthz").status_code == 200

        with grpc.insecure_channel(gw.grpc) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            with pytest.raises(grpc.RpcError) as e:
                stub.ClassifySentiment(pb.SentimentRequest(texts=["good"]), timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            answer = stub.ClassifySentiment(pb.SentimentRequest(texts=["good"]), metadata=(("authorization", "Bearer k1"),), timeout=30)
            assert len(answer.predictions) == 1
            health_stub = health_pb2_grpc.HealthStub(channel)
            assert health_stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING


def gateway_log(gw) -> str:
    return gw.log_path.read_text(encoding="utf-8") if gw.log_path else ""


def test_gateway_key_file_bom_reload_and_deletion_over_rest_and_grpc(tmp_path):
    """Issue 22, end to end on both servers: the first key of a file with a byte-order mark works;
    a change with an impossible key is not applied (the previous keys stay; an ERROR names the
    line, not the key); deleting the file revokes its keys within a second while the
    CLASSIFIER_API_KEYS ones stay; a file put back is read again."""
    from serving.gen.classifier.v1 import classifier_pb2 as pb
    from serving.gen.classifier.v1 import classifier_pb2_grpc as pb_grpc

    f = tmp_path / "keys"
    f.write_bytes(b"\xef\xbb\xbfalpha\nbeta\n")
    with gateway_process(api_keys="envkey", api_keys_file=f, models='["sentiment_lstm"]') as gw, \
            grpc.insecure_channel(gw.grpc) as channel, httpx.Client(base_url=gw.rest, timeout=10) as client:
        stub = pb_grpc.ClassifierStub(channel)

        def rest(key):
            return client.get("/v1/models", headers={"x-api-key": key}).status_code

        def grpc_ok(key):
            try:
                stub.ClassifySentiment(pb.SentimentRequest(texts=["good"]), timeout=10,
                                       metadata=(("authorization", f"Bearer {key}"),))
                return True
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
                return False

        assert rest("alpha") == 200 and grpc_ok("alpha") and rest("envkey") == 200 and rest("nope") == 401

        f.write_text("beta\ngamma\ncl\u00e9-secr\u00e8te\n", encoding="utf-8")  # line 3 cannot be a key
        # (the file is checked when a key is, at most once a second)
        wait_until(lambda: rest("alpha") == 200 and "is not applied" in gateway_log(gw), timeout=10, interval=0.1)
        assert rest("alpha") == 200 and grpc_ok("alpha") and rest("gamma") == 401 and not grpc_ok("gamma")
        log = gateway_log(gw)
        assert "line 3: the key has a non-ASCII character" in log and "secr" not in log

        f.unlink()  # revoked: only the environment's key is left
        wait_until(lambda: rest("beta") == 401, timeout=10, interval=0.1)
        assert not grpc_ok("beta") and rest("alpha") == 401 and rest("envkey") == 200 and grpc_ok("envkey")
        assert "is gone: its 2 key(s) are revoked, the 1 key(s) of api_keys stay" in gateway_log(gw)

        f.write_text("omega\n")  # back (valid): read again
        wait_until(lambda: rest("omega") == 200, timeout=10, interval=0.1)
        assert grpc_ok("omega") and rest("beta") == 401 and not grpc_ok("alpha")
        log = gateway_log(gw)
    assert not any(k in log for k in ("alpha", "beta", "gamma", "omega", "envkey"))


def test_gateway_refuses_to_start_with_an_impossible_key(tmp_path):
    """As with a missing keys file: a key no client could present stops the start, naming the line."""
    f = tmp_path / "keys"
    f.write_text("alpha\nsecret part\n")
    env = {**os.environ, "CLASSIFIER_API_KEYS_FILE": str(f), "CLASSIFIER_MODELS": '["sentiment_lstm"]',
           "CLASSIFIER_HOST": "127.0.0.1", "CLASSIFIER_REST_PORT": str(free_port()),
           "CLASSIFIER_GRPC_PORT": str(free_port())}
    try:  # it stops before loading anything (under a second); a gateway that serves runs on
        done = subprocess.run([sys.executable, "-m", "serving"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=15)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the gateway started with an impossible key: {e.stderr!s:.2000}")
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert f"api_keys_file {f}: line 2: the key has a space or tab inside" in out and "secret" not in out
