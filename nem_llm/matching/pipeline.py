"""The pipeline of one query: validate, retrieve, route, decide, rewrite.

:class:`QueryPipeline` strings the stages together for one query; the Matcher's batch and
stream methods run many of them through a strategy. Retrieval goes through the running
loop's micro-batcher (so concurrent queries are encoded together), the decision through
the running loop's governor. :meth:`QueryPipeline.prepare_async` stops before the LLM call
(the provider's Batch API sends it later).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..catalog import Catalog
from ..config import Thresholds
from ..errors import NemLLMError, NotReadyError
from ..models import Candidate, MatchResult
from ..retrieval.policy import RoutePolicy
from ..retrieval.retriever import Retriever, Where
from ..retrieval.routing import Route
from ..settings import MatcherSettings
from ..text import validate_query
from .decision import Decider, Pending, error_result
from .rewrite import Rewriter
from .runtime import Runtime

__all__ = ["QueryPipeline"]


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
    ) -> None:
        self.settings = settings
        self.retriever = retriever
        self._policy = policy
        self._catalog = catalog
        self.decider = decider
        self.runtime = runtime
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
        candidates = await self.candidates_async(normalized, k, mask_key, flush=alone)
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
            rewrite = self.settings.rewrite and self.decider.adjudicator is not None
            governor = self._governor
            result = await self.decider.decide_async(
                index, text, normalized, candidates, route, governor, ask_names=rewrite
            )
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

    def _governor(self) -> Any:
        return self.runtime.for_loop().governor

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
