"""What an operator allows one request: sizes, options, time (:class:`ServiceLimits`)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from .errors import ApiError

__all__ = ["ServiceLimits", "check_queries", "check_where"]


@dataclass(frozen=True, kw_only=True)
class ServiceLimits:
    """Request limits and the shutdown drain of the HTTP service.

    Example:
        >>> ServiceLimits(max_queries=100, max_query_chars=500).max_body_bytes
        1048576

    Args:
        max_body_bytes: larger request bodies are answered 413 (field ``body``).
        max_queries: more queries in one request are answered 422 (field ``query``/``queries``).
        max_query_chars: a longer query is answered 422 naming it (``query[3]``).
        drain_timeout: seconds in-flight requests may run on after shutdown starts.
        max_explain_concurrency: explanations of a list computed at once.
    """

    max_body_bytes: int = 1_048_576
    max_queries: int = 1_000
    max_query_chars: int = 2_000
    drain_timeout: float = 30.0
    max_explain_concurrency: int = 64

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_queries", "max_query_chars", "max_explain_concurrency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if not self.drain_timeout >= 0:
            raise ConfigError(f"drain_timeout must be >= 0, got {self.drain_timeout!r}")


def check_queries(queries: list[str], name: str, limits: ServiceLimits) -> None:
    """Refuse more queries than allowed, or one too long (a 422 naming it: ``query[3]``)."""
    if len(queries) > limits.max_queries:
        raise ApiError(
            422,
            "too_many_queries",
            f"{len(queries)} queries in one request; at most {limits.max_queries}",
            name,
        )
    for i, q in enumerate(queries):
        if len(q) > limits.max_query_chars:
            raise ApiError(
                422,
                "query_too_long",
                f"query of {len(q)} characters; at most {limits.max_query_chars}",
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
