"""The guard on a small local model's answers: accept it, or send the row to review.

A model of a few hundred million parameters on a CPU is not a reliable judge (see
``benchmarks/results/local-models.md``). What it may decide is fenced in here, as a pure
function of the retrieval candidates and the model's answer:

- it may pick a candidate other than the top one only when that candidate's score is
  within ``close`` of the top (never against a clear retrieval lead);
- it may match only a candidate scoring at least ``min_score`` (a small model agreeing
  with a weak candidate is no evidence: an absent entity's best candidate is weak too);
- it may say "none" (the row becomes ``novel``) only when the top candidate's score is
  below ``none_below`` (a strong top candidate is not overruled by a small model);
- an answer whose probability is below ``min_confidence`` is not accepted.

Anything not accepted comes back as ``review``, with the model's suggestion in the reason.
The decision stage applies the guard when the adjudicating model is one of the bundled
local models (:func:`policy_for` by model name; see ``matching/decision.py``).

Example:
    >>> from nem_llm.models import Candidate
    >>> cands = [Candidate(entity_id="NL", name="Netherlands", score=0.93),
    ...          Candidate(entity_id="CH", name="Switzerland", score=0.61)]
    >>> judge(cands, "CH", 0.9, GuardPolicy()).accept
    False
    >>> judge(cands, "NL", 0.9, GuardPolicy()).accept
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from ..models import Candidate, MatchResult

__all__ = [
    "LOCAL_MODEL_PREFIX",
    "GuardPolicy",
    "Verdict",
    "apply_guard",
    "judge",
    "policy_for",
]

#: Model names the bundled local server answers to start with this; the decision stage
#: guards every answer of such a model.
LOCAL_MODEL_PREFIX = "local/"


@dataclass(frozen=True, kw_only=True)
class GuardPolicy:
    """When a small model's answer is accepted (otherwise the row is ``review``).

    Example:
        >>> GuardPolicy(min_confidence=0.7, close=0.05)
        GuardPolicy(min_confidence=0.7, close=0.05, min_score=0.5, none_below=0.6)

    Args:
        min_confidence: the model's probability for its answer must reach this.
        close: a candidate other than the top one may be chosen only if its score is at
            most this far below the top's.
        min_score: a match needs the chosen candidate to score at least this.
        none_below: "none" is accepted only while the top candidate scores below this.
    """

    min_confidence: float = 0.5
    close: float = 0.05
    min_score: float = 0.5
    none_below: float = 0.6

    def __post_init__(self) -> None:
        for name in ("min_confidence", "close", "min_score", "none_below"):
            value = getattr(self, name)
            if isinstance(value, bool) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")


@dataclass(frozen=True)
class Verdict:
    """Whether the answer stands; ``reason`` says why not (empty when accepted)."""

    accept: bool
    reason: str = ""


def judge(
    candidates: Sequence[Candidate],
    entity_id: str | None,
    confidence: float | None,
    policy: GuardPolicy,
) -> Verdict:
    """Accept or refuse a small model's answer (``entity_id`` ``None`` = "none").

    Pure: candidates (best first, as retrieval ranked them) and the answer in, a verdict
    out. An answer naming an id that is not among the candidates is refused.
    """
    if confidence is None or not math.isfinite(confidence):
        return Verdict(False, "the local model gave no probability for its answer")
    if confidence < policy.min_confidence:
        return Verdict(
            False, f"the local model is unsure (p={confidence:.2f} < {policy.min_confidence:g})"
        )
    if not candidates:
        return Verdict(True)
    top = candidates[0]
    if entity_id is None:
        if top.score >= policy.none_below:
            return Verdict(
                False,
                f"the local model said none against a strong top candidate "
                f"({top.entity_id} {top.score:.2f} >= {policy.none_below:g})",
            )
        return Verdict(True)
    chosen = next((c for c in candidates if c.entity_id == entity_id), None)
    if chosen is None:
        return Verdict(False, f"the local model answered {entity_id!r}, not a candidate")
    if chosen.score < policy.min_score:
        return Verdict(
            False,
            f"the local model chose a weak candidate ({chosen.entity_id} {chosen.score:.2f} "
            f"< {policy.min_score:g})",
        )
    lead = top.score - chosen.score
    if lead > policy.close:
        return Verdict(
            False,
            f"the local model chose {chosen.entity_id} against the retrieval lead of "
            f"{top.entity_id} ({top.score:.2f} vs {chosen.score:.2f})",
        )
    return Verdict(True)


def apply_guard(result: MatchResult, policy: GuardPolicy) -> MatchResult:
    """``result`` as it is if the guard accepts its decision, else the same row as ``review``.

    Only ``matched`` and ``novel`` rows decided by the LLM (or its cache) are judged; the
    review row keeps the candidates, the model's confidence and its suggestion in the
    reason.
    """
    if result.status not in ("matched", "novel") or result.decided_by not in ("llm", "cache"):
        return result
    answer = result.entity_id if result.status == "matched" else None
    verdict = judge(result.candidates, answer, result.confidence, policy)
    if verdict.accept:
        return result
    suggestion = answer if answer is not None else "none"
    return result.model_copy(
        update={
            "status": "review",
            "entity_id": None,
            "entity_name": None,
            "score": result.candidates[0].score if result.candidates else None,
            "reason": f"review: {verdict.reason} (suggested {suggestion})",
        }
    )


def policy_for(model: str) -> GuardPolicy | None:
    """The guard policy for answers of ``model``: a policy for the bundled local models
    (their names start with :data:`LOCAL_MODEL_PREFIX`), ``None`` for any other model."""
    if not model.startswith(LOCAL_MODEL_PREFIX):
        return None
    from .local_models import guard_policy

    return guard_policy(model)
