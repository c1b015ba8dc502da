"""The HTTP service: a FastAPI app over one Matcher (``nem-llm serve``, ``create_app``).

Endpoints::

    POST   /v1/match            one query (-> MatchResult) or a list (-> list, input order)
    POST   /v1/match:stream     NDJSON, one MatchResult a line as each finishes (``index`` kept)
    POST   /v1/entities         add entities (when the Matcher has an incremental index)
    PUT    /v1/entities         replace entities by id (same)
    DELETE /v1/entities/{id}    remove one entity (same)
    GET    /healthz             alive
    GET    /readyz              index built and the LLM reachable (or not configured)
    GET    /metrics             Prometheus text format
    GET    /docs                OpenAPI (the response models are nem_llm's public models)

One Matcher serves every request, so concurrent requests share its micro-batcher and its
governor (one RPM/TPM budget, one 429 cooldown): 200 clients of one query each become
micro-batches of ~100 queries (``nem_llm_embed_texts / nem_llm_embed_batches`` in
``/metrics``). With ``api_key`` set, ``/v1/*`` and ``/metrics`` need ``Authorization:
Bearer <key>`` (compared in constant time); the probes and the docs stay open. Request
limits answer 413 (body) or 422 (queries, query length) with ``{"error": {"type",
"field", "message"}}``. A client that disconnects cancels its work (and so its LLM calls);
on shutdown in-flight requests drain up to ``ServiceLimits.drain_timeout`` and are
cancelled after. Secrets (the LLM client's API key and the bearer token) are replaced by
``[redacted]`` in every response body and log line.

The modules, one job each: ``limits`` (what a request may ask), ``schemas`` (the bodies),
``errors`` (error answers), ``redaction`` (secrets), ``metrics`` (Prometheus), ``health``
(the LLM probe), ``state`` (what one app holds), ``guard`` (the ASGI middleware: auth, body,
disconnects), ``routes`` (the endpoints), ``app`` (:func:`create_app`) and ``server``
(:func:`server_config`).

Example:
    >>> app = create_app(Matcher("entities.jsonl"), api_key="s3cret")  # doctest: +SKIP
    >>> uvicorn.run(app)                                               # doctest: +SKIP
"""

from __future__ import annotations

from ..._gc import tune_gc
from .app import create_app
from .limits import ServiceLimits
from .schemas import (
    EntitiesRequest,
    ErrorResponse,
    MatchRequest,
    ReadyStatus,
    StreamRequest,
)
from .server import server_config

__all__ = [
    "EntitiesRequest",
    "ErrorResponse",
    "MatchRequest",
    "ReadyStatus",
    "ServiceLimits",
    "StreamRequest",
    "create_app",
    "server_config",
    "tune_gc",
]
