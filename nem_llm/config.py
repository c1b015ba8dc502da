"""Configuration value objects: ``Limits`` (the governor) and ``Thresholds`` (routing)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .models import Calibration

__all__ = [
    "CLOSED_ACCEPT",
    "CLOSED_NOVEL",
    "LIMITS_HELP",
    "PRICES_USD_PER_MTOK",
    "Limits",
    "Thresholds",
    "price_for",
]

#: An accept threshold above every score: the auto-match route is closed.
CLOSED_ACCEPT = 1.01
#: A novel threshold below every score: the auto-novel route is closed.
CLOSED_NOVEL = 0.0

# Public list prices, USD per million tokens (input, output). Unknown models cost 0 unless
# the user sets Limits(input_usd_per_mtok=..., output_usd_per_mtok=...).
PRICES_USD_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1": (2.00, 8.00),
}


def price_for(model: str) -> tuple[float, float]:
    """(input, output) USD per million tokens for a known model name, else (0, 0)."""
    if model in PRICES_USD_PER_MTOK:
        return PRICES_USD_PER_MTOK[model]
    # dated snapshots such as "gpt-4o-mini-2024-07-18" price like their family
    for name in sorted(PRICES_USD_PER_MTOK, key=len, reverse=True):
        if model.startswith(name + "-"):
            return PRICES_USD_PER_MTOK[name]
    return (0.0, 0.0)


def _positive(name: str, value: float | None, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Limits:
    """How the governor spends: concurrency, rates, timeouts, retries and budget.

    Every LLM call goes through one governor configured by this value.

    Example:
        >>> Limits(concurrency=16, rpm=500, tpm=200_000, timeout=30.0, max_attempts=5)
        ... # doctest: +ELLIPSIS
        Limits(concurrency=16, rpm=500, tpm=200000, ...)

    Args:
        concurrency: LLM calls in flight at once (the semaphore), also the number of workers.
        rpm: requests per minute; ``None`` for no limit. Never more than ``rpm`` requests
            start in any 60 s window, no initial burst, and a busy run gets ``rpm`` a minute.
        tpm: tokens per minute (estimated before the call, reconciled with the
            response's usage); ``None`` for no limit.
        timeout: seconds for one attempt (request and response).
        max_attempts: attempts per call, first try included, for transient errors
            (429, 408, 409, 5xx, timeouts, connection errors).
        max_reasks: how many times instructor re-asks after an invalid answer.
        backoff_initial, backoff_max: exponential backoff with full jitter, in seconds.
        budget_tokens, budget_usd: stop new LLM calls once spent; remaining ambiguous items
            come back as ``review`` records that say why.
        input_usd_per_mtok, output_usd_per_mtok: prices; ``None`` means the list price of
            a known model (see ``PRICES_USD_PER_MTOK``), else 0.
    """

    concurrency: int = 16
    rpm: float | None = None
    tpm: float | None = None
    timeout: float = 30.0
    max_attempts: int = 5
    max_reasks: int = 2
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    budget_tokens: int | None = None
    budget_usd: float | None = None
    input_usd_per_mtok: float | None = None
    output_usd_per_mtok: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int):
            raise ConfigError(f"concurrency must be an int >= 1, got {self.concurrency!r}")
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be an int >= 1, got {self.max_attempts!r}")
        if not isinstance(self.max_reasks, int) or self.max_reasks < 0:
            raise ConfigError(f"max_reasks must be an int >= 0, got {self.max_reasks!r}")
        _positive("rpm", self.rpm)
        _positive("tpm", self.tpm)
        _positive("timeout", self.timeout, allow_none=False)
        _positive("backoff_initial", self.backoff_initial, allow_none=False)
        _positive("backoff_max", self.backoff_max, allow_none=False)
        _positive("budget_tokens", self.budget_tokens)
        _positive("budget_usd", self.budget_usd)
        for name in ("input_usd_per_mtok", "output_usd_per_mtok"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ConfigError(f"{name} must be >= 0, got {value!r}")


#: One line per ``Limits`` field (the CLI's help; the docstring above says more).
LIMITS_HELP: dict[str, str] = {
    "concurrency": "LLM calls in flight at once.",
    "rpm": "Requests per minute cap (none: no cap).",
    "tpm": "Tokens per minute cap (none: no cap).",
    "timeout": "Seconds for one LLM attempt.",
    "max_attempts": "Attempts per LLM call (transient errors are retried).",
    "max_reasks": "Re-asks after an invalid answer.",
    "backoff_initial": "First retry backoff, seconds (full jitter).",
    "backoff_max": "Longest retry backoff, seconds.",
    "budget_tokens": "Stop new LLM calls once this many tokens are spent.",
    "budget_usd": "Stop new LLM calls once this many dollars are spent.",
    "input_usd_per_mtok": "Input price, USD per million tokens (default: list price).",
    "output_usd_per_mtok": "Output price, USD per million tokens (default: list price).",
}


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    """Routing thresholds on the top candidate's score (cosine-like, in [0, 1]).

    Matched without an LLM call: ``exact`` and the query equals (folded) a name or alias
    of exactly one candidate, or ``top >= accept and top - runner_up >= margin`` with no
    same-named runner-up. Novel: ``top < novel``. Anything else goes to the LLM.
    ``accept > 1`` closes the auto-match route (every non-novel query goes to the LLM);
    ``novel = 0`` closes the auto-novel route.

    These defaults are used only until ``fit`` calibrates (from labels, or from probes of
    the catalog itself) or where the user set a threshold explicitly.
    """

    accept: float = 0.92
    margin: float = 0.05
    novel: float = 0.45
    exact: bool = True
    calibrated: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("accept", "margin", "novel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{name} threshold must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} threshold must be finite and >= 0, got {value!r}")
        if self.novel > 1:
            raise ConfigError(f"novel_threshold must be <= 1, got {self.novel}")

    def as_dict(self) -> dict[str, float]:
        d = asdict(self)
        d.pop("calibrated")
        return {k: float(v) for k, v in d.items()}

    @classmethod
    def from_calibration(cls, calibration: Calibration) -> Thresholds:
        """The thresholds a :class:`~nem_llm.models.Calibration` chose."""
        t = calibration.thresholds
        return cls(
            accept=t["accept"],
            margin=t["margin"],
            novel=t["novel"],
            exact=bool(t.get("exact", 1.0)),
            calibrated=True,
        )
