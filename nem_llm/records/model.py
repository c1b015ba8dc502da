"""A Fellegi-Sunter record model: per-field match weights, scored per pair and per query.

For each field ``f`` and comparison level ``l`` (``comparisons.py``) the model holds

- ``m[f][l]``: how often a *matching* pair lands on level ``l``;
- ``u[f][l]``: how often a *non-matching* one does: among the candidates retrieval
  returns (``u_source="candidates"``, the default) or among random pairs (``"random"``,
  as Splink does);
- term frequencies: an exact match on value ``v`` has ``u`` scaled by how much rarer
  ``v`` is than the average value (a shared rare surname is strong evidence, a shared
  common one weak);
- ``rho``: the share of queries whose entity is among their candidates.

A query is one entity or none, so at most one of its candidates matches: candidate ``j``'s
posterior is ``(rho/k) BF_j / ((1 - rho) + (rho/k) sum_i BF_i)`` (``BF``: the product
over fields of ``m/u``; ``k`` candidates, or ``N`` catalog entities with random u), and
"none" gets ``(1 - rho)`` over the same sum. Two near-identical candidates share the
probability instead of both matching. ``fit.py`` estimates all of it without labels.

Output per pair (:class:`PairScores`): each field's contribution (``log2 m/u``, 0 for a
missing value), the match weight (their sum plus the prior's log2 odds, as in Splink) and
the pairwise match probability; per query (:meth:`RecordModel.posteriors`) the
probability of each candidate and of "none". Pure: records in, arrays out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard, cast

import numpy as np
import numpy.typing as npt

from .comparisons import Column, Comparison
from .fields import FieldSpec

__all__ = [
    "Dependence",
    "FitReport",
    "PairScores",
    "Posteriors",
    "RecordModel",
    "USource",
]

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Records = Sequence[Mapping[str, Any]]

_LOG2 = math.log(2.0)


@dataclass(frozen=True)
class PairScores:
    """Scores of aligned (query, entity) pairs.

    Attributes:
        query, entity: each pair's query and entity positions.
        fields: the compared fields, in column order of ``levels`` and ``contributions``.
        levels: ``(pairs, fields)`` comparison levels (0: a value is missing).
        contributions: ``(pairs, fields)`` log2 Bayes factors (``log2 m/u``, term
            frequency adjusted; 0 where a value is missing): a waterfall chart's bars.
        prior_weight: per pair, the log2 prior odds that it matches.
        weight: ``prior_weight + contributions.sum(1)``: the match weight.
        probability: ``2**weight / (1 + 2**weight)``: the pairwise match probability.
    """

    query: Ints
    entity: Ints
    fields: tuple[str, ...]
    levels: npt.NDArray[np.int8]
    contributions: Floats
    prior_weight: Floats
    weight: Floats
    probability: Floats

    def __len__(self) -> int:
        return len(self.query)


@dataclass(frozen=True)
class Posteriors:
    """Per query: the probability of each candidate (aligned with the pairs) and of none.

    Attributes:
        pair: probability that pair ``k``'s entity is its query's entity.
        none: ``(queries,)`` probability that query ``q``'s entity is not among its
            candidates (not in the catalog, or missed by retrieval).
        queries: the number of queries (positions ``0..queries-1``).
    """

    pair: Floats
    none: Floats
    queries: int


@dataclass(frozen=True)
class FitReport:
    """How the fit went: iterations, whether EM converged, what it counted."""

    iterations: int
    converged: bool
    candidate_pairs: int
    random_pairs: int
    queries: int
    labelled: int


USource = Literal["random", "candidates"]


@dataclass(frozen=True)
class RecordModel:
    """A fitted Fellegi-Sunter model over a catalog's fields (see the module docstring).

    Build it with :func:`fit_record_model`; score with :meth:`score` and :meth:`posteriors`.

    Attributes:
        comparisons: one per compared field (kind ``skip`` fields are left out).
        m, u: per field, the probability of each level among matches / non-matches
            (index 0, the null level, is 1 in both: no evidence).
        rho: the share of queries whose entity is among their candidates (``exclusive``),
            or of candidate pairs that match (not ``exclusive``).
        exclusive: a query is at most one entity (entity matching: its candidates compete
            for one match); ``False`` for deduplication, where a record may have several
            duplicates and each pair is judged alone.
        entities: the catalog size ``N``.
        u_source: ``"random"``: ``u`` describes random pairs and one pair's prior is
            ``rho / N``; ``"candidates"``: ``u`` describes the non-matching candidates
            retrieval returns and one candidate's prior is ``rho / k`` (``k``: its
            query's number of candidates).
        catalog: the catalog's normalised columns, by field.
        frequencies: per field, each entity's value's share of the catalog's values.
        mean_frequency: per field, the frequency of the average value (``sum tf**2``): an
            exact match on a value of frequency ``tf`` weighs ``log2(mean_frequency /
            tf)`` more than the exact level's average.
        dependence: fields read given another field (``None``: all independent).
        fitted: the candidate pairs fit on and their levels (:meth:`fitted_scores`).
        specs: every field's spec, the skipped ones included (with why).
        report: how the fit went.
    """

    comparisons: tuple[Comparison, ...]
    m: tuple[Floats, ...]
    u: tuple[Floats, ...]
    rho: float
    entities: int
    u_source: USource = "random"
    exclusive: bool = True
    catalog: Mapping[str, Column] = field(default_factory=dict, repr=False)
    frequencies: tuple[Floats, ...] = field(default=(), repr=False)
    mean_frequency: tuple[float, ...] = ()
    dependence: Dependence | None = None
    specs: tuple[FieldSpec, ...] = ()
    report: FitReport | None = None
    term_frequencies: bool = True
    fitted: tuple[Ints, Ints, npt.NDArray[np.int8]] | None = field(default=None, repr=False)

    @property
    def fields(self) -> tuple[str, ...]:
        """The compared fields, in column order."""
        return tuple(c.spec.name for c in self.comparisons)

    def prepare(self, records: Records) -> dict[str, Column]:
        """Normalised columns of query records, ready for :meth:`score`."""
        return _columns(self.comparisons, records)

    def levels(
        self, queries: Records | Mapping[str, Column], query: Ints, entity: Ints
    ) -> npt.NDArray[np.int8]:
        """``(pairs, fields)`` comparison levels of query ``query[k]`` and entity ``entity[k]``."""
        if _is_columns(queries):
            return pair_levels(self.comparisons, queries, self.catalog, query, entity)
        cols = self.prepare(cast(Records, queries))
        return pair_levels(self.comparisons, cols, self.catalog, query, entity)

    def score(
        self,
        queries: Records | Mapping[str, Column],
        query: Sequence[int] | Ints,
        entity: Sequence[int] | Ints,
    ) -> PairScores:
        """Scores of pairs: query record ``queries[query[k]]`` against catalog entity ``entity[k]``.

        Args:
            queries: query records (attribute mappings) or their :meth:`prepare`-d columns.
            query, entity: aligned positions (into ``queries`` and into the catalog).
        """
        qi = np.asarray(query, dtype=np.int64)
        ei = np.asarray(entity, dtype=np.int64)
        return self._scores(qi, ei, self.levels(queries, qi, ei))

    def fitted_scores(self) -> PairScores:
        """Scores of the candidate pairs the model was fit on (their levels are kept: no
        comparison runs again)."""
        if self.fitted is None:
            raise ValueError("this model keeps no fitted pairs")
        qi, ei, levels = self.fitted
        return self._scores(qi, ei, levels)

    def _scores(self, qi: Ints, ei: Ints, levels: npt.NDArray[np.int8]) -> PairScores:
        contributions = self._field_log_bf(levels, ei) / _LOG2
        prior = log_priors(qi, self.rho, self.entities, self.u_source, self.exclusive) / _LOG2
        # log2 odds of the pair's prior p: log2(p / (1 - p))
        prior_weight = prior - np.log1p(-np.exp2(prior)) / _LOG2
        weight = prior_weight + contributions.sum(axis=1)
        return PairScores(
            query=qi,
            entity=ei,
            fields=self.fields,
            levels=levels,
            contributions=contributions,
            prior_weight=prior_weight,
            weight=weight,
            probability=_sigmoid2(weight),
        )

    def posteriors(self, scores: PairScores, queries: int | None = None) -> Posteriors:
        """Per query: each candidate's probability of being its entity, and of none.

        ``queries``: how many queries there are (default: the largest position + 1); a
        query with no candidate gets ``none`` = 1.
        """
        n = int(queries if queries is not None else (scores.query.max() + 1 if len(scores) else 0))
        log_bf = scores.contributions.sum(axis=1) * _LOG2
        prior = log_priors(scores.query, self.rho, self.entities, self.u_source, self.exclusive)
        pair, none = query_posteriors(log_bf, prior, scores.query, n, self.rho, self.exclusive)
        return Posteriors(pair, none, n)

    def explain(self, scores: PairScores, k: int) -> list[tuple[str, str, float]]:
        """Pair ``k`` field by field: (field, level label, log2 contribution), in field order."""
        return [
            (c.spec.name, c.labels[int(scores.levels[k, f])], float(scores.contributions[k, f]))
            for f, c in enumerate(self.comparisons)
        ]

    def _field_log_bf(self, levels: npt.NDArray[np.int8], entity: Ints) -> Floats:
        tf = self.frequencies if self.term_frequencies else None
        return log_bayes_factors(
            self.comparisons,
            self.m,
            self.u,
            levels,
            entity,
            tf,
            self.mean_frequency,
            self.dependence,
        )


def _is_columns(value: Records | Mapping[str, Column]) -> TypeGuard[Mapping[str, Column]]:
    """Whether ``value`` holds prepared columns (not records)."""
    return isinstance(value, Mapping) and all(isinstance(v, Column) for v in value.values())


def _sigmoid2(weight: Floats) -> Floats:
    """``2**w / (1 + 2**w)`` without overflow."""
    return np.asarray(0.5 * (1.0 + np.tanh(weight * _LOG2 / 2.0)), dtype=np.float64)


def _columns(comparisons: Sequence[Comparison], records: Records) -> dict[str, Column]:
    return {c.spec.name: c.prepare([r.get(c.spec.name) for r in records]) for c in comparisons}


def pair_levels(
    comparisons: Sequence[Comparison],
    left: Mapping[str, Column],
    right: Mapping[str, Column],
    li: Ints,
    ri: Ints,
) -> npt.NDArray[np.int8]:
    out = np.zeros((len(li), len(comparisons)), dtype=np.int8)
    for f, c in enumerate(comparisons):
        out[:, f] = c.levels(left[c.spec.name], right[c.spec.name], li, ri)
    return out


def value_frequencies(comparison: Comparison, column: Column) -> Floats:
    """Per catalog entity: the frequency of its value of this field (NaN where missing)."""
    freq = comparison.frequencies
    floor = 1.0 / max(len(column), 1)
    return np.array(
        [max(freq.get(v, floor), floor) if v is not None else np.nan for v in column.values],
        dtype=np.float64,
    )


def log_bayes_factors(
    comparisons: Sequence[Comparison],
    m: Sequence[Floats],
    u: Sequence[Floats],
    levels: npt.NDArray[np.int8],
    entity: Ints,
    frequencies: Sequence[Floats] | None,
    mean_frequency: Sequence[float] = (),
    tree: Dependence | None = None,
) -> Floats:
    """Natural-log Bayes factors ``log m/u`` per pair and field (term-frequency adjusted).

    With ``frequencies``, an exact match on value ``v`` has ``u = u_exact * tf(v) /
    mean_frequency``: the level's u scaled by how much rarer ``v`` is than the average
    value. With a dependence ``tree``, a field with a parent reads ``m`` and ``u`` given
    its parent's level (where both are present).
    """
    out = np.zeros(levels.shape, dtype=np.float64)
    for f, c in enumerate(comparisons):
        lv = levels[:, f].astype(np.int64)
        out[:, f] = np.log(m[f][lv]) - np.log(u[f][lv])
        if tree is not None and tree.parents[f] >= 0:
            pv = levels[:, tree.parents[f]].astype(np.int64)
            both = np.flatnonzero((pv > 0) & (lv > 0))
            mg, ug = tree.m_given[f], tree.u_given[f]
            assert mg is not None and ug is not None
            out[both, f] = np.log(mg[pv[both], lv[both]]) - np.log(ug[pv[both], lv[both]])
        if frequencies is not None:
            exact = np.flatnonzero(lv == c.exact_level)
            if len(exact):
                tf = frequencies[f][entity[exact]] / mean_frequency[f]
                out[exact, f] -= np.log(tf)
    return out


def log_priors(
    query: Ints, rho: float, entities: int, u_source: USource, exclusive: bool
) -> Floats:
    """Natural-log prior of each pair: ``rho / N`` (random u) or ``rho / k`` (candidate u);
    ``rho`` itself when pairs are judged alone (not ``exclusive``)."""
    if not exclusive:
        return np.full(len(query), math.log(rho))
    if u_source == "random":
        return np.full(len(query), math.log(rho / entities))
    k = np.bincount(query)[query]
    return np.asarray(math.log(rho) - np.log(k), dtype=np.float64)


def query_posteriors(
    log_bf: Floats, log_prior: Floats, query: Ints, queries: int, rho: float, exclusive: bool
) -> tuple[Floats, Floats]:
    """(per pair, per query none) posteriors: a query is at most one of its candidates
    (``exclusive``), or each pair on its own (``none``: no pair of the query matches)."""
    if not exclusive:
        odds = log_prior - np.log1p(-np.exp(log_prior)) + log_bf
        pair = np.asarray(0.5 * (1.0 + np.tanh(odds / 2.0)), dtype=np.float64)
        log_miss = np.bincount(
            query, weights=np.log1p(-np.minimum(pair, 1 - 1e-12)), minlength=queries
        ).astype(float)
        return pair, np.exp(log_miss)
    log_none = math.log1p(-rho)
    w = log_prior + log_bf
    top = np.full(queries, log_none)
    np.maximum.at(top, query, w)
    # (float even with no pairs: bincount of nothing is an int array)
    total = np.bincount(query, weights=np.exp(w - top[query]), minlength=queries).astype(float)
    total += np.exp(log_none - top)
    lse = top + np.log(total)
    return np.exp(w - lse[query]), np.exp(log_none - lse)


@dataclass(frozen=True)
class Dependence:
    """Which fields depend on which among matches and non-matches, and how.

    A Chow-Liu tree over the fields: ``parents[f]`` is the field ``f`` is read given
    (-1: none); ``m_given[f]`` and ``u_given[f]`` are ``(parent levels, levels)`` tables
    of ``f``'s level given its parent's (row 0 and column 0, the null levels, unused).
    Fellegi-Sunter multiplies the fields' evidence as if independent; two fields that
    move together (an address and its city: the same street is nearly always the same
    city, match or not) would count the same evidence twice.
    """

    parents: tuple[int, ...]
    m_given: tuple[Floats | None, ...]
    u_given: tuple[Floats | None, ...]
    information: tuple[float, ...] = ()
