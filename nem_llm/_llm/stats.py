"""RunStats from a stream of results (pure accumulation, O(1) memory but latencies)."""

from __future__ import annotations

import math
from collections import Counter

from ..models import MatchResult, RunStats, Usage

__all__ = ["StatsCollector", "percentile"]


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (``None`` when empty)."""
    if not sorted_values:
        return None
    # ceil(q% of n); round(x + 0.5) rounds half to even, one rank too high for p50 of 10
    rank = max(1, min(len(sorted_values), math.ceil(q * len(sorted_values) / 100)))
    return sorted_values[rank - 1]


class StatsCollector:
    """Adds up results as they stream past; :meth:`finish` makes the ``RunStats``."""

    def __init__(self) -> None:
        self.total = 0
        self.by_status: Counter[str] = Counter()
        self.by_decided_by: Counter[str] = Counter()
        self.llm_calls = 0
        self.llm_attempts = 0
        self.retries_by_cause: Counter[str] = Counter()
        self.rate_limited = 0
        self.reasks = 0
        self.usage = Usage()
        self.latencies: list[float] = []
        self.first_result_s: float | None = None
        self.budget_exhausted = False

    def add(self, result: MatchResult, elapsed_s: float) -> None:
        """Count one result; ``elapsed_s`` is the run's clock when it arrived."""
        self.total += 1
        if self.first_result_s is None:
            self.first_result_s = elapsed_s
        self.by_status[result.status] += 1
        if result.decided_by:
            self.by_decided_by[result.decided_by] += 1
        if result.attempts:
            self.llm_calls += 1
            self.llm_attempts += len(result.attempts)
            for attempt in result.attempts:
                if attempt.outcome == "retry" and attempt.error_type:
                    self.retries_by_cause[attempt.error_type] += 1
                self.reasks += attempt.reasks
                if attempt.status_code == 429:
                    self.rate_limited += 1
        if result.error_type == "budget":
            self.budget_exhausted = True
        self.usage += result.usage
        self.latencies.append(result.latency_s)

    def finish(self, wall_time_s: float) -> RunStats:
        lat = sorted(self.latencies)
        return RunStats(
            total=self.total,
            by_status=dict(self.by_status),
            by_decided_by=dict(self.by_decided_by),
            llm_calls=self.llm_calls,
            llm_attempts=self.llm_attempts,
            retries=sum(self.retries_by_cause.values()),
            retries_by_cause=dict(self.retries_by_cause),
            rate_limited=self.rate_limited,
            reasks=self.reasks,
            usage=self.usage,
            wall_time_s=wall_time_s,
            latency_p50_s=percentile(lat, 50),
            latency_p95_s=percentile(lat, 95),
            time_to_first_result_s=self.first_result_s,
            budget_exhausted=self.budget_exhausted,
        )
