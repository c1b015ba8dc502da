"""The bodies the service reads and writes (the OpenAPI schema is built from these)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...models import Entity

__all__ = [
    "EntitiesChanged",
    "EntitiesRequest",
    "ErrorDetail",
    "ErrorResponse",
    "MatchOptions",
    "MatchRequest",
    "QueryItem",
    "QueryRecord",
    "ReadyStatus",
    "StreamRequest",
    "plain",
]


class MatchOptions(BaseModel):
    """The per-request options both match endpoints take (strict: ``"5"`` is not 5)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    top_k: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Candidates retrieved (at most the server's --max-top-k; else 422).",
    )
    threshold: float | None = Field(
        default=None,
        ge=0.0,
        allow_inf_nan=False,
        description="The accept threshold for this request (only where the server allows "
        "it: --allow-request-thresholds; else 422).",
    )
    where: dict[str, Any] | list[dict[str, Any] | None] | None = Field(
        default=None,
        description=(
            "Filter on entity attributes: a value (equality) or a list (membership). With a "
            "list of queries, also a list of filters (or nulls), one per query: a filter that "
            "fails makes its query an `error` result and leaves the others alone."
        ),
    )

    def matcher_options(self) -> dict[str, Any]:
        """The options that are set, as the Matcher's match methods take them."""
        options = {"top_k": self.top_k, "threshold": self.threshold, "where": self.where}
        return {name: value for name, value in options.items() if value is not None}


class QueryRecord(BaseModel):
    """A record query: its text (optional) and its fields, compared field by field."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(default="", description="The text (default: the fields' values).")
    attributes: dict[str, str | int | float | bool | None] = Field(
        description="The record's fields, named as the catalog's attributes."
    )


#: One query as a request carries it: a text, or a record.
QueryItem = str | QueryRecord


def plain(query: QueryItem) -> str | dict[str, Any]:
    """A request's query as the Matcher takes it."""
    return query.model_dump() if isinstance(query, QueryRecord) else query


class MatchRequest(MatchOptions):
    """Body of ``POST /v1/match``: one query or a list, and the options."""

    query: QueryItem | list[QueryItem] = Field(
        description="One query (a text, or a record with its fields), or a list (results in "
        "input order)."
    )
    explain: bool = Field(default=False, description="Return Explanations (route, reasons).")


class StreamRequest(MatchOptions):
    """Body of ``POST /v1/match:stream``: the queries and the options."""

    queries: list[QueryItem]


class EntitiesRequest(BaseModel):
    """Body of ``POST /v1/entities``."""

    model_config = ConfigDict(extra="forbid")

    entities: list[Entity] = Field(min_length=1)


class ErrorDetail(BaseModel):
    """What went wrong, and which field of the request (if one) caused it."""

    type: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """Every error answer of the service."""

    error: ErrorDetail


class ReadyStatus(BaseModel):
    """Body of ``GET /readyz``."""

    ready: bool
    index_built: bool
    llm: Literal["not_configured", "reachable", "unreachable", "failing"] = Field(
        description="``failing``: the last LLM calls failed (connection, timeout, 5xx, "
        "auth, deadline); ``unreachable``: the probe got no answer."
    )
    detail: str | None = None


class EntitiesChanged(BaseModel):
    """Body answering entity administration."""

    added: int = 0
    updated: int = 0
    removed: int = 0
