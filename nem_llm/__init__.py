"""nem_llm: LLM-assisted entity matching."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
from .settings import MatcherSettings

if TYPE_CHECKING:
    from .matcher import Matcher
from .catalog import CatalogColumns
from .models import (
    Attempt,
    Calibration,
    Candidate,
    Diagnosis,
    Entity,
    Explanation,
    MatchResult,
    RouteEstimate,
    RunStats,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "AdjudicationError",
    "Attempt",
    "BudgetExceededError",
    "Calibration",
    "Candidate",
    "CatalogColumns",
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
    "MatcherSettings",
    "NemLLMError",
    "NotReadyError",
    "QueryError",
    "RouteEstimate",
    "RunStats",
    "Thresholds",
    "Usage",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # Matcher pulls in instructor, openai and scikit-learn: import it on first use so the
    # CLI answers bad input in a blink
    if name == "Matcher":
        from .matcher import Matcher

        return Matcher
    raise AttributeError(f"module 'nem_llm' has no attribute {name!r}")
