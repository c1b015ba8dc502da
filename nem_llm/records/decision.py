"""Per-query decisions from the record model's posteriors: matched, novel or undecided.

A query's outcomes are "its entity is candidate j" (one per candidate) and "none of them"
(``RecordModel.posteriors``; they add up to 1, because a query is at most one entity).
Each query's most probable outcome is its candidate decision; which of those are taken
without a reviewer (or the LLM) is decided per route, matched and novel:

- **the model's own expected precision**: a route's decisions are taken most probable
  first, as long as the mean posterior of everything taken stays at or above its target
  (0.99 for matched, 0.95 for novel: the Matcher's ``target_precision`` and
  ``novel_target_precision``): the expected share of right decisions, if the posteriors
  are calibrated. Where the fields speak clearly nearly every query is decided; where
  they do not, the least certain wait. No cut is tuned to a catalog: the cut is where
  the expected error of the route would pass ``1 - target_precision`` on this run's
  queries.
- **never a coin flip**: an outcome is taken only when it holds at least
  ``min_probability`` (2/3) of the mass: it is at least twice as probable as all the
  others together, however sure the rest of the route is (the mean alone would let a
  few 55% guesses ride on many certain decisions).
- **why the posterior, not a pair's own probability**: two near-identical candidates (a
  catalog duplicate, the same paper listed twice) each look like a match alone; against
  each other neither holds more than half, so the query waits.
- **with labels**, :func:`cut_for_precision` picks the lowest posterior at which labelled
  decisions reach the target, counting one unseen error against it.

The posteriors are only as calibrated as the model: fields that repeat each other's
evidence make them overconfident (``infer_fields`` skips a field that joins others). On
the development record sets this rule decided 99-100% of the queries with link
precision 1.0 and no labels (``docs/records.md``).

Pure: arrays in, arrays out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from .model import Posteriors

__all__ = ["Decision", "Decisions", "cut_for_precision", "decide", "expected_precision_cut"]

Decision = Literal["matched", "novel", "undecided"]
Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]

#: The floor: the decided outcome is at least twice as probable as all the others
#: together (odds 2:1).
DEFAULT_MIN_PROBABILITY = 2 / 3
#: What each route's decisions must be expected to reach (their mean posterior): the
#: Matcher's defaults for its auto routes (``target_precision``,
#: ``novel_target_precision``).
DEFAULT_TARGET_PRECISION = 0.99
DEFAULT_NOVEL_TARGET_PRECISION = 0.95


@dataclass(frozen=True)
class Decisions:
    """One decision per query (position ``q``).

    Attributes:
        status: ``"matched"``, ``"novel"`` or ``"undecided"``.
        entity: the matched entity's position, or -1.
        best_entity: the most probable candidate (-1: the query had none), decided or not.
        best_probability: its posterior.
        none_probability: the posterior that the query's entity is not among its
            candidates.
        pair: per query, the position (in the scored pairs) of its best candidate, or -1.
    """

    status: tuple[Decision, ...]
    entity: Ints
    best_entity: Ints
    best_probability: Floats
    none_probability: Floats
    pair: Ints

    def __len__(self) -> int:
        return len(self.status)

    def confidence(self) -> Floats:
        """Per query, the posterior of its most probable outcome (candidate or none)."""
        return np.maximum(self.best_probability, self.none_probability)


def decide(
    posteriors: Posteriors,
    query: Sequence[int] | Ints,
    entity: Sequence[int] | Ints,
    *,
    target_precision: float | None = DEFAULT_TARGET_PRECISION,
    novel_target_precision: float | None = DEFAULT_NOVEL_TARGET_PRECISION,
    min_probability: float = DEFAULT_MIN_PROBABILITY,
    novel_min_probability: float | None = None,
    review: Sequence[bool] | npt.NDArray[np.bool_] | None = None,
) -> Decisions:
    """Decide each query from its candidates' posteriors (see the module docstring).

    Args:
        posteriors: ``RecordModel.posteriors`` of the scored pairs.
        query, entity: the pairs' query and entity positions (as scored).
        target_precision: the matched route takes its decisions, most probable first,
            while their mean posterior stays at or above this; ``None`` takes every
            decision above the cuts.
        novel_target_precision: the same for the novel route (0.95, the Matcher's
            ``novel_target_precision``: calling a mention novel sends it nowhere wrong).
        min_probability: a match is never decided below this posterior (and only when it
            is the most probable outcome).
        novel_min_probability: the same for "none" (default: ``min_probability``).
        review: per pair, whether it may only be matched after review (e.g. an
            identifying field disagrees completely): its query is undecided instead.

    Raises:
        ValueError: a cut outside [0.5, 1] (below one half, two outcomes could pass), or
            a target outside (0, 1].
    """
    novel_cut = min_probability if novel_min_probability is None else novel_min_probability
    for name, cut in (("min_probability", min_probability), ("novel", novel_cut)):
        if not 0.5 <= cut <= 1.0:
            raise ValueError(f"{name} must be in [0.5, 1], got {cut!r}")
    for name, target in (
        ("target_precision", target_precision),
        ("novel_target_precision", novel_target_precision),
    ):
        if target is not None and not 0.0 < target <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {target!r}")
    qi = np.asarray(query, dtype=np.int64)
    ei = np.asarray(entity, dtype=np.int64)
    n = posteriors.queries
    best_pair = np.full(n, -1, dtype=np.int64)
    best_p = np.zeros(n)
    if len(qi):
        # per query, the pair of highest posterior (ties: the first pair given)
        order = np.lexsort((np.arange(len(qi)), -posteriors.pair, qi))
        first = np.ones(len(order), dtype=bool)
        first[1:] = qi[order][1:] != qi[order][:-1]
        chosen = order[first]
        best_pair[qi[chosen]] = chosen
        best_p[qi[chosen]] = posteriors.pair[chosen]
    best_entity = np.where(best_pair >= 0, ei[np.maximum(best_pair, 0)] if len(ei) else -1, -1)
    none = posteriors.none
    match_side = (best_pair >= 0) & (best_p > none)
    if target_precision is not None:
        min_probability = max(
            min_probability, expected_precision_cut(best_p[match_side], target_precision)
        )
    if novel_target_precision is not None:
        novel_cut = max(
            novel_cut, expected_precision_cut(none[~match_side], novel_target_precision)
        )
    matched = (best_pair >= 0) & (best_p >= min_probability) & (best_p > none)
    if review is not None:
        # a pair the caller holds for review is never matched without it
        held = np.asarray(review, dtype=bool)
        if len(held):
            matched &= ~held[np.maximum(best_pair, 0)]
    novel = ~matched & (none >= novel_cut) & (none >= best_p)
    status: tuple[Decision, ...] = tuple(
        "matched" if m else ("novel" if v else "undecided")
        for m, v in zip(matched.tolist(), novel.tolist(), strict=True)
    )
    return Decisions(
        status=status,
        entity=np.where(matched, best_entity, -1).astype(np.int64),
        best_entity=best_entity.astype(np.int64),
        best_probability=best_p,
        none_probability=np.asarray(none, dtype=np.float64),
        pair=best_pair,
    )


def expected_precision_cut(probabilities: Floats, target: float) -> float:
    """The lowest posterior at which decisions taken most probable first keep a mean
    posterior (their expected precision) of at least ``target``; above 1 if none does.

    Example:
        >>> expected_precision_cut(np.array([1.0, 1.0, 0.98, 0.6]), 0.99)
        0.98
    """
    p = np.sort(np.asarray(probabilities, dtype=np.float64))[::-1]
    if not len(p):
        return 1.0
    mean = np.cumsum(p) / np.arange(1, len(p) + 1)
    # a cut takes every decision at its value: only the end of a run of equal values counts
    last = np.ones(len(p), dtype=bool)
    last[:-1] = p[1:] != p[:-1]
    ok = np.flatnonzero((mean >= target) & last)
    return float(p[ok[-1]]) if len(ok) else float(np.nextafter(1.0, 2.0))


def cut_for_precision(
    confidence: Sequence[float] | Floats,
    correct: Sequence[bool] | npt.NDArray[np.bool_],
    *,
    target: float = 0.99,
    floor: float = DEFAULT_MIN_PROBABILITY,
) -> float | None:
    """The lowest cut (>= ``floor``) at which labelled decisions reach ``target`` precision.

    Decisions with ``confidence >= cut`` count; their precision is taken as
    ``right / (decided + 1)`` (one error not yet seen), so a handful of labels never
    opens a route on luck. ``None``: no cut reaches the target.

    Example:
        >>> cut_for_precision([0.99] * 200 + [0.6, 0.6], [True] * 200 + [False, False])
        0.99
    """
    conf = np.asarray(confidence, dtype=np.float64)
    right = np.asarray(correct, dtype=bool)
    if conf.shape != right.shape:
        raise ValueError("confidence and correct must have the same length")
    order = np.argsort(-conf, kind="stable")
    conf, right = conf[order], right[order]
    hits = np.cumsum(right)
    precision = hits / (np.arange(1, len(conf) + 1) + 1.0)
    # a cut can only fall between distinct confidences: take the last of each run
    last = np.ones(len(conf), dtype=bool)
    last[:-1] = conf[1:] != conf[:-1]
    ok = np.flatnonzero(last & (precision >= target) & (conf >= floor))
    if not len(ok):
        return None
    return float(conf[ok[-1]])
