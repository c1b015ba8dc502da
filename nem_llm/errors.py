"""The nem_llm exception hierarchy.

Every error nem_llm raises on purpose derives from :class:`NemLLMError`::

    NemLLMError
    ├── ConfigError            bad keyword argument, bad Limits, bad threshold (also a ValueError)
    ├── InputError             bad user data; names the source and the row/line (also a ValueError)
    │   ├── CatalogError       bad catalog: duplicate id, empty name, non-string alias, ...
    │   └── QueryError         bad query: empty, not a string, too long
    ├── NotReadyError          the matcher was used before ``fit``/``fit_async``
    └── LLMError               an LLM call failed for good (after the governor's retries)
        ├── BudgetExceededError  the run's token or dollar budget is spent
        └── AdjudicationError    the model never produced a valid choice

Per-item failures inside a batch never raise: they become ``MatchResult(status="error")``
records carrying the error's type and message. ``asyncio.CancelledError`` always
propagates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import Attempt, Usage

__all__ = [
    "AdjudicationError",
    "BudgetExceededError",
    "CatalogError",
    "ConfigError",
    "InputError",
    "LLMError",
    "NemLLMError",
    "NotReadyError",
    "QueryError",
]


class NemLLMError(Exception):
    """Base class of every error nem_llm raises on purpose."""


class ConfigError(NemLLMError, ValueError):
    """A configuration value is invalid (names the option and the allowed range)."""


class InputError(NemLLMError, ValueError):
    """User data is invalid; ``source`` and ``line`` say where.

    Args:
        message: What is wrong.
        source: File path or a description such as ``"entities[3]"``.
        line: 1-based line or row number within ``source``, if any.
    """

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None):
        self.message = message
        self.source = source
        self.line = line
        where = source or ""
        if line is not None:
            where = f"{where}:{line}" if where else f"line {line}"
        super().__init__(f"{where}: {message}" if where else message)


class CatalogError(InputError):
    """The entity catalog is invalid."""


class QueryError(InputError):
    """A query is invalid (empty, not a string, or too long)."""


class NotReadyError(NemLLMError, RuntimeError):
    """The matcher was used before its index was built."""


class LLMError(NemLLMError):
    """An LLM call failed for good.

    Attributes:
        cause: a short machine-readable cause ("rate_limit", "http_400", "timeout",
            "invalid_answer", "budget", ...).
        attempts: the governor's per-attempt log (set by the governor).
        usage: tokens spent by the failed call, failed attempts included.
        reasks: validation re-asks instructor made.
    """

    def __init__(self, message: str, *, cause: str | None = None) -> None:
        super().__init__(message)
        self.cause = cause or type(self).__name__
        self.attempts: list[Attempt] = []
        self.usage: Usage | None = None
        self.reasks = 0


class BudgetExceededError(LLMError):
    """The run's token or dollar budget is spent; no new LLM calls are made."""


class AdjudicationError(LLMError):
    """The model did not produce a valid choice after the allowed re-asks."""
