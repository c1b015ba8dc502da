"""``nem-llm serve``: the catalog over HTTP (FastAPI + uvicorn).

Example (JSON bodies are read as JSON whatever their declared Content-Type)::

    nem-llm serve --catalog entities.jsonl --index-dir idx/ --api-key-env NEM_KEY
    curl -H "Authorization: Bearer $NEM_KEY" -H 'Content-Type: application/json' \\
         -d '{"query": "USA"}' http://127.0.0.1:8000/v1/match
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ..errors import NemLLMError
from ..settings import MatcherSettings
from ._app import app, err, escape, fail
from ._settings import with_settings

#: The flags of ``serve`` that are not settings: the catalog, the server and its limits.
SERVE_FLAGS = frozenset(
    {
        "catalog", "host", "port", "api_key_env", "admin_key_env", "insecure_no_auth",
        "max_body_bytes", "max_queries", "max_top_k", "allow_request_thresholds",
        "max_aliases", "deadline", "header_timeout", "body_timeout", "drain_timeout",
        "log_level", "access_log",
    }
)  # fmt: skip


def _secret(flag: str, variable: str | None) -> str | None:
    """The value of the environment variable a ``--*-env`` flag names."""
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise fail(f"{flag} {variable}: that environment variable is not set")
    return value


@app.command()
# a query over HTTP is shorter than one in a file: 2,000 characters unless set
@with_settings(defaults={"max_query_chars": 2000})
def serve(
    settings: MatcherSettings,
    catalog: Annotated[
        Path | None,
        typer.Option(
            help="Entities: JSONL or CSV (id, name, ...). It seeds the index: once --index-dir "
            "holds one, the index's live catalog (entity changes included) is served."
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Off localhost, a key (--api-key-env) or --insecure-no-auth.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key_env: Annotated[
        str | None,
        typer.Option(
            help="Require 'Authorization: Bearer <token>', the token read from this env var."
        ),
    ] = None,
    admin_key_env: Annotated[
        str | None,
        typer.Option(help="Entity writes need this key (read from this env var) instead."),
    ] = None,
    insecure_no_auth: Annotated[
        bool, typer.Option(help="Serve off localhost without a key (anyone may write).")
    ] = False,
    max_body_bytes: Annotated[
        int, typer.Option(help="Larger bodies are answered 413.")
    ] = 1_048_576,
    max_queries: Annotated[int, typer.Option(help="Queries per request (else 422).")] = 1000,
    max_top_k: Annotated[
        int | None,
        typer.Option(help="Largest top_k a request may ask (default: --top-k; else 422)."),
    ] = None,
    allow_request_thresholds: Annotated[
        bool, typer.Option(help="Let a request set its own threshold (else 422).")
    ] = False,
    max_aliases: Annotated[
        int, typer.Option(help="Aliases per entity in an entity write (else 422).")
    ] = 1000,
    deadline: Annotated[
        float, typer.Option(help="Seconds per request; undecided queries: error 'deadline'.")
    ] = 60.0,
    header_timeout: Annotated[
        float, typer.Option(help="Seconds to send request headers (then 408, closed).")
    ] = 10.0,
    body_timeout: Annotated[
        float, typer.Option(help="Seconds to send a request body (then 408).")
    ] = 30.0,
    drain_timeout: Annotated[
        float, typer.Option(help="Seconds in-flight requests may finish after SIGTERM.")
    ] = 30.0,
    log_level: Annotated[
        str, typer.Option(help="uvicorn's log level: critical, error, warning, info, debug.")
    ] = "info",
    access_log: Annotated[
        bool, typer.Option(help="Log a line per request (off: ~10% less CPU per request).")
    ] = True,
) -> None:
    """Serve the catalog over HTTP (FastAPI + uvicorn; needs the `service` extra)."""
    try:
        from ..integrations.service import (
            ServiceLimits,
            create_app,
            run_server,
            server_config,
            serving_catalog,
        )
    except ImportError as exc:
        raise fail(f"{exc.name} is missing: pip install 'nem_llm[service]'") from None
    from ..matcher import Matcher

    token = _secret("--api-key-env", api_key_env)
    admin = _secret("--admin-key-env", admin_key_env)
    try:
        entities, note = serving_catalog(catalog, settings.index_dir)
        limits = ServiceLimits(
            max_body_bytes=max_body_bytes,
            max_queries=max_queries,
            max_query_chars=settings.max_query_chars,
            max_top_k=max_top_k,
            allow_request_thresholds=allow_request_thresholds,
            max_aliases=max_aliases,
            deadline=deadline,
            header_timeout=header_timeout,
            body_timeout=body_timeout,
            drain_timeout=drain_timeout,
        )
        matcher = Matcher(entities, settings)
        service = create_app(
            matcher, api_key=token, admin_key=admin, limits=limits, close_matcher=True, tune_gc=True
        )
        config = server_config(
            service,
            host=host,
            port=port,
            log_level=log_level,
            access_log=access_log,
            insecure_no_auth=insecure_no_auth,
        )
    except (NemLLMError, ValueError) as exc:
        raise fail(str(exc)) from None
    if note is not None:
        err.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    try:
        run_server(config)
    except NemLLMError as exc:  # the index could not be built: say why, exit non-zero
        raise fail(str(exc)) from None
