"""Fitting the record model: EM over candidate pairs, u from random pairs, priors, a tree.

:func:`fit_record_model` infers the fields' kinds (or takes them), normalises each field of
the catalog and the queries once, counts comparison levels on random pairs (the start of
u) and on the candidate pairs, and runs expectation maximisation (``model.py`` says what
the parameters mean): soft EM to convergence, then classification EM for m, and, if asked,
once more with a Chow-Liu tree of the fields that depend on each other. Pure: records in,
a :class:`~nem_llm.records.model.RecordModel` out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .comparisons import LEVELS, Column, Comparison, fit_comparison
from .fields import FieldKind, FieldSpec, infer_fields
from .model import (
    Dependence,
    FitReport,
    RecordModel,
    USource,
    log_bayes_factors,
    log_priors,
    pair_levels,
    query_posteriors,
    value_frequencies,
)

__all__ = ["PRIOR_QUERIES", "PSEUDO_COUNT", "fit_record_model"]

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
#: A field gets a parent only if it shares at least this much information with it (bits,
#: within the match and non-match classes, weighted by their sizes): below it the fields
#: are taken as independent, as Fellegi-Sunter does.
MIN_INFORMATION = 0.02


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
    random_pairs: int | None = None,
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
        random_pairs: how many random pairs estimate ``u`` (default 10,000 with
            ``u_source="random"``; 2,000 with ``"candidates"``, where they only start EM
            and stand in where the candidates are few).
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
    frequencies = tuple(value_frequencies(c, catalog[c.spec.name]) for c in comparisons)
    mean_frequency = tuple(
        max(float(sum(v * v for v in c.frequencies.values())), 1e-12) for c in comparisons
    )
    tf = frequencies if term_frequencies else None
    sizes = [len(c.labels) for c in comparisons]

    if random_pairs is None:
        random_pairs = 10_000 if u_source == "random" else 2_000
    u_random = _random_pair_counts(
        comparisons, qcols, catalog, random_pairs, seed=seed, exclude_self=exclude_self
    )
    n_random = int(u_random[0].sum()) if u_random else 0
    levels = pair_levels(comparisons, qcols, catalog, qi, ei)
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
        log_bf = log_bayes_factors(
            self.comparisons,
            state.m,
            state.u,
            self.levels,
            self.ei,
            self.tf,
            self.mean_frequency,
            state.tree,
        ).sum(axis=1)
        prior = log_priors(self.qi, state.rho, self.n_entities, self.u_source, self.exclusive)
        pair, _ = query_posteriors(
            log_bf, prior, self.qi, self.n_queries, state.rho, self.exclusive
        )
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
                    _count(levels[:, f], n, linked) + PRIOR_QUERIES * _levels_only(self.m_prior[f]),
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
    levels = pair_levels(comparisons, left, right, li, ri)
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
