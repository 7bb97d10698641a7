"""The web UI at ``/``: a chat (streaming, Markdown, a stop button, sampling settings) and a live view of the
cluster (each device's windows, mode, memory, tokens/s and link; the plan's predicted against measured
ms/token; a re-plan as it happens).

Static files in the package (``homering/api/static``: ``index.html``, ``app.js``, ``style.css``, its own small
Markdown renderer), no build step and nothing from a CDN. The page itself is open (it holds no secret); what
it reads and sends goes through the API with the key it asks for once and keeps in the browser's
``localStorage``: ``POST /v1/chat/completions`` (streamed) and ``GET /v1/cluster`` (polled every second).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
"""The page's files, installed with the package (pyproject's package data)."""


def install(app: FastAPI) -> None:
    """Serve ``GET /`` (the page) and ``GET /ui/<file>`` (its script and style) from ``app``, outside the
    OpenAPI document."""
    routes = APIRouter(include_in_schema=False)

    @routes.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @routes.get("/ui")
    async def ui() -> RedirectResponse:
        return RedirectResponse("/")

    app.include_router(routes)
    app.mount("/ui", StaticFiles(directory=STATIC), name="ui")
