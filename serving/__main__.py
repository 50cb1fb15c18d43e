"""Run the gateway: REST (uvicorn) and gRPC in one process and one event loop.

    python -m serving            # REST on :8000, gRPC on :50051 (see serving/settings.py)
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from serving.backend import Backend, make_backend
from serving.core import Classifier
from serving.grpc_api import start_grpc
from serving.rest import create_app
from serving.settings import Settings

log = logging.getLogger("serving")


class Gateway:
    """Both servers over one core. ``await run()`` serves until ``stop()`` (or SIGINT/SIGTERM)."""

    def __init__(self, settings: Settings, backend: Backend | None = None):
        self.settings = settings
        self.core = Classifier(settings, backend or make_backend(settings))
        config = uvicorn.Config(
            create_app(self.core), host=settings.host, port=settings.rest_port, log_level="warning",
            access_log=False, lifespan="off", timeout_graceful_shutdown=10,
        )
        self.http = uvicorn.Server(config)

    async def run(self) -> None:
        await self.core.start()
        grpc_server, port, health_task = await start_grpc(self.core, f"{self.settings.host}:{self.settings.grpc_port}")
        log.info("REST on %s:%s, gRPC on %s:%s", self.settings.host, self.settings.rest_port, self.settings.host, port)
        try:
            await self.http.serve()
        finally:
            health_task.cancel()
            await grpc_server.stop(grace=5)
            await self.core.stop()

    def stop(self) -> None:
        self.http.should_exit = True


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    if settings.event_loop == "uvloop":
        import uvloop

        uvloop.run(Gateway(settings).run())
    else:
        asyncio.run(Gateway(settings).run())


if __name__ == "__main__":
    main()
