"""Pydantic value types that cross the public API."""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "Attempt",
    "AuditNote",
    "AuditRoute",
    "Calibration",
    "Candidate",
    "DecidedBy",
    "Diagnosis",
    "Entity",
    "Explanation",
    "FieldEvidence",
    "MatchResult",
    "MatchStatus",
    "RouteEstimate",
    "RunStats",
    "Usage",
]

MatchStatus = Literal["matched", "novel", "review", "error"]
DecidedBy = Literal["embedding", "llm", "cache", "human"]


class Entity(BaseModel):
    """One catalog entry: an id, a name, optional aliases, description and attributes.

    Example:
        >>> Entity(id="US", name="United States", aliases=["USA", "America"]).surface_forms()
        ['United States', 'USA', 'America']
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    description: str = ""
    attributes: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id", "name")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("aliases")
    @classmethod
    def _aliases_not_blank(cls, value: list[str]) -> list[str]:
        for i, alias in enumerate(value):
            if not alias.strip():
                raise ValueError(f"alias {i} is blank")
        return value

    def surface_forms(self, *, include_description: bool = False) -> list[str]:
        """The name followed by each distinct alias: the strings that get a vector.

        With ``include_description``, ``"name, description"`` is one more form: it lifts
        retrieval on record-like catalogs (people, restaurants, papers) where queries
        carry addresses or authors.
        """
        forms = [self.name]
        for alias in self.aliases:
            if alias not in forms:
                forms.append(alias)
        if include_description and self.description.strip():
            forms.append(f"{self.name}, {self.description}")
        return forms


class Candidate(BaseModel):
    """A catalog entity retrieved for a query, with its similarity score in [0, 1].

    ``entity_id`` names the entity as ``MatchResult.entity_id`` does; ``id`` is a
    deprecated alias kept for one release (reading it, or passing ``id=``, warns).
    """

    model_config = ConfigDict(frozen=True)

    entity_id: str
    name: str
    score: float
    dense_score: float | None = None
    lexical_score: float | None = None
    matched_form: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _old_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and "id" in data and "entity_id" not in data:
            warnings.warn(
                "Candidate(id=...) is deprecated: use entity_id=", DeprecationWarning, stacklevel=2
            )
            data = {("entity_id" if k == "id" else k): v for k, v in data.items()}
        return data

    @property
    def id(self) -> str:
        """Deprecated alias of :attr:`entity_id`."""
        warnings.warn(
            "Candidate.id is deprecated: use Candidate.entity_id", DeprecationWarning, stacklevel=2
        )
        return self.entity_id


class Usage(BaseModel):
    """Tokens spent; added up per attempt, per result and per run."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            cost_usd=self.cost_usd + other.cost_usd,
        )


class Attempt(BaseModel):
    """One try of one LLM call, as the governor saw it."""

    number: int
    outcome: Literal["ok", "retry", "failed", "cancelled"]
    error_type: str | None = None
    error: str | None = None
    status_code: int | None = None
    latency_s: float = 0.0
    waited_s: float = 0.0
    reasks: int = 0
    usage: Usage = Field(default_factory=Usage)


class FieldEvidence(BaseModel):
    """How the field model saw a record query's best candidate (``nem_llm.records``).

    ``prior_bits + sum(contributions.values())`` is the candidate's match weight in bits:
    the bars of a waterfall chart; ``levels`` says how each field compared.
    """

    entity_id: str | None
    probability: float
    none_probability: float
    prior_bits: float = 0.0
    contributions: dict[str, float] = Field(default_factory=dict)
    levels: dict[str, str] = Field(default_factory=dict)


class AuditNote(BaseModel):
    """An audited auto decision: what the LLM said of the same candidates."""

    route: Literal["matched", "novel"]
    llm_entity_id: str | None
    agrees: bool


class AuditRoute(BaseModel):
    """One auto route's audit so far: how many decisions the LLM checked, how many it
    agreed with, the agreement's one-sided 90% upper bound, and whether it closed."""

    audited: int = 0
    agreeing: int = 0
    agreement_upper_bound: float | None = None
    target: float = 1.0
    closed: bool = False


