"""The Matcher: a facade over the matching stages, async first, with sync twins.

One query flows through the stages, each in its own module and tested alone::

    validate ──> Retriever (retrieval/retriever.py: micro-batched encode + search + filter)
             ──> RoutePolicy (retrieval/policy.py: thresholds, routing model, learned labels)
             ──> Decider (matching/decision.py: reviewed label, route, cache, governed LLM call)
             ──> Rewriter (matching/rewrite.py: only with ``rewrite=True``)

``fit`` is the :class:`~nem_llm._retrieval.fitting.Fitter` (index, learning, calibration).
The async methods are the implementation; each sync twin runs its async method on a
private event loop thread (see ``_sync.LoopThread``), so the logic exists once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import math
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
    Sized,
)
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import Any, TypeVar, cast, overload

from openai import AsyncOpenAI

from ._llm.governor import GovernorStats
from ._llm.stats import StatsCollector
from ._llm.strategies import Strategy, check_strategy, run_strategy
from ._matching.audit import Auditor
from ._matching.decision import Decider, Pending
from ._matching.explain import diagnosis, explanation
from ._matching.pipeline import QueryPipeline, valid_queries
from ._matching.runtime import LLMConnection, Runtime, settings_from_options
from ._retrieval.embedding import Embedder
from ._retrieval.encoders import make_embedder
from ._retrieval.fitting import Fitter, Targets, check_labels
from ._retrieval.index import HybridIndex
from ._retrieval.learning import FinetuneResult, FitMode, LearnedLabels
from ._retrieval.policy import RoutePolicy
from ._retrieval.retriever import Retriever, Where, Wheres, where_lookup
from ._retrieval.route_model import RouteModel
from ._sync import LoopThread
from ._text import validate_query
from .catalog import Catalog, EntitySource, load_catalog
from .config import Thresholds
from .errors import ConfigError, NemLLMError
from .models import (
    Calibration,
    Candidate,
    Diagnosis,
    Explanation,
    MatchResult,
    RunStats,
)
from .settings import DEFAULT_LABEL_SHARE, MatcherSettings

__all__ = ["Matcher", "ProgressCallback", "Query", "Where"]

ProgressCallback = Callable[[int, int | None], Awaitable[None] | None]
#: A query: its text, or a record ``{"query": text, "attributes": {field: value}}``.
Query = str | Mapping[str, Any]
Queries = Iterable[Query] | AsyncIterable[Query]

T = TypeVar("T")


def _twin(method: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """The sync twin of an async method: the same arguments (its signature, for help()
    and the docs), run on the matcher's private event loop thread."""

    @functools.wraps(method)
    def twin(self: Matcher, *args: Any, **kwargs: Any) -> T:
        return self._sync.run(method(self, *args, **kwargs))

    twin.__name__ = twin.__qualname__ = method.__name__.removesuffix("_async")
    twin.__doc__ = f"Sync twin of :meth:`{method.__name__}` (the same arguments)."
    return twin


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
        **options: settings fields; ``cache=`` may also be a ``DecisionCache`` object.

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
        self.settings, cache = settings_from_options(settings, options, embedder is not None)
        s = self.settings
        self.catalog = load_catalog(
            entities, include_description=s.index_description, columns=s.columns
        )
        missing = [a for a in s.prompt_attributes if a not in self.catalog.attribute_names()]
        if missing:
            known = ", ".join(sorted(self.catalog.attribute_names())[:10]) or "none"
            raise ConfigError(
                f"prompt_attributes {missing} are attributes no entity has (attributes: {known})"
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
        self._llm = LLMConnection.open(s, client, api_key, cache)
        self.decider = Decider(s, lambda: self.catalog, self._llm.adjudicator, self._llm.cache)
        self._runtime = Runtime(s, self.retriever.search_batch, self._executor)
        rate = s.resolved_audit_rate(self._llm.adjudicator is not None)
        targets = {"matched": s.target_precision, "novel": s.novel_target_precision}
        self.auditor = Auditor(rate, targets)
        self.pipeline = QueryPipeline(
            s, self.retriever, lambda: self.policy, lambda: self.catalog, self.decider,
            self._runtime, self.auditor,
        )  # fmt: skip
        self._sync = LoopThread()

    # -- what the stages hold, read through the facade -----------------------------------

    @property
    def llm_configured(self) -> bool:
        """Whether ambiguous queries can go to an LLM (else they come back as ``review``)."""
        return self.decider.adjudicator is not None

    @property
    def client(self) -> AsyncOpenAI | None:
        """The ``AsyncOpenAI`` client LLM calls go through (``None``: no LLM configured)."""
        return self._llm.client

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
        self.policy = dataclasses.replace(self.policy, model=model)

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
        return self._runtime.governor_stats

    @property
    def micro_batches(self) -> tuple[int, int]:
        """Micro-batches encoded on the current loop and the queries in them (0, 0 before)."""
        return self._runtime.micro_batches

    # -- fit -----------------------------------------------------------------------------

    async def fit_async(
        self,
        training_data: Sequence[tuple[str, str | None]] | None = None,
        *,
        mode: FitMode | None = None,
        show_progress: bool = True,
        target_precision: float | None = None,
        novel_target_precision: float | None = None,
        workload: Iterable[str | Mapping[str, Any]] | None = None,
        label_budget: int | None = None,
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
        - ``None``: chosen by measurement: the mode whose recall@top_k on the held-out
          share is highest (full is tried from 5,000 labelled pairs); ties go to the
          cheaper mode; ``calibration.fit_mode`` says which and the figures.

        In "aliases" and "full" a seeded share of the labels (``holdout``, default 0.3) is
        held out of training and calibrates the thresholds. With at least 20 labels the
        thresholds are calibrated on them; without, on probes of the catalog itself
        (except thresholds set in the settings). An auto route opens only where it is
        expected to reach its target precision; ``matcher.calibration`` says why not.

        ``workload``: the queries you are about to match (texts, or records
        ``{"query": ..., "attributes": {...}}``: a workload of records fits the field model
        that routes them field by field, without labels). With an LLM configured, a
        stratified sample of ``label_budget`` of them (default: the settings', 200 when
        unset) is adjudicated by the production call and prompt (the answers go to the
        decision cache: never paid twice) and the answers calibrate the routes on your own
        mentions; ``calibration.labelled`` and ``calibration.label_usage`` say how many and
        at what cost.
        """
        if self._runtime.closed:
            raise NemLLMError("this Matcher is closed")
        given = {"target_precision": target_precision, "novel_target_precision":
                 novel_target_precision}  # fmt: skip
        self.settings = self.settings.replace(**{k: v for k, v in given.items() if v is not None})
        targets = Targets(self.settings.target_precision, self.settings.novel_target_precision)
        labels = check_labels(training_data or (), self.settings.max_query_chars)
        queries, records = valid_queries(workload or (), self.settings.max_query_chars)
        budget = self.settings.resolved_label_budget(self.llm_configured, label_budget)
        if label_budget is None and self.settings.label_budget is None:  # the default
            budget = min(budget, math.ceil(DEFAULT_LABEL_SHARE * len(queries)))
        self.policy = await self.fitter.fit_async(
            labels,
            mode,
            targets,
            show_progress=show_progress,
            options=kwargs,
            workload=queries,
            records=records if self.settings.field_model else [],
            label_budget=budget if self.llm_configured else 0,
            teacher=self.pipeline.label_async,
        )
        return self

    # -- public async API --------------------------------------------------------------

    @overload
    async def match_async(
        self, query: Query, *, top_k: int | None = None, threshold: float | None = None,
        where: Where | None = None,
    ) -> MatchResult: ...  # fmt: skip

    @overload
    async def match_async(
        self, query: list[Query], *, top_k: int | None = None, threshold: float | None = None,
        where: Wheres = None,
    ) -> list[MatchResult]: ...  # fmt: skip

    async def match_async(
        self,
        query: Query | list[Query],
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
        result, _ = await self.pipeline.match_one_async(
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
        where_of = where_lookup(where, self.retriever.mask_key)
        total = len(queries) if isinstance(queries, Sized) else None
        collector = StatsCollector()
        loop = asyncio.get_running_loop()
        started = loop.time()
        alone = strategy == "sequential"

        async def worker(i: int, q: Query) -> MatchResult:
            one = self.pipeline.match_one_async(
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
        self.last_run_stats.audit = self.auditor.report()

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
        return list(
            await asyncio.gather(
                *(self.pipeline.candidates_async(n, k, mask_key) for n in normalized)
            )
        )

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
        result, route = await self.pipeline.match_one_async(
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
        candidates = await self.pipeline.candidates_async(normalized, self.settings.top_k)
        route, candidates = self.pipeline.route(candidates, normalized)
        return diagnosis(query, normalized, route, candidates, self.policy, self.llm_configured)

    # -- deferred adjudication (the provider's Batch API) --------------------------------

    async def prepare_async(
        self, index: int, query: Any, *, top_k: int | None = None, where: Where | None = None
    ) -> MatchResult | Pending:
        """Route one query without calling the LLM: its final result, or the call it needs.

        A :class:`~nem_llm._matching.decision.Pending` carries a provisional ``review``
        result and the exact request the live path would send (``decider.request_body``);
        finish it with ``decider.resolve``. Bad input is an error record, as in a batch.
        """
        return await self.pipeline.prepare_async(index, query, top_k=top_k, where=where)

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
        if self._runtime.closed:
            return
        await self._runtime.close_async()
        await self._llm.close_async()
        self.fitter.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    #: The standard name of an async close (``contextlib.aclosing`` calls it).
    aclose = close_async

    async def __aenter__(self) -> Matcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close_async()

    # -- sync twins: each runs its async method on the private loop ------------------------

    @overload
    def match(
        self, query: Query, *, top_k: int | None = None, threshold: float | None = None,
        where: Where | None = None,
    ) -> MatchResult: ...  # fmt: skip

    @overload
    def match(
        self, query: list[Query], *, top_k: int | None = None, threshold: float | None = None,
        where: Wheres = None,
    ) -> list[MatchResult]: ...  # fmt: skip

    def match(self, query: Query | list[Query], **options: Any) -> MatchResult | list[MatchResult]:
        """Sync twin of :meth:`match_async`."""
        done = self._sync.run(self.match_async(query, **options))
        return cast("MatchResult | list[MatchResult]", done)

    fit = _twin(fit_async)
    match_batch = _twin(match_batch_async)
    explain_match = _twin(explain_match_async)
    diagnose = _twin(diagnose_async)
    add_entities = _twin(add_entities_async)
    remove_entities = _twin(remove_entities_async)
    update_entities = _twin(update_entities_async)

    def close(self) -> None:
        """Sync twin of :meth:`close_async`; also stops the private loop thread."""
        if not self._runtime.closed:
            self._sync.run(self.close_async())
        self._sync.close()

    def __enter__(self) -> Matcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on this matcher's private loop (the sync twins elsewhere, such
        as ``integrations.frames.match_frame``, use it)."""
        return self._sync.run(coro)


async def _maybe_await(value: Awaitable[None] | None) -> None:
    if inspect.isawaitable(value):
        await value
