"""The audit: a seeded share of the auto decisions is also put to the LLM while running.

Calibration says how precise a route should be; the audit checks it on the run itself.
Every auto decision (matched or novel, by the embeddings) is audited when its query's
seeded draw falls under ``rate`` (the same query is always audited or never: a rerun costs
nothing more, the answers are cached). The LLM's answer is compared with the route's:

- agreeing, the decision stands;
- disagreeing, the row becomes ``review`` (both answers in ``result.audit``), since one of
  the two is wrong and nobody knows which;
- a route whose agreement, after at least :data:`MIN_AUDITS` audits, has a one-sided 90%
  Wilson *upper* bound below its target closes for the rest of the run: its queries go to
  the LLM. The LLM errs too, so agreement is a lower estimate of the route's precision;
  closing only on evidence that agreement is below the target keeps a sound route open.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from .._retrieval.bounds import lower_bound
from ..models import AuditRoute

__all__ = ["MIN_AUDITS", "Auditor"]

#: audits of a route before its agreement can close it
MIN_AUDITS = 20


@dataclass
class _Counts:
    audited: int = 0
    agreeing: int = 0
    closed: bool = False


@dataclass
class Auditor:
    """Draws which auto decisions to audit, counts agreement per route, closes a route.

    Args:
        rate: the share of auto decisions audited (0: none).
        targets: each route's target precision (``{"matched": 0.99, "novel": 0.95}``).
        seed: the draw's seed.
    """

    rate: float
    targets: dict[str, float]
    seed: int = 0
    _routes: dict[str, _Counts] = field(default_factory=dict)

    def picks(self, normalized: str) -> bool:
        """Whether this query's auto decision is audited (the same answer every time)."""
        if self.rate <= 0:
            return False
        digest = hashlib.sha256(f"{self.seed}:{normalized}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.rate

    def closed(self, route: str) -> bool:
        """Whether the audit has closed this route for the rest of the run."""
        counts = self._routes.get(route)
        return counts is not None and counts.closed

    def record(self, route: str, agrees: bool) -> bool:
        """Count one audit; returns whether the route closed with it."""
        counts = self._routes.setdefault(route, _Counts())
        counts.audited += 1
        counts.agreeing += int(agrees)
        if counts.closed or counts.audited < MIN_AUDITS:
            return False
        if self._upper(counts) < self.targets.get(route, 1.0):
            counts.closed = True
            return True
        return False

    @staticmethod
    def _upper(counts: _Counts) -> float:
        disagree = counts.audited - counts.agreeing
        return 1.0 - float(lower_bound(disagree, counts.audited, 1.0))

    def report(self) -> dict[str, AuditRoute]:
        """Per route: audited, agreeing, the agreement's upper bound, and whether closed."""
        return {
            route: AuditRoute(
                audited=c.audited,
                agreeing=c.agreeing,
                agreement_upper_bound=round(self._upper(c), 4) if c.audited else None,
                target=self.targets.get(route, 1.0),
                closed=c.closed,
            )
            for route, c in sorted(self._routes.items())
        }
