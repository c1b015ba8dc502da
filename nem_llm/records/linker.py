"""One object for the matcher to hold: fit on candidates, then link queries, each with why.

:class:`RecordLinker` wraps the pieces (fields, comparisons, model, decision) behind the
two calls routing, ``explain`` and a waterfall chart need: :meth:`RecordLinker.fit` on the
catalog's attributes and some queries' candidates (retrieval's top-k, as entity
positions), and :meth:`RecordLinker.link`, which gives per query a :class:`RecordLink`:
matched / novel / undecided, the probabilities, and every candidate's per-field
contributions. Pure: values in, values out; positions, never ids.

Example:
    >>> catalog = [{"name": "Ann Lee", "dob": "1970-01-02"},
    ...            {"name": "Bo Chen", "dob": "1981-05-06"}]
    >>> queries = [{"name": "ann lee", "dob": "19700102"}]
    >>> linker = RecordLinker.fit(catalog, queries, [[0, 1]])
    >>> link = linker.link(queries, [[0, 1]])[0]
    >>> link.status, link.entity, [c.level for c in link.candidates[0].fields]
    ('matched', 0, ['exact', 'exact'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .decision import (
    DEFAULT_MIN_PROBABILITY,
    DEFAULT_NOVEL_TARGET_PRECISION,
    DEFAULT_TARGET_PRECISION,
    Decision,
    decide,
)
from .fields import FieldKind, FieldSpec
from .fit import fit_record_model
from .model import RecordModel

__all__ = ["CandidateScore", "FieldScore", "RecordLink", "RecordLinker"]

Records = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class FieldScore:
    """One field of one (query, candidate) pair: its level and its log2 Bayes factor."""

    field: str
    level: str
    bits: float


@dataclass(frozen=True)
class CandidateScore:
    """One candidate of a query: its posterior, match weight and the fields behind it.

    ``prior_bits + sum(f.bits for f in fields) == weight``: the bars of a waterfall chart.
    """

    entity: int
    probability: float
    weight: float
    prior_bits: float
    fields: tuple[FieldScore, ...]


@dataclass(frozen=True)
class RecordLink:
    """A query's decision: ``entity`` is the matched entity's position (``None`` unless
    ``status == "matched"``); ``probability`` the best candidate's posterior and
    ``none_probability`` that of "not among the candidates"; candidates most probable
    first."""

    status: Decision
    entity: int | None
    probability: float
    none_probability: float
    candidates: tuple[CandidateScore, ...]


@dataclass(frozen=True)
class RecordLinker:
    """A fitted record model and the decision rule's settings.

    Args:
        model: the fitted :class:`~nem_llm.records.model.RecordModel`.
        target_precision, novel_target_precision, min_probability: see
            :func:`~nem_llm.records.decision.decide`.
        identifying: fields that identify an entity (the field holding its name): a
            candidate on which all of them disagree completely (level "else") is never
            matched without review, however much the other fields agree (another shop at
            the same address; docs/records.md).
    """

    model: RecordModel
    target_precision: float | None = DEFAULT_TARGET_PRECISION
    novel_target_precision: float | None = DEFAULT_NOVEL_TARGET_PRECISION
    min_probability: float = DEFAULT_MIN_PROBABILITY
    identifying: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [f for f in self.identifying if f not in self.model.fields]
        if unknown:
            raise ValueError(
                f"identifying fields {unknown} are not compared "
                f"(compared: {', '.join(self.model.fields)})"
            )

    @classmethod
    def fit(
        cls,
        catalog: Records,
        queries: Records,
        candidates: Sequence[Sequence[int]],
        *,
        fields: Sequence[FieldSpec] | None = None,
        kinds: Mapping[str, FieldKind] | None = None,
        labels: Mapping[int, int | None] | None = None,
        identifying: Sequence[str] = (),
        **options: Any,
    ) -> RecordLinker:
        """Fit on the catalog's attributes and the queries' candidates (entity positions).

        ``labels``: query position -> entity position or ``None`` (absent).
        ``identifying``: see the class. Other ``options`` go to
        :func:`~nem_llm.records.fit.fit_record_model`.
        """
        qi, ei = _pairs(candidates)
        model = fit_record_model(
            catalog, queries, qi, ei, fields=fields, kinds=kinds, labels=labels, **options
        )
        return cls(model, identifying=tuple(identifying))

    def link(self, queries: Records, candidates: Sequence[Sequence[int]]) -> list[RecordLink]:
        """Each query's decision, from its candidates (entity positions in the catalog)."""
        if len(queries) != len(candidates):
            raise ValueError(f"{len(queries)} queries but {len(candidates)} candidate lists")
        qi, ei = _pairs(candidates)
        scores = self.model.score(queries, qi, ei)
        post = self.model.posteriors(scores, len(queries))
        review = None
        if self.identifying:
            columns = [self.model.fields.index(f) for f in self.identifying]
            # level 1 is "else" in every kind; a missing value (0) is no disagreement
            review = (scores.levels[:, columns] == 1).all(axis=1)
        decided = decide(
            post,
            qi,
            ei,
            target_precision=self.target_precision,
            novel_target_precision=self.novel_target_precision,
            min_probability=self.min_probability,
            review=review,
        )
        labels = [c.labels for c in self.model.comparisons]
        per_query: list[list[CandidateScore]] = [[] for _ in queries]
        for k in range(len(qi)):
            fields = tuple(
                FieldScore(
                    name, labels[f][int(scores.levels[k, f])], float(scores.contributions[k, f])
                )
                for f, name in enumerate(scores.fields)
            )
            per_query[int(qi[k])].append(
                CandidateScore(
                    entity=int(ei[k]),
                    probability=float(post.pair[k]),
                    weight=float(scores.weight[k]),
                    prior_bits=float(scores.prior_weight[k]),
                    fields=fields,
                )
            )
        out: list[RecordLink] = []
        for q, status in enumerate(decided.status):
            ranked = sorted(per_query[q], key=lambda c: -c.probability)
            out.append(
                RecordLink(
                    status=status,
                    entity=int(decided.entity[q]) if status == "matched" else None,
                    probability=float(decided.best_probability[q]),
                    none_probability=float(decided.none_probability[q]),
                    candidates=tuple(ranked),
                )
            )
        return out


def _pairs(
    candidates: Sequence[Sequence[int]],
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    qi = np.array([q for q, found in enumerate(candidates) for _ in found], dtype=np.int64)
    ei = np.array([e for found in candidates for e in found], dtype=np.int64)
    return qi, ei
