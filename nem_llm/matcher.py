"""The Matcher: catalog + retrieval + routing + governed LLM adjudication, async and sync.

The async methods are the implementation; each sync twin runs its async method on a
private event loop thread (see ``_sync.LoopThread``), so the logic exists once.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import os
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Iterable,
    Sequence,
    Sized,
)
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from pathlib import Path
from typing import Any, overload

import instructor
import numpy as np
from openai import AsyncOpenAI

from ._sync import LoopThread
from .catalog import Catalog, EntitySource, load_catalog
from .config import Limits, Thresholds
from .errors import BudgetExceededError, ConfigError, LLMError, NemLLMError, NotReadyError
from .llm.adjudication import (
    PROMPT_VERSION,
    Adjudicator,
    Decision,
    estimate_tokens,
    render_messages,
)
from .llm.cache import CachedDecision, DecisionCache, decision_key
from .llm.governor import Governor, GovernorStats
from .llm.stats import StatsCollector
from .llm.strategies import Strategy, check_strategy, run_strategy
from .models import Candidate, Diagnosis, Explanation, MatchResult, RunStats, Usage
from .retrieval.embedding import Embedder, MicroBatcher, SentenceTransformerEmbedder
from .retrieval.index import HybridIndex, IndexMode
from .retrieval.routing import LabelledScore, Route, calibrate, route
from .text import DEFAULT_MAX_QUERY_CHARS, validate_query

__all__ = ["Matcher", "ProgressCallback"]

ProgressCallback = Callable[[int, int | None], Awaitable[None] | None]
Queries = Iterable[str] | AsyncIterable[str]


class _Runtime:
    """Loop-bound state: the governor and the micro-batcher belong to one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, governor: Governor, batcher: Any) -> None:
        self.loop = loop
        self.governor = governor
        self.batcher: MicroBatcher[tuple[str, int], list[Candidate]] = batcher


