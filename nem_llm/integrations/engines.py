"""The engines of a match job behind one protocol: local, Ray, the provider's Batch API.

Every engine receives the same :class:`~nem_llm._jobs.runs.MatchJob` (files, query-side
columns and :class:`~nem_llm.MatcherSettings`) and either honours every option or refuses
the job up front with a :class:`~nem_llm.errors.ConfigError` naming the option
(:meth:`Engine.check`). ``tests/test_engines.py`` holds the parity matrix: for each
engine and option, the same result rows as the local engine, or the refusal.

Example:
    >>> engine = make_engine("batch-api")
    >>> engine.name
    'batch-api'
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, get_args

from .._jobs.runs import JobSummary, MatchJob, ProgressHook
from ..errors import ConfigError
from ..settings import EngineName

__all__ = [
    "ENGINES",
    "BatchApiEngine",
    "Engine",
    "EngineName",
    "LocalEngine",
    "RayEngine",
    "make_engine",
]

ENGINES: tuple[str, ...] = get_args(EngineName)


class Engine(Protocol):
    """Runs a match job; the same rows as the local engine, or a refusal up front."""

    @property
    def name(self) -> str:
        """The engine's name (``--engine``)."""

    def check(self, job: MatchJob) -> None:
        """Raise :class:`ConfigError` naming an option this engine cannot honour."""

    async def run_async(
        self, job: MatchJob, *, stop: asyncio.Event | None, on_progress: ProgressHook | None
    ) -> JobSummary:
        """Run (or resume) the job; every input row ends as one output row."""


@dataclass(frozen=True)
class LocalEngine:
    """This process: the Matcher's async API, checkpointed and resumable."""

    embedder: Any = None  # an encoder object (tests, custom encoders); default: settings'
    name: str = "local"

    def check(self, job: MatchJob) -> None:
        """Every option is honoured here."""

    async def run_async(
        self, job: MatchJob, *, stop: asyncio.Event | None, on_progress: ProgressHook | None
    ) -> JobSummary:
        from .._jobs.batch import run_match_job

        return await run_match_job(
            job, stop=stop, on_progress=on_progress, matcher_factory=_factory(self.embedder)
        )


@dataclass(frozen=True)
class RayEngine:
    """A Ray Data actor pool (the ``[ray]`` extra); the limits are split across actors."""

    actors: int = 2
    address: str | None = None
    embedder: Any = None  # an encoder object for every actor (tests, custom encoders)
    name: str = "ray"

    def check(self, job: MatchJob) -> None:
        if self.actors < 1:
            raise ConfigError(f"--actors must be >= 1, got {self.actors}")
        if job.settings.cache is not None:
            raise ConfigError(
                "--cache with the Ray engine: actors share no disk, so one cache file "
                "cannot serve them (the job's checkpoint still skips finished rows)"
            )

    async def run_async(
        self, job: MatchJob, *, stop: asyncio.Event | None, on_progress: ProgressHook | None
    ) -> JobSummary:
        from .ray import run_ray_job

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None,
            lambda: run_ray_job(
                job,
                actors=self.actors,
                ray_address=self.address,
                on_progress=on_progress,
                embedder=self.embedder,
            ),
        )


@dataclass(frozen=True)
class BatchApiEngine:
    """The provider's Batch API: half the price, up to 24 h; a rerun resumes polling."""

    poll_interval: float = 30.0
    on_batch: Callable[[Any], None] | None = None
    embedder: Any = None  # an encoder object (tests, custom encoders); default: settings'
    name: str = "batch-api"

    def check(self, job: MatchJob) -> None:
        from .._jobs.batch_api import refuse_batch_api

        refuse_batch_api(job)

    async def run_async(
        self, job: MatchJob, *, stop: asyncio.Event | None, on_progress: ProgressHook | None
    ) -> JobSummary:
        from .._jobs.batch_api import BatchApiOptions, run_batch_api_job

        options = BatchApiOptions(poll_interval=self.poll_interval)
        return await run_batch_api_job(
            job,
            options=options,
            stop=stop,
            on_progress=on_progress,
            on_batch=self.on_batch,
            matcher_factory=_factory(self.embedder),
        )


def _factory(embedder: Any) -> Callable[..., Any]:
    """The Matcher factory of a job: with ``embedder`` when one is given."""
    from ..matcher import Matcher

    return Matcher if embedder is None else functools.partial(Matcher, embedder=embedder)


def make_engine(name: str, **options: Any) -> Engine:
    """The engine called ``name`` with its own options (``actors=`` for Ray, ...)."""
    kinds: dict[str, Callable[..., Engine]] = {
        "local": LocalEngine,
        "ray": RayEngine,
        "batch-api": BatchApiEngine,
    }
    if name not in kinds:
        raise ConfigError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    try:
        return kinds[name](**options)
    except TypeError as exc:
        raise ConfigError(f"engine {name!r}: {exc}") from None
