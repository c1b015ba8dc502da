"""Per-query decisions from the record model's posteriors: matched, novel or undecided.

A query's outcomes are "its entity is candidate j" (one per candidate) and "none of them"
(``RecordModel.posteriors``; they add up to 1, because a query is at most one entity).
The rule decides the most probable outcome when it holds more than ``min_probability`` of
the mass, and leaves the query undecided otherwise (for the LLM or a reviewer):

- **why the posterior, not the pair's own probability**: two near-identical candidates
  (a catalog duplicate, the same paper listed twice) each look like a match on their
  own; against each other neither holds more than half, so the query is undecided, not
  matched at random.
- **why more than half by default**: then the decided outcome is more probable than
  every other outcome taken together; on the development record sets this decided 98-100%
  of the queries with link precision >= 0.995 and no labels (``docs/records.md``). It
  needs no tuning per catalog; a stricter ``min_probability`` trades coverage for
  precision where the fields say less (one field, or correlated ones).
- **with labels**, :func:`cut_for_precision` picks the lowest cut whose decided labelled
  queries reach a target precision, counting one unseen error against it.

Pure: arrays in, arrays out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from .model import Posteriors

__all__ = ["Decision", "Decisions", "cut_for_precision", "decide"]

Decision = Literal["matched", "novel", "undecided"]
Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]

#: The default cut: the decided outcome holds more than half of the probability.
DEFAULT_MIN_PROBABILITY = 0.5


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
    min_probability: float = DEFAULT_MIN_PROBABILITY,
    novel_min_probability: float | None = None,
) -> Decisions:
    """Decide each query from its candidates' posteriors (see the module docstring).

    Args:
        posteriors: ``RecordModel.posteriors`` of the scored pairs.
        query, entity: the pairs' query and entity positions (as scored).
        min_probability: a match is decided when its candidate's posterior is at least
            this (and is the most probable outcome).
        novel_min_probability: the same for "none" (default: ``min_probability``).

    Raises:
        ValueError: a cut outside [0.5, 1] (below one half, two outcomes could pass).
    """
    novel_cut = min_probability if novel_min_probability is None else novel_min_probability
    for name, cut in (("min_probability", min_probability), ("novel", novel_cut)):
        if not 0.5 <= cut <= 1.0:
            raise ValueError(f"{name} must be in [0.5, 1], got {cut!r}")
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
    matched = (best_pair >= 0) & (best_p >= min_probability) & (best_p > none)
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
