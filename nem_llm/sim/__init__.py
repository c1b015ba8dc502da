"""An OpenAI-compatible LLM simulator for benchmarks and tests (it is not a model).

A real HTTP server on 127.0.0.1 that answers chat completions the way instructor asks
for them, by a fixed policy (the first candidate, or a labelled "oracle" file), with
seeded latency, server-side rate limits and injected faults.

Example:
    >>> async with SimServer(SimConfig(latency_p50=0.05, rpm=600)) as sim:  # doctest: +SKIP
    ...     client = instructor.from_openai(
    ...         AsyncOpenAI(base_url=sim.base_url, api_key="sim", max_retries=0)
    ...     )
"""

from __future__ import annotations

from .batches import BatchEndpoints, BatchLogRecord, BatchSimConfig
from .config import SimConfig, lognormal_sigma, sample_latency
from .server import KINDS, RequestRecord, SimServer, max_in_window, run_simulator, serve_forever

__all__ = [
    "KINDS",
    "BatchEndpoints",
    "BatchLogRecord",
    "BatchSimConfig",
    "RequestRecord",
    "SimConfig",
    "SimServer",
    "lognormal_sigma",
    "max_in_window",
    "run_simulator",
    "sample_latency",
    "serve_forever",
]
