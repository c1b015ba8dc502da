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
    "ERROR_TYPES",
    "AdjudicationError",
    "BudgetExceededError",
    "CatalogError",
    "ConfigError",
    "InputError",
    "LLMError",
    "NemLLMError",
    "NotReadyError",
    "QueryError",
    "error_code",
    "http_error_code",
]

#: The closed set of ``MatchResult.error_type`` / ``Attempt.error_type`` codes, each with
#: what it means. Nothing else is ever written there.
ERROR_TYPES: dict[str, str] = {
    "input": "the query or its input row is invalid (empty, not text, too long, unreadable)",
    "config": "an option is invalid for this item (a filter on an unknown attribute, ...)",
    "not_ready": "the matcher was used before its index was built",
    "timeout": "the LLM endpoint did not answer within the attempt's timeout",
    "connection": "the LLM endpoint could not be reached (refused, reset, DNS, TLS)",
    "rate_limit": "the LLM endpoint answered 429 Too Many Requests",
    "server": "the LLM endpoint answered 5xx",
    "auth": "the LLM endpoint refused the credentials (401, 403)",
    "bad_request": "the LLM endpoint refused the request (another 4xx)",
    "invalid_answer": "the model gave no valid choice after the allowed re-asks",
    "budget": "the run's token or dollar budget is spent (the item is 'review')",
    "deadline": "the request's overall deadline passed before a decision",
    "batch_api": "the provider's Batch API failed the line or the batch",
    "internal": "an unexpected error inside nem_llm (a bug: please report it)",
}


def http_error_code(status: int) -> str:
    """The :data:`ERROR_TYPES` code of an HTTP error status from the LLM endpoint."""
    if status == 429:
        return "rate_limit"
    if status == 408:
        return "timeout"
    if status in (401, 403):
        return "auth"
    return "server" if status >= 500 else "bad_request"


def error_code(exc: BaseException) -> str:
    """The :data:`ERROR_TYPES` code of an exception (``"internal"`` for anything unknown)."""
    if isinstance(exc, LLMError):
        return exc.cause if exc.cause in ERROR_TYPES else "internal"
    if isinstance(exc, InputError):
        return "input"
    if isinstance(exc, ConfigError):
        return "config"
    if isinstance(exc, NotReadyError):
        return "not_ready"
    return "internal"


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
        cause: one of the :data:`ERROR_TYPES` codes ("rate_limit", "server", "timeout",
            "connection", "invalid_answer", "budget", ...).
        attempts: the governor's per-attempt log (set by the governor).
        usage: tokens spent by the failed call, failed attempts included.
        reasks: validation re-asks instructor made.
    """

    def __init__(self, message: str, *, cause: str | None = None) -> None:
        super().__init__(message)
        self.cause = cause if cause in ERROR_TYPES else "internal"
        self.attempts: list[Attempt] = []
        self.usage: Usage | None = None
        self.reasks = 0


class BudgetExceededError(LLMError):
    """The run's token or dollar budget is spent; no new LLM calls are made."""


class AdjudicationError(LLMError):
    """The model did not produce a valid choice after the allowed re-asks."""
