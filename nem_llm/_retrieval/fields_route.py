"""The field route: record queries decided field by field, without labels or an LLM.

A query can carry fields (``{"query": ..., "attributes": {...}}``) like a catalog entity's
attributes. Fit on a workload of such queries and their retrieved candidates (the
blocking step), a Fellegi-Sunter model (``nem_llm.records``: per-field comparison levels,
m and u by EM without labels, term frequencies) gives each query the posterior of each
candidate and of "none of them". :class:`FieldRoute` turns those into a route:

- **matched** when the best candidate's posterior reaches ``match_cut``, is above "none",
  and the fields that carry the entity's name do not all disagree (another shop at the
  same address waits for the LLM);
- **novel** when "none" reaches ``novel_cut``;
- otherwise the LLM decides, shown the fields side by side.

The cuts are chosen once, at fit, on the workload's own posteriors: the lowest posterior
at which the decisions taken most probable first keep a mean posterior (their expected
precision) at the route's target, never below 2/3 (``records.decision``). Per query
afterwards, so a decision never depends on which other queries share its batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .._text import fold
from ..catalog import Catalog
from ..models import Candidate
from ..records import RecordLinker
from ..records.decision import DEFAULT_MIN_PROBABILITY, expected_precision_cut

__all__ = ["MIN_RECORDS", "FieldDecision", "FieldRoute", "identifying_fields"]

#: record queries (with candidates) a field model needs to be fit on
MIN_RECORDS = 30


@dataclass(frozen=True)
class FieldDecision:
    """One record query as the field model sees it.

    ``contributions`` are the best candidate's per-field log2 Bayes factors and
    ``prior_bits`` its prior: they add up to its match weight (a waterfall's bars).
    """

    kind: Literal["matched", "novel", "undecided"]
    entity_id: str | None  # the best candidate (decided or not)
    probability: float  # its posterior
    none_probability: float
    prior_bits: float
    contributions: dict[str, float]
    levels: dict[str, str]
    reason: str


def identifying_fields(catalog: Catalog, fields: Sequence[str]) -> tuple[str, ...]:
    """The fields that hold the entity's name (in 80% of the entities that have them)."""
    out = []
    for name in fields:
        values = [(e.name, e.attributes.get(name)) for e in catalog.entities]
        present = [(n, v) for n, v in values if isinstance(v, str) and v.strip()]
        if present and sum(fold(n) == fold(v) for n, v in present) >= 0.8 * len(present):
            out.append(name)
    return tuple(out)


def _positions(candidates: Sequence[Candidate], catalog: Catalog) -> list[int]:
    return [catalog.by_id[c.entity_id] for c in candidates if c.entity_id in catalog.by_id]


@dataclass(frozen=True)
class FieldRoute:
    """A fitted field model and the posterior each route must reach."""

    linker: RecordLinker
    match_cut: float
    novel_cut: float
    records: int  # record queries it was fit on

    @property
    def fields(self) -> tuple[str, ...]:
        """The compared fields."""
        return tuple(self.linker.model.fields)

    @classmethod
    def fit(
        cls,
        catalog: Catalog,
        queries: Sequence[Mapping[str, Any]],
        candidates: Sequence[Sequence[Candidate]],
        *,
        target: float,
        novel_target: float,
    ) -> FieldRoute | None:
        """Fit on record queries' attributes and their candidates; ``None`` when the catalog
        has no comparable attribute or there are fewer than :data:`MIN_RECORDS` queries."""
        if len(queries) < MIN_RECORDS:
            return None
        entities = [e.attributes for e in catalog.entities]
        positions = [_positions(c, catalog) for c in candidates]
        try:
            fitted = RecordLinker.fit(entities, queries, positions)
        except ValueError:  # no field the catalog and the queries share
            return None
        if not fitted.model.fields:
            return None
        linker = RecordLinker(
            fitted.model, identifying=identifying_fields(catalog, fitted.model.fields)
        )
        links = linker.link(queries, positions)
        best = np.array([lk.candidates[0].probability if lk.candidates else 0.0 for lk in links])
        none = np.array([lk.none_probability for lk in links])
        side = best > none
        match_cut = max(DEFAULT_MIN_PROBABILITY, expected_precision_cut(best[side], target))
        novel_cut = max(DEFAULT_MIN_PROBABILITY, expected_precision_cut(none[~side], novel_target))
        return cls(linker, match_cut, novel_cut, len(queries))

    def decide(
        self, attributes: Mapping[str, Any], candidates: Sequence[Candidate], catalog: Catalog
    ) -> FieldDecision | None:
        """The field model's decision for one record query (``None`` without candidates)."""
        positions = _positions(candidates, catalog)
        if not positions:
            return None
        [link] = self.linker.link([attributes], [positions])
        if not link.candidates:
            return None
        best = link.candidates[0]
        entity_id = catalog.entities[best.entity].id
        contributions = {f.field: round(f.bits, 3) for f in best.fields}
        levels = {f.field: f.level for f in best.fields}
        held = bool(self.linker.identifying) and all(
            levels.get(f) == "else" for f in self.linker.identifying
        )
        p, none = best.probability, link.none_probability
        kind: Literal["matched", "novel", "undecided"] = "undecided"
        if p >= self.match_cut and p > none and not held:
            kind = "matched"
            why = f"the fields agree: P({entity_id!r}) = {p:.3f} >= {self.match_cut:.3f}"
        elif none >= self.novel_cut and none >= p:
            kind = "novel"
            why = (
                f"the fields agree with no candidate: P(none) = {none:.3f} >= {self.novel_cut:.3f}"
            )
        elif held and p >= self.match_cut:
            why = (
                f"the fields agree with {entity_id!r} (P = {p:.3f}) but its name does not: "
                "the LLM decides"
            )
        else:
            why = f"the fields do not decide: P({entity_id!r}) = {p:.3f}, P(none) = {none:.3f}"
        return FieldDecision(
            kind, entity_id, p, none, round(best.prior_bits, 3), contributions, levels, why
        )
