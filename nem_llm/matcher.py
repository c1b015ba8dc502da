"""The Matcher: catalog + retrieval + routing + governed LLM adjudication, async and sync.

The async methods are the implementation; each sync twin runs its async method on a
private event loop thread (see ``_sync.LoopThread``), so the logic exists once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import random
import shutil
import tempfile
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
from pathlib import Path
from typing import Any, overload

import instructor
import numpy as np
from openai import AsyncOpenAI

from ._sync import LoopThread
from .catalog import Catalog, CatalogColumns, EntitySource, load_catalog
from .config import Limits, Thresholds
from .errors import BudgetExceededError, ConfigError, LLMError, NemLLMError, NotReadyError
from .llm.adjudication import (
    PROMPT_VERSION,
    REWRITE_VERSION,
    Adjudicator,
    Decision,
    estimate_tokens,
    render_messages,
    render_rewrite_messages,
)
from .llm.batch_api import PlannedRequest, request_body
from .llm.cache import CachedDecision, DecisionCache, ReviewedLabel, decision_key
from .llm.governor import Governor, GovernorStats
from .llm.stats import StatsCollector
from .llm.strategies import Strategy, check_strategy, run_strategy
from .llm.transport import make_async_client, skip_param_transform
from .models import (
    Attempt,
    Calibration,
    Candidate,
    Diagnosis,
    Explanation,
    MatchResult,
    RouteEstimate,
    RunStats,
    Usage,
)
from .retrieval.calibration import (
    PROBE_NOVEL_SHARE,
    PROBE_VERSION,
    combine,
    estimate,
    exact_rule_from_catalog,
    labelled_examples,
    make_probes,
    probe_examples,
    with_route_model,
)
from .retrieval.embedding import (
    TUNED_MANIFEST,
    Embedder,
    MicroBatcher,
    default_model_path,
)
from .retrieval.encoders import EncoderName, encoder_of, make_embedder
from .retrieval.index import HybridIndex, IndexMode, catalog_fingerprint
from .retrieval.learning import (
    FIT_MODES,
    FinetuneResult,
    FitMode,
    LearnedLabels,
    choose_mode,
    finetune,
    learn_labels,
    pairs_from_catalog,
    pairs_from_labels,
)
from .retrieval.route_model import RouteModel
from .retrieval.routing import Route, route
from .text import DEFAULT_MAX_QUERY_CHARS, fold, validate_query

__all__ = ["Matcher", "ProgressCallback", "Where"]

ProgressCallback = Callable[[int, int | None], Awaitable[None] | None]
Queries = Iterable[str] | AsyncIterable[str]
#: A candidate filter on entity attributes: ``{"country": "FR"}`` (equality) or
#: ``{"country": ["FR", "BE"]}`` (membership); every key must hold.
Where = Mapping[str, Any]
#: One filter for every query, or one per query (a sequence, or a function of the query's
#: position; ``None`` = no filter for that one).
Wheres = Where | Sequence[Where | None] | Callable[[int], Where | None] | None

log = logging.getLogger("nem_llm")
#: learned aliases and known-novel mentions, kept in the index directory
LEARNED_FILE = "learned.json"
# extra candidates retrieved per probe: its own entity may be among them (see calibration)
_PROBE_EXTRA = 1


class _Runtime:
    """Loop-bound state: the governor and the micro-batcher belong to one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, governor: Governor, batcher: Any) -> None:
        self.loop = loop
        self.governor = governor
        self.batcher: MicroBatcher[tuple[str, int, str | None], list[Candidate]] = batcher


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
        target_precision, novel_target_precision: what an auto route must be expected to
            reach before ``fit`` opens it (0.99 matched, 0.95 novel); see ``fit_async``.
        columns: a ``CatalogColumns`` mapping other column names onto id, name, aliases
            and description (every other column becomes an attribute).
        prompt_attributes: entity attributes shown to the LLM for each candidate, at most
            ``prompt_attribute_chars`` characters per candidate.
        rewrite: for a query the LLM found no match for (it is asked for the entity's
            catalog names with its "none", in the same call) or that retrieval called
            novel (one rewrite call), retrieve again with those names; a name the LLM
            gave with its "none" that routes to a match is taken, else the LLM
            adjudicates once more.
        index: ``"exact"`` search, ``"ann"`` (a faiss shortlist re-scored exactly; the
            ``[ann]`` extra), or ``"auto"``: ANN from ``ANN_MIN_FORMS`` surface forms.
        encoder: how the default model encodes catalog and queries (one encoder for
            both): ``"torch"``, ``"onnx"`` / ``"onnx-int8"`` (ONNX Runtime, the ``[fast]``
            extra), ``"static"`` (model2vec, the ``[static]`` extra), or ``"auto"`` (the
            default: the measured default, see ``retrieval.encoders``; a saved index
            built with another installed encoder is loaded with that one). Not with
            ``embedder=``.
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
        target_precision: float = 0.99,
        novel_target_precision: float = 0.95,
        columns: CatalogColumns | None = None,
        prompt_attributes: Sequence[str] | None = None,
        prompt_attribute_chars: int = 200,
        rewrite: bool = False,
        index: IndexMode = "auto",
        encoder: EncoderName | None = None,
    ) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"top_k must be an int >= 1, got {top_k!r}")
        if not 0.0 <= lexical_weight <= 1.0:
            raise ConfigError(f"lexical_weight must be in [0, 1], got {lexical_weight!r}")
        self.target_precision = _precision("target_precision", target_precision)
        self.novel_target_precision = _precision("novel_target_precision", novel_target_precision)
        self.catalog = load_catalog(
            entities, include_description=index_description, columns=columns
        )
        self.learned: LearnedLabels | None = None
        self._learned_ids: dict[str, str] = {}  # folded labelled mention -> entity id
        self.last_finetune: FinetuneResult | None = None
        self._tmp_model_dir: Path | None = None
        self._own_embedder = embedder is None
        defaults = Thresholds()
        self.thresholds = Thresholds(
            accept=defaults.accept if accept_threshold is None else accept_threshold,
            margin=defaults.margin if margin is None else margin,
            novel=defaults.novel if novel_threshold is None else novel_threshold,
        )
        # thresholds the user set are kept as given (labels still calibrate); the others
        # are estimated at fit from probes of the catalog itself
        self._user_thresholds = {
            k
            for k, v in (
                ("accept", accept_threshold),
                ("margin", margin),
                ("novel", novel_threshold),
            )
            if v is not None
        }
        if accept_threshold is not None and accept_threshold > 1:
            # an audit: every non-novel query goes to the LLM, exact hits included
            self.thresholds = dataclasses.replace(self.thresholds, exact=False)
            self._user_thresholds.add("exact")
        self.calibration: Calibration | None = None
        # fit on labels (see retrieval/route_model.py): decides some of what the
        # thresholds leave to the LLM
        self.route_model: RouteModel | None = None
        self.prompt_attributes = tuple(prompt_attributes or ())
        if self.prompt_attributes:
            known = self.catalog.attribute_names()
            missing = [a for a in self.prompt_attributes if a not in known]
            if missing:
                raise ConfigError(
                    f"prompt_attributes {missing} are attributes no entity has "
                    f"(attributes: {', '.join(sorted(known)[:10]) or 'none'})"
                )
        self.prompt_attribute_chars = prompt_attribute_chars
        self.rewrite = rewrite
        self._masks: dict[str, Any] = {}  # filter key -> (catalog, its mask, the filter)
        self.limits = limits or Limits()
        if not isinstance(self.limits, Limits):
            raise ConfigError(f"limits must be a nem_llm.Limits, got {type(limits).__name__}")
        self.model = model
        self.mode = mode
        self.top_k = top_k
        self.lexical_weight = lexical_weight
        if embedder is not None and encoder is not None:
            raise ConfigError("pass embedder= or encoder=, not both")
        self.encoder: str = encoder or "auto"
        self.embedder: Embedder = embedder or make_embedder(self.encoder)
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
            patched = instructor.from_openai(skip_param_transform(self._client), mode=mode)
            self._adjudicator = Adjudicator(
                patched, model, max_reasks=self.limits.max_reasks, temperature=temperature
            )
        if isinstance(cache, DecisionCache) or cache is None:
            self._cache, self._owns_cache = cache, False
        else:
            self._cache, self._owns_cache = DecisionCache(cache), True
        self._runtime: _Runtime | None = None
        self._reviewed: dict[str, ReviewedLabel] | None = None  # loaded on first use
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
        made = make_async_client(  # aiohttp when installed: measured cheaper per call
            base_url=base_url,
            api_key=api_key or "not-needed",  # local servers (llama.cpp, vLLM) want none
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
            batcher: MicroBatcher[tuple[str, int, str | None], list[Candidate]] = MicroBatcher(
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
        mode: FitMode | None = None,
        show_progress: bool = True,
        target_precision: float | None = None,
        novel_target_precision: float | None = None,
        **kwargs: Any,
    ) -> Matcher:
        """Build (or load) the index, learn from labels, and calibrate the routing thresholds.

        Modes (``training_data`` is labelled ``(query, gold_id_or_None)`` pairs):

        - ``"zero-shot"``: build the index; labels only calibrate.
        - ``"aliases"``: each labelled ``(query, id)`` becomes a learned surface form of its
          entity (saved with the index: a repeated mention is matched without the LLM);
          ``(query, None)`` teaches that the mention is not in the catalog.
        - ``"full"``: also fine-tune the embedding model on the labelled pairs plus the
          catalog's own alias pairs (contrastive, on CPU, bounded by ``max_seconds``,
          default 600, and ``epochs``, default 1; ``learning_rate`` default 1e-4); the tuned
          model is saved with the index (``index_path``) and the index fingerprint covers it.
        - ``None``: "zero-shot" with fewer than 20 labelled pairs that have an id, "aliases"
          below 5,000, "full" from 5,000.

        In "aliases" and "full" a seeded share of the labels (``holdout``, default 0.3)
        is held out of training and calibrates the thresholds, so the precision reported
        in ``matcher.calibration`` is measured on labels training did not see. Labels naming
        an unknown id are reported and skipped (``strict=True``: a ``ConfigError``).

        With labelled ``(query, gold_id_or_None)`` pairs (at least 20), the thresholds are
        calibrated on them; without, they are estimated from probes of the catalog itself
        (its aliases and noisy variants of its names, with each entity present and taken
        out), except thresholds set explicitly in the constructor. Either way an auto route
        (matched, novel) opens only where it is expected to reach its target precision
        (``target_precision``, default 0.99; ``novel_target_precision``, default 0.95);
        otherwise it is closed and its queries go to the LLM. ``matcher.calibration`` says
        what was estimated, on what, and why a route is closed.
        """
        if self._closed:
            raise NemLLMError("this Matcher is closed")
        unknown = set(kwargs) - {"holdout", "strict", "max_seconds", "epochs", "learning_rate",
                                 "seed", "batch_size"}  # fmt: skip
        if unknown:
            raise ConfigError(f"fit: unknown option(s) {', '.join(sorted(unknown))}")
        if mode is not None and mode not in FIT_MODES:
            raise ConfigError(f"mode must be one of {', '.join(FIT_MODES)} or None, got {mode!r}")
        if target_precision is not None:
            self.target_precision = _precision("target_precision", target_precision)
        if novel_target_precision is not None:
            self.novel_target_precision = _precision(
                "novel_target_precision", novel_target_precision
            )
        labels = self._check_labels(training_data or ())
        chosen = mode or choose_mode(labels)
        calibrate_on: Sequence[tuple[str, str | None]] = labels
        if chosen != "zero-shot" and labels:
            calibrate_on = await self._train(labels, chosen, show_progress, kwargs)
        loop = asyncio.get_running_loop()
        if self.index is None:
            self.index = await loop.run_in_executor(self._executor, self._build_index)
        calibration = None
        self.route_model = None
        if calibrate_on:
            calibration = await self._calibrate_on_labels(calibrate_on)
        if calibration is None and {"accept", "margin", "novel"} <= self._user_thresholds:
            calibration = self._user_calibration()
        if calibration is None:
            calibration = await self._calibrate_on_probes()
        self._apply(calibration)
        return self

    def _apply(self, calibration: Calibration) -> None:
        """Adopt a calibration's thresholds, keeping the ones the user set (unless labels)."""
        chosen = Thresholds.from_calibration(calibration)
        if calibration.source == "probes" and self._user_thresholds:
            chosen = dataclasses.replace(
                chosen, **{k: getattr(self.thresholds, k) for k in self._user_thresholds}
            )
            update: dict[str, Any] = {"thresholds": chosen.as_dict()}
            user = "set by the user (not estimated)"
            if "accept" in self._user_thresholds:
                update["matched"] = RouteEstimate(
                    open=chosen.accept <= 1 or chosen.exact,
                    target=self.target_precision,
                    reason=f"accept threshold {user}",
                )
            if "novel" in self._user_thresholds:
                update["novel"] = RouteEstimate(
                    open=chosen.novel > 0,
                    target=self.novel_target_precision,
                    reason=f"novel threshold {user}",
                )
            calibration = calibration.model_copy(update=update)
        self.thresholds = chosen
        self.calibration = calibration
        for name, est in (("auto-match", calibration.matched), ("auto-novel", calibration.novel)):
            if not est.open:
                log.info("nem_llm: the %s route is closed: %s", name, est.reason)

    def _user_calibration(self) -> Calibration:
        t = self.thresholds
        return Calibration(
            source="user",
            thresholds=t.as_dict(),
            exact=t.exact,
            matched=RouteEstimate(
                open=t.accept <= 1 or t.exact,
                target=self.target_precision,
                reason="thresholds set by the user (not estimated)",
            ),
            novel=RouteEstimate(
                open=t.novel > 0,
                target=self.novel_target_precision,
                reason="thresholds set by the user (not estimated)",
            ),
        )

    def _build_index(self) -> HybridIndex:
        self._restore_learned()
        if self.index_path is not None and (self.index_path / "manifest.json").exists():
            self._adopt_saved_encoder(self.index_path)
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

    async def _retrieve_many(self, texts: Sequence[str], k: int) -> list[list[Candidate]]:
        """Retrieval straight on the worker thread in large batches (no micro-batcher, no
        loop binding): for calibration."""
        loop = asyncio.get_running_loop()
        found: list[list[Candidate]] = []
        for lo in range(0, len(texts), 256):
            chunk: list[tuple[str, int, str | None]] = [(t, k, None) for t in texts[lo : lo + 256]]
            found.extend(await loop.run_in_executor(self._executor, self._retrieve_batch, chunk))
        return found

    def _check_labels(
        self, training_data: Sequence[tuple[str, str | None]]
    ) -> list[tuple[str, str | None]]:
        """Validated, normalized labels (a clear ConfigError/QueryError naming the item)."""
        out: list[tuple[str, str | None]] = []
        for i, pair in enumerate(training_data):
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise ConfigError(f"training_data[{i}] must be a (query, gold_id) pair")
            query, gold = pair
            if gold is not None and not isinstance(gold, str):
                raise ConfigError(f"training_data[{i}]: gold id must be a str or None")
            out.append((validate_query(query, index=i, max_chars=self.max_query_chars), gold))
        return out

    async def _train(
        self,
        labels: list[tuple[str, str | None]],
        mode: FitMode,
        show_progress: bool,
        options: dict[str, Any],
    ) -> list[tuple[str, str | None]]:
        """Learn from a training share of the labels; return the held-out share."""
        holdout = float(options.get("holdout", 0.3))
        if not 0.0 <= holdout < 1.0:
            raise ConfigError(f"holdout must be in [0, 1), got {holdout}")
        order = list(range(len(labels)))
        random.Random(int(options.get("seed", 0))).shuffle(order)
        cut = int(len(order) * holdout)
        held = [labels[i] for i in sorted(order[:cut])]
        train = [labels[i] for i in sorted(order[cut:])]
        learned, problems = learn_labels(train, self.catalog, strict=bool(options.get("strict")))
        for problem in problems[:20]:
            log.warning("nem_llm: %s", problem)
        if len(problems) > 20:
            log.warning("nem_llm: ... and %d more label problems", len(problems) - 20)
        loop = asyncio.get_running_loop()
        if mode == "full":
            if self._own_embedder:
                pairs = pairs_from_catalog(self.catalog) + pairs_from_labels(
                    train, self.catalog, strict=False
                )
                out = self._model_dir()
                result = await loop.run_in_executor(
                    self._executor,
                    lambda: finetune(
                        default_model_path(),
                        pairs,
                        out,
                        epochs=int(options.get("epochs", 1)),
                        max_seconds=options.get("max_seconds", 600),
                        learning_rate=float(options.get("learning_rate", 1e-4)),
                        batch_size=int(options.get("batch_size", 32)),
                        seed=int(options.get("seed", 0)),
                        show_progress=show_progress,
                    ),
                )
                self.embedder = make_embedder(self._tuned_encoder(), result.path)
                self.last_finetune = result
            else:
                log.warning("nem_llm: mode 'full' fine-tunes the default model only; "
                            "a custom embedder is kept (learning aliases)")  # fmt: skip
        self._learn(learned)
        return held

    def _tuned_encoder(self) -> str:
        """The encoder a tuned model runs on: the one in use (static is re-distilled)."""
        return encoder_of(self.embedder.name) if self.encoder == "auto" else self.encoder

    def _adopt_saved_encoder(self, path: Path) -> None:
        """With ``encoder="auto"``, encode as the saved index's vectors were encoded.

        Vectors from two encoders must never be mixed; an index built (say) with
        ``"onnx-int8"`` is loaded with that encoder when it is installed, and refused by
        ``HybridIndex.load`` otherwise (an explicit ``encoder=`` is never overridden).
        """
        if not self._own_embedder or self.encoder != "auto":
            return
        saved = str(HybridIndex.read_manifest(path).get("embedder", ""))
        if not saved or saved == self.embedder.name:
            return
        base = self.embedder.name.rpartition("@")[0] or self.embedder.name
        if (saved.rpartition("@")[0] or saved) != base:
            return  # another model altogether: HybridIndex.load says so
        try:
            adopted = make_embedder(encoder_of(saved), self._tuned_model_ref())
        except ConfigError as exc:
            log.warning("nem_llm: the index at %s was built with %s: %s", path, saved, exc)
            return
        if adopted.name == saved:
            self.embedder = adopted

    def _tuned_model_ref(self) -> Path | None:
        tuned = self.index_path / "model" if self.index_path is not None else None
        return tuned if tuned is not None and (tuned / TUNED_MANIFEST).exists() else None

    def _model_dir(self) -> Path:
        if self.index_path is not None:
            return self.index_path / "model"
        if self._tmp_model_dir is None:
            self._tmp_model_dir = Path(tempfile.mkdtemp(prefix="nem-llm-model-"))
        return self._tmp_model_dir / "model"

    def _learn(self, learned: LearnedLabels) -> None:
        """Adopt learned mentions: an exact lookup consulted before routing.

        Learned mentions are not added to the index as surface forms: measured on
        languages, indexing them (labels of one half, 11,586) lowered R@10 on the other
        half from 0.742 to 0.654, because foreign-language mentions of many entities crowd
        each other's candidates. As a lookup they match repeats and touch nothing else.
        """
        self.learned = learned
        self._learned_ids = {fold(q): eid for eid, qs in learned.aliases.items() for q in qs}
        if self.index_path is not None:
            self.index_path.mkdir(parents=True, exist_ok=True)
            target = self.index_path / LEARNED_FILE
            tmp = target.with_suffix(".tmp")
            tmp.write_text(learned.to_json(), encoding="utf-8")
            tmp.replace(target)

    def _restore_learned(self) -> None:
        """Reload learned aliases and a tuned model saved with the index (a restart)."""
        if self.index_path is None or self.learned is not None:
            return
        saved = self.index_path / LEARNED_FILE
        if saved.exists():
            self._learn(LearnedLabels.from_json(saved.read_text(encoding="utf-8")))
        tuned = self.index_path / "model"
        if self._own_embedder and (tuned / TUNED_MANIFEST).exists():
            self.embedder = make_embedder(self._tuned_encoder(), tuned)

    async def _calibrate_on_labels(
        self, labels: Sequence[tuple[str, str | None]]
    ) -> Calibration | None:
        queries = [q for q, _ in labels]
        golds = [g for _, g in labels]
        found = await self._retrieve_many(queries, max(self.top_k, 2))
        examples = labelled_examples(found, queries, golds)
        cal = estimate(
            examples,
            matched_target=self.target_precision,
            novel_target=self.novel_target_precision,
            source="labels",
        )
        if cal.examples < 20:
            log.info("nem_llm: %d labels are too few to calibrate on; using probes", cal.examples)
            return None
        if not (cal.matched.open and cal.novel.open):
            # a route the labels cannot open: the probes' rule, unless the labels say no
            cal = combine(cal, await self._calibrate_on_probes(), examples)
        loop = asyncio.get_running_loop()
        cal, self.route_model = await loop.run_in_executor(
            self._executor, lambda: with_route_model(cal, examples)
        )
        return cal

    def _probe_key(self) -> str:
        """What a label-free calibration depends on: reused from the index dir if equal."""
        parts = [
            catalog_fingerprint(self.catalog),
            self.embedder.name,
            self.lexical_weight,
            self.top_k,
            self.target_precision,
            self.novel_target_precision,
            PROBE_VERSION,
        ]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    async def _calibrate_on_probes(self) -> Calibration:
        saved = self.index_path / "calibration.json" if self.index_path is not None else None
        key = self._probe_key()
        if saved is not None and saved.exists():
            try:
                data = json.loads(saved.read_text(encoding="utf-8"))
                if data.get("key") == key:
                    return Calibration.model_validate(data["calibration"])
            except (OSError, ValueError, KeyError):
                pass  # unreadable: estimate again and overwrite it
        cal = await self._probe()
        if saved is not None:
            payload = {"key": key, "calibration": cal.model_dump()}
            tmp = saved.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(payload, indent=2), encoding="utf-8")
            tmp.replace(saved)
        return cal

    async def _probe(self) -> Calibration:
        probes = make_probes(self.catalog)
        found = await self._retrieve_many(
            [p.text for p in probes], max(self.top_k, 2) + _PROBE_EXTRA
        )
        return estimate(
            probe_examples(probes, found, self.catalog),
            matched_target=self.target_precision,
            novel_target=self.novel_target_precision,
            source="probes",
            novel_share=PROBE_NOVEL_SHARE,
            exact_rule=exact_rule_from_catalog(self.catalog),
        )

    # -- retrieval ---------------------------------------------------------------------

    def _mask_key(self, where: Where | None) -> str | None:
        """A filter's cache key (its mask is computed once and kept)."""
        if where is None:
            return None
        if not isinstance(where, Mapping):
            raise ConfigError(f"where must be a mapping, got {type(where).__name__}")
        key = json.dumps(dict(where), sort_keys=True, default=str)
        if key not in self._masks:
            self._masks[key] = (self.catalog, self.catalog.where_mask(where), where)
        return key

    def _retrieve_batch(self, items: list[tuple[str, int, str | None]]) -> list[list[Candidate]]:
        """Encode and search a batch in the worker thread (never on the event loop)."""
        index = self._require_index()
        texts = [text for text, _, _ in items]
        vectors = np.asarray(self.embedder.encode(texts), dtype=np.float32)
        out: list[list[Candidate]] = [[] for _ in items]
        groups: dict[str | None, list[int]] = {}
        for i, (_, _, mask_key) in enumerate(items):
            groups.setdefault(mask_key, []).append(i)
        for mask_key, rows in groups.items():
            k = max(items[i][1] for i in rows)
            allowed = self._allowed(index, mask_key) if mask_key is not None else None
            found = index.search(vectors[rows], [texts[i] for i in rows], k, allowed=allowed)
            for i, cands in zip(rows, found, strict=True):
                out[i] = cands[: items[i][1]]
        return out

    async def _candidates(
        self, normalized: str, top_k: int, mask_key: str | None = None, *, flush: bool = False
    ) -> list[Candidate]:
        """Retrieve through the shared micro-batcher (``flush``: do not wait for company)."""
        self._require_index()
        batcher = self._runtime_for_loop().batcher
        return await batcher.submit((normalized, top_k, mask_key), flush=flush)

    # -- one query ---------------------------------------------------------------------

    def _cache_key(
        self,
        normalized: str,
        messages: list[dict[str, str]],
        ids: tuple[str, ...],
        *,
        names: bool = False,
    ) -> str:
        # the rendered prompt is in the key: editing a template or a candidate's text
        # invalidates cached decisions; so is the response model (asked for names or not)
        prompt_hash = hashlib.sha256(messages[-1]["content"].encode()).hexdigest()[:16]
        version = f"{PROMPT_VERSION}:{prompt_hash}" + (":names" if names else "")
        return decision_key(normalized, ids, self.model, version)

    def _route(
        self, candidates: list[Candidate], thresholds: Thresholds, normalized: str
    ) -> tuple[Route, list[Candidate]]:
        """Routing, plus what fit learned from labels: a labelled mention is matched to its
        entity (put first among the candidates), one labelled "not in the catalog" is novel.
        """
        if self.learned is not None:
            key = fold(normalized)
            top = candidates[0].score if candidates else None
            if key in self.learned.novel:
                why = "a labelled example says this mention is not in the catalog"
                return Route("novel", why, top, None, "learned_novel"), candidates
            eid = self._learned_ids.get(key)
            if eid is not None and eid in self.catalog.by_id:
                entity = self.catalog.entities[self.catalog.by_id[eid]]
                own = next((c for c in candidates if c.id == eid), None)
                first = own or Candidate(
                    id=eid, name=entity.name, score=1.0, matched_form=normalized
                )
                rest = [c for c in candidates if c.id != eid]
                why = f"a labelled example says this mention is {eid!r}"
                return Route("matched", why, first.score, None, "learned"), [first, *rest]
        # a per-call threshold= routes by the thresholds alone
        model = self.route_model if thresholds is self.thresholds else None
        return route(candidates, thresholds, normalized, model), candidates

    def _thresholds_for(self, threshold: float | None) -> Thresholds:
        """The thresholds of one call: ``threshold`` overrides the accept threshold."""
        if threshold is None:
            return self.thresholds
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise ConfigError(f"threshold must be a number, got {threshold!r}")
        return dataclasses.replace(self.thresholds, accept=float(threshold))

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
        k = top_k or self.top_k
        text = query if isinstance(query, str) else repr(query)
        try:
            normalized = validate_query(query, index=index, max_chars=self.max_query_chars)
            candidates = await self._candidates(normalized, k, self._mask_key(where), flush=alone)
            decision, candidates = self._route(
                candidates, thresholds or self.thresholds, normalized
            )
            rewrite = self.rewrite and self._adjudicator is not None
            result = await self._decide(
                index, text, normalized, candidates, decision, ask_names=rewrite
            )
            if rewrite and result.status == "novel":
                result = await self._rewritten(
                    result, normalized, k, where, decision, thresholds or self.thresholds
                )
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

    def _messages(self, normalized: str, candidates: list[Candidate]) -> list[dict[str, str]]:
        """The adjudication prompt of one query (the live path and the Batch API share it)."""
        return render_messages(
            normalized,
            candidates,
            self.catalog,
            attributes=self.prompt_attributes,
            attribute_chars=self.prompt_attribute_chars,
        )

    async def _rewritten(
        self,
        first: MatchResult,
        normalized: str,
        k: int,
        where: Where | None,
        decision: Route,
        thresholds: Thresholds,
    ) -> MatchResult:
        """One LLM rewrite of a query retrieval missed: retrieve again with the names the LLM
        expects, then adjudicate once more over the merged candidates (never two rewrites
        per query).

        The names come with the LLM's "none" (the adjudication asked for them: no extra
        call; the LLM has judged that none of the candidates is the entity, so a name that
        routes to a match, an exact hit say, is taken without a second call), or, for a
        query retrieval alone called novel, from one rewrite call (whose names the LLM gave
        without judging any candidate: always adjudicated again). Both are cached.
        """
        if first.decided_by == "human" or decision.rule == "learned_novel":
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
        if fresh and self._cache is not None:
            stored = CachedDecision(
                entity_id=None, reason=json.dumps(names), usage=cost, model=self.model
            )
            await self._cache.aput(self._names_key(normalized, judged), stored)
        names = [n for n in names if fold(n) != fold(normalized)]
        if not names:
            why = f"{first.reason}; the LLM gave no other name"
            return first.model_copy(update={"reason": why, "attempts": attempts, "usage": usage})
        done: dict[str, Any] = {"rewritten_as": names, "attempts": attempts, "usage": usage}
        mask_key = self._mask_key(where)
        found = await asyncio.gather(*(self._candidates(n, k, mask_key) for n in names))
        # the LLM judged the first candidates: a name of its that routes to a match is taken
        for name, cands in zip(names, found, strict=True) if judged else ():
            routed, cands = self._route(cands, thresholds, name)
            if routed.kind == "matched" and cands:
                return MatchResult(
                    query=first.query,
                    index=first.index,
                    candidates=cands,
                    status="matched",
                    entity_id=cands[0].id,
                    entity_name=cands[0].name,
                    score=cands[0].score,
                    decided_by="llm",
                    reason=f"rewritten as {names}: {routed.reason}",
                    **done,
                )
        best: dict[str, Candidate] = {c.id: c for c in first.candidates}
        for cands in found:
            for c in cands:
                if c.id not in best or c.score > best[c.id].score:
                    best[c.id] = c
        merged = sorted(best.values(), key=lambda c: -c.score)[:k]
        if said_none and {c.id for c in merged} == {c.id for c in first.candidates}:
            # the LLM has already said none of these
            why = f"{first.reason}; rewritten as {names}: no new candidate"
            return first.model_copy(update={"reason": why, **done})
        top_score = merged[0].score if merged else None
        again = Route("adjudicate", f"rewritten as {names}", top_score, None, "rewrite")
        second = await self._decide(first.index, first.query, normalized, merged, again)
        return second.model_copy(
            update={
                **done,
                "attempts": attempts + second.attempts,
                "usage": usage + second.usage,
                "reason": f"rewritten as {names}: {second.reason}",
            }
        )

    def _names_key(self, normalized: str, judged: bool) -> str:
        """Cache key of a query's rewritten names: given with a "none", or by a rewrite call."""
        tag = "__names__" if judged else "__rewrite__"
        return decision_key(normalized, (tag,), self.model, REWRITE_VERSION)

    async def _cached_names(self, normalized: str, judged: bool) -> list[str] | None:
        if self._cache is None:
            return None
        cached = await self._cache.aget(self._names_key(normalized, judged))
        return None if cached is None else list(json.loads(cached.reason))  # names as JSON

    async def _rewrite_call(self, normalized: str) -> tuple[list[str], list[Attempt], Usage]:
        """The rewrite call through the governor: (names, its attempts, its usage)."""
        governor = self._runtime_for_loop().governor
        adjudicator = self._adjudicator
        assert adjudicator is not None
        governed = await governor.call(
            lambda: adjudicator.rewrite(
                normalized, request_timeout=self.limits.timeout, pace=governor.pace
            ),
            estimated_tokens=estimate_tokens(render_rewrite_messages(normalized), 40),
            usage_of=lambda r: r.usage,
        )
        return list(governed.value.names), governed.attempts, governed.usage

    async def _decide(
        self,
        index: int,
        query: str,
        normalized: str,
        candidates: list[Candidate],
        decision: Route,
        *,
        ask_names: bool = False,
    ) -> MatchResult:
        """The result of one routed query: the route's decision, a person's label, the
        cache's or the LLM's.

        ``ask_names``: the LLM is also asked, should it answer "none", for the names the
        entity has in the catalog; they come back in ``rewritten_as`` for
        :meth:`_rewritten`, which replaces them with the names it actually used.
        """
        top = candidates[0] if candidates else None

        def make(**fields: Any) -> MatchResult:
            return MatchResult(query=query, index=index, candidates=candidates, **fields)

        reviewed = await self.reviewed_label(normalized)
        if reviewed is not None:
            return self._from_reviewed(make, candidates, reviewed)
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
        messages = self._messages(normalized, candidates)
        ids = tuple(c.id for c in candidates)
        key = None
        if self._cache is not None:
            key = self._cache_key(normalized, messages, ids, names=ask_names)
            cached = await self._cache.aget(key)
            if cached is not None:
                return self._from_decision(make, candidates, cached, decided_by="cache")
        governor = self._runtime_for_loop().governor
        adjudicator = self._adjudicator
        try:
            governed = await governor.call(
                lambda: adjudicator.decide(
                    messages,
                    ids,
                    request_timeout=self.limits.timeout,
                    pace=governor.pace,
                    ask_names=ask_names,
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
        result.rewritten_as = list(d.names)
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

    async def reviewed_label(self, normalized: str) -> ReviewedLabel | None:
        """The hook for the human loop: a person's decision for this normalized query, if any.

        Labels live in the decision cache's ``reviewed`` table (``nem-llm review import``
        writes them); they are read once per Matcher, on first use, and win over routing
        and the LLM. A label naming an id that is no longer in the catalog is ignored.
        """
        if self._cache is None:
            return None
        if self._reviewed is None:
            self._reviewed = await self._cache.areviewed()
        label = self._reviewed.get(normalized)
        if label is not None and label.entity_id is not None:
            return label if label.entity_id in self.catalog.by_id else None
        return label

    def _from_reviewed(
        self, make: Callable[..., MatchResult], candidates: list[Candidate], label: ReviewedLabel
    ) -> MatchResult:
        reason = "reviewed by a person" + (f": {label.note}" if label.note else "")
        if label.entity_id is None:
            top = candidates[0].score if candidates else None
            return make(status="novel", score=top, decided_by="human", reason=reason)
        entity = self.catalog.entities[self.catalog.by_id[label.entity_id]]
        chosen = next((c for c in candidates if c.id == label.entity_id), None)
        return make(
            status="matched",
            entity_id=entity.id,
            entity_name=entity.name,
            score=chosen.score if chosen is not None else None,
            decided_by="human",
            reason=reason,
        )

    # -- public async API --------------------------------------------------------------

    @overload
    async def match_async(
        self,
        query: str,
        *,
        top_k: int | None = None,
        threshold: float | None = None,
        where: Where | None = None,
    ) -> MatchResult: ...

    @overload
    async def match_async(
        self,
        query: list[str],
        *,
        top_k: int | None = None,
        threshold: float | None = None,
        where: Wheres = None,
    ) -> list[MatchResult]: ...

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
            top_k: candidates retrieved and shown to the LLM (default: the matcher's).
            threshold: the accept threshold for this call (default: the calibrated one).
            where: a filter on entity attributes, ``{"country": "FR"}`` or
                ``{"country": ["FR", "BE"]}``: no candidate outside it comes back.

        Raises:
            NotReadyError: before ``fit_async``.
            QueryError: a single query that is empty, not a string or too long (in a
                list, such items become ``error`` records instead).
            ConfigError: a filter on an attribute no entity has.
        """
        self._require_index()
        if isinstance(query, list):
            return await self.match_batch_async(
                query, top_k=top_k, threshold=threshold, where=where, strategy="gather"
            )
        if where is not None and not isinstance(where, Mapping):
            raise ConfigError("where must be a mapping for a single query")
        result, _ = await self._match_one(
            0,
            query,
            top_k,
            thresholds=self._thresholds_for(threshold),
            where=where,
            raise_input_errors=True,
        )
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
        self._require_index()
        strategy = check_strategy(strategy)
        thresholds = self._thresholds_for(threshold)
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

    def _where_of(self, where: Wheres) -> Callable[[int], Where | None]:
        """Per-index filter lookup; a shared filter is checked now (a clear ConfigError)."""
        if where is None:
            return lambda i: None
        if isinstance(where, Mapping):
            self._mask_key(where)
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
            threshold: the accept threshold for this call (the seed API's ``threshold``).
            where: one filter for all queries, or one per query (see ``match_async``).
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
        self._require_index()
        k = top_k or self.top_k
        mask_key = self._mask_key(where)
        normalized = [
            validate_query(q, index=i, max_chars=self.max_query_chars)
            for i, q in enumerate(queries)
        ]
        return list(await asyncio.gather(*(self._candidates(n, k, mask_key) for n in normalized)))

    @property
    def governor_stats(self) -> GovernorStats | None:
        """Running LLM totals (calls, attempts, retries, 429s, tokens, cost, in flight) of the
        current event loop's governor, for live progress displays; ``None`` before use."""
        return self._runtime.governor.stats if self._runtime is not None else None

    async def explain_match_async(
        self, query: str, *, top_k: int | None = None, where: Where | None = None
    ) -> Explanation:
        """Match one query and say how: candidates, scores, routing decision, LLM reason."""
        self._require_index()
        result, decision = await self._match_one(
            0, query, top_k, where=where, raise_input_errors=True
        )
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
        decision, candidates = self._route(candidates, self.thresholds, normalized)
        if decision.kind == "adjudicate" and decision.margin is not None and decision.margin < 0.02:
            hints.append("near-tie between the top candidates: check for duplicate entities")
        if decision.kind == "novel" and candidates:
            hints.append(
                f"closest entity {candidates[0].id!r} scored {candidates[0].score:.3f}; add an "
                "alias if it is the same entity"
            )
        cal = self.calibration
        if cal is not None:
            for name, est in (("auto-match", cal.matched), ("auto-novel", cal.novel)):
                if not est.open:
                    hints.append(f"the {name} route is closed: {est.reason}")
            if cal.routing_model:
                hints.append(cal.routing_model)
            if cal.source == "probes":
                hints.append(
                    "thresholds were estimated from probes of the catalog; labelled examples "
                    "(fit_async(training_data=...)) calibrate them on real queries"
                )
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
        if self._tmp_model_dir is not None:  # a tuned model fit made without an index_path
            shutil.rmtree(self._tmp_model_dir, ignore_errors=True)
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
        self,
        query: str,
        *,
        top_k: int | None = None,
        threshold: float | None = None,
        where: Where | None = None,
    ) -> MatchResult: ...

    @overload
    def match(
        self,
        query: list[str],
        *,
        top_k: int | None = None,
        threshold: float | None = None,
        where: Wheres = None,
    ) -> list[MatchResult]: ...

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

    def match_batch(
        self,
        queries: Iterable[str],
        *,
        top_k: int | None = None,
        threshold: float | None = None,
        where: Wheres = None,
        batch_size: int = 64,
        strategy: Strategy = "gather",
        on_progress: ProgressCallback | None = None,
    ) -> list[MatchResult]:
        """Sync twin of :meth:`match_batch_async`."""
        return self._sync.run(
            self.match_batch_async(
                queries,
                top_k=top_k,
                threshold=threshold,
                where=where,
                batch_size=batch_size,
                strategy=strategy,
                on_progress=on_progress,
            )
        )

    def explain_match(
        self, query: str, *, top_k: int | None = None, where: Where | None = None
    ) -> Explanation:
        """Sync twin of :meth:`explain_match_async`."""
        return self._sync.run(self.explain_match_async(query, top_k=top_k, where=where))

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

    # -- deferred adjudication (the provider's Batch API) --------------------------------

    async def plan_async(
        self, index: int, query: Any, *, top_k: int | None = None
    ) -> tuple[MatchResult, PlannedRequest | None]:
        """Route one query without calling the LLM: its final result, or the request to send.

        Returns ``(result, None)`` when no LLM call is needed (matched, novel, cached, no
        LLM configured, bad input: an error record), else ``(provisional, request)``: a
        ``review`` result carrying the candidates, and the exact body the live path would
        send. Finish it with :meth:`resolve_planned`.
        """
        k = top_k or self.top_k
        text = query if isinstance(query, str) else repr(query)
        try:
            normalized = validate_query(query, index=index, max_chars=self.max_query_chars)
            candidates = await self._candidates(normalized, k)
            decision, candidates = self._route(candidates, self.thresholds, normalized)
            adjudicator = self._adjudicator
            if (
                decision.kind != "adjudicate"
                or adjudicator is None
                or await self.reviewed_label(normalized) is not None
            ):
                return await self._decide(index, text, normalized, candidates, decision), None
            messages = self._messages(normalized, candidates)
            ids = tuple(c.id for c in candidates)
            key = self._cache_key(normalized, messages, ids) if self._cache is not None else None
            provisional = MatchResult(
                query=text,
                index=index,
                candidates=candidates,
                status="review",
                score=candidates[0].score,
                reason=decision.reason,
            )
            if self._cache is not None and key is not None:
                cached = await self._cache.aget(key)
                if cached is not None:
                    return self.resolve_planned(provisional, cached, decided_by="cache"), None
            body = request_body(
                messages,
                len(ids),
                model=self.model,
                mode=self.mode,
                create_kwargs=adjudicator._kwargs,
            )
            return provisional, PlannedRequest(body=body, candidate_ids=ids, cache_key=key)
        except (asyncio.CancelledError, NotReadyError):
            raise
        except Exception as exc:
            error = MatchResult(
                query=text[:1000],
                index=index,
                status="error",
                error=str(exc),
                error_type=getattr(exc, "cause", None) or type(exc).__name__,
            )
            return error, None

    def resolve_planned(
        self,
        provisional: MatchResult,
        decision: Decision | CachedDecision,
        *,
        decided_by: str = "llm",
    ) -> MatchResult:
        """The final result of a :meth:`plan_async` request once its decision is known."""

        def make(**fields: Any) -> MatchResult:
            return MatchResult(
                query=provisional.query,
                index=provisional.index,
                candidates=provisional.candidates,
                **fields,
            )

        return self._from_decision(make, provisional.candidates, decision, decided_by=decided_by)

    # -- DataFrames (logic in integrations/frames.py) ------------------------------------

    async def match_frame_async(
        self,
        frame: Any,
        *,
        column: str = "name",
        where_columns: Sequence[str] | dict[str, str] | None = None,
        top_k: int | None = None,
        threshold: float | None = None,
        batch_size: int = 64,
        candidates: bool = False,
        prefix: str = "",
    ) -> Any:
        """Match a pandas/polars DataFrame's or pyarrow Table's ``column``; a new frame with
        entity_id, entity_name, status, score, decided_by, reason and cost columns.

        Needs the ``frames`` extra; see :func:`nem_llm.integrations.frames.match_frame_async`.
        """
        from .integrations.frames import match_frame_async

        return await match_frame_async(
            self,
            frame,
            column=column,
            where_columns=where_columns,
            top_k=top_k,
            threshold=threshold,
            batch_size=batch_size,
            candidates=candidates,
            prefix=prefix,
        )

    def match_frame(
        self,
        frame: Any,
        *,
        column: str = "name",
        where_columns: Sequence[str] | dict[str, str] | None = None,
        top_k: int | None = None,
        threshold: float | None = None,
        batch_size: int = 64,
        candidates: bool = False,
        prefix: str = "",
    ) -> Any:
        """Sync twin of :meth:`match_frame_async`."""
        return self._sync.run(
            self.match_frame_async(
                frame,
                column=column,
                where_columns=where_columns,
                top_k=top_k,
                threshold=threshold,
                batch_size=batch_size,
                candidates=candidates,
                prefix=prefix,
            )
        )

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

    def _allowed(self, index: HybridIndex, key: str) -> Any:
        """A filter's mask over the index's catalog now (entity changes outdate older masks).

        Runs in the worker thread, as the changes do: a search never sees a mask of
        another catalog.
        """
        catalog, mask, where = self._masks[key]
        if catalog is not index.catalog:
            try:
                mask = index.catalog.where_mask(where)
            except ConfigError:  # the last entity with the filter's attribute was removed
                mask = np.zeros(len(index.catalog.entities), dtype=bool)
            self._masks[key] = (index.catalog, mask, where)
        return mask


async def _maybe_await(value: Awaitable[None] | None) -> None:
    if inspect.isawaitable(value):
        await value


def _precision(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)
