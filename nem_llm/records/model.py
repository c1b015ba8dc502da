"""A Fellegi-Sunter record model: per-field match weights learned without labels.

For each field ``f`` and comparison level ``l`` (``comparisons.py``) the model holds

- ``u[f][l]``: how often a *non-matching* pair lands on level ``l``, counted on random
  (query, entity) pairs, which almost never match. Random pairs still hold a share
  ``lambda = rho / N`` of matches; with ``m`` known, ``u = (u_random - lambda m) / (1 -
  lambda)`` removes them (it matters on catalogs of a few dozen entities).
- ``m[f][l]``: how often a *matching* pair lands on it, and ``rho``, the share of queries
  whose entity is in the catalog, both by expectation maximisation over the candidate
  pairs retrieval found (the blocking step), with no labels.
- term frequencies: on the exact level, ``u`` is the value's own frequency in the
  catalog (a shared rare surname is strong evidence, a shared common one weak).

The E-step knows what entity matching knows: a query is one entity or none, so at most
one of its candidates matches. Each query's candidates compete: the posterior of
candidate ``j`` is ``(rho/N) BF_j / ((1 - rho) + (rho/N) sum_i BF_i)`` (``BF``: the
product over fields of ``m/u``), and of "none" ``(1 - rho)`` over the same sum. Two
near-identical candidates therefore share the probability instead of both matching, and
``rho`` comes out as the share of queries that have a match. Labels, when given, fix the
posteriors of their queries (semi-supervised EM).

Output per pair (:class:`PairScores`): each field's contribution (``log2 m/u``, 0 for a
missing value), the match weight (their sum plus the prior's log2 odds, as in Splink) and
the pairwise match probability; per query (:meth:`RecordModel.posteriors`) the
probability of each candidate and of "none". Pure: records in, arrays out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .comparisons import LEVELS, Column, Comparison, fit_comparison
from .fields import FieldKind, FieldSpec, infer_fields

__all__ = [
    "FitReport",
    "PairScores",
    "Posteriors",
    "RecordModel",
    "fit_record_model",
]

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Records = Sequence[Mapping[str, Any]]

#: Pseudo-counts added to every level when m and u are counted (keeps rare levels finite).
PSEUDO_COUNT = 0.5
#: EM estimates maximum a posteriori: priors worth this many queries (m: distributed as
#: :func:`_initial_m`; u from candidates: as the random pairs' u; rho: one half) decide
#: where the data are too few to (a catalog of a few entities, a handful of queries) and
#: fade as queries accumulate.
PRIOR_QUERIES = 10.0
#: rho stays within these bounds (neither route is ever certain a priori).
RHO_BOUNDS = (0.001, 0.999)
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
        cols = queries if _is_columns(queries) else self.prepare(queries)  # type: ignore[arg-type]
        return _levels(self.comparisons, cols, self.catalog, query, entity)  # type: ignore[arg-type]

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
        contributions = self._log_bf(levels, ei) / _LOG2
        prior = _log_prior(qi, self.rho, self.entities, self.u_source, self.exclusive) / _LOG2
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
        prior = _log_prior(scores.query, self.rho, self.entities, self.u_source, self.exclusive)
        pair, none = _posterior(log_bf, prior, scores.query, n, self.rho, self.exclusive)
        return Posteriors(pair, none, n)

    def explain(self, scores: PairScores, k: int) -> list[tuple[str, str, float]]:
        """Pair ``k`` field by field: (field, level label, log2 contribution), in field order."""
        return [
            (c.spec.name, c.labels[int(scores.levels[k, f])], float(scores.contributions[k, f]))
            for f, c in enumerate(self.comparisons)
        ]

    def _log_bf(self, levels: npt.NDArray[np.int8], entity: Ints) -> Floats:
        tf = self.frequencies if self.term_frequencies else None
        return _log_bf(
            self.comparisons,
            self.m,
            self.u,
            levels,
            entity,
            tf,
            self.mean_frequency,
            self.dependence,
        )


def _is_columns(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(v, Column) for v in value.values())


def _sigmoid2(weight: Floats) -> Floats:
    """``2**w / (1 + 2**w)`` without overflow."""
    return np.asarray(0.5 * (1.0 + np.tanh(weight * _LOG2 / 2.0)), dtype=np.float64)


def _columns(comparisons: Sequence[Comparison], records: Records) -> dict[str, Column]:
    return {c.spec.name: c.prepare([r.get(c.spec.name) for r in records]) for c in comparisons}


def _levels(
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


def _frequencies(comparison: Comparison, column: Column) -> Floats:
    """Per catalog entity: the frequency of its value of this field (NaN where missing)."""
    freq = comparison.frequencies
    floor = 1.0 / max(len(column), 1)
    return np.array(
        [max(freq.get(v, floor), floor) if v is not None else np.nan for v in column.values],
        dtype=np.float64,
    )


def _log_bf(
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


def _log_prior(
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


def _posterior(
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


def _count(levels: npt.NDArray[np.int8], size: int, weights: Floats | None) -> Floats:
    """Weighted counts of each level 1..size-1 (level 0, null, is not counted)."""
    raw = np.bincount(levels.astype(np.int64), weights=weights, minlength=size)[:size]
    counts: Floats = raw.astype(np.float64)
    counts[0] = 0.0
    return counts


def _normalise(counts: Floats, pseudo: float = PSEUDO_COUNT) -> Floats:
    """Probabilities over the non-null levels (with pseudo-counts); the null level is 1."""
    out = counts.copy()
    out[1:] += pseudo
    out[1:] /= out[1:].sum()
    out[0] = 1.0
    return out


def fit_record_model(
    entities: Records,
    queries: Records,
    query: Sequence[int] | Ints,
    entity: Sequence[int] | Ints,
    *,
    fields: Sequence[FieldSpec] | None = None,
    kinds: Mapping[str, FieldKind] | None = None,
    labels: Mapping[int, int | None] | None = None,
    u_source: USource = "candidates",
    exclusive: bool = True,
    dependence: bool = False,
    classify: bool = True,
    random_pairs: int = 10_000,
    term_frequencies: bool = True,
    max_iterations: int = 200,
    tolerance: float = 1e-6,
    seed: int = 0,
    exclude_self: bool = False,
) -> RecordModel:
    """Fit a record model on a catalog and the candidate pairs of some queries.

    Args:
        entities: the catalog's attributes, one mapping per entity (positions are ids).
        queries: the queries' attributes (for deduplication: the catalog itself).
        query, entity: the candidate pairs (blocking): query ``query[k]`` against entity
            ``entity[k]`` (e.g. each query's top-k retrieved candidates).
        fields: the fields and kinds to compare; default :func:`infer_fields` on
            ``entities`` with ``kinds`` as overrides.
        labels: known answers, query position -> entity position (or ``None``: not in
            the catalog). Their posteriors are fixed during EM.
        u_source: where ``u`` comes from (see :class:`RecordModel`): the non-matching
            ``"candidates"`` (the default: by EM, starting from the random pairs' u), or
            ``"random"`` pairs only (Fellegi-Sunter as Splink does it). Retrieval picks
            candidates that agree more than random pairs do (same street, same city),
            and ``u`` from random pairs counts that agreement as evidence of a match; on
            the development record sets ``"candidates"`` estimated m and u closer to the
            labelled truth (docs/records.md).
        exclusive: a query is at most one of its candidates (entity matching); ``False``
            judges each pair alone (deduplication).
        dependence: with ``u_source="candidates"``, learn which fields depend on each
            other (a Chow-Liu tree of :class:`Dependence`) and read them given each other.
        classify: once EM has converged, go on counting m only on the pairs the model
            links (posterior above one half: classification EM). Soft EM lets the
            candidates that agree on every field but the one that identifies (same
            address and city, another restaurant's name; same authors and year, another
            title) each pass a third of a match into m, which then expects that field to
            disagree completely in several percent of true matches; counted on linked
            pairs only, m learns that it almost never does (docs/records.md).
        random_pairs: how many random pairs estimate ``u``.
        term_frequencies: adjust the exact level by the value's frequency.
        exclude_self: random pairs never pair a record with itself (deduplication, where
            query ``i`` is entity ``i``).

    Raises:
        ValueError: no field to compare, misaligned pairs, or a position out of range.
    """
    qi = np.asarray(query, dtype=np.int64)
    ei = np.asarray(entity, dtype=np.int64)
    n_entities, n_queries = len(entities), len(queries)
    if len(qi) != len(ei):
        raise ValueError(f"{len(qi)} query positions but {len(ei)} entity positions")
    if n_entities == 0:
        raise ValueError("the catalog is empty")
    if len(qi) and (
        qi.min() < 0 or qi.max() >= n_queries or ei.min() < 0 or ei.max() >= n_entities
    ):
        raise ValueError("a pair position is out of range")
    if u_source not in ("random", "candidates"):
        raise ValueError(f"u_source must be 'random' or 'candidates', got {u_source!r}")
    specs = tuple(fields) if fields is not None else infer_fields(entities, kinds=kinds)
    compared = [s for s in specs if s.kind != "skip"]
    if not compared:
        raise ValueError("no field to compare: every field is missing or skipped")
    # each field's values normalised once: the comparisons fit on them and compare them
    blanks = [Comparison(s, LEVELS[s.kind]) for s in compared]
    catalog = {b.spec.name: b.prepare([e.get(b.spec.name) for e in entities]) for b in blanks}
    qcols = (
        catalog
        if queries is entities
        else {b.spec.name: b.prepare([q.get(b.spec.name) for q in queries]) for b in blanks}
    )
    comparisons = tuple(
        fit_comparison(s, catalog[s.name], None if exclude_self else qcols[s.name], seed=seed)
        for s in compared
    )
    frequencies = tuple(_frequencies(c, catalog[c.spec.name]) for c in comparisons)
    mean_frequency = tuple(
        max(float(sum(v * v for v in c.frequencies.values())), 1e-12) for c in comparisons
    )
    tf = frequencies if term_frequencies else None
    sizes = [len(c.labels) for c in comparisons]

    u_random = _random_pair_counts(
        comparisons, qcols, catalog, random_pairs, seed=seed, exclude_self=exclude_self
    )
    n_random = int(u_random[0].sum()) if u_random else 0
    levels = _levels(comparisons, qcols, catalog, qi, ei)
    in_pairs = np.zeros(n_queries, dtype=bool)
    in_pairs[qi] = True
    labelled = np.zeros(n_queries, dtype=bool)
    fixed_pair: Floats | None = None
    if labels:
        gold_of = np.full(n_queries, -1, dtype=np.int64)
        for q, gold in labels.items():
            if not 0 <= q < n_queries:
                raise ValueError(f"label for query {q}, out of range")
            labelled[q] = True
            if gold is not None:
                gold_of[q] = gold
        fixed_pair = (gold_of[qi] == ei).astype(np.float64)

    # EM: m, rho (and u from the candidates), a query being at most one of its candidates;
    # then, where the fields turn out to depend on each other, once more with that known
    m_prior = [_initial_m(n) for n in sizes]
    u_start = _random_u(u_random, m_prior, 0.0, comparisons)
    state = _EMState(list(m_prior), list(u_start), 0.5, None)
    em = _EM(
        comparisons,
        levels,
        qi,
        ei,
        n_queries,
        n_entities,
        sizes,
        m_prior,
        u_start,
        u_random,
        u_source,
        exclusive,
        tf,
        mean_frequency,
        labelled,
        fixed_pair,
        max_iterations,
        tolerance,
    )
    state, iterations, converged = em.run(state, None)
    if classify:
        state, more, converged = em.run(state, None, classify=True)
        iterations += more
    if dependence and u_source == "candidates" and len(sizes) > 1:
        parents, information = _dependence_tree(levels, sizes, em.posterior(state))
        if any(p >= 0 for p in parents):
            state, more, converged = em.run(state, parents, classify=classify)
            iterations += more
            assert state.tree is not None
            state = _EMState(
                state.m,
                state.u,
                state.rho,
                dataclasses.replace(state.tree, information=information),
            )
    m, u, rho = state.m, state.u, state.rho
    report = FitReport(
        iterations=iterations,
        converged=converged,
        candidate_pairs=len(qi),
        random_pairs=n_random,
        queries=int(in_pairs.sum()),
        labelled=int(labelled.sum()),
    )
    return RecordModel(
        comparisons=comparisons,
        m=tuple(m),
        u=tuple(u),
        rho=rho,
        entities=n_entities,
        u_source=u_source,
        exclusive=exclusive,
        catalog=catalog,
        frequencies=frequencies,
        mean_frequency=mean_frequency,
        dependence=state.tree,
        specs=specs,
        report=report,
        term_frequencies=term_frequencies,
        fitted=(qi, ei, levels),
    )


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


#: A field gets a parent only if it shares at least this much information with it (bits,
#: within the match and non-match classes, weighted by their sizes): below it the fields
#: are taken as independent, as Fellegi-Sunter does.
MIN_INFORMATION = 0.02


def _joint(a: Ints, b: Ints, na: int, nb: int, weights: Floats) -> Floats:
    """Weighted counts of (level a, level b) over pairs where both are present."""
    keep = (a > 0) & (b > 0)
    flat = a[keep] * nb + b[keep]
    counts = np.bincount(flat, weights=weights[keep], minlength=na * nb).astype(np.float64)
    return np.asarray(counts.reshape(na, nb), dtype=np.float64)


def _information(joint: Floats) -> float:
    """Mutual information (bits) of a table of counts."""
    total = joint.sum()
    if total <= 0:
        return 0.0
    p = joint / total
    pa = p.sum(axis=1, keepdims=True)
    pb = p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log2(p[nz] / (pa @ pb)[nz])).sum())


def _dependence_tree(
    levels: npt.NDArray[np.int8], sizes: Sequence[int], match: Floats
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(parents, information) of a maximum spanning tree of class-conditional information."""
    n_fields = len(sizes)
    lv = [levels[:, f].astype(np.int64) for f in range(n_fields)]
    edges: list[tuple[float, int, int]] = []
    for f in range(n_fields):
        for g in range(f + 1, n_fields):
            info = 0.0
            for weights in (match, 1.0 - match):
                joint = _joint(lv[f], lv[g], sizes[f], sizes[g], weights)
                info += _information(joint) * joint.sum()
            info /= max(len(match), 1)
            if info >= MIN_INFORMATION:
                edges.append((info, f, g))
    # Kruskal: strongest edges first, no cycles
    component = list(range(n_fields))

    def find(x: int) -> int:
        while component[x] != x:
            x = component[x]
        return x

    neighbours: dict[int, list[tuple[int, float]]] = {f: [] for f in range(n_fields)}
    for info, f, g in sorted(edges, reverse=True):
        rf, rg = find(f), find(g)
        if rf != rg:
            component[rf] = rg
            neighbours[f].append((g, info))
            neighbours[g].append((f, info))
    parents = [-1] * n_fields
    information = [0.0] * n_fields
    seen: set[int] = set()
    for root in range(n_fields):
        if root in seen:
            continue
        seen.add(root)
        stack = [root]
        while stack:
            node = stack.pop()
            for child, info in neighbours[node]:
                if child not in seen:
                    seen.add(child)
                    parents[child] = node
                    information[child] = info
                    stack.append(child)
    return tuple(parents), tuple(information)


def _conditional(
    levels: npt.NDArray[np.int8],
    sizes: Sequence[int],
    parents: Sequence[int],
    weights: Floats,
    marginal: Sequence[Floats],
) -> tuple[Floats | None, ...]:
    """Per field with a parent: P(level | parent's level), shrunk toward its marginal."""
    out: list[Floats | None] = []
    for f, g in enumerate(parents):
        if g < 0:
            out.append(None)
            continue
        joint = _joint(
            levels[:, g].astype(np.int64),
            levels[:, f].astype(np.int64),
            sizes[g],
            sizes[f],
            weights,
        )
        prior = _levels_only(marginal[f])
        table = joint + PRIOR_QUERIES * prior[None, :]
        table[:, 0] = 0.0
        table /= np.maximum(table.sum(axis=1, keepdims=True), 1e-300)
        table[:, 0] = 1.0
        out.append(table)
    return tuple(out)


@dataclass(frozen=True)
class _EMState:
    m: list[Floats]
    u: list[Floats]
    rho: float
    tree: Dependence | None


@dataclass(frozen=True)
class _EM:
    """Expectation maximisation over the candidate pairs (see :func:`fit_record_model`)."""

    comparisons: Sequence[Comparison]
    levels: npt.NDArray[np.int8]
    qi: Ints
    ei: Ints
    n_queries: int
    n_entities: int
    sizes: Sequence[int]
    m_prior: Sequence[Floats]
    u_start: Sequence[Floats]
    u_random: Sequence[Floats]
    u_source: USource
    exclusive: bool
    tf: Sequence[Floats] | None
    mean_frequency: Sequence[float]
    labelled: npt.NDArray[np.bool_]
    fixed_pair: Floats | None
    max_iterations: int
    tolerance: float

    def posterior(self, state: _EMState) -> Floats:
        """E-step: each candidate pair's posterior of being its query's match."""
        log_bf = _log_bf(
            self.comparisons,
            state.m,
            state.u,
            self.levels,
            self.ei,
            self.tf,
            self.mean_frequency,
            state.tree,
        ).sum(axis=1)
        prior = _log_prior(self.qi, state.rho, self.n_entities, self.u_source, self.exclusive)
        pair, _ = _posterior(log_bf, prior, self.qi, self.n_queries, state.rho, self.exclusive)
        if self.fixed_pair is not None:
            pair = np.where(self.labelled[self.qi], self.fixed_pair, pair)
        return pair

    def run(
        self, state: _EMState, parents: Sequence[int] | None, *, classify: bool = False
    ) -> tuple[_EMState, int, bool]:
        """Iterate from ``state`` until m and rho move less than the tolerance.

        ``classify``: m is counted on the pairs the posterior links (above one half),
        not on every pair by its posterior (classification EM; u and rho stay soft).
        """
        sizes, levels = self.sizes, self.levels
        active = max(int(np.unique(self.qi).size), 1)
        trials = active if self.exclusive else max(len(self.qi), 1)
        iterations = 0
        for iterations in range(1, self.max_iterations + 1):
            if self.u_source == "random":
                lam = state.rho / self.n_entities
                state = _EMState(
                    state.m,
                    _random_u(self.u_random, state.m, lam, self.comparisons),
                    state.rho,
                    state.tree,
                )
            pair = self.posterior(state)
            linked = (pair > 0.5).astype(np.float64) if classify else pair
            # the priors stand in for pseudo-counts
            m = [
                _normalise(
                    _count(levels[:, f], n, linked)
                    + PRIOR_QUERIES * _levels_only(self.m_prior[f]),
                    0.0,
                )
                for f, n in enumerate(sizes)
            ]
            u = state.u
            if self.u_source == "candidates":
                u = [
                    _normalise(
                        _count(levels[:, f], n, 1.0 - pair)
                        + PRIOR_QUERIES * _levels_only(self.u_start[f]),
                        0.0,
                    )
                    for f, n in enumerate(sizes)
                ]
            tree = None
            if parents is not None:
                tree = Dependence(
                    tuple(parents),
                    _conditional(levels, sizes, parents, linked, m),
                    _conditional(levels, sizes, parents, 1.0 - pair, u),
                )
            rho = float(
                np.clip((pair.sum() + PRIOR_QUERIES / 2) / (trials + PRIOR_QUERIES), *RHO_BOUNDS)
            )
            change = max(
                max(float(np.abs(a - b).max()) for a, b in zip(m, state.m, strict=True)),
                abs(rho - state.rho),
            )
            state = _EMState(m, u, rho, tree)
            if change < self.tolerance and (parents is None or iterations > 1):
                return state, iterations, True
        return state, iterations, False


def _random_pair_counts(
    comparisons: Sequence[Comparison],
    left: Mapping[str, Column],
    right: Mapping[str, Column],
    pairs: int,
    *,
    seed: int,
    exclude_self: bool,
) -> list[Floats]:
    """Per field, how many of ``pairs`` random (left, right) pairs land on each level."""
    n_left, n_right = len(next(iter(left.values()))), len(next(iter(right.values())))
    rng = np.random.default_rng(seed)
    possible = n_left * n_right - (min(n_left, n_right) if exclude_self else 0)
    n = int(min(pairs, max(possible, 0)))
    li = rng.integers(0, n_left, n)
    ri = rng.integers(0, n_right, n)
    if exclude_self and n_right > 1:
        clash = li == ri
        ri[clash] = (ri[clash] + rng.integers(1, n_right, int(clash.sum()))) % n_right
    levels = _levels(comparisons, left, right, li, ri)
    return [
        np.bincount(levels[:, f].astype(np.int64), minlength=len(c.labels)).astype(np.float64)
        for f, c in enumerate(comparisons)
    ]


def _random_u(
    counts: Sequence[Floats],
    m: Sequence[Floats],
    lam: float,
    comparisons: Sequence[Comparison],
) -> list[Floats]:
    """u per field from random-pair counts, with the expected matches among them removed.

    Random pairs hold a share ``lam`` of matches, distributed as ``m``: ``u = (counts -
    lam * n * m) / (1 - lam)``. The exact level is not counted: too rare to count on
    random pairs, it is the comparison's ``coincidence`` (two distinct catalog entities
    share a value).
    """
    out: list[Floats] = []
    for c, mf, comp in zip(counts, m, comparisons, strict=True):
        exact_u = comp.coincidence
        clean = np.maximum(c - lam * c[1:].sum() * _levels_only(mf), 0.0)
        clean[comp.exact_level] = 0.0
        u = _normalise(clean)
        u[1:] *= 1.0 - exact_u
        u[comp.exact_level] = exact_u
        out.append(u)
    return out


def _levels_only(m: Floats) -> Floats:
    """``m`` over the non-null levels (the null level's 1 set to 0)."""
    out = m.copy()
    out[0] = 0.0
    return out


def _initial_m(size: int) -> Floats:
    """A starting m: each level four times as likely among matches as the one below it."""
    m = np.array([0.0] + [4.0**i for i in range(size - 1)])
    return _normalise(m / m.sum() * 10)
