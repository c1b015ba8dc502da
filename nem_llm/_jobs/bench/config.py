"""What one benchmark run is: its settings (:class:`BenchConfig`), scenarios and data.

A scenario is a strategy, optionally with ``+rpm`` (a client-side rate limit, and a
server-side one on the simulator). Every scenario sends the same synthetic queries, each
near one entity of a synthetic catalog, so no answer is a repeat.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from ..._llm.strategies import Strategy, check_strategy
from ...errors import ConfigError
from ...sim import SimConfig
from ...sim.config import LatencyKind
from .bounds import mean_latency

__all__ = [
    "DEFAULT_RPM",
    "DEFAULT_SCENARIOS",
    "DEFAULT_SEQUENTIAL_N",
    "SIM_RPM_FACTOR",
    "BenchConfig",
    "BenchProgress",
    "HttpClientKind",
    "Plan",
    "make_catalog",
    "make_queries",
    "parse_scenario",
    "plans",
    "resolve_rpm",
]

#: The scenarios ``run_bench`` runs by default, in order.
DEFAULT_SCENARIOS: tuple[str, ...] = (
    "sequential",
    "gather",
    "as_completed",
    "gather+rpm",
    "as_completed+rpm",
)
#: Client requests per minute when neither ``rpm`` nor ``sim_rpm`` is given (30 req/s).
DEFAULT_RPM = 1800.0
#: The simulator's limit is this multiple of the client's, so a governed client stays below.
SIM_RPM_FACTOR = 1.5
DEFAULT_SEQUENTIAL_N = 20

HttpClientKind = Literal["httpx", "aiohttp"]
#: ``on_progress(scenario, completed, total)``, called after every result.
BenchProgress = Callable[[str, int, int], Awaitable[None] | None]


def resolve_rpm(rpm: float | None, sim_rpm: float | None) -> tuple[float, float]:
    """The client's and the simulator's RPM for the ``+rpm`` scenarios.

    Given one, the other follows (the simulator gets ``1.5x`` the client's rpm, so the
    client runs at ~2/3 of the server's capacity); given neither, 1800 and 2700.

    Example:
        >>> resolve_rpm(None, None)
        (1800.0, 2700.0)
        >>> resolve_rpm(None, 3000)
        (2000.0, 3000.0)
    """
    if (rpm is not None and rpm <= 0) or (sim_rpm is not None and sim_rpm <= 0):
        raise ConfigError(f"rpm and sim_rpm must be > 0, got {rpm!r} and {sim_rpm!r}")
    if rpm is None and sim_rpm is None:
        rpm = DEFAULT_RPM
    if rpm is None:
        assert sim_rpm is not None
        return float(sim_rpm) / SIM_RPM_FACTOR, float(sim_rpm)
    return float(rpm), float(sim_rpm) if sim_rpm is not None else float(rpm) * SIM_RPM_FACTOR


def parse_scenario(name: str) -> tuple[Strategy, bool]:
    """``"gather+rpm"`` -> ``("gather", True)``; ``"sequential"`` -> ``("sequential", False)``."""
    base, plus, suffix = name.partition("+")
    if plus and suffix != "rpm":
        raise ConfigError(f"unknown scenario {name!r}: the only suffix is '+rpm'")
    return check_strategy(base), bool(plus)


def make_catalog(size: int = 200) -> list[dict[str, str]]:
    """A synthetic catalog: ``E0001 "Entity 0001"`` ... (ids and names)."""
    return [{"id": f"E{i:04d}", "name": f"Entity {i:04d}"} for i in range(1, size + 1)]


def make_queries(n: int, catalog_size: int = 200) -> list[str]:
    """``n`` distinct queries, each near one catalog entity (so no answer is a repeat)."""
    return [f"entity {i % catalog_size + 1:04d} mention {i}" for i in range(n)]


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """Settings of one benchmark run (``nem-llm bench`` options map one to one).

    Attributes:
        n: queries per scenario.
        concurrency: the concurrency cap of the concurrent scenarios (sequential uses 1).
        latency, latency_p50, latency_p99: the simulator's latency distribution (seconds);
            with ``base_url`` the bound uses the measured mean LLM latency instead.
        rpm: client requests per minute in the ``+rpm`` scenarios; ``sim_rpm``: the
            simulator's limit in those scenarios (see :func:`resolve_rpm`). Scenarios
            without ``+rpm`` run against a simulator without a limit.
        sequential_n: queries of the sequential scenario (default ``min(n, 20)``).
        base_url, api_key, model: a real endpoint instead of the simulator.
        scenarios: names from ``DEFAULT_SCENARIOS`` (``strategy`` or ``strategy+rpm``).
        http_client: ``"aiohttp"`` (``openai.DefaultAioHttpClient``, the transport of the
            clients a ``Matcher`` makes itself: measured cheaper) or ``"httpx"`` (openai's
            own default).
        catalog_size, top_k: the synthetic catalog and candidates per query.
        max_attempts, timeout: the governor's ``Limits``.
        seed: the simulator's seed (every scenario's server starts from it).
        gc_freeze: tune the collector for each timed scenario (``nem_llm._gc.tuned_gc``,
            undone after it), as ``nem-llm match`` and ``nem-llm serve`` do once the index is
            built, so the cyclic collector's full passes skip the ~270k objects of the index
            and the imported libraries; each such pass otherwise stalls the event loop for
            100-350 ms on these machines. ``False`` measures an untuned process.
    """

    n: int = 1000
    concurrency: int = 64
    latency: LatencyKind = "lognormal"
    latency_p50: float = 1.0
    latency_p99: float | None = 3.0
    rpm: float | None = None
    sim_rpm: float | None = None
    sequential_n: int | None = None
    base_url: str | None = None
    api_key: str = "sim"
    model: str = "nem-llm-sim"
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    http_client: HttpClientKind = "aiohttp"
    catalog_size: int = 200
    top_k: int = 5
    max_attempts: int = 5
    timeout: float = 30.0
    seed: int = 0
    gc_freeze: bool = True

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.sequential_n is not None and self.sequential_n < 1:
            raise ConfigError(f"sequential_n must be >= 1, got {self.sequential_n}")
        if self.http_client not in ("httpx", "aiohttp"):
            raise ConfigError(f"http_client must be httpx or aiohttp, got {self.http_client!r}")
        if not self.scenarios:
            raise ConfigError("scenarios must not be empty")
        for name in self.scenarios:
            parse_scenario(name)
        resolve_rpm(self.rpm, self.sim_rpm)
        self.sim_config(rpm=None)  # validates the latency settings

    @property
    def effective_sequential_n(self) -> int:
        """Queries of the sequential scenario (``sequential_n``, at most ``n``)."""
        return min(self.n, self.sequential_n or DEFAULT_SEQUENTIAL_N)

    def sim_config(self, *, rpm: float | None) -> SimConfig:
        """The simulator's settings for one scenario (``rpm``: its server-side limit)."""
        return SimConfig(
            seed=self.seed,
            model=self.model,
            latency=self.latency,
            latency_p50=self.latency_p50,
            latency_p99=self.latency_p99,
            latency_max=self.latency_p99 if self.latency == "uniform" else None,
            rpm=rpm,
        )

    def expected_latency(self) -> float:
        """The mean latency of the simulator's distribution (see :func:`mean_latency`)."""
        return mean_latency(
            self.latency,
            self.latency_p50,
            p99=self.latency_p99,
            high=self.latency_p99 if self.latency == "uniform" else None,
        )


@dataclass(frozen=True)
class Plan:
    """One scenario as it runs: strategy, cap, rate limits, queries, endpoint."""

    name: str
    strategy: Strategy
    concurrency: int
    rpm: float | None
    n: int
    subset_of: int | None
    sim_rpm: float | None = None
    base_url: str = ""


def plans(config: BenchConfig) -> list[Plan]:
    """One plan per scenario of ``config``, in order (sequential runs its subset at C=1)."""
    rpm, sim_rpm = resolve_rpm(config.rpm, config.sim_rpm)
    out = []
    for name in config.scenarios:
        strategy, limited = parse_scenario(name)
        sequential = strategy == "sequential"
        out.append(
            Plan(
                name=name,
                strategy=strategy,
                concurrency=1 if sequential else config.concurrency,
                rpm=rpm if limited else None,
                n=config.effective_sequential_n if sequential else config.n,
                subset_of=config.n if sequential else None,
                sim_rpm=sim_rpm if limited else None,
            )
        )
    return out