class Matcher:
    """Match messy queries to catalog entities; an LLM decides only the ambiguous ones.

    Example:
        >>> from nem_llm import Matcher
        >>> matcher = Matcher([{"id": "US", "name": "United States", "aliases": ["USA"]}])
        >>> matcher.fit()                                   # doctest: +SKIP
        >>> matcher.match("USA").entity_id                  # doctest: +SKIP
        'US'

    Args:
        entities: list of dicts or ``Entity`` models, or a path to a JSONL/CSV file.
        client: an ``AsyncOpenAI`` client (its own retries are turned off: ours govern).
            Without one, a client is made from OPENAI_API_KEY/OPENAI_BASE_URL (or the
            ``api_key``/``base_url`` arguments); with none of them, ambiguous queries come
            back as ``review``.
        model: the chat model that adjudicates.
        mode: instructor mode; ``Mode.TOOLS`` works with OpenAI and llama.cpp's server.
        limits: the governor's ``Limits`` (concurrency, rpm, tpm, timeout, retries, budget).
        top_k: candidates retrieved and shown to the LLM.
        accept_threshold, margin, novel_threshold: routing (see ``Thresholds``);
            ``accept_threshold > 1`` sends every non-novel query to the LLM.
        embedder: any ``Embedder``; defaults to the offline all-MiniLM-L6-v2.
        lexical_weight: weight of character n-gram TF-IDF in a form's score (0..1).
        index_description: also index ``"name, description"`` as a surface form.
        cache: a ``DecisionCache`` or a SQLite path: an LLM decision is never paid twice.
        index_path: a directory to save the index to and load it from.
        batching: share one micro-batcher between concurrent calls (``False`` encodes every
            query alone; for comparisons).
        max_batch_size, max_wait: micro-batcher flush size and delay. A burst of
            concurrent calls is encoded in flushes of up to ``max_batch_size`` texts; the
            embedder sorts each flush by length and runs its own sub-batches, so bigger
            flushes pad less (512 concurrent calls: 0.88x one big encode at 256, 0.65x at
            64) at the price of a later first result within a burst.
        max_query_chars: longer queries are rejected with a clear error.
        index: ``"exact"`` search, ``"ann"`` (a faiss shortlist re-scored exactly; the
            ``[ann]`` extra), or ``"auto"``: ANN from ``ANN_MIN_FORMS`` surface forms.
    """

    def __init__(
        self,
        entities: EntitySource | Catalog,
        *,
        client: AsyncOpenAI | None = None,
        llm: bool = True,
        model: str = "gpt-4o-mini",
        mode: instructor.Mode = instructor.Mode.TOOLS,
        base_url: str | None = None,
        api_key: str | None = None,
        limits: Limits | None = None,
        top_k: int = 5,
        accept_threshold: float | None = None,
        margin: float | None = None,
        novel_threshold: float | None = None,
        embedder: Embedder | None = None,
        lexical_weight: float = 0.5,
        index_description: bool = False,
        cache: DecisionCache | str | os.PathLike[str] | None = None,
        index_path: str | os.PathLike[str] | None = None,
        batching: bool = True,
        max_batch_size: int = 256,
        max_wait: float = 0.005,
        max_query_chars: int = DEFAULT_MAX_QUERY_CHARS,
        temperature: float | None = 0.0,
        index: IndexMode = "auto",
    ) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"top_k must be an int >= 1, got {top_k!r}")
        if not 0.0 <= lexical_weight <= 1.0:
            raise ConfigError(f"lexical_weight must be in [0, 1], got {lexical_weight!r}")
        self.catalog = load_catalog(entities, include_description=index_description)
        defaults = Thresholds()
        self.thresholds = Thresholds(
            accept=defaults.accept if accept_threshold is None else accept_threshold,
            margin=defaults.margin if margin is None else margin,
            novel=defaults.novel if novel_threshold is None else novel_threshold,
        )
        self.limits = limits or Limits()
        if not isinstance(self.limits, Limits):
            raise ConfigError(f"limits must be a nem_llm.Limits, got {type(limits).__name__}")
        self.model = model
        self.mode = mode
        self.top_k = top_k
        self.lexical_weight = lexical_weight
        self.embedder: Embedder = embedder or SentenceTransformerEmbedder()
        self.batching = batching
        self.max_batch_size = max_batch_size if batching else 1
        self.max_wait = max_wait
        self.max_query_chars = max_query_chars
        self.index_path = Path(index_path) if index_path is not None else None
        self.index_mode: IndexMode = index
        self._index_description = index_description
        self.index: HybridIndex | None = None
        self.last_run_stats: RunStats | None = None

        self._client, self._owns_client = (
            self._resolve_client(client, base_url, api_key) if llm else (None, False)
        )
        self._adjudicator: Adjudicator | None = None
        if self._client is not None:
            patched = instructor.from_openai(self._client, mode=mode)
            self._adjudicator = Adjudicator(
                patched, model, max_reasks=self.limits.max_reasks, temperature=temperature
            )
        if isinstance(cache, DecisionCache) or cache is None:
            self._cache, self._owns_cache = cache, False
        else:
            self._cache, self._owns_cache = DecisionCache(cache), True
        self._runtime: _Runtime | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="nem-llm-embed")
        self._sync = LoopThread()
        self._closed = False

    # -- set-up ------------------------------------------------------------------------

    def _resolve_client(
        self, client: AsyncOpenAI | None, base_url: str | None, api_key: str | None
    ) -> tuple[AsyncOpenAI | None, bool]:
        if client is not None:
            if not isinstance(client, AsyncOpenAI):
                raise ConfigError(
                    f"client must be an openai.AsyncOpenAI, got {type(client).__name__}"
                )
            # one retry layer: ours. with_options shares the user's connection pool.
            return client.with_options(max_retries=0, timeout=self.limits.timeout), False
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if not base_url and not api_key:
            return None, False
        made = AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or "not-needed",  # local servers (llama.cpp, vLLM) want none
            max_retries=0,
            timeout=self.limits.timeout,
        )
        return made, True

    @property
    def llm_configured(self) -> bool:
        """Whether ambiguous queries can go to an LLM (else they come back as ``review``)."""
        return self._adjudicator is not None

    @property
    def ready(self) -> bool:
        return self.index is not None

    def _runtime_for_loop(self) -> _Runtime:
        if self._closed:
            raise NemLLMError("this Matcher is closed")
        loop = asyncio.get_running_loop()
        rt = self._runtime
        if rt is not None and rt.loop is not loop:
            if not rt.loop.is_closed():
                raise NemLLMError(
                    "this Matcher is already in use on another event loop; use either its "
                    "async methods or its sync twins, not both"
                )
            rt = None
        if rt is None:
            batcher: MicroBatcher[tuple[str, int], list[Candidate]] = MicroBatcher(
                self._retrieve_batch,
                max_batch_size=self.max_batch_size,
                max_wait=self.max_wait if self.batching else 0.0,
                executor=self._executor,
            )
            rt = _Runtime(loop, Governor(self.limits, model=self.model), batcher)
            self._runtime = rt
        return rt

    def _require_index(self) -> HybridIndex:
        if self.index is None:
            raise NotReadyError(
                "the matcher is not ready: call `await matcher.fit_async()` (or "
                "`matcher.fit()`) before matching"
            )
        return self.index

    async def fit_async(
        self,
        training_data: Sequence[tuple[str, str | None]] | None = None,
        *,
        target_precision: float = 0.99,
    ) -> Matcher:
        """Build (or load) the index; labelled ``(query, gold_id_or_None)`` calibrates thresholds.

        Without ``training_data`` the thresholds are the documented defaults (or the ones
        given to the constructor).
        """
        if self._closed:
            raise NemLLMError("this Matcher is closed")
        loop = asyncio.get_running_loop()
        if self.index is None:
            self.index = await loop.run_in_executor(self._executor, self._build_index)
        if training_data:
            self.thresholds = await self._calibrate(training_data, target_precision)
        return self

    def _build_index(self) -> HybridIndex:
        if self.index_path is not None and (self.index_path / "manifest.json").exists():
            return HybridIndex.load(
                self.index_path,
                self.catalog,
                embedder_name=self.embedder.name,
                lexical_weight=self.lexical_weight,
                index=self.index_mode,
            )
        vectors = self.embedder.encode(list(self.catalog.forms))
        index = HybridIndex(
            self.catalog,
            vectors,
            lexical_weight=self.lexical_weight,
            embedder_name=self.embedder.name,
            index=self.index_mode,
        )
        if self.index_path is not None:
            index.save(self.index_path)
        return index

    async def _calibrate(
        self, training_data: Sequence[tuple[str, str | None]], target_precision: float
    ) -> Thresholds:
        if not 0.0 < target_precision <= 1.0:
            raise ConfigError(f"target_precision must be in (0, 1], got {target_precision}")
        items: list[tuple[str, int]] = []
        golds: list[str | None] = []
        for i, pair in enumerate(training_data):
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise ConfigError(f"training_data[{i}] must be a (query, gold_id) pair")
            query, gold = pair
            items.append((validate_query(query, index=i, max_chars=self.max_query_chars), 2))
            golds.append(gold)
        # straight to the worker thread in large batches: no micro-batcher, no loop binding
        loop = asyncio.get_running_loop()
        found: list[list[Candidate]] = []
        for lo in range(0, len(items), 256):
            chunk = items[lo : lo + 256]
            found.extend(await loop.run_in_executor(self._executor, self._retrieve_batch, chunk))
        examples = []
        for cands, gold in zip(found, golds, strict=True):
            top = cands[0].score if cands else 0.0
            second = cands[1].score if len(cands) > 1 else 0.0
            examples.append(
                LabelledScore(
                    top_score=top,
                    margin=top - second,
                    top_is_gold=bool(cands) and gold is not None and cands[0].id == gold,
                    gold_is_none=gold is None,
                )
            )
        return calibrate(examples, target_precision=target_precision, default=self.thresholds)

    # -- retrieval ---------------------------------------------------------------------

    def _retrieve_batch(self, items: list[tuple[str, int]]) -> list[list[Candidate]]:
        """Encode and search a batch in the worker thread (never on the event loop)."""
        index = self._require_index()
        texts = [text for text, _ in items]
        vectors = self.embedder.encode(texts)
        k = max(k for _, k in items)
        found = index.search(np.asarray(vectors, dtype=np.float32), texts, k)
        return [cands[:want] for cands, (_, want) in zip(found, items, strict=True)]

    async def _candidates(self, normalized: str, top_k: int) -> list[Candidate]:
        self._require_index()
        return await self._runtime_for_loop().batcher.submit((normalized, top_k))

    # -- one query ---------------------------------------------------------------------

    def _cache_key(
        self, normalized: str, messages: list[dict[str, str]], ids: tuple[str, ...]
    ) -> str:
        # the rendered prompt is in the key: editing a template or a candidate's text
        # invalidates cached decisions
        prompt_hash = hashlib.sha256(messages[-1]["content"].encode()).hexdigest()[:16]
        return decision_key(normalized, ids, self.model, f"{PROMPT_VERSION}:{prompt_hash}")

    async def _match_one(
        self, index: int, query: Any, top_k: int | None, *, raise_input_errors: bool = False
    ) -> tuple[MatchResult, Route | None]:
        """Match one query; every failure but cancellation becomes an error record."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        k = top_k or self.top_k
        text = query if isinstance(query, str) else repr(query)
        try:
            normalized = validate_query(query, index=index, max_chars=self.max_query_chars)
            candidates = await self._candidates(normalized, k)
            decision = route(candidates, self.thresholds)
            result = await self._decide(index, text, normalized, candidates, decision)
        except asyncio.CancelledError:
            raise
        except NotReadyError:
            raise
        except Exception as exc:
            if raise_input_errors and isinstance(exc, NemLLMError):
                raise
            result = MatchResult(
                query=text[:1000],
                index=index,
                status="error",
                error=str(exc),
                error_type=getattr(exc, "cause", None) or type(exc).__name__,
            )
            decision = None
        result.latency_s = loop.time() - started
        return result, decision

    async def _decide(
        self,
        index: int,
        query: str,
        normalized: str,
        candidates: list[Candidate],
        decision: Route,
    ) -> MatchResult:
        top = candidates[0] if candidates else None

        def make(**fields: Any) -> MatchResult:
            return MatchResult(query=query, index=index, candidates=candidates, **fields)

        if decision.kind == "matched" and top is not None:
            return make(
                status="matched",
                entity_id=top.id,
                entity_name=top.name,
                score=top.score,
                decided_by="embedding",
                reason=decision.reason,
            )
        if decision.kind == "novel":
            return make(
                status="novel",
                score=top.score if top else None,
                decided_by="embedding",
                reason=decision.reason,
            )
        if self._adjudicator is None:
            return make(
                status="review",
                score=top.score if top else None,
                reason=f"{decision.reason}; no LLM configured",
            )
        messages = render_messages(normalized, candidates, self.catalog)
        ids = tuple(c.id for c in candidates)
        key = self._cache_key(normalized, messages, ids) if self._cache is not None else None
        if self._cache is not None and key is not None:
            cached = await self._cache.aget(key)
            if cached is not None:
                return self._from_decision(make, candidates, cached, decided_by="cache")
        governor = self._runtime_for_loop().governor
        adjudicator = self._adjudicator
        try:
            governed = await governor.call(
                lambda: adjudicator.decide(
                    messages, ids, request_timeout=self.limits.timeout, pace=governor.pace
                ),
                estimated_tokens=estimate_tokens(messages),
                usage_of=lambda d: d.usage,
            )
        except BudgetExceededError as exc:
            return make(
                status="review",
                score=top.score if top else None,
                reason=f"{decision.reason}; {exc}",
                error=str(exc),
                error_type="budget",
                attempts=exc.attempts,
                usage=exc.usage or Usage(),
            )
        except LLMError as exc:
            return make(
                status="error",
                score=top.score if top else None,
                reason=decision.reason,
                error=str(exc),
                error_type=exc.cause,
                attempts=exc.attempts,
                usage=exc.usage or Usage(),
            )
        d: Decision = governed.value
        if self._cache is not None and key is not None:
            await self._cache.aput(
                key,
                CachedDecision(
                    entity_id=d.entity_id,
                    confidence=d.confidence,
                    reason=d.reason,
                    usage=governed.usage,
                    model=self.model,
                ),
            )
        result = self._from_decision(make, candidates, d, decided_by="llm")
        governed.attempts[-1].reasks = d.reasks
        result.attempts = governed.attempts
        result.usage = governed.usage
        return result

    @staticmethod
    def _from_decision(
        make: Callable[..., MatchResult],
        candidates: list[Candidate],
        d: Decision | CachedDecision,
        *,
        decided_by: str,
    ) -> MatchResult:
        chosen = next((c for c in candidates if c.id == d.entity_id), None)
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
            entity_id=chosen.id,
            entity_name=chosen.name,
            score=chosen.score,
            decided_by=decided_by,
            reason=d.reason,
            confidence=d.confidence,
        )

    # -- public async API --------------------------------------------------------------

    @overload
    async def match_async(self, query: str, *, top_k: int | None = None) -> MatchResult: ...

    @overload
    async def match_async(
        self, query: list[str], *, top_k: int | None = None
    ) -> list[MatchResult]: ...

    async def match_async(
        self, query: str | list[str], *, top_k: int | None = None
    ) -> MatchResult | list[MatchResult]:
        """Match one query (-> ``MatchResult``) or a list (-> list, input order).

        Raises:
            NotReadyError: before ``fit_async``.
            QueryError: a single query that is empty, not a string or too long (in a
                list, such items become ``error`` records instead).
        """
        self._require_index()
        if isinstance(query, list):
            return await self.match_batch_async(query, top_k=top_k, strategy="gather")
        result, _ = await self._match_one(0, query, top_k, raise_input_errors=True)
        return result

    def _workers(self, strategy: Strategy, batch_size: int) -> int:
        if strategy == "sequential":
            return 1
        return max(self.limits.concurrency, batch_size)

    async def match_stream_async(
        self,
        queries: Queries,
        *,
        top_k: int | None = None,
        strategy: Strategy = "as_completed",
        batch_size: int = 64,
        on_progress: ProgressCallback | None = None,
    ) -> AsyncGenerator[MatchResult, None]:
        """Yield each result as soon as it is done (completion order; ``index`` says where
        it came from). Leaving the loop early cancels the remaining work.
        """
        self._require_index()
        strategy = check_strategy(strategy)
        total = len(queries) if isinstance(queries, Sized) else None
        collector = StatsCollector()
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def worker(i: int, q: str) -> MatchResult:
            return (await self._match_one(i, q, top_k))[0]

        stream = run_strategy(
            strategy, queries, worker, workers=self._workers(strategy, batch_size)
        )
        async with aclosing(stream):
            async for result in stream:
                collector.add(result, loop.time() - started)
                if on_progress is not None:
                    await _maybe_await(on_progress(collector.total, total))
                yield result
        self.last_run_stats = collector.finish(loop.time() - started)

    async def match_batch_async(
        self,
        queries: Queries,
        *,
        top_k: int | None = None,
        batch_size: int = 64,
        strategy: Strategy = "gather",
        on_progress: ProgressCallback | None = None,
    ) -> list[MatchResult]:
        """Match many queries; one result per input (failures are ``error`` records).

        Args:
            queries: any iterable or async iterable of strings (consumed lazily).
            strategy: ``"sequential"``, ``"gather"`` (input order) or ``"as_completed"``
                (completion order).
            batch_size: queries in flight through embedding at once (with the LLM
                concurrency, it sets the number of workers).
            on_progress: ``cb(completed, total)``, sync or async; ``total`` is ``None``
                for inputs without a length.

        The run's figures are in ``matcher.last_run_stats`` afterwards.
        """
        self._require_index()
        strategy = check_strategy(strategy)
        stream = self.match_stream_async(
            queries,
            top_k=top_k,
            strategy=strategy,
            batch_size=batch_size,
            on_progress=on_progress,
        )
        async with aclosing(stream):
            results = [r async for r in stream]
        if strategy == "gather":  # same work, delivered in input order
            results.sort(key=lambda r: r.index)
        return results

    async def retrieve_async(
        self, queries: Sequence[str], *, top_k: int | None = None
    ) -> list[list[Candidate]]:
        """Retrieval only: the top-k candidates of each query, best first (no routing, no LLM).

        Raises:
            QueryError: naming the first invalid query.
        """
        self._require_index()
        k = top_k or self.top_k
        normalized = [
            validate_query(q, index=i, max_chars=self.max_query_chars)
            for i, q in enumerate(queries)
        ]
        return list(await asyncio.gather(*(self._candidates(n, k) for n in normalized)))

    @property
    def governor_stats(self) -> GovernorStats | None:
        """Running LLM totals (calls, attempts, retries, 429s, tokens, cost, in flight) of the
        current event loop's governor, for live progress displays; ``None`` before use."""
        return self._runtime.governor.stats if self._runtime is not None else None

    async def explain_match_async(self, query: str, *, top_k: int | None = None) -> Explanation:
        """Match one query and say how: candidates, scores, routing decision, LLM reason."""
        self._require_index()
        result, decision = await self._match_one(0, query, top_k, raise_input_errors=True)
        assert decision is not None
        return Explanation(
            result=result,
            candidates=result.candidates,
            route=decision.kind,
            route_reason=decision.reason,
            thresholds=self.thresholds.as_dict(),
            llm_reason=result.reason if result.decided_by in ("llm", "cache") else None,
        )

    async def diagnose_async(self, query: str) -> Diagnosis:
        """Why a query routes as it does, whether the matcher is ready, and hints.

        Makes no LLM call. Works before ``fit_async`` (then it says what is missing).
        """
        normalized = validate_query(query, max_chars=self.max_query_chars)
        hints: list[str] = []
        if not self.llm_configured:
            hints.append(
                "no LLM configured: ambiguous queries come back as 'review' (pass client= "
                "or set OPENAI_API_KEY / OPENAI_BASE_URL)"
            )
        if self.index is None:
            hints.insert(0, "not ready: call fit_async() / fit() to build the index")
            return Diagnosis(
                query=query,
                normalized_query=normalized,
                ready=False,
                llm_configured=self.llm_configured,
                route=None,
                route_reason="index not built",
                top_score=None,
                margin_to_runner_up=None,
                thresholds=self.thresholds.as_dict(),
                hints=hints,
            )
        candidates = await self._candidates(normalized, self.top_k)
        decision = route(candidates, self.thresholds)
        if decision.kind == "adjudicate" and decision.margin is not None and decision.margin < 0.02:
            hints.append("near-tie between the top candidates: check for duplicate entities")
        if decision.kind == "novel" and candidates:
            hints.append(
                f"closest entity {candidates[0].id!r} scored {candidates[0].score:.3f}; add an "
                "alias if it is the same entity"
            )
        if not self.thresholds.calibrated:
            hints.append("thresholds are defaults: fit_async(training_data=...) calibrates them")
        return Diagnosis(
            query=query,
            normalized_query=normalized,
            ready=True,
            llm_configured=self.llm_configured,
            route=decision.kind,
            route_reason=decision.reason,
            top_score=decision.top_score,
            margin_to_runner_up=decision.margin,
            thresholds=self.thresholds.as_dict(),
            hints=hints,
            candidates=candidates,
        )

    async def aclose(self) -> None:
        """Release the client (if we made it), the micro-batcher, thread pools, the cache."""
        if self._closed:
            return
        self._closed = True
        rt, self._runtime = self._runtime, None
        if rt is not None:
            if rt.loop is asyncio.get_running_loop():
                await rt.batcher.aclose()
            elif not rt.loop.is_closed():
                # bound to another loop (sync close() after async use, as in Jupyter): stop
                # the batcher on its own loop, without waiting (that loop may be our caller's)
                asyncio.run_coroutine_threadsafe(rt.batcher.aclose(), rt.loop)
        if self._owns_client and self._client is not None:
            await self._client.close()
        if self._owns_cache and self._cache is not None:
            self._cache.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> Matcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- sync twins --------------------------------------------------------------------

    def fit(
        self,
        training_data: Sequence[tuple[str, str | None]] | None = None,
        *,
        target_precision: float = 0.99,
    ) -> Matcher:
        """Sync twin of :meth:`fit_async`."""
        return self._sync.run(self.fit_async(training_data, target_precision=target_precision))

    @overload
    def match(self, query: str, *, top_k: int | None = None) -> MatchResult: ...

    @overload
    def match(self, query: list[str], *, top_k: int | None = None) -> list[MatchResult]: ...

    def match(
        self, query: str | list[str], *, top_k: int | None = None
    ) -> MatchResult | list[MatchResult]:
        """Sync twin of :meth:`match_async`."""
        if isinstance(query, list):
            return self._sync.run(self.match_async(query, top_k=top_k))
        return self._sync.run(self.match_async(query, top_k=top_k))

    def match_batch(
        self,
        queries: Iterable[str],
        *,
        top_k: int | None = None,
        batch_size: int = 64,
        strategy: Strategy = "gather",
        on_progress: ProgressCallback | None = None,
    ) -> list[MatchResult]:
        """Sync twin of :meth:`match_batch_async`."""
        return self._sync.run(
            self.match_batch_async(
                queries,
                top_k=top_k,
                batch_size=batch_size,
                strategy=strategy,
                on_progress=on_progress,
            )
        )

    def explain_match(self, query: str, *, top_k: int | None = None) -> Explanation:
        """Sync twin of :meth:`explain_match_async`."""
        return self._sync.run(self.explain_match_async(query, top_k=top_k))

    def diagnose(self, query: str) -> Diagnosis:
        """Sync twin of :meth:`diagnose_async`."""
        return self._sync.run(self.diagnose_async(query))

    def close(self) -> None:
        """Sync twin of :meth:`aclose`; also stops the private loop thread."""
        if not self._closed:
            self._sync.run(self.aclose())
        self._sync.close()

    def __enter__(self) -> Matcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- incremental catalog updates ---------------------------------------------------

    async def add_entities_async(self, entities: EntitySource) -> None:
        """Add entities to the fitted index without a rebuild (saved to ``index_path``).

        Only the new surface forms are encoded. The next query sees them.

        Raises:
            CatalogError: an invalid entity or an id already in the catalog.
        """
        await self._change_entities(add=entities)

    async def remove_entities_async(self, ids: Sequence[str]) -> None:
        """Remove entities by id from the fitted index (saved to ``index_path``).

        Raises:
            CatalogError: an id not in the catalog.
        """
        await self._change_entities(remove=ids)

    async def update_entities_async(self, entities: EntitySource) -> None:
        """Replace entities (matched by id) with new versions: names, aliases, attributes.

        An updated entity moves to the end of the catalog order.

        Raises:
            CatalogError: an invalid entity or an id not in the catalog.
        """
        await self._change_entities(add=entities, replace=True)

    async def _change_entities(
        self,
        *,
        remove: Sequence[str] = (),
        add: EntitySource | None = None,
        replace: bool = False,
    ) -> None:
        index = self._require_index()
        if isinstance(remove, str):
            raise ConfigError("ids must be a list of entity ids, not one string")
        if isinstance(add, list | tuple) and not add:
            add = None
        new = load_catalog(add, include_description=self._index_description) if add else None
        gone = [e.id for e in new.entities] if new is not None and replace else list(remove)
        loop = asyncio.get_running_loop()

        def work() -> None:
            vectors = self.embedder.encode(list(new.forms)) if new is not None else None
            index.apply_changes(remove=gone, add=new, add_vectors=vectors)
            if self.index_path is not None:
                index.save(self.index_path)

        await loop.run_in_executor(self._executor, work)
        self.catalog = index.catalog

    def add_entities(self, entities: EntitySource) -> None:
        """Sync twin of :meth:`add_entities_async`."""
        self._sync.run(self.add_entities_async(entities))

    def remove_entities(self, ids: Sequence[str]) -> None:
        """Sync twin of :meth:`remove_entities_async`."""
        self._sync.run(self.remove_entities_async(ids))

    def update_entities(self, entities: EntitySource) -> None:
        """Sync twin of :meth:`update_entities_async`."""
        self._sync.run(self.update_entities_async(entities))


async def _maybe_await(value: Awaitable[None] | None) -> None:
    if inspect.isawaitable(value):
        await value
