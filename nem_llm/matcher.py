"""The Matcher: a facade over the matching stages, async first, with sync twins.

One query flows through the stages, each in its own module and tested alone::

    validate ──> Retriever (retrieval/retriever.py: micro-batched encode + search + filter)
             ──> RoutePolicy (retrieval/policy.py: thresholds, routing model, learned labels)
             ──> Decider (matching/decision.py: reviewed label, route, cache, governed LLM call)
             ──> Rewriter (matching/rewrite.py: only with ``rewrite=True``)

``fit`` is the :class:`~nem_llm.retrieval.fitting.Fitter` (index, learning, calibration).
The async methods are the implementation; each sync twin runs its async method on a
private event loop thread (see ``_sync.LoopThread``), so the logic exists once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import warnings
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
    Sized,
)
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import Any, overload

import instructor
from openai import AsyncOpenAI

from ._sync import LoopThread
from .catalog import Catalog, EntitySource, load_catalog
from .config import Thresholds
from .errors import ConfigError, NemLLMError, NotReadyError
from .llm.adjudication import Adjudicator
from .llm.cache import DecisionCache, ReviewedLabel
from .llm.governor import Governor, GovernorStats
from .llm.stats import StatsCollector
from .llm.strategies import Strategy, check_strategy, run_strategy
from .llm.transport import resolve_client, skip_param_transform
from .matching.decision import Decider, Pending, error_result
from .matching.explain import diagnosis, explanation
from .matching.rewrite import Rewriter
from .models import Calibration, Candidate, Diagnosis, Explanation, MatchResult, RunStats
from .retrieval.embedding import Embedder, MicroBatcher
from .retrieval.encoders import make_embedder
from .retrieval.fitting import Fitter, Targets, check_labels
from .retrieval.index import HybridIndex
from .retrieval.learning import FinetuneResult, FitMode, LearnedLabels
from .retrieval.policy import RoutePolicy
from .retrieval.retriever import Retriever, SearchItem, Where
from .retrieval.route_model import RouteModel
from .retrieval.routing import Route
from .settings import MatcherSettings
from .text import validate_query

__all__ = ["Matcher", "ProgressCallback", "Where"]

ProgressCallback = Callable[[int, int | None], Awaitable[None] | None]
Queries = Iterable[str] | AsyncIterable[str]
#: One filter for every query, or one per query (a sequence, or a function of the query's
#: position; ``None`` = no filter for that one).
Wheres = Where | Sequence[Where | None] | Callable[[int], Where | None] | None

log = logging.getLogger("nem_llm")

# old keyword spellings -> (the settings field, how the value converts)
_RENAMED = {"index": "search", "index_path": "index_dir"}


class _Runtime:
    """Loop-bound state: the governor and the micro-batcher belong to one event loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        governor: Governor,
        batcher: MicroBatcher[SearchItem, list[Candidate]],
    ) -> None:
        self.loop = loop
        self.governor = governor
        self.batcher = batcher


def _settings_of(
    settings: MatcherSettings | None, options: dict[str, Any]
) -> tuple[MatcherSettings, DecisionCache | None]:
    """Settings from ``settings=`` and keyword options (old spellings warn and still work)."""
    cache_object: DecisionCache | None = None
    for old, new in _RENAMED.items():
        if old in options:
            warnings.warn(
                f"Matcher({old}=...) is deprecated: use {new}=...", DeprecationWarning, stacklevel=3
            )
            options[new] = options.pop(old)
    if "mode" in options:  # an instructor.Mode (or its value)
        mode = options.pop("mode")
        options["instructor_mode"] = mode.value if isinstance(mode, instructor.Mode) else mode
    if isinstance(options.get("cache"), DecisionCache):
        cache_object = options.pop("cache")
    base = settings if settings is not None else MatcherSettings()
    if not isinstance(base, MatcherSettings):
        raise ConfigError(f"settings must be a MatcherSettings, got {type(base).__name__}")
    return base.replace(**options), cache_object


