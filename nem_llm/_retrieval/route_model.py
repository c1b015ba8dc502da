"""The routing model: with labels, a small calibrated classifier decides some of what the
threshold rules leave to the LLM.

The threshold rules (``routing.py``) look at a few numbers at a time: the top score and its
lead, or an exact hit. Labels can show more: that an exact hit which crossed scripts is
always right on this catalog while one in the same script is not, or that a high dense
score with a low lexical one is a different entity. Given enough labels
(:data:`MIN_LABELS`), :func:`fit_route_model` fits two small gradient-boosted tree
ensembles (scikit-learn's ``HistGradientBoostingClassifier``, depth 3) over the routing
features (:data:`FEATURES`): the chance that the top candidate is the entity meant, and the
chance that the entity meant is not in the catalog.

Each model opens its route only where cross-validation says it is safe: its cut is chosen
on out-of-fold probabilities (each labelled example scored by a model that never saw it),
as the lowest probability at which the route, the rule's decisions plus the model's,
still reaches its target precision at the lower end of the one-sided 90% Wilson interval
(the bound calibration uses everywhere). Then the model is refit on all labels. A model
that adds nothing under that bound is not kept: the rules route alone.

Pure apart from the fitting itself: labelled examples and the rule's thresholds in, a
:class:`RouteModel` (or ``None``) and a one-line account out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .bounds import widest_cut
from .routing import RouteFeatures

__all__ = ["FEATURES", "MIN_LABELS", "RouteModel", "fit_route_model", "vector"]

#: What the model reads, in order (see :class:`~nem_llm._retrieval.routing.RouteFeatures`).
FEATURES = (
    "top",
    "margin",
    "dense",
    "lexical",
    "agree",
    "near_ties",
    "exact",
    "cross_script",
    "query_tokens",
)
#: Fewer labels than this fit no model (the rules route alone).
MIN_LABELS = 100
#: Folds of the cross-validation that chooses each cut.
FOLDS = 5
#: Each class needs this many labelled examples for its model to be fit.
_MIN_CLASS = 10


def vector(f: RouteFeatures) -> list[float]:
    """The features of one query as the model reads them (:data:`FEATURES` order)."""
    return [
        f.top,
        min(f.margin, 0.5),
        f.dense,
        f.lexical,
        float(f.agree),
        float(min(f.near_ties, 5)),
        float(f.exact),
        float(f.cross_script),
        float(min(f.query_tokens, 50)),
    ]


@dataclass(frozen=True)
class RouteModel:
    """Two fitted classifiers and the probability each must reach to decide alone.

    ``matched`` estimates P(the top candidate is the entity meant), ``novel`` P(the entity
    meant is not in the catalog); either is ``None`` when its route gained nothing.
    """

    matched: Any | None
    matched_cut: float
    novel: Any | None
    novel_cut: float
    labels: int

    def decide(self, f: RouteFeatures) -> tuple[Literal["matched", "novel"], float] | None:
        """``(route, probability)`` when one model is sure enough, else ``None``."""
        if f.same_name_tie:  # same-named entities are never told apart by these features
            return None
        x = np.array([vector(f)], dtype=np.float64)
        if self.matched is not None:
            p = float(self.matched.predict_proba(x)[0, 1])
            if p >= self.matched_cut:
                return "matched", p
        if self.novel is not None:
            p = float(self.novel.predict_proba(x)[0, 1])
            if p >= self.novel_cut:
                return "novel", p
        return None

    def describe(self) -> str:
        """One line: which routes the model decides, and at what probability."""
        parts = []
        if self.matched is not None:
            parts.append(f"matched when P(right) >= {self.matched_cut:.3f}")
        if self.novel is not None:
            parts.append(f"novel when P(absent) >= {self.novel_cut:.3f}")
        return (
            f"a routing model ({FOLDS}-fold cross-validated on {self.labels} labels) decides "
            + " and ".join(parts)
        )


def _classifier(seed: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        max_depth=3,
        # 30 trees: as good as 100 on the development sets, and a third of the cost per
        # query (each tree is one call at prediction time)
        max_iter=30,
        learning_rate=0.3,
        min_samples_leaf=20,
        l2_regularization=1.0,
        early_stopping=False,
        random_state=seed,
    )


def _out_of_fold(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.int64], groups: npt.NDArray[np.int64], seed: int
) -> Any:
    """Each example's probability from a model fit on the other folds. Examples of one
    group (a mention labelled many times, see :func:`fit_route_model`'s ``mentions``) share
    a fold: a model that has seen one copy would score the others as if it knew them, and
    the cut would be too loose."""
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict

    folds = StratifiedGroupKFold(FOLDS, shuffle=True, random_state=seed)
    return cross_val_predict(
        _classifier(seed), x, y, groups=groups, cv=folds, method="predict_proba"
    )[:, 1]


def _widest_cut(
    p: npt.NDArray[np.float64],
    good: npt.NDArray[np.bool_],
    rule: npt.NDArray[np.bool_],
    eligible: npt.NDArray[np.bool_],
    target: float,
) -> tuple[float, int, int] | None:
    """(cut, decided, right) of the lowest cut at which ``rule | (eligible & p >= cut)``
    keeps the precision bound at ``target``, when the model decides anything."""
    if not eligible.any():
        return None
    already = (float(rule.sum()), float((good & rule).sum()))
    g = good[eligible].astype(np.float64)
    cut = widest_cut(p[eligible], g, np.ones_like(g), target, 1.0, already)
    if cut is None:
        return None
    return cut[0], round(cut[2]), round(cut[3])


@dataclass(frozen=True)
class ModelFit:
    """What :func:`fit_route_model` found: the model (or ``None``) and per route the
    cross-validated decided count and right count of rule plus model (``None``: the
    model adds nothing there)."""

    model: RouteModel | None
    matched: tuple[int, int] | None
    novel: tuple[int, int] | None
    reason: str


def fit_route_model(
    features: Sequence[RouteFeatures],
    top_is_right: Sequence[bool],
    absent: Sequence[bool],
    rule_matched: Sequence[bool],
    rule_novel: Sequence[bool],
    *,
    matched_target: float,
    novel_target: float,
    mentions: Sequence[str] | None = None,
    seed: int = 0,
) -> ModelFit:
    """Fit the routing model on labelled examples, beside the rules that route them.

    Args:
        features: each labelled query's routing features.
        top_is_right, absent: what the label says (the top candidate is the entity; the
            entity is not in the catalog).
        rule_matched, rule_novel: what the calibrated threshold rules already decide.
        matched_target, novel_target: the precision each route must keep.
        mentions: each example's mention (folded), so that copies of one labelled
            mention share a cross-validation fold; ``None``: examples with the same
            features do.
    """
    n = len(features)
    if n < MIN_LABELS:
        return ModelFit(None, None, None, f"no routing model: {n} labels (needs {MIN_LABELS})")
    x = np.array([vector(f) for f in features], dtype=np.float64)
    keys = list(mentions) if mentions is not None else [repr(row) for row in x.tolist()]
    _, inverse = np.unique(np.array(keys, dtype=object), return_inverse=True)
    groups = inverse.ravel().astype(np.int64)
    distinct = int(groups.max()) + 1
    if distinct < MIN_LABELS:
        why = f"no routing model: {distinct} distinct labelled mentions (needs {MIN_LABELS})"
        return ModelFit(None, None, None, why)
    right = np.asarray(top_is_right, dtype=bool)
    gone = np.asarray(absent, dtype=bool)
    by_rule_m = np.asarray(rule_matched, dtype=bool)
    by_rule_n = np.asarray(rule_novel, dtype=bool) & ~by_rule_m
    same = np.array([f.same_name_tie for f in features], dtype=bool)
    open_ = ~by_rule_m & ~by_rule_n & ~same

    matched = _one_route(x, right, groups, by_rule_m, open_, matched_target, seed)
    if matched is not None:
        open_ = open_ & ~matched.taken  # what the matched model takes, novel never sees
    novel = _one_route(x, gone, groups, by_rule_n, open_, novel_target, seed)
    matched_model = matched.model if matched else None
    novel_model = novel.model if novel else None
    if matched_model is None and novel_model is None:
        why = (
            f"no routing model: on {n} labels it decides nothing more at the targets "
            f"({matched_target:g} matched, {novel_target:g} novel) than the rules"
        )
        return ModelFit(None, None, None, why)
    model = RouteModel(
        matched_model,
        matched.cut if matched else 1.0,
        novel_model,
        novel.cut if novel else 1.0,
        n,
    )
    return ModelFit(
        model,
        matched.counts if matched else None,
        novel.counts if novel else None,
        model.describe(),
    )


@dataclass(frozen=True)
class _RouteFit:
    model: Any
    cut: float
    counts: tuple[int, int]  # (decided, right) by rule and model, out of fold
    taken: npt.NDArray[np.bool_]  # the examples the model takes (out of fold)


def _one_route(
    x: npt.NDArray[np.float64],
    good: npt.NDArray[np.bool_],
    groups: npt.NDArray[np.int64],
    rule: npt.NDArray[np.bool_],
    eligible: npt.NDArray[np.bool_],
    target: float,
    seed: int,
) -> _RouteFit | None:
    """One route's model, when both classes have examples and it adds to the rule."""
    if min(good.sum(), (~good).sum()) < _MIN_CLASS:
        return None
    y = good.astype(np.int64)
    p = _out_of_fold(x, y, groups, seed)
    cut = _widest_cut(p, good, rule, eligible, target)
    if cut is None:
        return None
    model = _classifier(seed).fit(x, y)
    return _RouteFit(model, cut[0], (cut[1], cut[2]), eligible & (p >= cut[0]))
