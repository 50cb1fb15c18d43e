"""Run the gateway: REST (uvicorn) and gRPC in one process and one event loop.

    python -m serving            # REST on :8000, gRPC on :50051 (see serving/settings.py)
    python -m serving check-config FILE [--previous F] [--traffic F] [--models DIR]
                                 # would the gateway apply this models.config? (exit 0/1)
    python -m serving pull SOURCE DEST --models-config FILE [--watch SECONDS]
                                 # copy the versions models.config names from s3://, gs:// or a
                                 # folder into DEST, atomically per version (serving/pull.py)

On SIGTERM (or SIGINT) it drains as an orchestrator expects: /readyz answers
503 and gRPC health NOT_SERVING at once; new work is still taken for
``drain_settle_s`` (while load balancers take the pod out); then both
listeners close (a proxy in front tries another gateway) and, a moment later,
new work on connections still open is refused with 503/UNAVAILABLE; requests in flight and queued finish within
``drain_timeout_s`` (whatever is left then is answered 503, never dropped
silently); then both servers stop and the process exits 0. A second signal
exits at once.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import uvicorn

from serving.auth import ApiKeys
from serving.backends import Backend, make_backend
from serving.api.rest.connections import guarded_protocol
from serving.core import Classifier
from serving.api.grpc.server import GrpcServer
from serving.api.rest.hot_path import create_asgi
from serving.settings import Settings
from serving import tracing

log = logging.getLogger("serving")


class _Server(uvicorn.Server):
    """uvicorn's server, with SIGTERM/SIGINT handed to the gateway's drain."""

    def __init__(self, config: uvicorn.Config, on_signal):
        super().__init__(config)
        self._on_signal = on_signal
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None):
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame):  # runs in the signal handler: hand over to the loop
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._on_signal)
        else:
            self.should_exit = True


DRAIN_LINGER_S = 0.2  # after the drain: answers still go out, no new connection is taken
LISTENERS_CLOSED_S = 0.1  # between closing the listeners and refusing new work on open connections
FD_RESERVE = 256  # file descriptors kept for model files, logs, TF Serving channels, the listeners


def fit_connection_caps(settings: Settings) -> Settings:
    """The settings with both ports' connection caps (max_connections, grpc_max_connections) lowered,
    with a WARNING, so that together they fit the process' file-descriptor limit (first raised to
    its hard limit) less FD_RESERVE: a flood of connections then meets a cap, never the fd limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    rest, grpc_ = settings.max_connections, settings.grpc_max_connections
    if soft == resource.RLIM_INFINITY or rest + grpc_ + FD_RESERVE <= soft:
        return settings
    room = max(32, soft - FD_RESERVE)
    fitted = {"max_connections": max(16, room * rest // (rest + grpc_)),
              "grpc_max_connections": max(16, room * grpc_ // (rest + grpc_))}
    log.warning("file descriptor limit %d (ulimit -n) is below max_connections=%d + grpc_max_connections=%d + %d "
                "in reserve: caps lowered to %s", soft, rest, grpc_, FD_RESERVE, fitted)
    return settings.model_copy(update=fitted)


class Gateway:
    """Both servers over one core. ``await run()`` serves until ``stop()`` or a signal (then drains)."""

    def __init__(self, settings: Settings, backend: Backend | None = None):
        self.settings = s = settings = fit_connection_caps(settings)
        self.core = Classifier(settings, backend or make_backend(settings))
        keys = ApiKeys.from_settings(settings)
        self.grpc = GrpcServer(self.core, keys)
        tls = {}
        if s.tls_cert_file and s.tls_key_file:
            tls = {"ssl_certfile": str(s.tls_cert_file), "ssl_keyfile": str(s.tls_key_file)}
        config = uvicorn.Config(
            create_asgi(self.core, keys), host=s.host, port=s.rest_port, log_config=None, log_level="warning",
            access_log=False, proxy_headers=False, lifespan="off", timeout_graceful_shutdown=5,
            timeout_keep_alive=s.http_keepalive_timeout_s, http=guarded_protocol(s), **tls,
        )
        self.http = _Server(config, self.request_stop)
        self._drain_task: asyncio.Task | None = None
        self._grpc_stopping: asyncio.Future | None = None

    def _grpc_credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if not (s.tls_cert_file and s.tls_key_file):
            return None
        return grpc.ssl_server_credentials([(s.tls_key_file.read_bytes(), s.tls_cert_file.read_bytes())])

    async def run(self) -> None:
        await self.core.start()
        s = self.settings
        port = await self.grpc.start(f"{s.host}:{s.grpc_port}", self._grpc_credentials())
        log.info("REST on %s:%s, gRPC on %s:%s%s", s.host, s.rest_port, s.host, port,
                 " (TLS)" if s.tls_cert_file else "")
        try:
            await self.http.serve()
        finally:
            await self.grpc.stop(grace=1)
            if self._grpc_stopping is not None:
                # The drain's stop (grace drain_timeout_s) ends with the one above: a stream still
                # open (a health Watch) got 1 s. Awaited so that no task outlives the gateway.
                await asyncio.wait([self._grpc_stopping], timeout=2)
            await self.core.stop()
            await asyncio.to_thread(tracing.flush)  # the spans still buffered (tracing on), at most 2 s
            log.info("stopped")

    def request_stop(self) -> None:
        """First call: drain, then exit. A second call: exit now."""
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self.drain())
        else:
            log.warning("second stop signal: exiting without waiting for the drain")
            self.http.should_exit = self.http.force_exit = True

    async def drain(self) -> None:
        s = self.settings
        log.info("draining: not ready now, refusing new work in %gs, finishing work within %gs after that",
                 s.drain_settle_s, s.drain_timeout_s)
        self.core.begin_drain()
        await self.grpc.drain()
        await asyncio.sleep(s.drain_settle_s)
        # First no new connection and no new gRPC call: both listeners close, and gRPC's connections
        # get GOAWAY, so a proxy in front (nginx, which cannot resend a gRPC call answered UNAVAILABLE
        # in trailers) fails to connect and tries another gateway. From now on every REST answer closes
        # its connection, so no client sends another request on a connection about to close (that one
        # would get a reset, not an answer).
        self.http.config.http.closing = True
        for server in getattr(self.http, "servers", ()):
            server.close()
        self._grpc_stopping = asyncio.ensure_future(self.grpc.stop(grace=s.drain_timeout_s))
        # What was accepted just before is still served (not refused: a request whose connection was
        # accepted an instant before the listener closed is as much the gateway's as any in flight) ...
        await asyncio.sleep(LISTENERS_CLOSED_S)
        # ... then new work on connections still open is refused (503 / UNAVAILABLE).
        self.core.stop_accepting()
        if not await self.core.wait_idle(s.drain_timeout_s):
            log.warning("drain_timeout_s=%g passed with %d request(s) in flight: answering them 503",
                        s.drain_timeout_s, self.core.active)
            await self.core.stop()
            await self.core.wait_idle(2)
        # A last moment for requests already on their way over open connections to get their 503 (and
        # gRPC calls their UNAVAILABLE) before idle connections close.
        await asyncio.sleep(DRAIN_LINGER_S)
        self.http.should_exit = True  # run() ends the gRPC stop begun above

    def stop(self) -> None:
        """Exit without draining (tests)."""
        self.http.should_exit = True


def main() -> None:
    import sys

    if sys.argv[1:2] == ["check-config"]:
        from serving.model_config import check_main

        sys.exit(check_main(sys.argv[2:]))
    if sys.argv[1:2] == ["pull"]:
        from serving.pull import main as pull_main

        sys.exit(pull_main(sys.argv[2:]))
    from serving.logs import setup_logging

    settings = Settings()
    setup_logging(settings)
    try:  # OpenTelemetry tracing: on with OTEL_TRACES_EXPORTER=otlp (serving/tracing.py)
        tracing.configure()
    except ValueError as e:
        log.error("tracing: %s", e)
        sys.exit(2)
    sys.setswitchinterval(settings.gil_switch_interval_s)
    if settings.event_loop == "uvloop":
        import uvloop

        uvloop.run(Gateway(settings).run())
    else:
        asyncio.run(Gateway(settings).run())


if __name__ == "__main__":
    main()
