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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .comparisons import Column, Comparison, comparison_for
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
    specs: tuple[FieldSpec, ...] = ()
    report: FitReport | None = None
    term_frequencies: bool = True

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
        levels = self.levels(queries, qi, ei)
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
        return _log_bf(self.comparisons, self.m, self.u, levels, entity, tf, self.mean_frequency)


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
) -> Floats:
    """Natural-log Bayes factors ``log m/u`` per pair and field (term-frequency adjusted).

    With ``frequencies``, an exact match on value ``v`` has ``u = u_exact * tf(v) /
    mean_frequency``: the level's u scaled by how much rarer ``v`` is than the average
    value.
    """
    out = np.zeros(levels.shape, dtype=np.float64)
    for f, c in enumerate(comparisons):
        lv = levels[:, f].astype(np.int64)
        out[:, f] = np.log(m[f][lv]) - np.log(u[f][lv])
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
        log_miss = np.bincount(query, weights=np.log1p(-np.minimum(pair, 1 - 1e-12)),
                               minlength=queries)  # fmt: skip
        return pair, np.exp(log_miss)
    log_none = math.log1p(-rho)
    w = log_prior + log_bf
    top = np.full(queries, log_none)
    np.maximum.at(top, query, w)
    total = np.bincount(query, weights=np.exp(w - top[query]), minlength=queries)
    total += np.exp(log_none - top)
    lse = top + np.log(total)
    return np.exp(w - lse[query]), np.exp(log_none - lse)


def _count(levels: npt.NDArray[np.int8], size: int, weights: Floats | None) -> Floats:
    """Weighted counts of each level 1..size-1 (level 0, null, is not counted)."""
    counts = np.bincount(levels.astype(np.int64), weights=weights, minlength=size)[:size]
    counts = counts.astype(np.float64)
    counts[0] = 0.0
    return counts


def _normalise(counts: Floats) -> Floats:
    """Probabilities over the non-null levels (with pseudo-counts); the null level is 1."""
    out = counts.copy()
    out[1:] += PSEUDO_COUNT
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
    random_pairs: int = 50_000,
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
    comparisons = tuple(
        comparison_for(
            s,
            [e.get(s.name) for e in entities],
            others=[] if exclude_self else [q.get(s.name) for q in queries],
            seed=seed,
        )
        for s in compared
    )
    catalog = _columns(comparisons, entities)
    frequencies = tuple(_frequencies(c, catalog[c.spec.name]) for c in comparisons)
    mean_frequency = tuple(
        max(float(sum(v * v for v in c.frequencies.values())), 1e-12) for c in comparisons
    )
    tf = frequencies if term_frequencies else None
    qcols = _columns(comparisons, queries)
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

    # EM: m, rho (and u from the candidates), a query being at most one of its candidates
    m_prior = [_initial_m(n) for n in sizes]
    m = list(m_prior)
    u = _random_u(u_random, m, 0.0, comparisons)
    u_start = list(u)
    rho = 0.5
    pair = np.zeros(len(qi))
    converged = False
    iterations = 0
    active = max(int(in_pairs.sum()), 1)
    for iterations in range(1, max_iterations + 1):  # noqa: B007
        if u_source == "random":
            u = _random_u(u_random, m, rho / n_entities, comparisons)
        log_bf = _log_bf(comparisons, m, u, levels, ei, tf, mean_frequency).sum(axis=1)
        prior = _log_prior(qi, rho, n_entities, u_source, exclusive)
        pair, _ = _posterior(log_bf, prior, qi, n_queries, rho, exclusive)
        if fixed_pair is not None:
            pair = np.where(labelled[qi], fixed_pair, pair)
        new_m = [
            _normalise(_count(levels[:, f], n, pair) + PRIOR_QUERIES * _levels_only(m_prior[f]))
            for f, n in enumerate(sizes)
        ]
        if u_source == "candidates":
            u = [
                _normalise(_count(levels[:, f], n, 1.0 - pair) + PRIOR_QUERIES * _levels_only(ur))
                for f, (n, ur) in enumerate(zip(sizes, u_start, strict=True))
            ]
        trials = active if exclusive else max(len(qi), 1)
        new_rho = float(np.clip((pair.sum() + PRIOR_QUERIES / 2) / (trials + PRIOR_QUERIES),
                                *RHO_BOUNDS))  # fmt: skip
        change = max(
            max(float(np.abs(a - b).max()) for a, b in zip(new_m, m, strict=True)),
            abs(new_rho - rho),
        )
        m, rho = new_m, new_rho
        if change < tolerance:
            converged = True
            break
    if u_source == "random":
        u = _random_u(u_random, m, rho / n_entities, comparisons)
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
        specs=specs,
        report=report,
        term_frequencies=term_frequencies,
    )


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
