"""The routing policy a fit leaves behind: thresholds, a routing model, learned mentions.

:class:`RoutePolicy` is one frozen value, swapped whole when ``fit`` finishes, so a query
in flight never routes by half of an old policy and half of a new one. It is pure: a
query's candidates in, a :class:`~nem_llm._retrieval.routing.Route` out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .._text import fold
from ..catalog import Catalog
from ..config import Thresholds
from ..errors import ConfigError
from ..models import Calibration, Candidate
from .fields_route import FieldRoute
from .learning import LearnedLabels
from .route_model import RouteModel
from .routing import Route, route

__all__ = ["RoutePolicy"]


@dataclass(frozen=True)
class RoutePolicy:
    """How queries route: thresholds, what calibration said, a model and learned labels.

    Args:
        thresholds: the thresholds in force.
        calibration: what ``fit`` estimated, and why a route is closed (``None`` before).
        model: a routing model fit on labels (decides some of what the thresholds leave
            to the LLM), or ``None``.
        learned: mentions learned from labels (``fit`` in "aliases" or "full" mode).
    """

    thresholds: Thresholds
    calibration: Calibration | None = None
    model: RouteModel | None = None
    learned: LearnedLabels | None = None
    # folded labelled mention -> entity id
    learned_ids: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    #: the field model of record queries (fit on a workload of them), or ``None``
    fields: FieldRoute | None = None
    #: auto routes the user closed by setting (``accept_threshold > 1``: "matched",
    #: ``novel_threshold = 0``: "novel"): closed for the field model too
    user_closed: frozenset[str] = frozenset()

    def with_learned(self, learned: LearnedLabels | None) -> RoutePolicy:
        """This policy with ``learned`` mentions (an exact lookup before routing)."""
        ids = (
            {} if learned is None else {fold(q): e for e, qs in learned.aliases.items() for q in qs}
        )
        return dataclasses.replace(self, learned=learned, learned_ids=MappingProxyType(ids))

    def for_threshold(self, threshold: float | None) -> Thresholds:
        """The thresholds of one call: ``threshold`` overrides the accept threshold."""
        if threshold is None:
            return self.thresholds
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise ConfigError(f"threshold must be a number, got {threshold!r}")
        return dataclasses.replace(self.thresholds, accept=float(threshold))

    def route(
        self,
        candidates: list[Candidate],
        normalized: str,
        catalog: Catalog,
        thresholds: Thresholds | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> tuple[Route, list[Candidate]]:
        """Route one query; a labelled mention is matched to its entity (put first among
        the candidates), one labelled "not in the catalog" is novel; a record query
        (``attributes``) is routed by the field model when there is one.

        ``thresholds`` other than the policy's (a per-call ``threshold=``) route by the
        thresholds alone, without the routing model.
        """
        if self.learned is not None:
            key = fold(normalized)
            top = candidates[0].score if candidates else None
            if key in self.learned.novel:
                why = "a labelled example says this mention is not in the catalog"
                return Route("novel", why, top, None, "learned_novel"), candidates
            eid = self.learned_ids.get(key)
            if eid is not None and eid in catalog.by_id:
                entity = catalog.entities[catalog.by_id[eid]]
                own = next((c for c in candidates if c.entity_id == eid), None)
                first = own or Candidate(
                    entity_id=eid, name=entity.name, score=1.0, matched_form=normalized
                )
                rest = [c for c in candidates if c.entity_id != eid]
                why = f"a labelled example says this mention is {eid!r}"
                return Route("matched", why, first.score, None, "learned"), [first, *rest]
        chosen = thresholds if thresholds is not None else self.thresholds
        if attributes and self.fields is not None and candidates:
            routed = self._by_fields(candidates, attributes, catalog, chosen)
            if routed is not None:
                return routed
        model = self.model if chosen is self.thresholds else None
        return route(candidates, chosen, normalized, model), candidates

    def _by_fields(
        self,
        candidates: list[Candidate],
        attributes: Mapping[str, Any],
        catalog: Catalog,
        thresholds: Thresholds,
    ) -> tuple[Route, list[Candidate]] | None:
        """A record query routed by the field model (its best candidate put first); a
        route the user closed (by setting, or a per-call ``threshold`` above 1) is closed
        here too. A route calibration closed is not: it was estimated for the text."""
        assert self.fields is not None
        d = self.fields.decide(attributes, candidates, catalog)
        if d is None:
            return None
        best = next((c for c in candidates if c.entity_id == d.entity_id), candidates[0])
        ranked = [best, *(c for c in candidates if c is not best)]
        margin = best.score - (ranked[1].score if len(ranked) > 1 else 0.0)
        kind = "adjudicate" if d.kind == "undecided" else d.kind
        reason = d.reason
        closed = set(self.user_closed)
        if thresholds is not self.thresholds and thresholds.accept > 1:
            closed.add("matched")
        if kind in closed:
            kind, reason = "adjudicate", f"{d.reason}; but the auto-{d.kind} route is closed"
        return Route(kind, reason, best.score, margin, "fields", d), ranked
