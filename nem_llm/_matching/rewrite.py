"""The rewrite stage: a query retrieval missed is retrieved again with the LLM's names.

For a query the LLM found no match for (asked, with its "none", for the names the entity
has in the catalog: no extra call) or that retrieval alone called novel (one rewrite
call), :meth:`Rewriter.rewritten` retrieves again with those names. A name the LLM gave
with its "none" that routes to a match is taken (the LLM has judged the first candidates);
otherwise the LLM adjudicates once more over the merged candidates. Never two rewrites
per query; names and decisions are cached.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from .._llm.adjudication import REWRITE_VERSION, estimate_tokens, render_rewrite_messages
from .._llm.cache import CachedDecision, decision_key
from .._llm.governor import Governor
from .._retrieval.routing import Route
from .._text import fold
from ..config import Thresholds
from ..errors import BudgetExceededError, LLMError
from ..models import Attempt, Candidate, MatchResult, Usage
from .decision import Decider

__all__ = ["Rewriter"]

#: candidates of one name: (name, k, filter key) -> candidates
CandidatesOf = Callable[[str, int, str | None], Awaitable[list[Candidate]]]
#: routing of one name's candidates: (candidates, name, thresholds) -> (route, candidates)
RouteOf = Callable[[list[Candidate], str, Thresholds], tuple[Route, list[Candidate]]]


class Rewriter:
    """Retrieves a missed query again with the names the LLM expects, and decides again.

    Args:
        decider: the decision stage (its adjudicator, cache and model).
        candidates: retrieval of one name through the shared micro-batcher.
        route: the routing policy.
        governor: the running loop's governor.
    """

    def __init__(
        self,
        decider: Decider,
        candidates: CandidatesOf,
        route: RouteOf,
        governor: Callable[[], Governor],
    ) -> None:
        self.decider = decider
        self._candidates = candidates
        self._route = route
        self._governor = governor

    def _names_key(self, normalized: str, judged: bool) -> str:
        """Cache key of a query's names: given with a "none", or by a rewrite call."""
        tag = "__names__" if judged else "__rewrite__"
        return decision_key(normalized, (tag,), self.decider.settings.model, REWRITE_VERSION)

    async def _cached_names(self, normalized: str, judged: bool) -> list[str] | None:
        cache = self.decider.cache
        if cache is None:
            return None
        cached = await cache.get_async(self._names_key(normalized, judged))
        return None if cached is None else list(json.loads(cached.reason))  # names as JSON

    async def _rewrite_call(self, normalized: str) -> tuple[list[str], list[Attempt], Usage]:
        """The rewrite call through the governor: (names, its attempts, its usage)."""
        governor = self._governor()
        adjudicator = self.decider.adjudicator
        assert adjudicator is not None
        timeout = self.decider.settings.limits.timeout
        governed = await governor.call_async(
            lambda: adjudicator.rewrite_async(
                normalized, request_timeout=timeout, pace=governor.pace_async
            ),
            estimated_tokens=estimate_tokens(render_rewrite_messages(normalized), 40),
            usage_of=lambda r: r.usage,
        )
        return list(governed.value.names), governed.attempts, governed.usage

    async def rewritten_async(
        self,
        first: MatchResult,
        normalized: str,
        k: int,
        mask_key: str | None,
        route: Route,
        thresholds: Thresholds,
    ) -> MatchResult:
        """One LLM rewrite of a query retrieval missed (see the module docstring)."""
        if first.decided_by == "human" or route.rule == "learned_novel":
            return first
        said_none = first.decided_by in ("llm", "cache")  # the LLM saw these candidates
        judged = said_none  # the names come with that "none"
        attempts = list(first.attempts)
        usage = first.usage
        names: list[str] | None
        if first.decided_by == "llm":  # asked with the adjudication: no extra call
            names, fresh = list(first.rewritten_as), True
        else:
            names, fresh = await self._cached_names(normalized, judged), False
            if names is None and judged:  # a cached "none" whose names were not kept
                judged = False
                names = await self._cached_names(normalized, judged)
        first = first.model_copy(update={"rewritten_as": []})
        cost = Usage()
        if names is None:  # routed novel by retrieval alone: one rewrite call
            try:
                names, more, cost = await self._rewrite_call(normalized)
            except (BudgetExceededError, LLMError) as exc:
                why = f"{first.reason}; the rewrite failed: {exc}"
                return first.model_copy(update={"reason": why})
            attempts += more
            usage = usage + cost
            fresh = True
        cache = self.decider.cache
        if fresh and cache is not None:
            stored = CachedDecision(
                entity_id=None,
                reason=json.dumps(names),
                usage=cost,
                model=self.decider.settings.model,
            )
            await cache.put_async(self._names_key(normalized, judged), stored)
        names = [n for n in names if fold(n) != fold(normalized)]
        if not names:
            why = f"{first.reason}; the LLM gave no other name"
            return first.model_copy(update={"reason": why, "attempts": attempts, "usage": usage})
        done: dict[str, Any] = {"rewritten_as": names, "attempts": attempts, "usage": usage}
        found = await asyncio.gather(*(self._candidates(n, k, mask_key) for n in names))
        # the LLM judged the first candidates: a name of its that routes to a match is taken
        for name, cands in zip(names, found, strict=True) if judged else ():
            routed, cands = self._route(cands, name, thresholds)
            if routed.kind == "matched" and cands:
                return MatchResult(
                    query=first.query,
                    index=first.index,
                    candidates=cands,
                    status="matched",
                    entity_id=cands[0].entity_id,
                    entity_name=cands[0].name,
                    score=cands[0].score,
                    decided_by="llm",
                    reason=f"rewritten as {names}: {routed.reason}",
                    **done,
                )
        best: dict[str, Candidate] = {c.entity_id: c for c in first.candidates}
        for cands in found:
            for c in cands:
                if c.entity_id not in best or c.score > best[c.entity_id].score:
                    best[c.entity_id] = c
        merged = sorted(best.values(), key=lambda c: -c.score)[:k]
        if said_none and {c.entity_id for c in merged} == {c.entity_id for c in first.candidates}:
            # the LLM has already said none of these
            why = f"{first.reason}; rewritten as {names}: no new candidate"
            return first.model_copy(update={"reason": why, **done})
        top_score = merged[0].score if merged else None
        again = Route("adjudicate", f"rewritten as {names}", top_score, None, "rewrite")
        second = await self.decider.decide_async(
            first.index, first.query, normalized, merged, again, self._governor
        )
        return second.model_copy(
            update={
                **done,
                "attempts": attempts + second.attempts,
                "usage": usage + second.usage,
                "reason": f"rewritten as {names}: {second.reason}",
            }
        )
