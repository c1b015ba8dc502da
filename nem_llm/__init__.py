"""nem_llm: LLM-assisted entity matching."""

from __future__ import annotations

from .config import Limits, Thresholds
from .errors import (
    AdjudicationError,
    BudgetExceededError,
    CatalogError,
    ConfigError,
    InputError,
    LLMError,
    NemLLMError,
    NotReadyError,
    QueryError,
)
from .matcher import Matcher
from .models import Attempt, Candidate, Diagnosis, Entity, Explanation, MatchResult, RunStats, Usage

__version__ = "0.1.0"

__all__ = [
    "AdjudicationError",
    "Attempt",
    "BudgetExceededError",
    "Candidate",
    "CatalogError",
    "ConfigError",
    "Diagnosis",
    "Entity",
    "Explanation",
    "InputError",
    "LLMError",
    "Limits",
    "MatchResult",
    "Matcher",
    "NemLLMError",
    "NotReadyError",
    "QueryError",
    "RunStats",
    "Thresholds",
    "Usage",
    "__version__",
]
