"""How ``nem-llm serve`` runs an app: the uvicorn configuration (:func:`server_config`)."""

from __future__ import annotations

import math

import uvicorn
from fastapi import FastAPI

__all__ = ["server_config"]


def server_config(
    app: FastAPI,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    drain_timeout: float | None = None,
    log_level: str = "info",
    access_log: bool = True,
) -> uvicorn.Config:
    """The uvicorn configuration ``nem-llm serve`` runs ``app`` with.

    On SIGTERM/Ctrl-C uvicorn stops accepting connections and lets in-flight requests
    finish for up to ``drain_timeout`` seconds (default: the app's
    ``ServiceLimits.drain_timeout``), then cancels them. ``access_log=False`` drops
    uvicorn's line per request (about a tenth of the server's CPU per single-query
    request, measured: ``/metrics`` counts requests either way).
    """
    if drain_timeout is None:
        drain_timeout = app.state.nem_llm.limits.drain_timeout
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=max(1, math.ceil(drain_timeout)),
        server_header=False,
    )