class MatchResult(BaseModel):
    """The answer for one query.

    ``status``: ``matched`` (``entity_id`` set), ``novel`` (not in the catalog), ``review``
    (ambiguous and nobody could decide: no LLM configured, budget spent), ``error`` (this
    item failed; ``error`` says why). ``decided_by`` says who decided (``human``: a
    reviewed label imported with ``nem-llm review import``).
    """

    query: str
    index: int = 0
    status: MatchStatus
    entity_id: str | None = None
    entity_name: str | None = None
    score: float | None = None
    decided_by: DecidedBy | None = None
    candidates: list[Candidate] = Field(default_factory=list)
    reason: str = ""
    confidence: float | None = None
    usage: Usage = Field(default_factory=Usage)
    attempts: list[Attempt] = Field(default_factory=list)
    error: str | None = None
    error_type: str | None = None
    latency_s: float = 0.0
    rewritten_as: list[str] = Field(default_factory=list)
    #: an audited auto decision (``audit_rate``): the LLM's answer and whether it agrees
    audit: AuditNote | None = None
    #: a record query: the field model's view of its best candidate
    fields: FieldEvidence | None = None


class Explanation(BaseModel):
    """What ``explain_match`` returns: the result plus how routing saw it."""

    result: MatchResult
    candidates: list[Candidate]
    route: Literal["matched", "novel", "adjudicate"]
    route_reason: str
    thresholds: dict[str, float]
    llm_reason: str | None = None


class Diagnosis(BaseModel):
    """What ``diagnose`` returns: why a query routes as it does, readiness and hints."""

    query: str
    normalized_query: str
    ready: bool
    llm_configured: bool
    route: Literal["matched", "novel", "adjudicate"] | None
    route_reason: str
    top_score: float | None
    margin_to_runner_up: float | None
    thresholds: dict[str, float]
    hints: list[str] = Field(default_factory=list)
    candidates: list[Candidate] = Field(default_factory=list)


class RunStats(BaseModel):
    """Figures for one batch: counts, LLM calls, retries by cause, tokens, cost, timing."""

    total: int = 0
    by_status: dict[str, int] = Field(default_factory=dict)
    by_decided_by: dict[str, int] = Field(default_factory=dict)
    llm_calls: int = 0
    llm_attempts: int = 0
    retries: int = 0
    retries_by_cause: dict[str, int] = Field(default_factory=dict)
    reasks: int = 0
    rate_limited: int = 0
    usage: Usage = Field(default_factory=Usage)
    wall_time_s: float = 0.0
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    time_to_first_result_s: float | None = None
    budget_exhausted: bool = False
    #: per auto route (``matched``, ``novel``): the audit's counts and whether it closed
    audit: dict[str, AuditRoute] = Field(default_factory=dict)


class RouteEstimate(BaseModel):
    """One auto route (matched or novel) as calibration left it.

    ``open`` routes decide without the LLM; a closed one sends its queries to the LLM (or
    ``review``). ``reason`` says in one sentence how it was estimated or why it is closed.
    """

    open: bool
    target: float
    expected_precision: float | None = None
    expected_coverage: float | None = None
    reason: str = ""


class Calibration(BaseModel):
    """What ``fit`` estimated: thresholds and the expected precision and coverage of each
    auto route, and on what evidence (``source``: ``labels``, ``probes`` of the catalog
    itself, ``user`` thresholds, or ``defaults``)."""

    source: str
    examples: int = 0
    thresholds: dict[str, float]
    exact: bool = True
    matched: RouteEstimate
    novel: RouteEstimate
    #: with labels: what the routing model decides beside the thresholds, or why none was
    #: fit (``None``: no labels, no model)
    routing_model: str | None = None
    #: the fit mode used and why (``fit(mode=None)``: the recall each mode reached)
    fit_mode: str = ""
    #: workload queries the LLM labelled at ``fit`` (``label_budget``), and what it cost
    labelled: int = 0
    label_usage: Usage = Field(default_factory=Usage)
