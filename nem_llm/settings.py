"""``MatcherSettings``: every matching option, declared once.

One frozen, typed, serialisable value describes how a :class:`~nem_llm.Matcher` matches:
the LLM, the governor's ``Limits``, retrieval, routing, the prompt and the micro-batcher.
The Matcher, the batch job (``MatchJob``), every engine (local, Ray, Batch API), the CLI
(each field is a flag of ``nem-llm match``; ``tests/test_settings.py`` fails when a field
has no flag or a flag no field) and the service are all built from it, so an option
cannot be honoured by one surface and dropped by another.

Example:
    >>> s = MatcherSettings(top_k=10, prompt_attributes=("country",))
    >>> s.top_k, s.search
    (10, 'auto')
    >>> MatcherSettings.model_validate_json(s.model_dump_json()) == s
    True
    >>> s.fingerprint() == MatcherSettings(top_k=10, prompt_attributes=("country",)).fingerprint()
    True

``fingerprint()`` is a stable hash of the options that change answers (the run key of a
batch job); options that only change speed or location (the micro-batcher, the index
directory, the cache file, rates and retries) are left out of it.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._text import DEFAULT_MAX_QUERY_CHARS
from .catalog import CatalogColumns
from .config import Limits
from .errors import ConfigError

__all__ = [
    "DEFAULT_AUDIT_RATE",
    "DEFAULT_LABEL_BUDGET",
    "ENCODERS",
    "INSTRUCTOR_MODES",
    "SEARCH_MODES",
    "EncoderName",
    "EngineName",
    "InstructorMode",
    "MatcherSettings",
    "OutputOrder",
    "SearchMode",
    "Strategy",
]

#: How catalog and queries are encoded (see ``retrieval/encoders.py``).
EncoderName = Literal["auto", "torch", "onnx", "onnx-int8", "static"]
ENCODERS: tuple[str, ...] = get_args(EncoderName)
#: Exact search, a faiss ANN shortlist re-scored exactly, or ANN from a catalog size on.
SearchMode = Literal["auto", "exact", "ann"]
SEARCH_MODES: tuple[str, ...] = get_args(SearchMode)
#: instructor modes by their value (``instructor.Mode.TOOLS.value == "tool_call"``).
InstructorMode = Literal["tool_call", "json_mode", "json_schema_mode", "markdown_json_mode"]
INSTRUCTOR_MODES: tuple[str, ...] = get_args(InstructorMode)

#: The order LLM work is started in (answers are the same; see ``llm/strategies.py``).
Strategy = Literal["sequential", "gather", "as_completed"]
#: A batch job's output row order at the end.
OutputOrder = Literal["input", "completion"]
#: Where a batch job runs (see ``integrations/engines.py``).
EngineName = Literal["local", "ray", "batch-api"]

#: ``label_budget=None`` with an LLM: workload queries labelled at fit, at most
#: ``DEFAULT_LABEL_SHARE`` of the workload (a small job is not labelled end to end)
DEFAULT_LABEL_BUDGET = 200
DEFAULT_LABEL_SHARE = 0.2
#: ``audit_rate=None`` with an LLM: the share of auto decisions audited
DEFAULT_AUDIT_RATE = 0.02

#: Fields left out of :meth:`MatcherSettings.fingerprint`: they change speed, pacing or
#: where files live, never an answer (``limits`` enters through its budgets only).
_NOT_IN_FINGERPRINT = frozenset(
    {"index_dir", "cache", "batching", "max_batch_size", "max_wait", "limits"}
)


class MatcherSettings(BaseModel):
    """How a Matcher matches: one frozen value for the API, the CLI, the service and engines.

    Args:
        model: the chat model that adjudicates.
        base_url: an OpenAI-compatible endpoint (default: ``OPENAI_BASE_URL``).
        llm: use an LLM for ambiguous queries; off, they come back as ``review``.
        instructor_mode: instructor's mode by value; ``"tool_call"`` (forced tool call)
            works with OpenAI, vLLM and llama.cpp's server.
        temperature: sampling temperature of the adjudication call (``None``: the
            endpoint's default).
        limits: the governor's :class:`~nem_llm.Limits` (concurrency, rpm, tpm, timeout,
            retries, budget).
        top_k: candidates retrieved and shown to the LLM.
        lexical_weight: weight of character n-gram TF-IDF in a form's score (0..1).
        index_description: also index ``"name, description"`` as a surface form (lifts
            retrieval on record-like catalogs).
        encoder: ``"torch"``, ``"onnx"``, ``"onnx-int8"`` (the ``[fast]`` extra),
            ``"static"`` (the ``[static]`` extra) or ``"auto"`` (the measured default; a
            saved index is loaded with the encoder that built it).
        search: ``"exact"``, ``"ann"`` (a faiss shortlist re-scored exactly; the ``[ann]``
            extra) or ``"auto"`` (ANN from ``ANN_MIN_FORMS`` surface forms).
        index_dir: a directory to save the index to and load it from.
        columns: which catalog columns hold id, name, aliases and description.
        max_query_chars: longer queries are rejected with a clear error.
        accept_threshold, margin, novel_threshold: routing thresholds kept as given
            (``None``: calibrated by ``fit``); ``accept_threshold > 1`` sends every
            non-novel query to the LLM.
        target_precision, novel_target_precision: what an auto route must be expected to
            reach before ``fit`` opens it.
        label_budget: workload queries the LLM labels at ``fit`` (given a workload) so the
            routes are calibrated on the user's own mentions; ``None``:
            :data:`DEFAULT_LABEL_BUDGET` when an LLM is configured (at most a fifth of the
            workload), ``0``: off.
        field_model: route record queries (``{"query": ..., "attributes": {...}}``) by
            a Fellegi-Sunter model of their fields (``nem_llm.records``), fit on the
            workload given to ``fit`` without labels.
        audit_rate: the share of auto decisions also adjudicated while running (seeded);
            a route whose audit shows it below its target closes for the rest of the run;
            ``None``: :data:`DEFAULT_AUDIT_RATE` when an LLM is configured, ``0``: off.
        prompt_attributes: entity attributes shown to the LLM for each candidate, at most
            ``prompt_attribute_chars`` characters per candidate.
        rewrite: for a query the LLM found no match for (or retrieval called novel),
            retrieve again with the catalog names the LLM expects and decide once more.
        cache: a SQLite file of LLM decisions: never pay twice for one.
        batching, max_batch_size, max_wait: the micro-batcher shared by concurrent calls
            (flush at ``max_batch_size`` texts or after ``max_wait`` seconds).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    # -- the LLM -------------------------------------------------------------------------
    model: str = Field(
        default="gpt-4o-mini", min_length=1, description="The chat model that adjudicates."
    )
    base_url: str | None = Field(
        default=None, description="OpenAI-compatible endpoint (default: OPENAI_BASE_URL)."
    )
    llm: bool = Field(
        default=True,
        description="Use an LLM for ambiguous queries (off: they come back as review).",
    )
    instructor_mode: InstructorMode = Field(
        default="tool_call",
        description="instructor mode: tool_call, json_mode, json_schema_mode, ...",
    )
    temperature: float | None = Field(
        default=0.0, ge=0.0, le=2.0, description="Sampling temperature of the adjudication call."
    )
    limits: Limits = Field(default_factory=Limits, description="The governor's limits.")
    # -- retrieval -----------------------------------------------------------------------
    top_k: int = Field(
        default=5, ge=1, le=1000, description="Candidates retrieved and shown to the LLM."
    )
    lexical_weight: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Weight of character n-gram similarity (0..1)."
    )
    index_description: bool = Field(
        default=False, description="Also index 'name, description' (record-like catalogs)."
    )
    encoder: EncoderName = Field(
        default="auto",
        description="Catalog and query encoder: torch, onnx, onnx-int8, static or auto.",
    )
    search: SearchMode = Field(
        default="auto", description="Search: exact, ann (faiss shortlist, re-scored) or auto."
    )
    index_dir: Path | None = Field(
        default=None, description="Directory to save the index to and load it from."
    )
    columns: CatalogColumns | None = Field(
        default=None, description="Catalog columns holding id, name, aliases and description."
    )
    max_query_chars: int = Field(
        default=DEFAULT_MAX_QUERY_CHARS, ge=1, description="Longer queries are rejected."
    )
    # -- routing -------------------------------------------------------------------------
    accept_threshold: float | None = Field(
        default=None, ge=0.0, description="Auto-match at or above this score (default: calibrated)."
    )
    margin: float | None = Field(
        default=None,
        ge=0.0,
        description="Lead over the runner-up an auto-match needs (calibrated).",
    )
    novel_threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Auto-novel below this score (default: calibrated).",
    )
    target_precision: float = Field(
        default=0.99,
        gt=0.0,
        le=1.0,
        description="Precision the auto-match route must reach to open.",
    )
    label_budget: int | None = Field(
        default=None,
        ge=0,
        description="Workload queries the LLM labels at fit to calibrate the routes on the "
        "job's own mentions (default: 200 when an LLM is configured; 0: off).",
    )
    field_model: bool = Field(
        default=True,
        description="Route record queries (with fields) by a field-by-field model fit on "
        "the workload, without labels.",
    )
    audit_rate: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Share of auto decisions also sent to the LLM as an audit; a route the "
        "audit shows below its target closes (default: 0.02 with an LLM; 0: off).",
    )
    novel_target_precision: float = Field(
        default=0.95,
        gt=0.0,
        le=1.0,
        description="Precision the auto-novel route must reach to open.",
    )
    # -- the prompt ----------------------------------------------------------------------
    prompt_attributes: tuple[str, ...] = Field(
        default=(), description="Entity attributes shown to the LLM for each candidate."
    )
    prompt_attribute_chars: int = Field(
        default=200, ge=1, description="Characters of attributes shown per candidate."
    )
    rewrite: bool = Field(
        default=False,
        description="Retrieve again with the catalog names the LLM expects for a row it "
        "found no match for (or retrieval called novel), and decide once more.",
    )
    # -- state and speed -----------------------------------------------------------------
    cache: Path | None = Field(default=None, description="SQLite decision cache (never pay twice).")
    batching: bool = Field(
        default=True, description="Share one micro-batcher between concurrent queries."
    )
    max_batch_size: int = Field(default=256, ge=1, description="Micro-batcher flush size (texts).")
    max_wait: float = Field(
        default=0.005, ge=0.0, description="Micro-batcher flush delay (seconds)."
    )

    @field_validator("accept_threshold", "margin", "novel_threshold", "temperature", "max_wait")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be finite")
        return value

    @field_validator("prompt_attributes", mode="before")
    @classmethod
    def _attribute_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [a.strip() for a in value.split(",") if a.strip()]
        if isinstance(value, list | tuple):
            for name in value:
                if not isinstance(name, str) or not name.strip():
                    raise ValueError(f"attribute names must be non-empty strings, got {name!r}")
            return tuple(dict.fromkeys(value))
        return value

    @field_validator("limits", mode="before")
    @classmethod
    def _limits(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return Limits(**value)
        return value

    @field_validator("columns", mode="before")
    @classmethod
    def _columns(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return CatalogColumns(**value)
        return value

    @classmethod
    def of(cls, **options: Any) -> MatcherSettings:
        """Settings from keyword options, with a :class:`ConfigError` naming a bad one.

        Example:
            >>> MatcherSettings.of(top_k=0)
            Traceback (most recent call last):
            ...
            nem_llm.errors.ConfigError: top_k: Input should be greater than or equal to 1 (got 0)
        """
        try:
            return cls(**options)
        except ValidationError as exc:
            raise config_error(exc) from None

    def replace(self, **changes: Any) -> MatcherSettings:
        """A copy with ``changes`` applied and validated (a ``ConfigError`` names a bad one)."""
        if not changes:
            return self
        unknown = sorted(set(changes) - set(type(self).model_fields))
        if unknown:
            raise ConfigError(f"unknown option(s): {', '.join(unknown)}")
        return type(self).of(**{**self._fields(), **changes})

    def _fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in type(self).model_fields}

    @property
    def thresholds_set(self) -> frozenset[str]:
        """The routing thresholds the user set (kept as given; the others are calibrated)."""
        given = (
            ("accept", self.accept_threshold),
            ("margin", self.margin),
            ("novel", self.novel_threshold),
        )
        return frozenset(name for name, value in given if value is not None)

    def resolved_label_budget(self, llm_configured: bool, given: int | None = None) -> int:
        """The label budget in force: ``given`` (a call's), else the one set, else the
        default with an LLM, else 0."""
        if given is not None:
            if isinstance(given, bool) or not isinstance(given, int) or given < 0:
                raise ConfigError(f"label_budget must be an int >= 0, got {given!r}")
            return given
        if self.label_budget is not None:
            return self.label_budget
        return DEFAULT_LABEL_BUDGET if llm_configured and self.llm else 0

    def resolved_audit_rate(self, llm_configured: bool) -> float:
        """The audit rate in force: the one set, else the default with an LLM, else 0."""
        if self.audit_rate is not None:
            return self.audit_rate
        return DEFAULT_AUDIT_RATE if llm_configured and self.llm else 0.0

    def fingerprint(self) -> str:
        """A stable hash of every option that changes answers (a batch job's run key).

        Equal for equal settings in any process; the micro-batcher, the index directory,
        the cache file, rates and retries are left out (they never change an answer).
        """
        data = self.model_dump(mode="json", exclude=set(_NOT_IN_FINGERPRINT))
        data["budgets"] = [self.limits.budget_tokens, self.limits.budget_usd]
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


def config_error(exc: ValidationError) -> ConfigError:
    """One clear line per invalid option, naming it and the value given."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "settings"
        message = str(error["msg"]).removeprefix("Value error, ")
        given = error.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"{where}: {message}{shown}")
    return ConfigError("; ".join(lines))
