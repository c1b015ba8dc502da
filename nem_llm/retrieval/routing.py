"""Routing: matched / novel / adjudicate from candidate scores, and threshold calibration.

Pure functions: candidates and thresholds in, a :class:`Route` out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..config import Thresholds
from ..models import Candidate

__all__ = ["LabelledScore", "Route", "calibrate", "route"]

RouteKind = Literal["matched", "novel", "adjudicate"]


@dataclass(frozen=True)
class Route:
    """Where one query goes, and why (a sentence for ``explain``/``diagnose``)."""

    kind: RouteKind
    reason: str
    top_score: float | None
    margin: float | None


def route(candidates: Sequence[Candidate], thresholds: Thresholds) -> Route:
    """Decide from the top candidates whether to accept, call novel, or ask the LLM."""
    if not candidates:
        return Route("novel", "no candidates", None, None)
    top = candidates[0].score
    runner_up = candidates[1].score if len(candidates) > 1 else 0.0
    margin = top - runner_up
    if top < thresholds.novel:
        return Route(
            "novel",
            f"top score {top:.3f} < novel_threshold {thresholds.novel:.3f}",
            top,
            margin,
        )
    if top >= thresholds.accept and margin >= thresholds.margin:
        return Route(
            "matched",
            f"top score {top:.3f} >= accept_threshold {thresholds.accept:.3f} and "
            f"{margin:.3f} ahead of the runner-up (margin {thresholds.margin:.3f})",
            top,
            margin,
        )
    if top >= thresholds.accept:
        why = f"top score {top:.3f} is high but only {margin:.3f} ahead of the runner-up"
    else:
        why = (
            f"top score {top:.3f} is between novel_threshold {thresholds.novel:.3f} and "
            f"accept_threshold {thresholds.accept:.3f}"
        )
    return Route("adjudicate", why, top, margin)


@dataclass(frozen=True)
class LabelledScore:
    """One labelled example as calibration sees it."""

    top_score: float
    margin: float
    top_is_gold: bool
    gold_is_none: bool


_MARGINS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.08, 0.1, 0.15)


def calibrate(
    examples: Sequence[LabelledScore],
    *,
    target_precision: float = 0.99,
    default: Thresholds | None = None,
    min_examples: int = 20,
) -> Thresholds:
    """Pick thresholds that reach ``target_precision`` on labelled examples.

    - accept/margin: among all (accept, margin) pairs whose auto-accepted examples are at
      least ``target_precision`` correct (top candidate is the gold id), the pair that
      auto-accepts the most examples; ties keep the larger margin.
    - novel: the highest cut whose "novel" examples (top below it) are at least
      ``target_precision`` truly absent (gold is None), placed midway between the highest
      novel example and the cut; capped at accept.

    With fewer than ``min_examples`` examples, or no pair reaching the target, the
    corresponding default is kept (the LLM then sees more queries: the safe side).
    """
    base = default or Thresholds()
    if len(examples) < min_examples:
        return base
    top = np.array([e.top_score for e in examples], dtype=np.float64)
    gap = np.array([e.margin for e in examples], dtype=np.float64)
    ok = np.array([e.top_is_gold for e in examples], dtype=np.float64)
    none = np.array([e.gold_is_none for e in examples], dtype=np.float64)

    accept, margin, best_cov = base.accept, base.margin, 0
    for m in sorted(_MARGINS, reverse=True):  # ties keep the larger (safer) margin
        sel = gap >= m
        t, c = top[sel], ok[sel]
        if t.size == 0:
            continue
        order = np.argsort(-t, kind="stable")
        t, c = t[order], c[order]
        # accepting "score >= t[i]" takes every example up to the last one tied with t[i]
        last = np.searchsorted(-t, -t, side="right") - 1
        n = last + 1
        precision = np.cumsum(c)[last] / n
        good = np.flatnonzero(precision >= target_precision)
        if good.size:
            i = good[np.argmax(n[good])]
            if n[i] > best_cov:
                best_cov, accept, margin = int(n[i]), float(t[i]), m

    novel = base.novel
    if none.any():
        order = np.argsort(top, kind="stable")
        t, c = top[order], none[order]
        # "novel if score < t[i]" takes every example strictly below t[i]
        n_below = np.searchsorted(t, t, side="left")
        cum = np.r_[0.0, np.cumsum(c)]
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = cum[n_below] / n_below
        good = np.flatnonzero((n_below > 0) & (precision >= target_precision))
        if good.size:
            cut = int(good[np.argmax(t[good])])
            # midway between the highest score called novel and the cut, so the threshold
            # does not hug the first non-novel example
            novel = float((t[n_below[cut] - 1] + t[cut]) / 2)
    novel = min(novel, accept)
    return Thresholds(accept=accept, margin=margin, novel=novel, calibrated=True)
