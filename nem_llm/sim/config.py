"""Simulator configuration: ``SimConfig`` and the pure latency sampler.

Everything here is a value or a pure function: no I/O, no clock, no global state.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

__all__ = [
    "FAULT_KINDS",
    "Z99",
    "LatencyKind",
    "PolicyKind",
    "SimConfig",
    "lognormal_sigma",
    "sample_latency",
]

LatencyKind = Literal["fixed", "uniform", "lognormal"]
PolicyKind = Literal["top", "oracle"]

#: The 99th percentile of the standard normal distribution (rounded as in the brief).
Z99 = 2.326

#: Injected fault kinds, in the order their rates are laid out on [0, 1).
FAULT_KINDS: tuple[str, ...] = (
    "fault_429",
    "fault_500",
    "fault_503",
    "hang",
    "malformed",
    "invalid",
)

_LATENCIES = ("fixed", "uniform", "lognormal")
_POLICIES = ("top", "oracle")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_finite(name: str, value: object, *, minimum: float = 0.0, strict: bool = False) -> None:
    if not _is_number(value) or not math.isfinite(float(value)):  # type: ignore[arg-type]
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    number = float(value)  # type: ignore[arg-type]
    if strict and number <= minimum:
        raise ConfigError(f"{name} must be > {minimum:g}, got {value!r}")
    if not strict and number < minimum:
        raise ConfigError(f"{name} must be >= {minimum:g}, got {value!r}")


def _check_rate(name: str, value: object) -> None:
    if not _is_number(value) or not 0.0 <= float(value) <= 1.0:  # type: ignore[arg-type]
        raise ConfigError(f"{name} must be a probability in [0, 1], got {value!r}")


def lognormal_sigma(p50: float, p99: float) -> float:
    """Return the log-normal sigma whose 99th percentile is ``p99`` given median ``p50``.

    ``sigma = ln(p99 / p50) / 2.326`` (2.326 is the standard normal 99th percentile).
    """
    if p50 <= 0 or p99 < p50:
        raise ConfigError(f"lognormal latency needs 0 < p50 <= p99, got p50={p50}, p99={p99}")
    return math.log(p99 / p50) / Z99


#: How the oracle's errors fall (see ``SimConfig.error_profile``).
ErrorProfile = Literal["uniform", "difficulty"]
#: ``error_profile="difficulty"``: the error rate's factor when the gold entity is the
#: first candidate, another candidate, or none of them (an absent entity)
DIFFICULTY = {"first": 0.2, "other": 2.5, "absent": 1.5}


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """Settings of the OpenAI-compatible LLM simulator (seeded, so runs are reproducible).

    The simulator is not a model: it answers by a fixed policy (``"top"`` picks the first
    candidate, ``"oracle"`` looks the query up in a labelled file), with simulated latency,
    server-side rate limits and injected faults, for benchmarks and tests.

    Attributes:
        seed: Seed of the ``random.Random`` that draws faults, latencies and oracle errors.
        model: Model id reported by ``/v1/models`` and echoed in completions.
        latency: ``"fixed"`` (always ``latency_p50``), ``"uniform"`` (between
            ``latency_min`` and ``latency_max``) or ``"lognormal"`` (median ``latency_p50``,
            99th percentile ``latency_p99``).
        latency_p50: Seconds; the fixed value, or the log-normal median.
        latency_p99: Seconds; the log-normal 99th percentile (required for lognormal).
        latency_min: Seconds; lower bound of the uniform latency.
        latency_max: Seconds; upper bound of the uniform latency (required for uniform).
        rpm: Requests per minute accepted in any sliding 60 s window (None: unlimited).
        tpm: Tokens per minute accepted in any sliding 60 s window (None: unlimited); a
            request is admitted on its prompt tokens, its completion tokens are added to
            the window once it is answered.
        rate_429: Probability of an injected 429 (with ``Retry-After: retry_after``).
        rate_500: Probability of an injected HTTP 500.
        rate_503: Probability of an injected HTTP 503.
        rate_hang: Probability that a request hangs ``hang_seconds`` (until the client
            gives up or the server stops).
        rate_malformed: Probability of a 200 whose arguments are not valid JSON.
        rate_invalid: Probability of a 200 with valid JSON whose ``entity_id`` is not
            among the allowed ids.
        hang_seconds: How long a hung request waits before it is answered (503).
        retry_after: Seconds sent as ``Retry-After`` on injected 429s.
        policy: ``"top"`` or ``"oracle"``.
        gold_path: JSONL file of ``{"query": ..., "gold_id": ... or null}`` lines
            (required for the oracle policy).
        oracle_error_rate: Probability that the oracle answers a wrong allowed value
            (in the rewrite call: a random other entity's name).
        error_profile: ``"uniform"``: every answer is wrong at ``oracle_error_rate``;
            ``"difficulty"``: errors concentrate on ambiguous requests, as a real model's
            do: the rate is scaled by :data:`DIFFICULTY` (x0.2 when the gold entity is the
            first candidate, x2.5 when it is another one, x1.5 when it is not among them).
            Plumbing for tests of calibration with an imperfect teacher, not a model.
        catalog_path: Catalog file (JSONL/CSV, as ``load_catalog`` reads it) the oracle
            takes names from to answer the rewrite call (tool ``CatalogNames``) and the
            ``names`` of an adjudication that asks for them with its "none" (one error draw
            for both); without it those are answered ``[]``.

    Example:
        >>> SimConfig(seed=1, latency="lognormal", latency_p50=0.2, latency_p99=1.0, rpm=500)
        ... # doctest: +ELLIPSIS
        SimConfig(seed=1, model='nem-llm-sim', latency='lognormal', ...)
    """

    seed: int = 0
    model: str = "nem-llm-sim"
    latency: LatencyKind = "fixed"
    latency_p50: float = 0.0
    latency_p99: float | None = None
    latency_min: float = 0.0
    latency_max: float | None = None
    rpm: float | None = None
    tpm: float | None = None
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_503: float = 0.0
    rate_hang: float = 0.0
    rate_malformed: float = 0.0
    rate_invalid: float = 0.0
    hang_seconds: float = 3600.0
    retry_after: float = 1.0
    policy: PolicyKind = "top"
    gold_path: str | None = None
    oracle_error_rate: float = 0.0
    catalog_path: str | None = None
    error_profile: ErrorProfile = "uniform"

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"model must be a non-empty string, got {self.model!r}")
        if self.latency not in _LATENCIES:
            raise ConfigError(f"latency must be one of {_LATENCIES}, got {self.latency!r}")
        _check_finite("latency_p50", self.latency_p50)
        _check_finite("latency_min", self.latency_min)
        if self.latency_p99 is not None:
            _check_finite("latency_p99", self.latency_p99)
        if self.latency_max is not None:
            _check_finite("latency_max", self.latency_max)
        if self.latency == "lognormal":
            if self.latency_p50 <= 0:
                raise ConfigError(
                    f"lognormal latency needs latency_p50 > 0, got {self.latency_p50!r}"
                )
            if self.latency_p99 is None or self.latency_p99 < self.latency_p50:
                raise ConfigError(
                    "lognormal latency needs latency_p99 >= latency_p50, "
                    f"got latency_p99={self.latency_p99!r}, latency_p50={self.latency_p50!r}"
                )
        if self.latency == "uniform" and (
            self.latency_max is None or self.latency_max < self.latency_min
        ):
            raise ConfigError(
                "uniform latency needs latency_max >= latency_min, "
                f"got latency_min={self.latency_min!r}, latency_max={self.latency_max!r}"
            )
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None:
                _check_finite(name, value, strict=True)
        total = 0.0
        for kind in FAULT_KINDS:
            name = self._rate_name(kind)
            value = getattr(self, name)
            _check_rate(name, value)
            total += float(value)
        if total > 1.0 + 1e-9:
            raise ConfigError(f"the fault rates (rate_429 ... rate_invalid) sum to {total:g} > 1")
        _check_finite("hang_seconds", self.hang_seconds)
        _check_finite("retry_after", self.retry_after)
        if self.policy not in _POLICIES:
            raise ConfigError(f"policy must be one of {_POLICIES}, got {self.policy!r}")
        if self.policy == "oracle" and not self.gold_path:
            raise ConfigError("policy='oracle' needs gold_path (a labelled JSONL file)")
        if self.gold_path is not None and not isinstance(self.gold_path, str):
            raise ConfigError(f"gold_path must be a string path, got {self.gold_path!r}")
        _check_rate("oracle_error_rate", self.oracle_error_rate)
        if self.error_profile not in ("uniform", "difficulty"):
            raise ConfigError(
                f"error_profile must be 'uniform' or 'difficulty', got {self.error_profile!r}"
            )
        if self.catalog_path is not None and not isinstance(self.catalog_path, str):
            raise ConfigError(f"catalog_path must be a string path, got {self.catalog_path!r}")

    @staticmethod
    def _rate_name(kind: str) -> str:
        return "rate_" + kind.removeprefix("fault_")

    def fault_rates(self) -> tuple[tuple[str, float], ...]:
        """Return ``(kind, probability)`` for each injected fault kind, in draw order."""
        return tuple((kind, float(getattr(self, self._rate_name(kind)))) for kind in FAULT_KINDS)


def sample_latency(config: SimConfig, rng: random.Random) -> float:
    """Draw one simulated latency in seconds from ``config``'s distribution using ``rng``."""
    if config.latency == "fixed":
        return float(config.latency_p50)
    if config.latency == "uniform":
        high = config.latency_max if config.latency_max is not None else config.latency_min
        return rng.uniform(config.latency_min, high)
    assert config.latency_p99 is not None  # validated in SimConfig
    sigma = lognormal_sigma(config.latency_p50, config.latency_p99)
    return rng.lognormvariate(math.log(config.latency_p50), sigma)
