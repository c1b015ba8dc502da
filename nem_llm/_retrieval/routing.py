"""Routing: matched / novel / adjudicate from a query's candidates, with a one-line why.

Pure functions: a query, its candidates and thresholds in, a :class:`Route` out. The
signal is the top score, its lead over the runner-up, whether the query is exactly (after
folding case, accents and script) a name or alias of one candidate and of no near twin of
it, and whether the runner-up carries the same name (same-named entities are never told
apart by scores).
Thresholds come from calibration (``calibration.py``); with labels, a routing model
(``route_model.py``) may decide some of what the thresholds leave to the LLM, and says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

from .._text import fold
from ..config import Thresholds
from ..models import Candidate
from .guards import name_compatible, number_conflict

if TYPE_CHECKING:
    from .fields_route import FieldDecision
    from .route_model import RouteModel

__all__ = ["Route", "RouteFeatures", "RouteKind", "features", "route"]

RouteKind = Literal["matched", "novel", "adjudicate"]

# the candidates' names recur from query to query: each is folded once (bounded)
_fold = lru_cache(maxsize=1 << 16)(fold)


@dataclass(frozen=True)
class RouteFeatures:
    """What routing looks at for one query."""

    top: float
    margin: float
    exact: bool  # the query is a name or alias of the top candidate and near no other one
    same_name_tie: bool  # the runner-up's matched name is the top candidate's name
    # what the routing model (route_model.py) reads besides the above
    dense: float = 0.0  # the top candidate's dense (embedding) score
    lexical: float = 0.0  # its lexical (character n-gram) score
    agree: bool = False  # it is also first by the dense score alone and by the lexical alone
    near_ties: int = 0  # other candidates within NEAR_TIE of its score
    cross_script: bool = False  # the query and its matched form are in different scripts
    query_tokens: int = 0  # words in the query
    # the structural guards (guards.py), read by every route
    number_conflict: bool = False  # the top candidate's name has a number the query lacks
    name_compatible: bool = False  # the query fits a candidate's name by words and initials


def features(query: str, candidates: Sequence[Candidate], *, detail: bool = True) -> RouteFeatures:
    """Routing features of ``query`` (normalized) given its candidates, best first.

    ``detail=False`` leaves out what only the routing model reads (the fields after
    ``same_name_tie`` keep their defaults): the thresholds route without it, per query.
    """
    if not candidates:
        return RouteFeatures(0.0, 0.0, False, False)
    conflict = number_conflict(query, candidates[0])
    compatible = name_compatible(query, candidates) is not None
    top = candidates[0]
    runner_up = candidates[1] if len(candidates) > 1 else None
    top_form = _fold(top.matched_form or top.name)
    q = _fold(query)
    # an exact hit is unique only if no other candidate's name is a near twin of the query:
    # one that contains it ("Chinook" vs "Chinook Jargon", "Moba" vs "Bimoba": the mention
    # may mean either) or is one edit from it ("Bubi" vs "Bube", "Kwa" vs "Kwa'": a mention
    # of one, spelt the way another language spells it, is exactly the other's name)
    exact = q == top_form and not any(
        _near_twin(q, _fold(form)) for c in candidates[1:] for form in _forms(c)
    )
    same = runner_up is not None and _fold(runner_up.matched_form or runner_up.name) == top_form
    margin = top.score - (runner_up.score if runner_up is not None else 0.0)
    if not detail:
        return RouteFeatures(
            top.score, margin, exact, same, number_conflict=conflict, name_compatible=compatible
        )
    dense = [c.score if c.dense_score is None else c.dense_score for c in candidates]
    lexical = [0.0 if c.lexical_score is None else c.lexical_score for c in candidates]
    return RouteFeatures(
        top.score,
        margin,
        exact,
        same,
        dense=dense[0],
        lexical=lexical[0],
        agree=dense[0] >= max(dense) and lexical[0] >= max(lexical),
        near_ties=sum(1 for c in candidates[1:] if top.score - c.score <= NEAR_TIE),
        cross_script=_non_latin(query) != _non_latin(top.matched_form or top.name),
        query_tokens=len(query.split()),
        number_conflict=conflict,
        name_compatible=compatible,
    )


#: Candidates this close to the top score count as near ties of it.
NEAR_TIE = 0.02


def _non_latin(text: str) -> bool:
    """Whether ``text`` has a letter outside the Latin blocks (Greek, Cyrillic, Han, ...)."""
    return any(ch.isalpha() and ord(ch) > 0x24F for ch in text)


def _forms(candidate: Candidate) -> set[str]:
    return {candidate.name, candidate.matched_form or candidate.name}


def _near_twin(query: str, form: str) -> bool:
    """``form`` contains ``query`` or is at most one edit (insert, delete, substitute) away."""
    return query in form or _one_edit(query, form)


def _one_edit(a: str, b: str) -> bool:
    """Levenshtein distance of ``a`` and ``b`` <= 1, in one pass."""
    if len(a) > len(b):
        a, b = b, a
    if len(b) - len(a) > 1:
        return False
    i = 0
    while i < len(a) and a[i] == b[i]:
        i += 1
    if len(a) == len(b):
        return a[i + 1 :] == b[i + 1 :]
    return a[i:] == b[i + 1 :]


@dataclass(frozen=True)
class Route:
    """Where one query goes, and why (a sentence for ``explain``/``diagnose``)."""

    kind: RouteKind
    reason: str
    top_score: float | None
    margin: float | None
    rule: str = ""
    fields: FieldDecision | None = None  # a record query: the field model's view


def route(
    candidates: Sequence[Candidate],
    thresholds: Thresholds,
    query: str | None = None,
    model: RouteModel | None = None,
) -> Route:
    """Decide from the candidates whether to accept, call novel, or ask the LLM.

    Without ``query`` the exact-hit rule is not applied. ``model`` (fit on labels, see
    ``route_model.py``) decides, where it is sure enough, what the thresholds leave to the
    LLM; it never overrides a threshold rule. The structural guards (``guards.py``) come
    first: a number or code in the top candidate's name that the query lacks blocks every
    auto-match, a query that fits a candidate's name by words and initials every
    auto-novel.
    """
    if not candidates:
        return Route("novel", "no candidates were retrieved", None, None, "empty")
    f = features(query if query is not None else "\x00", candidates, detail=model is not None)
    if query is None:  # no query, no string to guard
        f = dataclasses.replace(f, number_conflict=False, name_compatible=False)
    top, margin = f.top, f.margin
    if thresholds.exact and f.exact:
        return Route(
            "matched",
            f"the query is a name or alias of {candidates[0].entity_id!r} and of no other "
            "candidate",
            top,
            margin,
            "exact",
        )
    if top < thresholds.novel and not f.name_compatible:
        return Route(
            "novel",
            f"top score {top:.3f} < novel_threshold {thresholds.novel:.3f}",
            top,
            margin,
            "novel",
        )
    if f.same_name_tie:
        why = (
            f"the runner-up {candidates[1].entity_id!r} has the same name as "
            f"{candidates[0].entity_id!r}: scores cannot tell them apart"
        )
        return Route("adjudicate", why, top, margin, "same_name")
    if top >= thresholds.accept and margin >= thresholds.margin and not f.number_conflict:
        return Route(
            "matched",
            f"top score {top:.3f} >= accept_threshold {thresholds.accept:.3f} and "
            f"{margin:.3f} ahead of the runner-up (margin {thresholds.margin:.3f})",
            top,
            margin,
            "threshold",
        )
    if model is not None:
        decided = model.decide(f)
        if decided is not None and not _guarded(decided[0], f):
            kind, p = decided
            if kind == "matched":
                why = (
                    f"the routing model puts the chance that {candidates[0].entity_id!r} is "
                    f"the entity at {p:.3f} (>= {model.matched_cut:.3f})"
                )
            else:
                why = (
                    "the routing model puts the chance that the entity is not in the "
                    f"catalog at {p:.3f} (>= {model.novel_cut:.3f})"
                )
            return Route(kind, why, top, margin, "model")
    if f.number_conflict:
        why = (
            f"{candidates[0].entity_id!r} has a number or code in its name that the query "
            "does not: never matched without the LLM"
        )
        return Route("adjudicate", why, top, margin, "number_guard")
    if top < thresholds.novel:
        fits = name_compatible(query or "", candidates)
        who = fits.entity_id if fits is not None else candidates[0].entity_id
        why = (
            f"top score {top:.3f} < novel_threshold {thresholds.novel:.3f}, but the query "
            f"fits the name of {who!r} by its words and initials: never novel without the LLM"
        )
        return Route("adjudicate", why, top, margin, "name_guard")
    if thresholds.accept > 1:
        why = "the auto-match route's score rule is closed (accept_threshold > 1)"
        if thresholds.exact:
            why += "; only an exact hit on a name or alias matches alone"
        if thresholds.novel <= 0:
            why = (
                "both auto routes are closed"
                if not thresholds.exact
                else why + ("; the auto-novel route is closed")
            )
        return Route("adjudicate", why, top, margin, "closed")
    if top >= thresholds.accept:
        why = f"top score {top:.3f} is high but only {margin:.3f} ahead of the runner-up"
    else:
        why = (
            f"top score {top:.3f} is between novel_threshold {thresholds.novel:.3f} and "
            f"accept_threshold {thresholds.accept:.3f}"
        )
    return Route("adjudicate", why, top, margin, "ambiguous")


def _guarded(kind: str, f: RouteFeatures) -> bool:
    """Whether a structural guard forbids deciding ``kind`` alone for these features."""
    return f.number_conflict if kind == "matched" else f.name_compatible
