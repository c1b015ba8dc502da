"""``nem-llm serve``: the catalog over HTTP (FastAPI + uvicorn)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ..errors import NemLLMError
from ..settings import MatcherSettings
from ._app import app, fail
from ._settings import with_settings

#: The flags of ``serve`` that are not settings: the catalog, the server and its limits.
SERVE_FLAGS = frozenset(
    {
        "catalog", "host", "port", "api_key_env", "max_body_bytes", "max_queries",
        "drain_timeout", "log_level", "access_log",
    }
)  # fmt: skip


@app.command()
# a query over HTTP is shorter than one in a file: 2,000 characters unless set
@with_settings(defaults={"max_query_chars": 2000})
def serve(
    catalog: Annotated[Path, typer.Option(help="Entities: JSONL or CSV (id, name, ...).")],
    settings: MatcherSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_env: Annotated[
        str | None,
        typer.Option(
            help="Require 'Authorization: Bearer <token>', the token read from this env var."
        ),
    ] = None,
    max_body_bytes: Annotated[
        int, typer.Option(help="Larger bodies are answered 413.")
    ] = 1_048_576,
    max_queries: Annotated[int, typer.Option(help="Queries per request (else 422).")] = 1000,
    drain_timeout: Annotated[
        float, typer.Option(help="Seconds in-flight requests may finish after SIGTERM.")
    ] = 30.0,
    log_level: str = "info",
    access_log: Annotated[
        bool, typer.Option(help="Log a line per request (off: ~10% less CPU per request).")
    ] = True,
) -> None:
    """Serve the catalog over HTTP (FastAPI + uvicorn; needs the `service` extra)."""
    try:
        import uvicorn

        from ..integrations.service import ServiceLimits, create_app, server_config
    except ImportError as exc:
        raise fail(f"{exc.name} is missing: pip install 'nem_llm[service]'") from None
    from ..matcher import Matcher

    token: str | None = None
    if api_key_env is not None:
        token = os.environ.get(api_key_env)
        if not token:
            raise fail(f"--api-key-env {api_key_env}: that environment variable is not set")
    if not catalog.is_file():
        raise fail(f"{catalog}: catalog file not found")
    try:
        service_limits = ServiceLimits(
            max_body_bytes=max_body_bytes,
            max_queries=max_queries,
            max_query_chars=settings.max_query_chars,
            drain_timeout=drain_timeout,
        )
        matcher = Matcher(catalog, settings)
    except (NemLLMError, ValueError) as exc:
        raise fail(str(exc)) from None
    service = create_app(
        matcher, api_key=token, limits=service_limits, close_matcher=True, tune_gc=True
    )
    config = server_config(
        service, host=host, port=port, log_level=log_level, access_log=access_log
    )
    uvicorn.Server(config).run()
