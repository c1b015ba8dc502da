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
``/metrics``).

What a request may do is the operator's (:class:`ServiceLimits`): with ``api_key`` set,
``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <key>`` (constant-time compare;
the probes and the docs stay open), and with ``admin_key`` entity writes need that one;
off localhost, ``server_config`` refuses to serve without a key unless told
``insecure_no_auth``. A body is JSON whatever its declared Content-Type (anything else
is 415); it must arrive within ``body_timeout`` and its headers within
``header_timeout`` (408). Sizes answer 413 (body) or 422 (queries, query length,
aliases); ``top_k`` above ``max_top_k`` and a ``threshold`` the operator did not allow
are refused (422), never silently changed. Every error is ``{"error": {"type",
"message", "field"}}``. A request has ``deadline`` seconds: a query undecided by then is
an ``error`` result with ``error_type="deadline"`` (its LLM call cancelled).
``/readyz`` answers 503 while the index is being built, while the LLM probe gets no
answer (named as results name it: ``connection``, ``timeout``, ...) or after
``llm_failures`` LLM calls failed in a row. Entity writes are built aside and swapped in:
matching goes on meanwhile. A client that disconnects cancels its work (and so its LLM
calls); on shutdown in-flight requests drain up to ``drain_timeout`` and are answered 503
after. Secrets (the LLM client's API key and the bearer tokens) are replaced by
``[redacted]`` in every response body and log line (uvicorn's access log included).

The modules, one job each: ``limits`` (what a request may ask), ``schemas`` (the bodies),
``errors`` (error answers), ``redaction`` (secrets), ``metrics`` (Prometheus), ``health``
(the LLM probe and recent failures), ``state`` (what one app holds), ``guard`` (the ASGI
middleware: keys, bodies, disconnects, shutdown), ``routes`` (the endpoints), ``results``
(the NDJSON stream and the deadline), ``app`` (:func:`create_app`), ``server``
(:func:`server_config`, :func:`run_server`, :class:`GracefulServer`) and ``startup``
(which catalog to serve).

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
from .server import GracefulServer, run_server, server_config
from .startup import serving_catalog

__all__ = [
    "EntitiesRequest",
    "ErrorResponse",
    "GracefulServer",
    "MatchRequest",
    "ReadyStatus",
    "ServiceLimits",
    "StreamRequest",
    "create_app",
    "run_server",
    "server_config",
    "serving_catalog",
    "tune_gc",
]
