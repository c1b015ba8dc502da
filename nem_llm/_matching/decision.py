"""The decision stage: a routed query becomes a final result or one pending LLM call.

One step, :meth:`Decider.prepare`, serves the live path and the provider's Batch API:

- a person's reviewed label, the route's own decision (matched / novel), "no LLM
  configured" (``review``) and a cached LLM decision are **final** results;
- anything else is a :class:`Pending` call: the rendered prompt, the candidate ids, the
  cache key and a provisional ``review`` result carrying the candidates.

The live path sends a pending call through the governor (:meth:`Decider.call`); the Batch
API writes its request body into a batch file and finishes it with :meth:`Decider.resolve`
once the provider answers. Either way the result is built by the same code.

When the model is one of the bundled small local models (``local/...``), its decisions
(live or cached) pass :func:`~nem_llm._llm.local_guard.apply_guard`: an answer against a
clear retrieval lead, or an unsure one, comes back as ``review`` (:meth:`Decider.guarded`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .._llm.adjudication import (
    PROMPT_VERSION,
    Adjudicator,
    Decision,
    estimate_tokens,
    render_messages,
)
from .._llm.batch_api import request_body
from .._llm.cache import CachedDecision, DecisionCache, ReviewedLabel, decision_key
from .._llm.governor import Governor
from .._llm.local_guard import apply_guard, policy_for
from .._retrieval.routing import Route
from ..catalog import Catalog
from ..errors import BudgetExceededError, LLMError, error_code
from ..models import Candidate, FieldEvidence, MatchResult, Usage
from ..settings import MatcherSettings

__all__ = ["Decider", "Pending", "error_result"]


@dataclass
class Pending:
    """One LLM call a routed query still needs (the live path or a Batch API line)."""

    provisional: MatchResult  # status "review", with the candidates and the route's reason
    normalized: str
    messages: list[dict[str, str]]
    ids: tuple[str, ...]
    key: str | None  # the decision cache key (None without a cache)
    route: Route
    ask_names: bool = False


def error_result(index: int, query: object, exc: BaseException) -> MatchResult:
    """The error record of one item that failed (never raised inside a batch)."""
    text = query if isinstance(query, str) else repr(query)
    return MatchResult(
        query=text[:1000],
        index=index,
        status="error",
        error=str(exc),
        error_type=error_code(exc),
    )


class Decider:
    """Decides routed queries: reviewed labels, routes, the cache, and the governed LLM call.

    Args:
        settings: the matcher's settings (model, prompt attributes, timeout).
        catalog: returns the catalog now (entity changes replace it).
        adjudicator: the LLM caller, or ``None`` when no LLM is configured.
        cache: the decision cache (LLM decisions and reviewed labels), or ``None``.
    """

    def __init__(
        self,
        settings: MatcherSettings,
        catalog: Callable[[], Catalog],
        adjudicator: Adjudicator | None,
        cache: DecisionCache | None,
    ) -> None:
        self.settings = settings
        self._catalog = catalog
        self.adjudicator = adjudicator
        self.cache = cache
        self._reviewed: dict[str, ReviewedLabel] | None = None  # loaded on first use
        #: the small-model guard, for the bundled local models only (``None`` otherwise)
        self.guard = policy_for(settings.model)

    def guarded(self, result: MatchResult) -> MatchResult:
        """``result``, or ``review`` where the small-model guard refuses its LLM decision."""
        return result if self.guard is None else apply_guard(result, self.guard)

    # -- the prompt and its cache key ----------------------------------------------------

    def messages(
        self,
        normalized: str,
        candidates: list[Candidate],
        attributes: Mapping[str, Any] | None = None,
    ) -> list[dict[str, str]]:
        """The adjudication prompt of one query (the live path and the Batch API share it).

        A record query's ``attributes`` are shown with it, and the same fields of every
        candidate beside them (side by side), besides the settings' prompt attributes.
        """
        shown = tuple(self.settings.prompt_attributes)
        if attributes:
            shown += tuple(a for a in attributes if a not in shown)
        return render_messages(
            normalized,
            candidates,
            self._catalog(),
            attributes=shown,
            attribute_chars=self.settings.prompt_attribute_chars,
            query_attributes=attributes,
        )

    def cache_key(
        self,
        normalized: str,
        messages: list[dict[str, str]],
        ids: tuple[str, ...],
        *,
        names: bool = False,
    ) -> str:
        """The decision's cache key: the rendered prompt and the response model are in it,
        so editing a template or a candidate's text invalidates cached decisions."""
        prompt_hash = hashlib.sha256(messages[-1]["content"].encode()).hexdigest()[:16]
        version = f"{PROMPT_VERSION}:{prompt_hash}" + (":names" if names else "")
        return decision_key(normalized, ids, self.settings.model, version)

    # -- one query -----------------------------------------------------------------------

    async def reviewed_label_async(self, normalized: str) -> ReviewedLabel | None:
        """A person's decision for this normalized query, if any (the human loop's hook).

        Labels live in the decision cache's ``reviewed`` table (``nem-llm review import``
        writes them); they are read once, on first use, and win over routing and the LLM.
        A label naming an id that is no longer in the catalog is ignored.
        """
        if self.cache is None:
            return None
        if self._reviewed is None:
            self._reviewed = await self.cache.reviewed_async()
        label = self._reviewed.get(normalized)
        if label is not None and label.entity_id is not None:
            return label if label.entity_id in self._catalog().by_id else None
        return label

    async def prepare_async(
        self,
        index: int,
        query: str,
        normalized: str,
        candidates: list[Candidate],
        route: Route,
        *,
        ask_names: bool = False,
        attributes: Mapping[str, Any] | None = None,
    ) -> MatchResult | Pending:
        """A routed query's final result, or the LLM call it still needs.

        ``ask_names``: should the LLM answer "none", it is also asked for the names the
        entity has in the catalog (query rewriting, in the same call). ``attributes``: a
        record query's fields (shown to the LLM).
        """
        top = candidates[0] if candidates else None
        evidence = _evidence(route)

        def make(**fields: Any) -> MatchResult:
            return MatchResult(
                query=query, index=index, candidates=candidates, fields=evidence, **fields
            )

        reviewed = await self.reviewed_label_async(normalized)
        if reviewed is not None:
            return self._from_reviewed(make, candidates, reviewed)
        if route.kind == "matched" and top is not None:
            return make(
                status="matched",
                entity_id=top.entity_id,
                entity_name=top.name,
                score=top.score,
                decided_by="embedding",
                reason=route.reason,
            )
        score = top.score if top else None
        if route.kind == "novel":
            return make(status="novel", score=score, decided_by="embedding", reason=route.reason)
        if self.adjudicator is None:
            return make(status="review", score=score, reason=f"{route.reason}; no LLM configured")
        messages = self.messages(normalized, candidates, attributes)
        ids = tuple(c.entity_id for c in candidates)
        key = None
        if self.cache is not None:
            key = self.cache_key(normalized, messages, ids, names=ask_names)
            cached = await self.cache.get_async(key)
            if cached is not None:
                return self.guarded(from_decision(make, candidates, cached, decided_by="cache"))
        provisional = make(status="review", score=score, reason=route.reason)
        return Pending(provisional, normalized, messages, ids, key, route, ask_names)

    async def call_async(self, pending: Pending, governor: Governor) -> MatchResult:
        """Send a pending call through the governor; failures become result records."""
        adjudicator = self.adjudicator
        assert adjudicator is not None
        p = pending.provisional
        timeout = self.settings.limits.timeout
        try:
            governed = await governor.call_async(
                lambda: adjudicator.decide_async(
                    pending.messages,
                    pending.ids,
                    request_timeout=timeout,
                    pace=governor.pace_async,
                    ask_names=pending.ask_names,
                ),
                estimated_tokens=estimate_tokens(pending.messages),
                usage_of=lambda d: d.usage,
            )
        except BudgetExceededError as exc:
            return p.model_copy(
                update={
                    "reason": f"{pending.route.reason}; {exc}",
                    "error": str(exc),
                    "error_type": "budget",
                    "attempts": exc.attempts,
                    "usage": exc.usage or Usage(),
                }
            )
        except LLMError as exc:
            return p.model_copy(
                update={
                    "status": "error",
                    "error": str(exc),
                    "error_type": error_code(exc),
                    "attempts": exc.attempts,
                    "usage": exc.usage or Usage(),
                }
            )
        d: Decision = governed.value
        if self.cache is not None and pending.key is not None:
            stored = CachedDecision(
                entity_id=d.entity_id,
                confidence=d.confidence,
                reason=d.reason,
                usage=governed.usage,
                model=self.settings.model,
            )
            await self.cache.put_async(pending.key, stored)
        result = self.guarded(self.resolve(p, d))
        result.rewritten_as = list(d.names)
        governed.attempts[-1].reasks = d.reasks
        result.attempts = governed.attempts
        result.usage = governed.usage
        return result

    async def decide_async(
        self,
        index: int,
        query: str,
        normalized: str,
        candidates: list[Candidate],
        route: Route,
        governor: Callable[[], Governor],
        *,
        ask_names: bool = False,
        attributes: Mapping[str, Any] | None = None,
    ) -> MatchResult:
        """:meth:`prepare`, then :meth:`call` if the LLM is still needed."""
        prepared = await self.prepare_async(
            index, query, normalized, candidates, route, ask_names=ask_names, attributes=attributes
        )
        if isinstance(prepared, Pending):
            return await self.call_async(prepared, governor())
        return prepared

    def request_body(self, pending: Pending) -> dict[str, Any]:
        """The exact body the live path would send for ``pending`` (a Batch API line)."""
        adjudicator = self.adjudicator
        assert adjudicator is not None
        return request_body(
            pending.messages,
            len(pending.ids),
            model=self.settings.model,
            mode=adjudicator.mode,
            create_kwargs=adjudicator.create_kwargs,
        )

    @staticmethod
    def resolve(
        provisional: MatchResult, decision: Decision | CachedDecision, *, decided_by: str = "llm"
    ) -> MatchResult:
        """The final result of a pending call once its decision is known."""

        def make(**fields: Any) -> MatchResult:
            return MatchResult(
                query=provisional.query,
                index=provisional.index,
                candidates=provisional.candidates,
                fields=provisional.fields,
                **fields,
            )

        return from_decision(make, provisional.candidates, decision, decided_by=decided_by)

    def _from_reviewed(
        self, make: Callable[..., MatchResult], candidates: list[Candidate], label: ReviewedLabel
    ) -> MatchResult:
        reason = "reviewed by a person" + (f": {label.note}" if label.note else "")
        if label.entity_id is None:
            top = candidates[0].score if candidates else None
            return make(status="novel", score=top, decided_by="human", reason=reason)
        catalog = self._catalog()
        entity = catalog.entities[catalog.by_id[label.entity_id]]
        chosen = next((c for c in candidates if c.entity_id == label.entity_id), None)
        return make(
            status="matched",
            entity_id=entity.id,
            entity_name=entity.name,
            score=chosen.score if chosen is not None else None,
            decided_by="human",
            reason=reason,
        )


def from_decision(
    make: Callable[..., MatchResult],
    candidates: list[Candidate],
    d: Decision | CachedDecision,
    *,
    decided_by: str,
) -> MatchResult:
    """A result from an LLM (or cached) decision: the chosen candidate, or novel."""
    chosen = next((c for c in candidates if c.entity_id == d.entity_id), None)
    if chosen is None:
        return make(
            status="novel",
            score=candidates[0].score if candidates else None,
            decided_by=decided_by,
            reason=d.reason,
            confidence=d.confidence,
        )
    return make(
        status="matched",
        entity_id=chosen.entity_id,
        entity_name=chosen.name,
        score=chosen.score,
        decided_by=decided_by,
        reason=d.reason,
        confidence=d.confidence,
    )


def _evidence(route: Route) -> FieldEvidence | None:
    """A record query's field evidence, as results carry it."""
    d = route.fields
    if d is None:
        return None
    return FieldEvidence(
        entity_id=d.entity_id,
        probability=round(d.probability, 4),
        none_probability=round(d.none_probability, 4),
        prior_bits=d.prior_bits,
        contributions=d.contributions,
        levels=d.levels,
    )
