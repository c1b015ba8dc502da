"""The pipeline of one query: validate, retrieve, route, decide, rewrite.

:class:`QueryPipeline` strings the stages together for one query; the Matcher's batch and
stream methods run many of them through a strategy. Retrieval goes through the running
loop's micro-batcher (so concurrent queries are encoded together), the decision through
the running loop's governor. :meth:`QueryPipeline.prepare_async` stops before the LLM call
(the provider's Batch API sends it later).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from ..catalog import Catalog
from ..config import Thresholds
from ..errors import NemLLMError, NotReadyError
from ..models import AuditNote, Candidate, MatchResult, Usage
from ..retrieval.fitting import Taught
from ..retrieval.policy import RoutePolicy
from ..retrieval.retriever import Retriever, Where
from ..retrieval.routing import Route
from ..settings import MatcherSettings
from ..text import validate_query
from .audit import Auditor
from .decision import Decider, Pending, error_result
from .rewrite import Rewriter
from .runtime import Runtime

__all__ = ["QueryPipeline", "Tap", "valid_queries"]

# routes a person's labels decided: never audited, never closed by an audit
_LEARNED = frozenset({"learned", "learned_novel"})


class Tap:
    """A wider retrieval kept from the matching itself (``nem-llm eval``'s recall columns):
    each query's retrieval asks for ``k`` candidates (at least its own ``top_k``), keeps them
    all in ``found`` (by the query's position) and routes the head, its own ``top_k``.

    Only for an exact index, where a top-``k`` list is the head of a top-``K`` list (the
    index's tie rule): the matching is then the same as without the tap.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.found: dict[int, list[Candidate]] = {}


_tap: ContextVar[Tap | None] = ContextVar("nem_llm_retrieval_tap", default=None)


@contextmanager
def tapped(k: int) -> Iterator[Tap]:
    """Within the block, the matching's retrievals are widened to ``k`` and kept (a
    context variable: the tasks a batch starts inside the block see it)."""
    tap = Tap(k)
    token = _tap.set(tap)
    try:
        yield tap
    finally:
        _tap.reset(token)


def valid_queries(workload: Iterable[str], max_chars: int) -> list[str]:
    """The workload's valid queries, normalized (a bad one is skipped: it is no label)."""
    out = []
    for query in workload:
        try:
            out.append(validate_query(query, max_chars=max_chars))
        except NemLLMError:
            continue
    return out


class QueryPipeline:
    """One query through the stages; every failure but cancellation is an error record.

    Args:
        settings: top_k, query length limit, rewrite.
        retriever: the retrieval stage.
        policy: returns the routing policy now (``fit`` replaces it whole).
        catalog: returns the catalog now (entity changes replace it).
        decider: the decision stage.
        runtime: the running loop's micro-batcher and governor.
    """

    def __init__(
        self,
        settings: MatcherSettings,
        retriever: Retriever,
        policy: Callable[[], RoutePolicy],
        catalog: Callable[[], Catalog],
        decider: Decider,
        runtime: Runtime,
        auditor: Auditor | None = None,
    ) -> None:
        self.settings = settings
        self.retriever = retriever
        self._policy = policy
        self._catalog = catalog
        self.decider = decider
        self.runtime = runtime
        self.auditor = auditor
        self.rewriter = Rewriter(
            decider, self.candidates_async, self.route, lambda: runtime.for_loop().governor
        )

    async def candidates_async(
        self, normalized: str, top_k: int, mask_key: str | None = None, *, flush: bool = False
    ) -> list[Candidate]:
        """Retrieve through the shared micro-batcher (``flush``: do not wait for company)."""
        self.retriever.require_index()
        batcher = self.runtime.for_loop().batcher
        return await batcher.submit_async((normalized, top_k, mask_key), flush=flush)

    def route(
        self, candidates: list[Candidate], normalized: str, thresholds: Thresholds | None = None
    ) -> tuple[Route, list[Candidate]]:
        """Route one query's candidates by the policy in force."""
        return self._policy().route(candidates, normalized, self._catalog(), thresholds)

    async def _routed(
        self,
        query: Any,
        index: int,
        top_k: int | None,
        thresholds: Thresholds,
        where: Where | None,
        alone: bool = False,
    ) -> tuple[str, int, str | None, Route, list[Candidate]]:
        """Validate, retrieve and route one query."""
        normalized = validate_query(query, index=index, max_chars=self.settings.max_query_chars)
        k = top_k or self.settings.top_k
        mask_key = self.retriever.mask_key(where)
        tap = _tap.get()
        if tap is None:
            candidates = await self.candidates_async(normalized, k, mask_key, flush=alone)
        else:
            wide = await self.candidates_async(normalized, max(k, tap.k), mask_key, flush=alone)
            tap.found[index] = wide
            candidates = wide[:k]
        route, candidates = self.route(candidates, normalized, thresholds)
        return normalized, k, mask_key, route, candidates

    async def match_one_async(
        self,
        index: int,
        query: Any,
        top_k: int | None,
        *,
        thresholds: Thresholds | None = None,
        where: Where | None = None,
        raise_input_errors: bool = False,
        alone: bool = False,
    ) -> tuple[MatchResult, Route | None]:
        """Match one query; every failure but cancellation becomes an error record.

        ``alone``: no other query of this call is in flight (the sequential strategy), so
        retrieval does not wait the micro-batcher's ``max_wait`` for company.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        text = query if isinstance(query, str) else repr(query)
        thresholds = thresholds or self._policy().thresholds
        route: Route | None = None
        try:
            normalized, k, mask_key, route, candidates = await self._routed(
                query, index, top_k, thresholds, where, alone
            )
            route = self._audit_closed(route)
            rewrite = self.settings.rewrite and self.decider.adjudicator is not None
            governor = self._governor
            result = await self.decider.decide_async(
                index, text, normalized, candidates, route, governor, ask_names=rewrite
            )
            if result.decided_by == "embedding" and route.rule not in _LEARNED:
                result = await self._audited(result, normalized, candidates)
            if rewrite and result.status == "novel":
                result = await self.rewriter.rewritten_async(
                    result, normalized, k, mask_key, route, thresholds
                )
        except (asyncio.CancelledError, NotReadyError):
            raise
        except Exception as exc:
            if raise_input_errors and isinstance(exc, NemLLMError):
                raise
            result, route = error_result(index, query, exc), None
        result.latency_s = loop.time() - started
        return result, route

    def _audit_closed(self, route: Route) -> Route:
        """The route, or the LLM's if the audit has closed this auto route."""
        if self.auditor is None or route.kind == "adjudicate" or route.rule in _LEARNED:
            return route
        if not self.auditor.closed(route.kind):
            return route
        why = f"{route.reason}; but the audit closed the auto-{route.kind} route for this run"
        return Route("adjudicate", why, route.top_score, route.margin, "audit_closed")

    async def _audited(
        self, result: MatchResult, normalized: str, candidates: list[Candidate]
    ) -> MatchResult:
        """An auto decision, put to the LLM too when the audit draws it."""
        auditor = self.auditor
        if auditor is None or self.decider.adjudicator is None or not auditor.picks(normalized):
            return result
        kind = result.status
        assert kind in ("matched", "novel")
        check = Route("adjudicate", "an audit of an auto decision", None, None, "audit")
        llm = await self.decider.decide_async(
            result.index, result.query, normalized, candidates, check, self._governor
        )
        update: dict[str, Any] = {
            "attempts": llm.attempts,
            "usage": llm.usage,
        }
        if llm.status not in ("matched", "novel"):  # the audit call failed: no evidence
            return result.model_copy(update=update)
        agrees = llm.status == result.status and llm.entity_id == result.entity_id
        closed = auditor.record(kind, agrees)
        update["audit"] = AuditNote(route=kind, llm_entity_id=llm.entity_id, agrees=agrees)
        if not agrees:
            said = f"{llm.entity_id!r}" if llm.entity_id else "not in the catalog"
            update.update(
                status="review",
                entity_id=None,
                entity_name=None,
                reason=f"{result.reason}; but the LLM audit says {said}"
                + ("; the audit closed this route" if closed else ""),
            )
        return result.model_copy(update=update)

    def _governor(self) -> Any:
        return self.runtime.for_loop().governor

    async def label_async(self, queries: list[str], shown: list[list[Candidate]]) -> Taught:
        """The production LLM call as calibration's teacher: each query adjudicated over the
        candidates production would show, with the same prompt (the answers are cached, so
        the run that follows never pays for them twice)."""
        ask = self.settings.rewrite and self.decider.adjudicator is not None
        route = Route("adjudicate", "a workload label for calibration", None, None, "label")
        results = await asyncio.gather(
            *(
                self.decider.decide_async(i, q, q, c, route, self._governor, ask_names=ask)
                for i, (q, c) in enumerate(zip(queries, shown, strict=True))
            )
        )
        usage = sum((r.usage for r in results), Usage())
        known = [r.status in ("matched", "novel") for r in results]
        return Taught(known, [r.entity_id for r in results], usage)

    async def prepare_async(
        self, index: int, query: Any, *, top_k: int | None = None, where: Where | None = None
    ) -> MatchResult | Pending:
        """Route one query without calling the LLM: its final result, or the call it needs.

        Bad input is an error record, as in a batch.
        """
        try:
            thresholds = self._policy().thresholds
            normalized, _, _, route, candidates = await self._routed(
                query, index, top_k, thresholds, where
            )
            text = query if isinstance(query, str) else repr(query)
            return await self.decider.prepare_async(index, text, normalized, candidates, route)
        except (asyncio.CancelledError, NotReadyError):
            raise
        except Exception as exc:
            return error_result(index, query, exc)
