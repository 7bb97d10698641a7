"""Window files for agents without the model (see :mod:`homering.transport.windows`, the client side).

``GET /v1/windows/<sha256>``: a window file of the current plan, or a probe window, by its SHA-256 (404 for
any other); ``GET /v1/windows/probe/<start>-<end>-<role>``: slices a probe window the profiler may use and
answers its :class:`~homering.wire.WindowFile` (its file is then served by SHA-256).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from fastapi import APIRouter
from fastapi.params import Depends
from fastapi.responses import FileResponse

from homering.api.errors import ApiError
from homering.api.responses import error
from homering.api.view import ClusterView
from homering.wire import SHA256, WINDOWS_PATH, WindowFile


def router(view: ClusterView, *, auth: Sequence[Depends] = ()) -> APIRouter:
    """The window routes of ``view``'s cluster, behind ``auth``."""
    routes = APIRouter(dependencies=list(auth))

    @routes.get(
        f"/v1{WINDOWS_PATH}/probe/{{label}}",
        response_model=None,
        responses={
            200: {"model": WindowFile, "description": "the probe window, sliced (its file is then served by sha256)"},
            404: error("not a probe window of this model"),
            500: error("the window could not be sliced"),
        },
    )
    async def probe_window(label: str):
        wf = await view.probe_window(label)
        if wf is None:
            raise ApiError(404, f"'{label}' is not a probe window of this model", code="window_not_found")
        return wf.model_dump()

    @routes.get(
        f"/v1{WINDOWS_PATH}/{{sha256}}",
        response_class=FileResponse,
        responses={
            200: {
                "description": "the window file (GGUF)",
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            },
            404: error("no window file of the current plan (or probe window) has this sha256"),
        },
    )
    async def window(sha256: str):
        path = view.window_file(sha256) if re.fullmatch(SHA256, sha256) else None
        if path is None:
            raise ApiError(404, "no window file of the current plan has this sha256", code="window_not_found")
        return FileResponse(path, media_type="application/octet-stream", filename=f"{sha256}.gguf")

    return routes
