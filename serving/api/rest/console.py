"""The console at ``/``: one static page and its two assets, packaged in ``serving/console/``
(no CDN, no build step: it works offline and air-gapped). The page itself only reads the
public API: ``/v1/models``, ``/metrics``, ``/v1/*:predict`` with ``explain``, and
``/console/config.json`` (whether it must ask for an API key)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse

CONSOLE_DIR = Path(__file__).resolve().parents[2] / "console"
ASSETS = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
# Static, no data: served without a key even when API keys are on.
PUBLIC_PATHS = ("/", "/console/config.json", *(f"/console/{name}" for name in ASSETS))
HEADERS = {
    # Everything from this origin only; no inline script or style.
    "content-security-policy": "default-src 'self'; img-src 'self' data:; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def add_console_routes(app: FastAPI, api_keys_on: Callable[[], bool]) -> None:
    @app.get("/", include_in_schema=False)
    async def console_page():
        return FileResponse(CONSOLE_DIR / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)

    @app.get("/console/config.json", include_in_schema=False)
    async def console_config():
        return JSONResponse({"api_keys": api_keys_on()}, headers=HEADERS)

    for name, media_type in ASSETS.items():
        app.add_api_route(f"/console/{name}", _asset(CONSOLE_DIR / name, media_type), methods=["GET"],
                          include_in_schema=False)


def _asset(path: Path, media_type: str):
    """An endpoint serving one fixed file. It takes no parameters: FastAPI would read any
    parameter (defaults included) from the query string."""
    async def serve():
        return FileResponse(path, media_type=media_type, headers=HEADERS)

    return serve
