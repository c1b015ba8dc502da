"""What an operator allows one request: sizes, options, time (:class:`ServiceLimits`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import ConfigError
from ...models import Entity
from .errors import ApiError

__all__ = ["ServiceLimits", "check_aliases", "check_options", "check_queries", "check_where"]


@dataclass(frozen=True, kw_only=True)
class ServiceLimits:
    """What the operator allows one request: size, options and time; and the drain.

    Example:
        >>> ServiceLimits(max_queries=100, max_top_k=20).max_body_bytes
        1048576

    Args:
        max_body_bytes: larger request bodies are answered 413 (field ``body``).
        max_queries: more queries in one request are answered 422 (field ``query``/``queries``).
        max_query_chars: a longer query is answered 422 naming it (``query[3]``).
        max_top_k: the largest ``top_k`` a request may ask for (``None``: the matcher's
            own ``top_k``, so a request can lower it, never raise its cost); above it the
            request is refused (422 naming ``top_k`` and this limit).
        allow_request_thresholds: whether a request may set its own ``threshold`` (which
            can send any query to the LLM); off, such a request is refused (422).
        max_aliases: aliases one entity of an entity write may carry (else 422 naming it).
        deadline: seconds one request may take; a query not decided by then is an
            ``error`` result with ``error_type="deadline"`` (its LLM call is cancelled).
        header_timeout: seconds a connection may take to send a request's headers (then
            408 and the connection is closed).
        body_timeout: seconds a request may take to send its body (then 408).
        drain_timeout: seconds in-flight requests may run on after shutdown starts.
        max_explain_concurrency: explanations of a list computed at once.
        llm_failures: consecutive failed LLM calls (connection, timeout, 5xx, auth,
            deadline) after which ``/readyz`` answers 503 ...
        llm_failure_window: ... for this many seconds after the last of them (then
            traffic may come back to try again).
    """

    max_body_bytes: int = 1_048_576
    max_queries: int = 1_000
    max_query_chars: int = 2_000
    max_top_k: int | None = None
    allow_request_thresholds: bool = False
    max_aliases: int = 1_000
    deadline: float = 60.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    drain_timeout: float = 30.0
    max_explain_concurrency: int = 64
    llm_failures: int = 3
    llm_failure_window: float = 60.0

    def __post_init__(self) -> None:
        ints = (
            "max_body_bytes", "max_queries", "max_query_chars", "max_aliases",
            "max_explain_concurrency", "llm_failures",
        )  # fmt: skip
        for name in ints:
            _check_int(name, getattr(self, name))
        if self.max_top_k is not None:
            _check_int("max_top_k", self.max_top_k)
        for name in ("deadline", "header_timeout", "body_timeout", "llm_failure_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"{name} must be a number of seconds > 0, got {value!r}")
        if not self.drain_timeout >= 0:
            raise ConfigError(f"drain_timeout must be >= 0, got {self.drain_timeout!r}")
        if not isinstance(self.allow_request_thresholds, bool):
            raise ConfigError(
                f"allow_request_thresholds must be a bool, got {self.allow_request_thresholds!r}"
            )


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")


def check_queries(
    queries: Sequence[str | Mapping[str, Any]], name: str, limits: ServiceLimits
) -> None:
    """Refuse more queries than allowed, or one too long (a 422 naming it: ``query[3]``);
    a record's size is its text and its fields (as JSON)."""
    if len(queries) > limits.max_queries:
        raise ApiError(
            422,
            "too_many_queries",
            f"{len(queries)} queries in one request; at most {limits.max_queries}",
            name,
        )
    for i, q in enumerate(queries):
        size = len(q) if isinstance(q, str) else len(json.dumps(q, default=str))
        if size > limits.max_query_chars:
            raise ApiError(
                422,
                "query_too_long",
                f"query of {size} characters; at most {limits.max_query_chars}",
                f"{name}[{i}]",
            )


def check_where(where: object, queries: int, many: bool) -> None:
    """A list of filters needs a list of queries, one filter per query."""
    if not isinstance(where, list):
        return
    if not many:
        raise ApiError(
            422, "invalid_option", "one query takes one filter (an object), not a list", "where"
        )
    if len(where) != queries:
        raise ApiError(
            422, "invalid_option", f"{len(where)} filters for {queries} queries", "where"
        )


def check_options(
    top_k: int | None, threshold: float | None, limits: ServiceLimits, default_top_k: int
) -> None:
    """Refuse per-request options the operator does not allow (a 422 naming the option).

    ``top_k`` may go up to ``limits.max_top_k`` (unset: the matcher's own ``default_top_k``);
    ``threshold`` only with ``limits.allow_request_thresholds``.
    """
    cap = limits.max_top_k if limits.max_top_k is not None else default_top_k
    if top_k is not None and top_k > cap:
        raise ApiError(
            422,
            "limit_exceeded",
            f"top_k {top_k} is over this server's limit of {cap} (refused, not capped; "
            "the operator raises it with --max-top-k)",
            "top_k",
        )
    if threshold is not None and not limits.allow_request_thresholds:
        raise ApiError(
            422,
            "option_not_allowed",
            "this server does not take per-request thresholds (refused; the operator "
            "allows them with --allow-request-thresholds)",
            "threshold",
        )


def check_aliases(entities: Sequence[Entity], limits: ServiceLimits) -> None:
    """Refuse an entity with more aliases than allowed (a 422 naming it)."""
    for i, entity in enumerate(entities):
        if len(entity.aliases) > limits.max_aliases:
            raise ApiError(
                422,
                "too_many_aliases",
                f"entity {entity.id!r} has {len(entity.aliases)} aliases; at most "
                f"{limits.max_aliases} (--max-aliases)",
                f"entities[{i}].aliases",
            )
