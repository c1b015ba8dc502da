"""What a Matcher is wired from: its settings, its LLM connection, its per-loop runtime.

- :func:`settings_from_options` turns ``Matcher(entities, settings, **options)`` into one
  :class:`~nem_llm.MatcherSettings` (old keyword spellings warn and still work);
- :class:`LLMConnection` is the client, the adjudicator and the decision cache, and
  knows which of them it must close;
- :class:`Runtime` holds the loop-bound state: the governor and the micro-batcher belong
  to one event loop, made on first use and refused on a second loop.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import instructor
from openai import AsyncOpenAI

from ..errors import ConfigError, NemLLMError
from ..llm.adjudication import Adjudicator
from ..llm.cache import DecisionCache
from ..llm.governor import Governor
from ..llm.transport import resolve_client, skip_param_transform
from ..models import Candidate
from ..retrieval.embedding import MicroBatcher
from ..retrieval.retriever import SearchItem
from ..settings import MatcherSettings

__all__ = ["LLMConnection", "LoopState", "Runtime", "settings_from_options"]

# old keyword spellings -> the settings field
_RENAMED = {"index": "search", "index_path": "index_dir"}


def settings_from_options(
    settings: MatcherSettings | None, options: dict[str, Any]
) -> tuple[MatcherSettings, DecisionCache | None]:
    """Settings from ``settings=`` and keyword options, and a cache object if one was given.

    ``mode=`` may be an ``instructor.Mode``; ``cache=`` a ``DecisionCache`` (a path goes in
    the settings); ``index=`` and ``index_path=`` are old spellings of ``search=`` and
    ``index_dir=`` (a ``DeprecationWarning``).
    """
    cache_object: DecisionCache | None = None
    for old, new in _RENAMED.items():
        if old in options:
            warnings.warn(
                f"Matcher({old}=...) is deprecated: use {new}=...", DeprecationWarning, stacklevel=4
            )
            options[new] = options.pop(old)
    if "mode" in options:
        mode = options.pop("mode")
        options["instructor_mode"] = mode.value if isinstance(mode, instructor.Mode) else mode
    if isinstance(options.get("cache"), DecisionCache):
        cache_object = options.pop("cache")
    base = settings if settings is not None else MatcherSettings()
    if not isinstance(base, MatcherSettings):
        raise ConfigError(f"settings must be a MatcherSettings, got {type(base).__name__}")
    return base.replace(**options), cache_object


@dataclass
class LLMConnection:
    """The client LLM calls go through, its adjudicator, and the decision cache."""

    client: AsyncOpenAI | None
    adjudicator: Adjudicator | None
    cache: DecisionCache | None
    owns_client: bool = False
    owns_cache: bool = False

    @classmethod
    def open(
        cls,
        settings: MatcherSettings,
        client: AsyncOpenAI | None,
        api_key: str | None,
        cache: DecisionCache | None,
    ) -> LLMConnection:
        """Connect as the settings say (no client, no key, no base URL: no LLM)."""
        made, owns = (None, False)
        if settings.llm:
            made, owns = resolve_client(
                client, base_url=settings.base_url, api_key=api_key, timeout=settings.limits.timeout
            )
        adjudicator = None
        if made is not None:
            patched = instructor.from_openai(
                skip_param_transform(made), mode=instructor.Mode(settings.instructor_mode)
            )
            adjudicator = Adjudicator(
                patched,
                settings.model,
                max_reasks=settings.limits.max_reasks,
                temperature=settings.temperature,
            )
        owns_cache = cache is None and settings.cache is not None
        if owns_cache:
            assert settings.cache is not None
            cache = DecisionCache(settings.cache)
        return cls(made, adjudicator, cache, owns, owns_cache)

    async def close_async(self) -> None:
        """Close what this connection made (a client or cache the user passed stays open)."""
        if self.owns_client and self.client is not None:
            await self.client.close()
        if self.owns_cache and self.cache is not None:
            self.cache.close()


@dataclass
class LoopState:
    """The governor and the micro-batcher of one event loop."""

    loop: asyncio.AbstractEventLoop
    governor: Governor
    batcher: MicroBatcher[SearchItem, list[Candidate]]


class Runtime:
    """Makes the loop-bound state on first use, and refuses a second loop while it lives.

    Args:
        settings: the governor's limits and the micro-batcher's flush size and delay.
        search: the batch function the micro-batcher calls (in ``executor``).
        executor: the one worker thread every encode and search runs in.
    """

    def __init__(
        self,
        settings: MatcherSettings,
        search: Callable[[list[SearchItem]], Sequence[list[Candidate]]],
        executor: ThreadPoolExecutor,
    ) -> None:
        self._settings = settings
        self._search = search
        self._executor = executor
        self.state: LoopState | None = None
        self.closed = False

    def for_loop(self) -> LoopState:
        """The running loop's state (made now if this is the first use)."""
        if self.closed:
            raise NemLLMError("this Matcher is closed")
        loop = asyncio.get_running_loop()
        state = self.state
        if state is not None and state.loop is not loop:
            if not state.loop.is_closed():
                raise NemLLMError(
                    "this Matcher is already in use on another event loop; use either its "
                    "async methods or its sync twins, not both"
                )
            state = None
        if state is None:
            s = self._settings
            batcher: MicroBatcher[SearchItem, list[Candidate]] = MicroBatcher(
                self._search,
                max_batch_size=s.max_batch_size if s.batching else 1,
                max_wait=s.max_wait if s.batching else 0.0,
                executor=self._executor,
            )
            state = LoopState(loop, Governor(s.limits, model=s.model), batcher)
            self.state = state
        return state

    async def close_async(self) -> None:
        """Stop the micro-batcher (on its own loop when called from another one)."""
        self.closed = True
        state, self.state = self.state, None
        if state is None:
            return
        if state.loop is asyncio.get_running_loop():
            await state.batcher.close_async()
        elif not state.loop.is_closed():
            # bound to another loop (sync close() after async use, as in Jupyter): stop the
            # batcher on its own loop, without waiting (that loop may be our caller's)
            asyncio.run_coroutine_threadsafe(state.batcher.close_async(), state.loop)
