"""Process probes of the benchmarks: the simulator in a child process, CPU seconds, load,
event-loop lag, a quiet instructor log and the client the scenarios use.

Shared by ``nem-llm bench``, the fault soak and the scripts in ``benchmarks/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import openai

from ..._llm.stats import percentile
from ...errors import ConfigError
from ...sim import SimConfig
from .config import HttpClientKind

__all__ = [
    "LoopLag",
    "SimProcess",
    "load_avg",
    "make_client",
    "maybe_await",
    "process_cpu",
    "quiet_instructor",
    "self_cpu",
    "wait_ready",
]


_SIM_SCRIPT = r"""
import asyncio, json, signal, sys, threading
from nem_llm.sim import SimConfig, SimServer

async def main():
    servers = [SimServer(SimConfig(**c)) for c in json.loads(sys.argv[1])]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    def watch_stdin():
        sys.stdin.read()  # EOF: the parent closed the pipe (or died)
        loop.call_soon_threadsafe(stop.set)
    threading.Thread(target=watch_stdin, daemon=True).start()
    try:
        for server in servers:
            await server.start()
        print(json.dumps([server.base_url for server in servers]), flush=True)
        await stop.wait()
    finally:
        for server in servers:
            await server.stop()

asyncio.run(main())
"""


class SimProcess:
    """Simulator servers (one per config) in a child process, off the client's CPU time.

    One process serves them all (importing nem_llm takes seconds); each scenario gets a
    fresh server, so rate-limit windows and seeded latency draws start anew. Use it as a
    context manager, ``with`` or ``async with`` (the blocking start and stop then run in a
    worker thread); ``base_urls`` are the servers' ``/v1`` URLs, in config order.
    """

    def __init__(self, configs: Sequence[SimConfig], *, start_timeout: float = 60.0) -> None:
        self.configs = list(configs)
        self.start_timeout = start_timeout
        self.base_urls: list[str] = []
        self._proc: subprocess.Popen[str] | None = None
        self._stderr: Any = None

    def start(self) -> None:
        """Start the child process and wait until every server answers ``GET /models``."""
        payload = json.dumps([asdict(c) for c in self.configs])
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SIM_SCRIPT, payload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        # a child that never prints is killed, which ends the readline below
        timer = threading.Timer(self.start_timeout, self._proc.kill)
        timer.start()
        try:
            assert self._proc.stdout is not None
            line = self._proc.stdout.readline()
            timer.cancel()
            if not line:
                raise RuntimeError(f"the simulator did not start: {self._stderr_tail()}")
            self.base_urls = list(json.loads(line))
            for url in self.base_urls:
                wait_ready(url)
        except BaseException:
            timer.cancel()
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the child process (EOF on its stdin; killed if it lingers)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> SimProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> SimProcess:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    def cpu_seconds(self) -> float | None:
        """CPU seconds (user + system) the simulator process has used, if readable."""
        return None if self._proc is None else process_cpu(self._proc.pid)

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return str(self._stderr.read())[-2000:]


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process from ``/proc`` (None where there is none)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def self_cpu() -> float:
    """User + system CPU seconds of this process so far."""
    times = os.times()
    return times.user + times.system


def load_avg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (rounded), or None where there are none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def wait_ready(base_url: str, within_s: float = 30.0) -> None:
    """Poll ``GET {base_url}/models`` until it answers 200 (blocking)."""
    deadline = time.monotonic() + within_s
    with httpx.Client(timeout=2.0) as http:
        while True:
            try:
                if http.get(base_url.rstrip("/") + "/models").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{base_url} did not answer GET /models in {within_s:g} s")
            time.sleep(0.1)


def make_client(
    base_url: str,
    api_key: str = "sim",
    kind: HttpClientKind = "httpx",
    *,
    timeout: float | None = None,
) -> openai.AsyncOpenAI:
    """An ``AsyncOpenAI`` client with no retries of its own (the governor retries) on the
    ``httpx`` or ``aiohttp`` transport; ``timeout``: seconds per request (openai's default
    when None)."""
    options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    if kind == "aiohttp":
        try:
            options["http_client"] = openai.DefaultAioHttpClient(**options)
        except RuntimeError as exc:  # openai raises this when httpx-aiohttp is missing
            raise ConfigError(f"http_client='aiohttp' needs openai[aiohttp]: {exc}") from exc
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, **options)


class LoopLag:
    """Samples how late the running event loop wakes a sleeper, while the block runs."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._sample(), name="nem-llm-bench-loop-lag")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.interval)
            self.samples.append(max(0.0, loop.time() - start - self.interval))

    @property
    def mean_ms(self) -> float | None:
        """The mean lateness in milliseconds (None before the first sample)."""
        return 1000 * sum(self.samples) / len(self.samples) if self.samples else None

    @property
    def p99_ms(self) -> float | None:
        """The 99th percentile lateness in milliseconds (None before the first sample)."""
        value = percentile(sorted(self.samples), 99)
        return None if value is None else 1000 * value


@contextlib.contextmanager
def quiet_instructor() -> Iterator[None]:
    """Mute instructor's per-attempt error log for the run (the governor records attempts).

    instructor logs every transport error it passes up at ERROR level; in a soak with 20 %
    429s that is thousands of lines on stderr and costs client CPU.
    """
    logger = logging.getLogger("instructor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


async def maybe_await(value: Awaitable[None] | None) -> None:
    """Await a progress hook's result if it returned an awaitable."""
    if value is not None:
        await value
