"""The pipeline of one query: validate, retrieve, route, decide, rewrite.

:class:`QueryPipeline` strings the stages together for one query; the Matcher's batch and
stream methods run many of them through a strategy. Retrieval goes through the running
loop's micro-batcher (so concurrent queries are encoded together), the decision through
the running loop's governor. :meth:`QueryPipeline.prepare_async` stops before the LLM call
(the provider's Batch API sends it later).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from .._retrieval.fitting import Taught
from .._retrieval.policy import RoutePolicy
from .._retrieval.retriever import Retriever, Where
from .._retrieval.routing import Route
from .._text import validate_query
from ..catalog import Catalog
from ..config import Thresholds
from ..errors import NemLLMError, NotReadyError, QueryError
from ..models import AuditNote, Candidate, MatchResult, Usage
from ..settings import MatcherSettings
from .audit import Auditor
from .decision import Decider, Pending, error_result
from .rewrite import Rewriter
from .runtime import Runtime

__all__ = ["QueryPipeline", "Tap", "query_text", "split_query", "tapped", "valid_queries"]

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


def split_query(query: object, index: int | None = None) -> tuple[object, Mapping[str, Any] | None]:
    """A query's text and its fields: a string is all text; a record is a mapping
    ``{"query": text, "attributes": {field: value}}`` (the text may be left out: the
    fields' values joined stand in for it, for retrieval)."""
    if not isinstance(query, Mapping):
        return query, None
    attributes = query.get("attributes")
    if attributes is not None and not isinstance(attributes, Mapping):
        raise QueryError("a record's 'attributes' must be a mapping of field -> value",
                         source=f"queries[{index}]" if index is not None else None)  # fmt: skip
    text = query.get("query")
    if (text is None or (isinstance(text, str) and not text.strip())) and attributes:
        text = ", ".join(str(v) for v in attributes.values() if v not in (None, ""))
    return text, dict(attributes) if attributes else None


def query_text(query: object) -> str:
    """What a result says the query was: its text (or a record's), else its repr."""
    try:
        text = split_query(query)[0]
    except QueryError:
        text = None
    return text if isinstance(text, str) else repr(query)


def valid_queries(
    workload: Iterable[object], max_chars: int
) -> tuple[list[str], list[tuple[str, Mapping[str, Any]]]]:
    """The workload's valid queries, normalized, and its records (normalized text and
    fields); a bad one is skipped: it is no evidence."""
    texts: list[str] = []
    records: list[tuple[str, Mapping[str, Any]]] = []
    for query in workload:
        try:
            text, attributes = split_query(query)
            normalized = validate_query(text, max_chars=max_chars)
        except NemLLMError:
            continue
        texts.append(normalized)
        if attributes:
            records.append((normalized, attributes))
    return texts, records


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
        self,
        candidates: list[Candidate],
        normalized: str,
        thresholds: Thresholds | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> tuple[Route, list[Candidate]]:
        """Route one query's candidates by the policy in force."""
        policy = self._policy()
        return policy.route(candidates, normalized, self._catalog(), thresholds, attributes)

    async def _routed(
        self,
        query: Any,
        index: int,
        top_k: int | None,
        thresholds: Thresholds,
        where: Where | None,
        alone: bool = False,
    ) -> tuple[str, int, str | None, Route, list[Candidate]]:
        """Validate, retrieve and route one query (a text, or a record: ``split_query``)."""
        text, attributes = split_query(query, index)
        normalized = validate_query(text, index=index, max_chars=self.settings.max_query_chars)
        k = top_k or self.settings.top_k
        mask_key = self.retriever.mask_key(where)
        tap = _tap.get()
        if tap is None:
            candidates = await self.candidates_async(normalized, k, mask_key, flush=alone)
        else:
            wide = await self.candidates_async(normalized, max(k, tap.k), mask_key, flush=alone)
            tap.found[index] = wide
            candidates = wide[:k]
        route, candidates = self.route(candidates, normalized, thresholds, attributes)
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
        text = query_text(query)
        thresholds = thresholds or self._policy().thresholds
        route: Route | None = None
        try:
            normalized, k, mask_key, route, candidates = await self._routed(
                query, index, top_k, thresholds, where, alone
            )
            route = self._audit_closed(route)
            rewrite = self.settings.rewrite and self.decider.adjudicator is not None
            governor = self._governor
            attributes = split_query(query, index)[1]
            result = await self.decider.decide_async(
                index, text, normalized, candidates, route, governor, ask_names=rewrite,
                attributes=attributes,
            )  # fmt: skip
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
            attributes = split_query(query, index)[1]
            return await self.decider.prepare_async(
                index, query_text(query), normalized, candidates, route, attributes=attributes
            )
        except (asyncio.CancelledError, NotReadyError):
            raise
        except Exception as exc:
            return error_result(index, query, exc)
