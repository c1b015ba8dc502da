"""Calibration: routing thresholds that reach a target precision, from labels or from probes.

Two sources of evidence, one estimator:

- **labels**: ``(query, gold_id or None)`` pairs the user gives to ``fit``; each becomes an
  :class:`Example` (weight 1) from the query's retrieved candidates.
- **probes** (no labels needed): sampled catalog entities are queried with their own
  aliases and noisy variants of their names (typos, dropped or swapped tokens, case,
  accents, truncation). Each probe is scored twice from one search: once as retrieved
  (stands in for a mention of a known entity: right when its entity comes first) and once
  with its entity taken out of the candidates (stands in for a mention of an absent
  entity: any auto-match is wrong, "novel" is right).

:func:`estimate` then chooses, per route, the rule that decides the most examples while
its (weighted) precision reaches the target, and **closes the route when no rule does**:
never a fallback to a less safe default. Probes do not know how many real mentions will
be novel, so each route is estimated at the end of a plausible range of that share which
is worse for it (``PROBE_NOVEL_SHARE``: auto-match assumes many novel mentions, auto-novel
few).

Everything here is pure: examples in, a :class:`Calibration` out.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .._text import fold
from ..catalog import Catalog
from ..config import CLOSED_ACCEPT, CLOSED_NOVEL, Thresholds
from ..models import Calibration, Candidate, RouteEstimate
from .bounds import lower_bound, widest_cut
from .route_model import RouteModel, fit_route_model
from .routing import RouteFeatures, features

__all__ = [
    "MARGINS",
    "PROBE_NOVEL_SHARE",
    "PROBE_VERSION",
    "Example",
    "Probe",
    "calibrate",
    "combine",
    "estimate",
    "exact_rule_from_catalog",
    "make_probes",
    "merge_routes",
    "probe_examples",
    "stratified_sample",
    "teacher_check",
    "with_route_model",
]

#: Bumped whenever probes or the estimator change: a saved label-free calibration of an
#: older version is estimated again.
PROBE_VERSION = 9
#: Margins (top minus runner-up) tried by calibration, safest last.
MARGINS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.08, 0.1, 0.15, 0.2)
#: The share of novel mentions probes assume: (lowest, highest). Auto-match precision is
#: estimated at the highest share (more absent mentions to wrongly match), auto-novel
#: precision at the lowest (more known mentions to wrongly call novel).
PROBE_NOVEL_SHARE = (0.25, 0.5)


@dataclass(frozen=True)
class Example:
    """One query as calibration sees it: its routing features and what was right."""

    features: RouteFeatures
    top_is_right: bool  # the top candidate is the entity meant
    absent: bool  # the entity meant is not in the catalog
    weight: float = 1.0
    mention: str = ""  # the query, folded (copies of one mention are one piece of evidence)


def _example(cands: Sequence[Candidate], query: str, gold: str | None, weight: float) -> Example:
    f = features(query, cands)
    right = bool(cands) and gold is not None and cands[0].entity_id == gold
    return Example(f, right, gold is None, weight, fold(query))


def labelled_examples(
    found: Sequence[Sequence[Candidate]],
    queries: Sequence[str],
    golds: Sequence[str | None],
    weights: Sequence[float] | None = None,
) -> list[Example]:
    """Examples from labelled queries and their retrieved candidates (weight 1 each, or
    ``weights``: a stratified sample's)."""
    ws = weights if weights is not None else [1.0] * len(queries)
    return [_example(c, q, g, w) for c, q, g, w in zip(found, queries, golds, ws, strict=True)]


# -- the estimator ----------------------------------------------------------------------


def _best_accept(
    top: npt.NDArray[np.float64],
    gap: npt.NDArray[np.float64],
    right: npt.NDArray[np.float64],
    weight: npt.NDArray[np.float64],
    eligible: npt.NDArray[np.bool_],
    target: float,
    prior: float,
) -> tuple[float, float, float, float] | None:
    """(accept, margin, precision, weight decided) of the widest rule reaching ``target``."""
    best: tuple[float, float, float, float] | None = None
    for m in sorted(MARGINS, reverse=True):  # ties keep the larger (safer) margin
        sel = eligible & (gap >= m)
        if not sel.any():
            continue
        cut = widest_cut(top[sel], right[sel], weight[sel], target, prior)
        if cut is not None and (best is None or cut[2] > best[3] + 1e-12):
            best = (cut[0], m, cut[1], cut[2])
    return best


def _best_novel(
    top: npt.NDArray[np.float64],
    absent: npt.NDArray[np.float64],
    weight: npt.NDArray[np.float64],
    target: float,
    prior: float,
) -> tuple[float, float, float] | None:
    """(threshold, precision, weight decided) of the highest novel cut reaching ``target``."""
    order = np.argsort(top, kind="stable")
    t, a, w = top[order], absent[order], weight[order]
    # "novel if score < t[i]" takes every example strictly below t[i]
    n_below = np.searchsorted(t, t, side="left")
    cum_w = np.r_[0.0, np.cumsum(w)]
    cum_a = np.r_[0.0, np.cumsum(a * w)]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = lower_bound(cum_a[n_below], cum_w[n_below], prior)
    good = np.flatnonzero((n_below > 0) & (precision >= target))
    # also the cut above every example (all of them novel), if precise enough
    all_precision = float(lower_bound(cum_a[-1], cum_w[-1], prior)) if cum_w[-1] > 0 else 0.0
    if all_precision >= target and t.size:
        return float(min(1.0, t[-1] + 1e-6)), float(all_precision), float(cum_w[-1])
    if not good.size:
        return None
    cut = int(good[np.argmax(t[good])])
    # midway between the highest score called novel and the cut, so the threshold does not
    # hug the first non-novel example
    threshold = float((t[n_below[cut] - 1] + t[cut]) / 2)
    return threshold, float(precision[cut]), float(cum_w[n_below[cut]])


def _weights(examples: Sequence[Example], novel_share: float | None) -> npt.NDArray[np.float64]:
    w = np.array([e.weight for e in examples], dtype=np.float64)
    if novel_share is None:
        return w
    absent = np.array([e.absent for e in examples])
    total_a, total_p = w[absent].sum(), w[~absent].sum()
    if total_a == 0 or total_p == 0:
        return w
    # rescale so absent examples carry `novel_share` of the weight
    scaled: npt.NDArray[np.float64] = np.where(
        absent, w * novel_share / total_a, w * (1 - novel_share) / total_p
    )
    return scaled


def estimate(
    examples: Sequence[Example],
    *,
    matched_target: float = 0.99,
    novel_target: float = 0.95,
    source: str = "labels",
    novel_share: tuple[float, float] | None = None,
    min_examples: int = 20,
    exact_rule: tuple[float, float] | None = None,
) -> Calibration:
    """Choose thresholds that reach the targets on ``examples``; close routes that cannot.

    Args:
        examples: labelled or probe examples.
        matched_target, novel_target: the precision each auto route must reach.
        source: what the examples are (``"labels"`` or ``"probes"``), for the report.
        novel_share: for probes, the (lowest, highest) share of novel mentions to assume;
            ``None`` for labels (their own mix is the truth).
        min_examples: below this many examples nothing is estimated and both routes close.
        exact_rule: (precision, coverage) of the exact-hit rule when known otherwise (a
            census of the catalog's names, see :func:`exact_rule_from_catalog`).

    Every precision is the lower end of its one-sided 90% Wilson interval (``Z``), counted
    in examples: a rule must decide about ``1.6 / (1 - target)`` examples without a mistake
    (165 at 0.99, 33 at 0.95) before it can open, so a handful of lucky examples never does,
    while on thousands of examples the bound is close to the measured precision.

    Matched: an exact hit on one entity's name or alias (rule ``exact``) when its precision
    reaches the target, plus ``top >= accept and top - runner_up >= margin`` (no same-named
    runner-up) for the widest (accept, margin) pair whose precision reaches the target.
    Novel: ``top < novel`` for the highest cut whose precision reaches the target.
    """
    n = len(examples)
    if n < min_examples:
        why = f"only {n} examples (need {min_examples})"
        return _closed(source, n, matched_target, novel_target, why, exact_rule)
    lo_share, hi_share = novel_share if novel_share is not None else (None, None)
    top = np.array([e.features.top for e in examples], dtype=np.float64)
    gap = np.array([e.features.margin for e in examples], dtype=np.float64)
    exact = np.array([e.features.exact for e in examples])
    same = np.array([e.features.same_name_tie for e in examples])
    # the structural guards: what no rule may decide (guards.py)
    conflict = np.array([e.features.number_conflict for e in examples])
    compatible = np.array([e.features.name_compatible for e in examples])
    right = np.array([e.top_is_right for e in examples], dtype=np.float64)
    absent = np.array([e.absent for e in examples], dtype=np.float64)

    # -- matched ------------------------------------------------------------------------
    w_m = _weights(examples, hi_share)
    total_m = w_m.sum()
    prior_m = total_m / n
    exact_open = False
    exact_est = None
    if exact_rule is not None:
        exact_est = exact_rule
    elif exact.any():
        taken = float(w_m[exact].sum())
        right_w = float((right[exact] * w_m[exact]).sum())
        exact_est = (float(lower_bound(right_w, taken, prior_m)), taken / total_m)
    if exact_est is not None:
        exact_open = exact_est[0] >= matched_target
    eligible = ~same & ~(exact & exact_open) & ~conflict
    rule = _best_accept(top, gap, right, w_m, eligible, matched_target, prior_m)
    decided = (exact_est[1] * total_m if exact_open and exact_est else 0.0) + (
        rule[3] if rule else 0.0
    )
    correct = (exact_est[0] * exact_est[1] * total_m if exact_open and exact_est else 0.0) + (
        rule[2] * rule[3] if rule else 0.0
    )
    if rule is None and not exact_open:
        why = f"no rule reaches precision {matched_target:g} on {n} {source}"
        if exact_est is not None:
            why += f" (exact hits: {exact_est[0]:.3f})"
        matched = RouteEstimate(open=False, target=matched_target, reason=why)
        accept, margin = CLOSED_ACCEPT, 0.0
    else:
        accept, margin = (rule[0], rule[1]) if rule else (CLOSED_ACCEPT, 0.0)
        parts = []
        if exact_open:
            parts.append("an exact hit on one entity's name or alias")
        if rule:
            parts.append(f"top >= {accept:.3f} and {margin:.2f} ahead of the runner-up")
        matched = RouteEstimate(
            open=True,
            target=matched_target,
            expected_precision=round(correct / decided, 4) if decided else None,
            expected_coverage=round(decided / total_m, 4) if total_m else None,
            reason=" or ".join(parts) + f", estimated on {n} {source}",
        )

    # -- novel --------------------------------------------------------------------------
    w_n = _weights(examples, lo_share)
    prior_n = w_n.sum() / n
    free = ~compatible
    cut = (
        _best_novel(top[free], absent[free], w_n[free], novel_target, prior_n)
        if absent[free].any()
        else None
    )
    if cut is None:
        why = (
            f"no score cut reaches precision {novel_target:g} on {n} {source}"
            if absent.any()
            else f"no example of an absent entity among {n} {source}"
        )
        novel = RouteEstimate(open=False, target=novel_target, reason=why)
        novel_t = CLOSED_NOVEL
    else:
        novel_t = min(cut[0], accept)
        novel = RouteEstimate(
            open=True,
            target=novel_target,
            expected_precision=round(cut[1], 4),
            expected_coverage=round(cut[2] / w_n.sum(), 4),
            reason=f"top < {novel_t:.3f}, estimated on {n} {source}",
        )
    thresholds = Thresholds(
        accept=accept, margin=margin, novel=novel_t, exact=exact_open, calibrated=True
    )
    return Calibration(
        source=source,
        examples=n,
        thresholds=thresholds.as_dict(),
        exact=exact_open,
        matched=matched,
        novel=novel,
    )


def _closed(
    source: str,
    n: int,
    matched_target: float,
    novel_target: float,
    why: str,
    exact_rule: tuple[float, float] | None = None,
) -> Calibration:
    """Both estimated routes closed; the exact-hit rule open where a census of the
    catalog's names proves it (it needs no examples: it holds by construction)."""
    exact = exact_rule is not None and exact_rule[0] >= matched_target
    t = Thresholds(accept=CLOSED_ACCEPT, margin=0.0, novel=CLOSED_NOVEL, exact=exact)
    matched = RouteEstimate(open=False, target=matched_target, reason=why)
    if exact and exact_rule is not None:
        matched = RouteEstimate(
            open=True,
            target=matched_target,
            expected_precision=round(exact_rule[0], 4),
            expected_coverage=round(exact_rule[1], 4),
            reason=f"an exact hit on one entity's name or alias (a census of the catalog's "
            f"names; the score rules: {why})",
        )
    return Calibration(
        source=source,
        examples=n,
        thresholds=t.as_dict(),
        exact=exact,
        matched=matched,
        novel=RouteEstimate(open=False, target=novel_target, reason=why),
    )


def exact_rule_from_catalog(
    catalog: Catalog, novel_share: float = PROBE_NOVEL_SHARE[1]
) -> tuple[float, float]:
    """(precision, coverage) of the exact-hit rule over every name and alias of a catalog.

    A census, not a sample: a mention by a form of one of its entities is an exact unique
    hit, and right, when no other entity has that form (folded); a mention by that form of
    an entity absent from the catalog is an exact unique hit, and wrong, when exactly one
    other entity has it. ``novel_share`` weighs the two.
    """
    owners: dict[str, set[int]] = {}
    for form, owner in zip(catalog.forms, catalog.form_entity, strict=True):
        owners.setdefault(fold(form), set()).add(owner)
    pairs = sum(len(v) for v in owners.values())
    unique = sum(1 for v in owners.values() if len(v) == 1)
    doubled = sum(len(v) for v in owners.values() if len(v) == 2)
    right = (1 - novel_share) * unique
    wrong = novel_share * doubled
    if not pairs or right + wrong == 0:
        return 0.0, 0.0
    return right / (right + wrong), (right + wrong) / pairs


def calibrate(
    examples: Sequence[Example],
    *,
    target_precision: float = 0.99,
    novel_target_precision: float | None = None,
    min_examples: int = 20,
) -> Thresholds:
    """Thresholds from labelled examples (see :func:`estimate`; closed routes stay closed)."""
    cal = estimate(
        examples,
        matched_target=target_precision,
        novel_target=target_precision if novel_target_precision is None else novel_target_precision,
        min_examples=min_examples,
    )
    return Thresholds.from_calibration(cal)


# -- probes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """A synthetic mention of catalog entity ``entity`` (its position), made by ``kind``."""

    text: str
    entity: int
    kind: str


_KEYBOARD = "abcdefghijklmnopqrstuvwxyz"
#: probe kinds that mention an entity absent from the catalog (named like a present one)
ABSENT_KINDS = frozenset({"number_sibling", "sibling"})
# probes a small catalog gets in all, and at most per entity (noise is drawn again)
_PROBES = 2000
_MAX_PER_ENTITY = 200


def _typo(text: str, rng: random.Random, edits: int) -> str:
    chars = list(text)
    for _ in range(edits):
        letters = [i for i, ch in enumerate(chars) if ch.isalpha()]
        if len(letters) < 3:
            break
        i = rng.choice(letters)
        op = rng.randrange(4)
        if op == 0:  # delete
            del chars[i]
        elif op == 1 and i + 1 < len(chars):  # swap with the next character
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        elif op == 2:  # substitute
            chars[i] = rng.choice(_KEYBOARD)
        else:  # insert
            chars.insert(i, rng.choice(_KEYBOARD))
    return "".join(chars)


def _variants(form: str, rng: random.Random) -> list[tuple[str, str]]:
    """Noisy variants of one surface form, each about as far from it as a messy mention.

    Kept mild on purpose: a probe stands in for a real mention, and the novel route is
    estimated from the hardest probes of entities that are present.
    """
    tokens = form.split()
    out: list[tuple[str, str]] = []
    if len(form) >= 5:
        out.append(("typo", _typo(form, rng, 1)))
    if len(form) >= 12:
        out.append(("typos", _typo(form, rng, 2)))
    if len(tokens) >= 3:
        drop = rng.randrange(1, len(tokens))  # keep the first token: it carries the name
        out.append(("drop_token", " ".join(t for i, t in enumerate(tokens) if i != drop)))
        keep = max(2, int(len(tokens) * 0.7 + 0.5))
        if keep < len(tokens):
            out.append(("truncate", " ".join(tokens[:keep])))
    if len(tokens) >= 2:
        out.append(("reorder", " ".join(tokens[1:] + tokens[:1])))
    if len(tokens) >= 3:
        # another record of the same entity: a third of the details gone, a few typos
        kept = [t for i, t in enumerate(tokens) if i == 0 or rng.random() >= 1 / 3]
        mixed = " ".join(kept)
        out.append(("mixed", _typo(mixed, rng, min(3, 1 + len(mixed) // 15))))
    folded = fold(form)
    out.append(("fold_case", folded.upper() if rng.random() < 0.5 else folded))
    return out


def _families(name: str, rng: random.Random) -> list[tuple[str, str]]:
    """Probes of the failure families scores cannot see (the guards' cases).

    ``number_sibling``: the name with its number changed ("Product 101" -> "Product 1011"),
    and ``sibling``: a quarter of its letters (at least two) changed ("Slovakia" ->
    "Slovenia"), each a mention of an entity that is NOT in the catalog but is named like
    one that is (in a small catalog, removing an entity leaves nothing named like it, so
    the entity-removed probes alone would judge any close name safe); ``initials`` and
    ``surname_first``: a person-like name written "J. Smith" or "Smith, John", a mention of
    the entity.
    """
    out: list[tuple[str, str]] = []
    letters = [i for i, ch in enumerate(name) if ch.isalpha()]
    if len(letters) >= 4:
        chars = list(name)
        for i in rng.sample(letters, max(2, len(letters) // 4)):
            chars[i] = rng.choice([c for c in _KEYBOARD if c != chars[i].lower()])
        out.append(("sibling", "".join(chars)))
    tokens = name.split()
    numbers = [i for i, t in enumerate(tokens) if t.isdigit()]
    if numbers:
        i = rng.choice(numbers)
        n = tokens[i]
        changed = rng.choice([n + str(rng.randrange(10)), str(int(n) + 1), n[:-1] or "0"])
        if changed != n:
            out.append(("number_sibling", " ".join([*tokens[:i], changed, *tokens[i + 1 :]])))
    words = [t for t in tokens if t.isalpha() and len(t) >= 2]
    if 2 <= len(tokens) <= 4 and len(words) == len(tokens):
        out.append(("initials", " ".join([f"{t[0]}." for t in tokens[:-1]] + tokens[-1:])))
        out.append(("surname_first", f"{tokens[-1]}, {' '.join(tokens[:-1])}"))
    return out


def make_probes(
    catalog: Catalog, *, entities: int = 400, per_entity: int | None = None, seed: int = 0
) -> list[Probe]:
    """Synthetic mentions of sampled entities: aliases, noisy variants of their forms, and
    the failure families of :func:`_families`.

    ``per_entity`` (default: 5, more for small catalogs so that about ``_PROBES`` probes
    are made, at most ``_MAX_PER_ENTITY`` an entity): a catalog of two entities still gets
    enough evidence for a rule to be estimated (or to be shown unsafe). Deterministic for a
    seed. A probe never equals one of its entity's own forms except for aliases (a mention
    by an alias is the commonest real case), and a number sibling never equals any form of
    the catalog (it must be absent).
    """
    rng = random.Random(seed)
    n = len(catalog.entities)
    if per_entity is None:
        per_entity = max(5, min(_MAX_PER_ENTITY, -(-_PROBES // max(n, 1))))
    picked = rng.sample(range(n), min(entities, n))
    forms_of: dict[int, list[str]] = {}
    for form, owner in zip(catalog.forms, catalog.form_entity, strict=True):
        forms_of.setdefault(owner, []).append(form)
    every_form = {fold(f) for f in catalog.forms}
    probes: list[Probe] = []
    for e in sorted(picked):
        forms = forms_of.get(e, [])
        if not forms:
            continue
        own = {f.casefold() for f in forms}
        made: list[tuple[str, str]] = [("alias", a) for a in forms[1:3]]
        # noise on the fullest form: a messy mention usually carries at least that much
        # (a record's "name, description"), and short mentions are covered by aliases;
        # small catalogs draw the noise (and the families) again for more probes
        for _ in range(1 + per_entity // 4):
            made.extend(
                (kind, text)
                for kind, text in _families(forms[0], rng)
                if kind not in ABSENT_KINDS or fold(text) not in every_form
            )
            made.extend(_variants(max(forms, key=len), rng))
        rng.shuffle(made)
        kept = 0
        seen: set[str] = set()
        for kind, text in made:
            text = " ".join(text.split())
            key = text.casefold()
            if not text or key in seen or (kind != "alias" and key in own):
                continue
            seen.add(key)
            probes.append(Probe(text, e, kind))
            kept += 1
            if kept >= per_entity:
                break
    return probes


def probe_examples(
    probes: Sequence[Probe], found: Sequence[Sequence[Candidate]], catalog: Catalog
) -> list[Example]:
    """Two examples per probe: as retrieved (entity present) and with its entity removed.

    ``found`` must hold at least one more candidate than routing looks at (the removed
    entity may be among them).
    """
    out: list[Example] = []
    for probe, cands in zip(probes, found, strict=True):
        if probe.kind in ABSENT_KINDS:  # a mention of another entity, absent as it is
            out.append(_example(cands, probe.text, None, 1.0))
            continue
        entity_id = catalog.entities[probe.entity].id
        present = _example(cands, probe.text, entity_id, 1.0)
        without = [c for c in cands if c.entity_id != entity_id]
        out.append(present)
        out.append(_example(without, probe.text, None, 1.0))
    return out


def _decides_matched(e: Example, t: dict[str, float]) -> bool:
    if t.get("exact", 0.0) and e.features.exact:
        return True
    f = e.features
    return not f.same_name_tie and f.top >= t["accept"] and f.margin >= t["margin"]


def combine(labels: Calibration, probes: Calibration, examples: Sequence[Example]) -> Calibration:
    """Labels win where they can decide; elsewhere the probes' route, unless the labels
    contradict it.

    A route the labels leave closed for want of evidence takes the probes' rule when that
    rule, applied to the labelled examples, is at least as precise as the target on those
    it decides (or decides none of them); a route whose rule the labels show to be worse
    stays closed. Both estimates come from :func:`estimate`.
    """
    t = dict(labels.thresholds)
    matched, novel, exact = labels.matched, labels.novel, labels.exact
    used_probes = False
    if not labels.matched.open and probes.matched.open:
        decided = [e for e in examples if _decides_matched(e, probes.thresholds)]
        right = sum(e.top_is_right for e in decided)
        if not decided or right / len(decided) >= labels.matched.target:
            for key in ("accept", "margin", "exact"):
                t[key] = probes.thresholds[key]
            exact = probes.exact
            matched = probes.matched.model_copy(
                update={
                    "reason": f"{probes.matched.reason}; the labels agree ({right} of "
                    f"{len(decided)} they decide are right)"
                }
            )
            used_probes = True
    if not labels.novel.open and probes.novel.open:
        cut = probes.thresholds["novel"]
        decided = [e for e in examples if e.features.top < cut]
        absent = sum(e.absent for e in decided)
        if not decided or absent / len(decided) >= labels.novel.target:
            t["novel"] = min(cut, t["accept"])
            novel = probes.novel.model_copy(
                update={
                    "reason": f"{probes.novel.reason}; the labels agree ({absent} of "
                    f"{len(decided)} they decide are absent)"
                }
            )
            used_probes = True
    return Calibration(
        source="labels+probes" if used_probes else labels.source,
        examples=labels.examples + (probes.examples if used_probes else 0),
        thresholds=t,
        exact=exact,
        matched=matched,
        novel=novel,
    )


def stratified_sample(
    features_of: Sequence[RouteFeatures], budget: int, *, seed: int = 0
) -> list[tuple[int, float]]:
    """Which workload queries to label: ``budget`` positions spread over the routing
    features, each with the weight that makes the sample stand for the whole.

    Strata are the top score (tenths), the lead over the runner-up (< 0.05, < 0.2, more),
    an exact hit, a cross-script match and the query's length (1, 2-4, 5+ words). Each
    non-empty stratum gets at least one label; the rest is shared in proportion to the
    square root of its size (rare kinds of query are labelled more than their share, the
    common ones less), drawn at random within; a budget smaller than the number of strata
    is a plain random sample. A label's weight is its stratum's size over
    the labels drawn there, rescaled so the weights average 1.
    """
    if budget <= 0 or not features_of:
        return []
    strata: dict[tuple[int, ...], list[int]] = {}
    for i, f in enumerate(features_of):
        lead = 0 if f.margin < 0.05 else 1 if f.margin < 0.2 else 2
        words = 0 if f.query_tokens <= 1 else 1 if f.query_tokens <= 4 else 2
        key: tuple[int, ...] = (
            min(int(f.top * 10), 9),
            lead,
            int(f.exact),
            int(f.cross_script),
            words,
        )
        strata.setdefault(key, []).append(i)
    rng = random.Random(seed)
    keys = sorted(strata)
    if budget >= len(features_of):
        return [(i, 1.0) for i in range(len(features_of))]
    if budget < len(keys):  # fewer labels than strata: a plain random sample
        return sorted((i, 1.0) for i in rng.sample(range(len(features_of)), budget))
    share = np.sqrt([len(strata[k]) for k in keys])
    want = np.maximum(1, np.floor(share / share.sum() * budget)).astype(int)
    want = np.minimum(want, [len(strata[k]) for k in keys])
    # hand out what rounding left, largest strata first
    spare = budget - int(want.sum())
    for j in np.argsort(-share):
        if spare <= 0:
            break
        if want[j] < len(strata[keys[j]]):
            want[j] += 1
            spare -= 1
    picked: list[tuple[int, float]] = []
    for key, n in zip(keys, want, strict=True):
        members = strata[key]
        chosen = rng.sample(members, int(n)) if n < len(members) else list(members)
        picked.extend((i, len(members) / len(chosen)) for i in chosen)
    mean = sum(w for _, w in picked) / len(picked)
    return sorted((i, w / mean) for i, w in picked)


def teacher_check(
    proposed: Calibration, examples: Sequence[Example], *, z: float = 1.2816
) -> Calibration:
    """Keep each open route of ``proposed`` unless LLM-labelled workload ``examples`` show
    it worse than its target: the route closes when the one-sided 90% Wilson *upper* bound
    of its precision on the examples it decides falls below the target.

    The teacher is an LLM, right most but not all of the time: its disagreements with a
    sound rule are its own errors as often as the rule's, so a route is closed only on
    evidence that it is worse than its target, never for want of evidence that it is better.
    """
    t = dict(proposed.thresholds)
    update: dict[str, Any] = {}
    total = sum(e.weight for e in examples) or 1.0
    unit = total / max(len(examples), 1)
    for name in ("matched", "novel"):
        est: RouteEstimate = getattr(proposed, name)
        if not est.open:
            continue
        if name == "matched":
            decided = [e for e in examples if _decides_matched(e, t)]
            good = [e.top_is_right for e in decided]
        else:
            decided = [
                e
                for e in examples
                if not _decides_matched(e, t)
                and e.features.top < t["novel"]
                and not e.features.name_compatible
            ]
            good = [e.absent for e in decided]
        taken = sum(e.weight for e in decided)
        right = sum(e.weight for e, g in zip(decided, good, strict=True) if g)
        if not decided:
            continue
        upper = 1.0 - float(lower_bound(taken - right, taken, unit))
        measured = (
            f"the LLM agrees on {right / taken:.3f} of the {len(decided)} labelled "
            "workload queries it decides"
        )
        if upper < est.target:
            closed = RouteEstimate(
                open=False,
                target=est.target,
                reason=f"{est.reason}; closed: {measured} (upper bound {upper:.3f} < target)",
            )
            update[name] = closed
            if name == "matched":
                t["accept"], t["exact"] = CLOSED_ACCEPT, 0.0
            else:
                t["novel"] = CLOSED_NOVEL
        else:
            update[name] = est.model_copy(update={"reason": f"{est.reason}; {measured}"})
    update["thresholds"] = t
    update["exact"] = bool(t.get("exact", 0.0))
    return proposed.model_copy(update=update)


def merge_routes(own: Calibration, other: Calibration) -> Calibration:
    """Each route from ``own`` where it is open, else from ``other`` (its thresholds too)."""
    t = dict(own.thresholds)
    update: dict[str, Any] = {}
    if not own.matched.open and other.matched.open:
        for key in ("accept", "margin", "exact"):
            t[key] = other.thresholds[key]
        update["matched"] = other.matched
    if not own.novel.open and other.novel.open:
        t["novel"] = other.thresholds["novel"]
        update["novel"] = other.novel
    t["novel"] = min(t["novel"], t["accept"])
    if update:
        update["source"] = f"{own.source}+{other.source}"
    return own.model_copy(update={**update, "thresholds": t, "exact": bool(t.get("exact", 0))})


def with_route_model(
    cal: Calibration, examples: Sequence[Example], *, seed: int = 0
) -> tuple[Calibration, RouteModel | None]:
    """``cal`` plus, where labels show it safe, a routing model beside its thresholds.

    The model decides only queries the thresholds leave to the LLM; each route's expected
    precision and coverage become those of rule and model together, measured out of fold
    (see ``route_model.py``). Without enough labels, or when the model adds nothing at the
    targets, ``cal`` comes back with the reason in ``routing_model``.
    """
    t = cal.thresholds
    by_rule_m = [_decides_matched(e, t) for e in examples]
    by_rule_n = [
        not m and e.features.top < t["novel"] for e, m in zip(examples, by_rule_m, strict=True)
    ]
    fit = fit_route_model(
        [e.features for e in examples],
        [e.top_is_right for e in examples],
        [e.absent for e in examples],
        by_rule_m,
        by_rule_n,
        matched_target=cal.matched.target,
        novel_target=cal.novel.target,
        mentions=[e.mention for e in examples] if all(e.mention for e in examples) else None,
        seed=seed,
    )
    update: dict[str, Any] = {"routing_model": fit.reason}
    n = len(examples)
    for name, counts, what in (
        ("matched", fit.matched, "P(right)"),
        ("novel", fit.novel, "P(absent)"),
    ):
        if counts is None or fit.model is None:
            continue
        before: RouteEstimate = getattr(cal, name)
        cut = fit.model.matched_cut if name == "matched" else fit.model.novel_cut
        decided, right = counts
        said = f"the routing model's {what} >= {cut:.3f} ({right} of {decided} right out of fold)"
        update[name] = RouteEstimate(
            open=True,
            target=before.target,
            expected_precision=round(float(lower_bound(right, decided, 1.0)), 4),
            expected_coverage=round(decided / n, 4),
            reason=f"{before.reason}; or {said}"
            if before.open
            else f"{said} (the thresholds alone: {before.reason})",
        )
    return cal.model_copy(update=update), fit.model
