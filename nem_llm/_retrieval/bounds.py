"""The precision bound every route is chosen by: pure numpy, shared by the threshold
calibration (``calibration.py``) and the routing model (``route_model.py``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Z", "lower_bound", "widest_cut"]

#: z of the one-sided 90% Wilson lower bound every estimated precision is taken at.
Z = 1.2816


def lower_bound(correct: Any, taken: Any, unit: float) -> Any:
    """Wilson lower bound of the precision ``correct / taken`` (weights; ``unit`` is one
    example's weight, so ``taken / unit`` examples were counted). Works on arrays."""
    with np.errstate(invalid="ignore", divide="ignore"):
        n = np.asarray(taken, dtype=np.float64) / unit
        p = np.asarray(correct, dtype=np.float64) / np.asarray(taken, dtype=np.float64)
        z2 = Z * Z
        centre = p + z2 / (2 * n)
        spread = Z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
        return (centre - spread) / (1 + z2 / n)


def widest_cut(
    score: npt.NDArray[np.float64],
    good: npt.NDArray[np.float64],
    weight: npt.NDArray[np.float64],
    target: float,
    unit: float,
    already: tuple[float, float] = (0.0, 0.0),
) -> tuple[float, float, float, float] | None:
    """The lowest cut on ``score`` whose decisions keep the precision bound at ``target``.

    Deciding ``score >= cut`` takes every example tied with the cut. ``already`` is the
    (weight, right weight) other rules decide beside it, counted in the bound. Returns
    ``(cut, bound, taken weight, right weight)`` (``already`` included), or ``None``.
    """
    order = np.argsort(-score, kind="stable")
    s, g, w = score[order], good[order], weight[order]
    last = np.searchsorted(-s, -s, side="right") - 1
    taken = already[0] + np.cumsum(w)[last]
    right = already[1] + np.cumsum(g * w)[last]
    bound = lower_bound(right, taken, unit)
    ok = np.flatnonzero(bound >= target)
    if not ok.size:
        return None
    i = ok[np.argmax(taken[ok])]
    return float(s[i]), float(bound[i]), float(taken[i]), float(right[i])