class Matcher:
    """Match messy queries to catalog entities; an LLM decides only the ambiguous ones.

    Example:
        >>> from nem_llm import Matcher, MatcherSettings
        >>> matcher = Matcher([{"id": "US", "name": "United States", "aliases": ["USA"]}],
        ...                   settings=MatcherSettings(top_k=3), llm=False)
        >>> matcher.settings.top_k
        3
        >>> matcher.fit()                                   # doctest: +SKIP
        >>> matcher.match("USA").entity_id                  # doctest: +SKIP
        'US'

    Args:
        entities: list of dicts or ``Entity`` models, or a path to a JSONL/CSV file.
        settings: every matching option (:class:`~nem_llm.MatcherSettings`); keyword
            options (``top_k=10``, ``model=...``, any settings field) are applied on top.
        client: an ``AsyncOpenAI`` client (its own retries are turned off: ours govern).
            Without one, a client is made from ``settings.base_url`` / ``api_key`` or
            OPENAI_BASE_URL / OPENAI_API_KEY; with none of them, ambiguous queries come
            back as ``review``.
        api_key: the key of the client made here (never part of the settings).
        embedder: any ``Embedder``; default: the offline all-MiniLM-L6-v2 on
            ``settings.encoder``. Not with ``encoder=``.
        cache: a ``DecisionCache`` object (a path goes in ``settings.cache``).

    Raises:
        ConfigError: an invalid option, named with the value given.
        CatalogError: an invalid catalog, naming the entity.
    """

    def __init__(
        self,
        entities: EntitySource | Catalog,
        settings: MatcherSettings | None = None,
        *,
        client: AsyncOpenAI | None = None,
        api_key: str | None = None,
        embedder: Embedder | None = None,
        **options: Any,
    ) -> None:
        if embedder is not None and options.get("encoder") not in (None, "auto"):
            raise ConfigError("pass embedder= or encoder=, not both")
        options = {k: v for k, v in options.items() if not (k == "encoder" and v is None)}
        self.settings, cache_object = _settings_of(settings, options)
        s = self.settings
        self.catalog = load_catalog(
            entities, include_description=s.index_description, columns=s.columns
        )
        if s.prompt_attributes:
            known = self.catalog.attribute_names()
            missing = [a for a in s.prompt_attributes if a not in known]
            if missing:
                raise ConfigError(
                    f"prompt_attributes {missing} are attributes no entity has "
                    f"(attributes: {', '.join(sorted(known)[:10]) or 'none'})"
                )
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="nem-llm-embed")
        self.retriever = Retriever(
            self.catalog,
            embedder or make_embedder(s.encoder),
            lexical_weight=s.lexical_weight,
            search=s.search,
            index_description=s.index_description,
            executor=self._executor,
        )
        self.fitter = Fitter(s, self.retriever, own_embedder=embedder is None)
        self.policy = RoutePolicy(thresholds=self.fitter.initial_thresholds())
        self.last_run_stats: RunStats | None = None
        self._client, self._owns_client = (
            resolve_client(client, base_url=s.base_url, api_key=api_key, timeout=s.limits.timeout)
            if s.llm
            else (None, False)
        )
        adjudicator = None
        if self._client is not None:
            patched = instructor.from_openai(
                skip_param_transform(self._client), mode=instructor.Mode(s.instructor_mode)
            )
            adjudicator = Adjudicator(
                patched, s.model, max_reasks=s.limits.max_reasks, temperature=s.temperature
            )
        if cache_object is not None:
            cache, self._owns_cache = cache_object, False
        elif s.cache is not None:
            cache, self._owns_cache = DecisionCache(s.cache), True
        else:
            cache, self._owns_cache = None, False
        self.decider = Decider(s, lambda: self.catalog, adjudicator, cache)
        self.rewriter = Rewriter(self.decider, self._candidates, self._route, self._governor)
        self._runtime: _Runtime | None = None
        self._sync = LoopThread()
        self._closed = False

    # -- what the stages hold, read through the facade -----------------------------------

    @property
    def llm_configured(self) -> bool:
        """Whether ambiguous queries can go to an LLM (else they come back as ``review``)."""
        return self.decider.adjudicator is not None

    @property
    def client(self) -> AsyncOpenAI | None:
        """The ``AsyncOpenAI`` client LLM calls go through (``None``: no LLM configured)."""
        return self._client

    @property
    def ready(self) -> bool:
        """Whether the index is built (``fit_async`` has run)."""
        return self.retriever.index is not None

    @property
    def index(self) -> HybridIndex | None:
        """The built index (``None`` before ``fit``)."""
        return self.retriever.index

    @property
    def embedder(self) -> Embedder:
        """The encoder of catalog forms and queries (a tuned one after ``fit(mode="full")``)."""
        return self.retriever.embedder

    @property
    def thresholds(self) -> Thresholds:
        """The routing thresholds in force."""
        return self.policy.thresholds

    @property
    def calibration(self) -> Calibration | None:
        """What ``fit`` estimated for each auto route, and why a route is closed."""
        return self.policy.calibration

    @property
    def route_model(self) -> RouteModel | None:
        """The routing model fit on labels, if any."""
        return self.policy.model

    @route_model.setter
    def route_model(self, model: RouteModel | None) -> None:
        self.policy = RoutePolicy(
            thresholds=self.policy.thresholds, calibration=self.policy.calibration, model=model
        ).with_learned(self.policy.learned)

    @property
    def learned(self) -> LearnedLabels | None:
        """Mentions learned from labels (``fit`` in "aliases" or "full" mode)."""
        return self.policy.learned

    @property
    def last_finetune(self) -> FinetuneResult | None:
        """The last fine-tuning run (``fit(mode="full")``), if any."""
        return self.fitter.last_finetune

    @property
    def governor_stats(self) -> GovernorStats | None:
        """Running LLM totals of the current event loop's governor (``None`` before use)."""
        return self._runtime.governor.stats if self._runtime is not None else None

    @property
    def micro_batches(self) -> tuple[int, int]:
        """Micro-batches encoded on the current event loop and the queries in them
        (``(0, 0)`` before the first query)."""
        rt = self._runtime
        return (rt.batcher.batches, rt.batcher.items) if rt is not None else (0, 0)

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
            s = self.settings
            batcher: MicroBatcher[SearchItem, list[Candidate]] = MicroBatcher(
                self.retriever.search_batch,
                max_batch_size=s.max_batch_size if s.batching else 1,
                max_wait=s.max_wait if s.batching else 0.0,
                executor=self._executor,
            )
            rt = _Runtime(loop, Governor(s.limits, model=s.model), batcher)
            self._runtime = rt
        return rt

    def _governor(self) -> Governor:
        return self._runtime_for_loop().governor

    # -- fit -----------------------------------------------------------------------------

    async def fit_async(
        self,
        training_data: Sequence[tuple[str, str | None]] | None = None,
        *,
        mode: FitMode | None = None,
        show_progress: bool = True,
        target_precision: float | None = None,
        novel_target_precision: float | None = None,
        **kwargs: Any,
    ) -> Matcher:
        """Build (or load) the index, learn from labels, and calibrate the routing thresholds.

        Modes (``training_data`` is labelled ``(query, gold_id_or_None)`` pairs):

        - ``"zero-shot"``: build the index; labels only calibrate.
        - ``"aliases"``: each labelled ``(query, id)`` becomes a learned mention of its
          entity (saved with the index); ``(query, None)`` teaches that the mention is not
          in the catalog.
        - ``"full"``: also fine-tune the embedding model on the labelled pairs plus the
          catalog's own alias pairs (contrastive, on CPU, bounded by ``max_seconds``,
          default 600, and ``epochs``, default 1; ``learning_rate`` default 1e-4).
        - ``None``: chosen by the number of labelled pairs (see ``learning.choose_mode``).

        In "aliases" and "full" a seeded share of the labels (``holdout``, default 0.3) is
        held out of training and calibrates the thresholds. With at least 20 labels the
        thresholds are calibrated on them; without, on probes of the catalog itself
        (except thresholds set in the settings). An auto route opens only where it is
        expected to reach its target precision; ``matcher.calibration`` says why not.
        """
        if self._closed:
            raise NemLLMError("this Matcher is closed")
        targets = Targets(
            matched=self._target("target_precision", target_precision),
            novel=self._target("novel_target_precision", novel_target_precision),
        )
        labels = check_labels(training_data or (), self.settings.max_query_chars)
        self.policy = await self.fitter.fit_async(
            labels, mode, targets, show_progress=show_progress, options=kwargs
        )
        return self

    def _target(self, name: str, value: float | None) -> float:
        if value is None:
            return float(getattr(self.settings, name))
        self.settings = self.settings.replace(**{name: value})
        return float(value)

    # -- one query -----------------------------------------------------------------------

    async def _candidates(
        self, normalized: str, top_k: int, mask_key: str | None = None, *, flush: bool = False
    ) -> list[Candidate]:
        """Retrieve through the shared micro-batcher (``flush``: do not wait for company)."""
        self.retriever.require_index()
        batcher = self._runtime_for_loop().batcher
        return await batcher.submit_async((normalized, top_k, mask_key), flush=flush)

    def _route(
        self, candidates: list[Candidate], normalized: str, thresholds: Thresholds | None = None
    ) -> tuple[Route, list[Candidate]]:
        return self.policy.route(candidates, normalized, self.catalog, thresholds)

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
        candidates = await self._candidates(normalized, k, mask_key, flush=alone)
        route, candidates = self._route(candidates, normalized, thresholds)
        return normalized, k, mask_key, route, candidates

    async def _match_one(
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
        thresholds = thresholds or self.thresholds
        route: Route | None = None
        try:
            normalized, k, mask_key, route, candidates = await self._routed(
                query, index, top_k, thresholds, where, alone
            )
            rewrite = self.settings.rewrite and self.llm_configured
            result = await self.decider.decide_async(
                index, text, normalized, candidates, route, self._governor, ask_names=rewrite
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

    async def reviewed_label_async(self, normalized: str) -> ReviewedLabel | None:
        """A person's decision for this normalized query, if any (see ``Decider``)."""
        return await self.decider.reviewed_label_async(normalized)

    # -- public async API --------------------------------------------------------------

    @overload
    async def match_async(
        self, query: str, *, top_k: int | None = None, threshold: float | None = None,
        where: Where | None = None,
    ) -> MatchResult: ...  # fmt: skip

    @overload
    async def match_async(
        self, query: list[str], *, top_k: int | None = None, threshold: float | None = None,
        where: Wheres = None,
    ) -> list[MatchResult]: ...  # fmt: skip

    async def match_async(
        self,
        query: str | list[str],
        *,
        top_k: int | None = None,
        threshold: float | None = None,
        where: Wheres = None,
    ) -> MatchResult | list[MatchResult]:
        """Match one query (-> ``MatchResult``) or a list (-> list, input order).

        Args:
            top_k: candidates retrieved and shown to the LLM (default: the settings').
            threshold: the accept threshold for this call (default: the calibrated one).
            where: a filter on entity attributes, ``{"country": "FR"}`` or
                ``{"country": ["FR", "BE"]}``: no candidate outside it comes back.

        Raises:
            NotReadyError: before ``fit_async``.
            QueryError: a single query that is empty, not a string or too long (in a
                list, such items become ``error`` records instead).
            ConfigError: a filter on an attribute no entity has.
        """
        self.retriever.require_index()
        if isinstance(query, list):
            return await self.match_batch_async(
                query, top_k=top_k, threshold=threshold, where=where, strategy="gather"
            )
        if where is not None and not isinstance(where, Mapping):
            raise ConfigError("where must be a mapping for a single query")
        thresholds = self.policy.for_threshold(threshold)
        result, _ = await self._match_one(
            0, query, top_k, thresholds=thresholds, where=where, raise_input_errors=True
        )
        return result

    async def match_stream_async(
        self,
        queries: Queries,
        *,
        top_k: int | None = None,
        threshold: float | None = None,
        where: Wheres = None,
        strategy: Strategy = "as_completed",
        batch_size: int = 64,
        on_progress: ProgressCallback | None = None,
    ) -> AsyncGenerator[MatchResult, None]:
        """Yield each result as soon as it is done (completion order; ``index`` says where
        it came from). Leaving the loop early cancels the remaining work.

        ``where``: one filter for every query, or a sequence of filters (or ``None``), one
        per query; ``threshold`` overrides the accept threshold for this call.
        """
        self.retriever.require_index()
        strategy = check_strategy(strategy)
        thresholds = self.policy.for_threshold(threshold)
        where_of = self._where_of(where)
        total = len(queries) if isinstance(queries, Sized) else None
        collector = StatsCollector()
        loop = asyncio.get_running_loop()
        started = loop.time()
        alone = strategy == "sequential"

        async def worker(i: int, q: str) -> MatchResult:
            one = self._match_one(
                i, q, top_k, thresholds=thresholds, where=where_of(i), alone=alone
            )
            return (await one)[0]

        workers = 1 if alone else max(self.settings.limits.concurrency, batch_size)
        stream = run_strategy(strategy, queries, worker, workers=workers)
        async with aclosing(stream):
            async for result in stream:
                collector.add(result, loop.time() - started)
                if on_progress is not None:
                    await _maybe_await(on_progress(collector.total, total))
                yield result
        self.last_run_stats = collector.finish(loop.time() - started)

    def _where_of(self, where: Wheres) -> Callable[[int], Where | None]:
        """Per-index filter lookup; a shared filter is checked now (a clear ConfigError)."""
        if where is None:
            return lambda i: None
        if isinstance(where, Mapping):
            self.retriever.mask_key(where)
            shared = where
            return lambda i: shared
        if callable(where):
            return where
        if isinstance(where, str | bytes) or not isinstance(where, Sequence):
            raise ConfigError(
                f"where must be a mapping or a sequence of mappings, got {type(where).__name__}"
            )
        rows = where

        def lookup(i: int) -> Where | None:
            if i >= len(rows):
                raise ConfigError(f"no filter for query {i}: where has {len(rows)} entries")
            return rows[i]

        return lookup

    async def match_batch_async(
        self,
        queries: Queries,
        *,
        top_k: int | None = None,
        threshold: float | None = None,
        where: Wheres = None,
        batch_size: int = 64,
        strategy: Strategy = "gather",
        on_progress: ProgressCallback | None = None,
    ) -> list[MatchResult]:
        """Match many queries; one result per input (failures are ``error`` records).

        Args:
            queries: any iterable or async iterable of strings (consumed lazily).
            threshold: the accept threshold for this call.
            where: one filter for all queries, or one per query (see ``match_async``).
            strategy: ``"sequential"``, ``"gather"`` (input order) or ``"as_completed"``
                (completion order).
            batch_size: queries in flight through embedding at once (with the LLM
                concurrency, it sets the number of workers).
            on_progress: ``cb(completed, total)``, sync or async; ``total`` is ``None``
                for inputs without a length.

        The run's figures are in ``matcher.last_run_stats`` afterwards.
        """
        self.retriever.require_index()
        strategy = check_strategy(strategy)
        stream = self.match_stream_async(
            queries,
            top_k=top_k,
            threshold=threshold,
            where=where,
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
        self, queries: Sequence[str], *, top_k: int | None = None, where: Where | None = None
    ) -> list[list[Candidate]]:
        """Retrieval only: the top-k candidates of each query, best first (no routing, no LLM).

        Raises:
            QueryError: naming the first invalid query.
            ConfigError: a filter on an attribute no entity has.
        """
        self.retriever.require_index()
        k = top_k or self.settings.top_k
        mask_key = self.retriever.mask_key(where)
        limit = self.settings.max_query_chars
        normalized = [validate_query(q, index=i, max_chars=limit) for i, q in enumerate(queries)]
        return list(await asyncio.gather(*(self._candidates(n, k, mask_key) for n in normalized)))

    async def explain_match_async(
        self,
        query: str,
        *,
        top_k: int | None = None,
        threshold: float | None = None,
        where: Where | None = None,
    ) -> Explanation:
        """Match one query and say how: candidates, scores, routing decision, LLM reason."""
        self.retriever.require_index()
        thresholds = self.policy.for_threshold(threshold)
        result, route = await self._match_one(
            0, query, top_k, thresholds=thresholds, where=where, raise_input_errors=True
        )
        assert route is not None
        return explanation(result, route, thresholds)

    async def diagnose_async(self, query: str) -> Diagnosis:
        """Why a query routes as it does, whether the matcher is ready, and hints.

        Makes no LLM call. Works before ``fit_async`` (then it says what is missing).
        """
        normalized = validate_query(query, max_chars=self.settings.max_query_chars)
        if self.retriever.index is None:
            return diagnosis(query, normalized, None, [], self.policy, self.llm_configured)
        candidates = await self._candidates(normalized, self.settings.top_k)
        route, candidates = self._route(candidates, normalized)
        return diagnosis(query, normalized, route, candidates, self.policy, self.llm_configured)

    # -- deferred adjudication (the provider's Batch API) --------------------------------

    async def prepare_async(
        self, index: int, query: Any, *, top_k: int | None = None, where: Where | None = None
    ) -> MatchResult | Pending:
        """Route one query without calling the LLM: its final result, or the call it needs.

        A :class:`~nem_llm.matching.decision.Pending` carries a provisional ``review``
        result and the exact request the live path would send (``decider.request_body``);
        finish it with ``decider.resolve``. Bad input is an error record, as in a batch.
        """
        try:
            thresholds = self.thresholds
            normalized, _, _, route, candidates = await self._routed(
                query, index, top_k, thresholds, where
            )
            text = query if isinstance(query, str) else repr(query)
            return await self.decider.prepare_async(index, text, normalized, candidates, route)
        except (asyncio.CancelledError, NotReadyError):
            raise
        except Exception as exc:
            return error_result(index, query, exc)

    # -- incremental catalog updates ---------------------------------------------------

    async def add_entities_async(self, entities: EntitySource) -> None:
        """Add entities to the fitted index without a rebuild (saved to ``index_dir``).

        Raises:
            CatalogError: an invalid entity or an id already in the catalog.
        """
        await self._change_entities(add=entities)

    async def remove_entities_async(self, ids: Sequence[str]) -> None:
        """Remove entities by id from the fitted index (saved to ``index_dir``).

        Raises:
            CatalogError: an id not in the catalog.
        """
        await self._change_entities(remove=ids)

    async def update_entities_async(self, entities: EntitySource) -> None:
        """Replace entities (matched by id) with new versions; an updated entity moves to
        the end of the catalog order.

        Raises:
            CatalogError: an invalid entity or an id not in the catalog.
        """
        await self._change_entities(add=entities, replace=True)

    async def _change_entities(self, **change: Any) -> None:
        self.catalog = await self.retriever.change_entities_async(
            **change, index_dir=self.settings.index_dir
        )

    # -- closing -------------------------------------------------------------------------

    async def close_async(self) -> None:
        """Release the client (if we made it), the micro-batcher, thread pools, the cache."""
        if self._closed:
            return
        self._closed = True
        rt, self._runtime = self._runtime, None
        if rt is not None:
            if rt.loop is asyncio.get_running_loop():
                await rt.batcher.close_async()
            elif not rt.loop.is_closed():
                # bound to another loop (sync close() after async use, as in Jupyter): stop
                # the batcher on its own loop, without waiting (that loop may be our caller's)
                asyncio.run_coroutine_threadsafe(rt.batcher.close_async(), rt.loop)
        if self._owns_client and self._client is not None:
            await self._client.close()
        if self._owns_cache and self.decider.cache is not None:
            self.decider.cache.close()
        self.fitter.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    #: The standard name of an async close (``contextlib.aclosing`` calls it).
    aclose = close_async

    async def __aenter__(self) -> Matcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close_async()

    # -- sync twins ----------------------------------------------------------------------

    def fit(
        self,
        training_data: Sequence[tuple[str, str | None]] | None = None,
        *,
        mode: FitMode | None = None,
        show_progress: bool = True,
        target_precision: float | None = None,
        novel_target_precision: float | None = None,
        **kwargs: Any,
    ) -> Matcher:
        """Sync twin of :meth:`fit_async`."""
        return self._sync.run(
            self.fit_async(
                training_data,
                mode=mode,
                show_progress=show_progress,
                target_precision=target_precision,
                novel_target_precision=novel_target_precision,
                **kwargs,
            )
        )

    @overload
    def match(
        self, query: str, *, top_k: int | None = None, threshold: float | None = None,
        where: Where | None = None,
    ) -> MatchResult: ...  # fmt: skip

    @overload
    def match(
        self, query: list[str], *, top_k: int | None = None, threshold: float | None = None,
        where: Wheres = None,
    ) -> list[MatchResult]: ...  # fmt: skip

    def match(
        self,
        query: str | list[str],
        *,
        top_k: int | None = None,
        threshold: float | None = None,
        where: Wheres = None,
    ) -> MatchResult | list[MatchResult]:
        """Sync twin of :meth:`match_async`."""
        if isinstance(query, list):
            return self._sync.run(
                self.match_async(query, top_k=top_k, threshold=threshold, where=where)
            )
        if where is not None and not isinstance(where, Mapping):
            raise ConfigError("where must be a mapping for a single query")
        return self._sync.run(
            self.match_async(query, top_k=top_k, threshold=threshold, where=where)
        )

    def match_batch(self, queries: Iterable[str], **options: Any) -> list[MatchResult]:
        """Sync twin of :meth:`match_batch_async` (the same keyword options)."""
        return self._sync.run(self.match_batch_async(queries, **options))

    def explain_match(self, query: str, **options: Any) -> Explanation:
        """Sync twin of :meth:`explain_match_async` (the same keyword options)."""
        return self._sync.run(self.explain_match_async(query, **options))

    def diagnose(self, query: str) -> Diagnosis:
        """Sync twin of :meth:`diagnose_async`."""
        return self._sync.run(self.diagnose_async(query))

    def add_entities(self, entities: EntitySource) -> None:
        """Sync twin of :meth:`add_entities_async`."""
        self._sync.run(self.add_entities_async(entities))

    def remove_entities(self, ids: Sequence[str]) -> None:
        """Sync twin of :meth:`remove_entities_async`."""
        self._sync.run(self.remove_entities_async(ids))

    def update_entities(self, entities: EntitySource) -> None:
        """Sync twin of :meth:`update_entities_async`."""
        self._sync.run(self.update_entities_async(entities))

    def close(self) -> None:
        """Sync twin of :meth:`close_async`; also stops the private loop thread."""
        if not self._closed:
            self._sync.run(self.close_async())
        self._sync.close()

    def __enter__(self) -> Matcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_sync(self, coro: Any) -> Any:
        """Run a coroutine of this matcher on its private loop (for sync twins elsewhere,
        such as ``integrations.frames.match_frame``)."""
        return self._sync.run(coro)


async def _maybe_await(value: Awaitable[None] | None) -> None:
    if inspect.isawaitable(value):
        await value
