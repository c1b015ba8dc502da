"""The simulator's HTTP server: an OpenAI-compatible chat-completions endpoint on aiohttp.

It is a simulator, not a model: answers come from a fixed policy (the first candidate, or
a labelled "oracle" file), with seeded latency, server-side rate limits (a sliding 60 s
window, like OpenAI's) and injected faults (429/500/503, hangs, malformed or invalid
answers). Use it to benchmark and test the client side (governor, retries, strategies).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import math
import random
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiohttp import web

from ..catalog import load_catalog
from .batches import BatchEndpoints, BatchSimConfig
from .config import DIFFICULTY, SimConfig, sample_latency
from .protocol import (
    NONE_ID,
    BadRequest,
    ParsedRequest,
    chat_completion_body,
    error_body,
    load_gold,
    lookup_gold,
    names_answer_text,
    parse_request,
)

__all__ = [
    "KINDS",
    "RequestRecord",
    "SimServer",
    "max_in_window",
    "run_simulator",
    "serve_forever",
]

#: Every ``RequestRecord.kind``, in the order ``SimServer.stats()`` lists them.
KINDS: tuple[str, ...] = (
    "ok",
    "rate_limited",
    "fault_429",
    "fault_500",
    "fault_503",
    "hang",
    "malformed",
    "invalid",
    "bad_request",
)

WINDOW_SECONDS = 60.0
_ERROR_REASON = "simulated: injected oracle error"
_INVALID_ID = "not-a-candidate"


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One chat-completions request as the simulator saw it.

    Attributes:
        arrival: ``time.monotonic()`` when the request reached the handler.
        status: HTTP status sent; 0 if no response was sent (the client disconnected,
            e.g. it gave up on a hung request).
        kind: One of :data:`KINDS`: ``"ok"``, ``"rate_limited"`` (the rpm/tpm window),
            ``"fault_429"``, ``"fault_500"``, ``"fault_503"``, ``"hang"``, ``"malformed"``,
            ``"invalid"`` or ``"bad_request"``.
        latency: Seconds the simulator slept (the drawn latency, or the hang).
        prompt_tokens: Prompt tokens charged (0 if the body could not be parsed).
        completion_tokens: Completion tokens charged (0 unless an answer was sent).
    """

    arrival: float
    status: int
    kind: str
    latency: float
    prompt_tokens: int
    completion_tokens: int


def max_in_window(times: Sequence[float], window: float = WINDOW_SECONDS) -> int:
    """Return the most ``times`` that fall inside any half-open window ``[t, t + window)``.

    Two times exactly ``window`` apart are never in the same window.

    Example:
        >>> max_in_window([0.0, 10.0, 59.9, 60.0, 70.0])
        3
    """
    if window <= 0:
        raise ValueError(f"window must be > 0, got {window!r}")
    ordered = sorted(times)
    best = 0
    for i, start in enumerate(ordered):
        count = bisect.bisect_left(ordered, start + window, lo=i) - i
        best = max(best, count)
    return best


class _SlidingWindow:
    """Accepted requests (and their tokens) in the last 60 s: the server-side rate limiter."""

    def __init__(self, rpm: float | None, tpm: float | None, window: float = WINDOW_SECONDS):
        self.rpm = rpm
        self.tpm = tpm
        self.window = window
        self.enabled = rpm is not None or tpm is not None
        self._entries: deque[list[float]] = deque()  # [accepted_at, tokens], oldest first
        self._tokens = 0.0
        self._horizon = -math.inf  # entries at or before this time have left the window

    def _expire(self, now: float) -> None:
        entries = self._entries
        self._horizon = max(self._horizon, now - self.window)
        while entries and entries[0][0] <= self._horizon:
            self._tokens -= entries.popleft()[1]
        if not entries:
            self._tokens = 0.0  # no float drift across idle periods

    def try_acquire(self, now: float, tokens: int) -> tuple[list[float] | None, float, str]:
        """Accept a request (returns its entry) or return (None, seconds to wait, limit kind)."""
        entry = [now, float(tokens)]
        if not self.enabled:
            return entry, 0.0, ""
        self._expire(now)
        entries = self._entries
        if self.rpm is not None and len(entries) + 1 > self.rpm:
            # the oldest `drop` entries must leave the window before one more fits
            drop = math.ceil(len(entries) + 1 - self.rpm)
            return None, entries[drop - 1][0] + self.window - now, "requests"
        if self.tpm is not None and self._tokens + tokens > self.tpm:
            excess = self._tokens + tokens - self.tpm
            if tokens <= self.tpm:
                for at, used in entries:
                    excess -= used
                    if excess <= 0:
                        return None, at + self.window - now, "tokens"
            return None, self.window, "tokens"  # larger than the whole budget
        entries.append(entry)
        self._tokens += tokens
        return entry, 0.0, ""

    def add_tokens(self, entry: list[float], tokens: int) -> None:
        """Charge ``tokens`` more to an accepted request (its completion tokens)."""
        entry[1] += tokens
        if self.enabled and entry[0] > self._horizon:
            self._tokens += tokens

    def used(self, now: float) -> tuple[int, float]:
        """Return (requests, tokens) in the window ending at ``now``."""
        self._expire(now)
        return len(self._entries), self._tokens


def _seconds_header(seconds: float) -> str:
    """Format seconds for ``Retry-After``: an integer when whole, else a short decimal."""
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class SimServer:
    """An OpenAI-compatible LLM simulator served over HTTP on 127.0.0.1 (not a model).

    ``GET /v1/models`` lists ``config.model``; ``POST /v1/chat/completions`` answers the
    requests instructor sends (Mode.TOOLS with a forced tool call, JSON, MD_JSON,
    JSON_SCHEMA) with ``{"entity_id", "confidence", "reason"}`` chosen by ``config.policy``,
    after the rate-limit check, the injected faults and the simulated latency, in that
    order; discovery's ``EntityProposal`` tool calls get ``protocol.propose_entity``'s
    answer (the cluster's most frequent mention as the name). Every request is logged in
    :attr:`requests`.

    Example:
        >>> async def main() -> None:                       # doctest: +SKIP
        ...     async with SimServer(SimConfig(latency_p50=0.05, rpm=600)) as sim:
        ...         client = AsyncOpenAI(base_url=sim.base_url, api_key="sim", max_retries=0)
        ...         ...
        ...         print(sim.stats())
    """

    def __init__(
        self,
        config: SimConfig,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        batch: BatchSimConfig | None = None,
    ) -> None:
        if not isinstance(config, SimConfig):
            raise TypeError(f"config must be a SimConfig, got {type(config).__name__}")
        self.config = config
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._gold = load_gold(config.gold_path) if config.gold_path else ({}, {})
        self._catalog = load_catalog(config.catalog_path) if config.catalog_path else None
        self._rng = random.Random(config.seed)
        self._fault_rates = config.fault_rates()
        self._limiter = _SlidingWindow(config.rpm, config.tpm)
        self._records: list[RequestRecord] = []
        self._sleepers: set[asyncio.Future[None]] = set()
        self._runner: web.AppRunner | None = None
        self._stopping = False
        self._counter = 0
        self._in_flight = 0
        #: The provider Batch API (``/v1/files``, ``/v1/batches``), answered by the same policy.
        self.batches = BatchEndpoints(batch or BatchSimConfig(), self._batch_answer)

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The TCP port the server listens on (known after :meth:`start`)."""
        if self._port is None:
            raise RuntimeError("the simulator is not started")
        return self._port

    @property
    def base_url(self) -> str:
        """The OpenAI ``base_url`` of this server: ``http://HOST:PORT/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def requests(self) -> list[RequestRecord]:
        """The request log, in completion order (sort by ``arrival`` for arrival order)."""
        return self._records

    @property
    def in_flight(self) -> int:
        """Requests being handled right now (sleeping, hanging, or being answered)."""
        return self._in_flight

    def stats(self) -> dict[str, int]:
        """Return the number of logged requests of each kind (every kind, zeros included)."""
        counts = Counter(record.kind for record in list(self._records))
        return {kind: counts.get(kind, 0) for kind in KINDS}

    async def start(self) -> None:
        """Start listening; afterwards :attr:`base_url` is known."""
        if self._runner is not None:
            raise RuntimeError("the simulator is already started")
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self.batches.register(app)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=5.0,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._requested_port, backlog=1024)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        addresses = runner.addresses
        self._port = int(addresses[0][1]) if addresses else self._requested_port
        self._stopping = False
        self._runner = runner

    async def stop(self) -> None:
        """Stop listening, end hung and sleeping requests, and close every connection."""
        runner = self._runner
        if runner is None:
            return
        self._stopping = True
        for fut in list(self._sleepers):
            _wake(fut)
        try:
            await runner.cleanup()
        finally:
            self._runner = None

    async def __aenter__(self) -> SimServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _sleep(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less if the server stops meanwhile."""
        if delay <= 0 or self._stopping:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        handle = loop.call_later(delay, _wake, fut)
        self._sleepers.add(fut)
        try:
            await fut
        finally:
            handle.cancel()
            self._sleepers.discard(fut)

    # ------------------------------------------------------------------ handlers

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.config.model,
                        "object": "model",
                        "created": 0,
                        "owned_by": "nem-llm-sim",
                    }
                ],
            }
        )

    def _draw_fault(self) -> str:
        u = self._rng.random()
        acc = 0.0
        for kind, rate in self._fault_rates:
            if rate <= 0:
                continue
            acc += rate
            if u < acc:
                return kind
        return "ok"

    def _choose(self, parsed: ParsedRequest) -> tuple[str, float, str]:
        """Return (entity_id, confidence, reason) by the configured policy (the reason of
        an injected error is :data:`_ERROR_REASON`)."""
        allowed = parsed.allowed
        if self.config.policy == "top":
            first = next((a for a in allowed if a != NONE_ID), NONE_ID)
            return first, 0.8, "simulated: first candidate"
        known, gold = lookup_gold(self._gold, parsed.query)
        right = gold if known and gold is not None and gold in allowed else NONE_ID
        rate = self.config.oracle_error_rate
        if self.config.error_profile == "difficulty":
            where = "absent" if right == NONE_ID else "first" if allowed[0] == right else "other"
            rate = min(1.0, rate * DIFFICULTY[where])
        if rate > 0 and self._rng.random() < rate:
            wrong = [a for a in allowed if a != right]
            if NONE_ID not in allowed and right != NONE_ID:
                wrong.append(NONE_ID)
            if wrong:
                return self._rng.choice(wrong), 0.6, _ERROR_REASON
        return right, 0.9, "simulated: gold label" if known else "simulated: unknown query"

    def _names(self, parsed: ParsedRequest, wrong: bool | None = None) -> list[str]:
        """The rewrite call's answer: the gold entity's name or one of its aliases.

        ``[]`` when the gold is null, the query unknown, the policy ``"top"`` or there is no
        catalog; at the oracle's error rate (drawn for every known query, null gold too)
        the name of a random other entity instead. ``wrong``: the error is already drawn
        (the names that come with an adjudication's "none" share its one draw).
        """
        catalog = self._catalog
        if self.config.policy != "oracle" or catalog is None:
            return []
        known, gold = lookup_gold(self._gold, parsed.query)
        if not known:
            return []
        position = catalog.by_id.get(gold) if gold is not None else None
        if wrong is None:
            rate = self.config.oracle_error_rate
            wrong = rate > 0 and self._rng.random() < rate
        if wrong and len(catalog) > 1:
            other = self._rng.randrange(len(catalog) - (position is not None))
            if position is not None and other >= position:
                other += 1
            return [catalog.entities[other].name]
        if position is None:
            return []
        forms = catalog.entities[position].surface_forms()
        # which of its names: the same for the same query in any order of requests (two
        # engines sending the same rows in another order get the same answers)
        pick = random.Random(f"{self.config.seed}:{parsed.query}").randrange(len(forms))
        return [forms[pick]]

    def _answer(self, parsed: ParsedRequest, kind: str, n: int) -> tuple[dict[str, Any], int]:
        if parsed.rewrite:
            names = self._names(parsed)
            text = names_answer_text(names)
            if kind == "invalid":
                text = json.dumps({"names": "simulated: not a list"})
            return self._completion(parsed, kind, n, text)
        entity_id, confidence, reason = self._choose(parsed)
        if kind == "invalid":
            entity_id = _INVALID_ID
            while entity_id in parsed.allowed:
                entity_id += "-x"
            reason = "simulated: invalid id"
        given: list[str] = []
        if parsed.names_too and entity_id == NONE_ID:
            given = self._names(parsed, wrong=reason == _ERROR_REASON)
        text = parsed.answer_text(entity_id, confidence, reason, given)
        if parsed.proposal is not None:  # a discovery request: answered by its own rule
            text = parsed.proposal
        return self._completion(parsed, kind, n, text)

    def _completion(
        self, parsed: ParsedRequest, kind: str, n: int, text: str
    ) -> tuple[dict[str, Any], int]:
        """The chat.completion body carrying ``text`` (cut short when ``malformed``)."""
        if kind == "malformed":
            text = text[: len(text) // 2]  # cut short: never valid JSON
        completion_tokens = math.ceil(len(text) / 4)
        body = chat_completion_body(
            completion_id=f"chatcmpl-sim{n:08d}",
            created=int(time.time()),
            model=self.config.model,
            tool_name=parsed.tool_name,
            call_id=f"call_sim{n:08d}",
            text=text,
            prompt_tokens=parsed.prompt_tokens,
            completion_tokens=completion_tokens,
        )
        return body, completion_tokens

    def _batch_answer(self, body: dict[str, Any], kind: str) -> dict[str, Any]:
        """Answer one Batch API line like the live endpoint (``kind`` "ok" or "invalid")."""
        self._counter += 1
        return self._answer(parse_request(body), kind, self._counter)[0]

    def _rate_limited(self, wait: float, limit: str) -> web.Response:
        wait = max(wait, 0.0)
        used, tokens = self._limiter.used(time.monotonic())
        if limit == "tokens":
            detail = f"tokens per min (TPM): Limit {self.config.tpm:g}, Used {tokens:g}"
        else:
            detail = f"requests per min (RPM): Limit {self.config.rpm:g}, Used {used}"
        message = (
            f"Rate limit reached for {detail} on {self.config.model} (simulated). "
            f"Please try again in {wait:.3f}s."
        )
        return web.json_response(
            error_body(message, limit, "rate_limit_exceeded"),
            status=429,
            headers={
                "Retry-After": str(max(1, math.ceil(wait))),
                "retry-after-ms": str(max(1, math.ceil(wait * 1000))),
            },
        )

    def _fault(self, kind: str) -> web.Response:
        if kind == "fault_429":
            retry = self.config.retry_after
            return web.json_response(
                error_body(
                    f"Rate limit reached for requests on {self.config.model} (simulated fault).",
                    "requests",
                    "rate_limit_exceeded",
                ),
                status=429,
                headers={
                    "Retry-After": _seconds_header(retry),
                    "retry-after-ms": str(max(0, math.ceil(retry * 1000))),
                },
            )
        status = 500 if kind == "fault_500" else 503
        return web.json_response(
            error_body("simulated server error", "server_error", None), status=status
        )

    async def _chat(self, request: web.Request) -> web.Response:
        arrival = time.monotonic()
        self._in_flight += 1
        status = 0
        kind = "ok"
        latency = 0.0
        prompt_tokens = 0
        completion_tokens = 0
        try:
            raw = await request.read()
            try:
                parsed = parse_request(json.loads(raw))
            except (BadRequest, ValueError) as exc:
                kind, status = "bad_request", 400
                return web.json_response(
                    error_body(f"invalid request: {exc}", "invalid_request_error", None),
                    status=400,
                )
            prompt_tokens = parsed.prompt_tokens

            entry, wait, limit = self._limiter.try_acquire(arrival, prompt_tokens)
            if entry is None:
                kind, status = "rate_limited", 429
                return self._rate_limited(wait, limit)

            self._counter += 1
            n = self._counter
            kind = self._draw_fault()
            if kind in ("fault_429", "fault_500", "fault_503"):
                response = self._fault(kind)
                status = response.status
                return response
            if kind == "hang":
                latency = self.config.hang_seconds
                await self._sleep(latency)
                status = 503
                return web.json_response(
                    error_body("simulated hang ended without an answer", "server_error", None),
                    status=503,
                )

            # draw everything for this request now, so the random stream depends only on
            # the order in which requests arrive, not on how their sleeps interleave
            latency = sample_latency(self.config, self._rng)
            body, tokens = self._answer(parsed, kind, n)
            await self._sleep(latency)
            completion_tokens = tokens
            self._limiter.add_tokens(entry, completion_tokens)
            status = 200
            return web.json_response(body)
        finally:
            self._in_flight -= 1
            self._records.append(
                RequestRecord(
                    arrival=arrival,
                    status=status,
                    kind=kind,
                    latency=latency,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                )
            )


# ---------------------------------------------------------------------- running it


@contextlib.contextmanager
def run_simulator(
    config: SimConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    batch: BatchSimConfig | None = None,
) -> Iterator[SimServer]:
    """Run a :class:`SimServer` in a background thread with its own event loop (sync).

    Yields the started server (``base_url`` known); on exit stops it, ends hung requests
    and joins the thread. For sync code, and for benchmarks that want the simulator off the
    client's event loop.

    Example:
        >>> with run_simulator(SimConfig(latency_p50=0.01)) as sim:   # doctest: +SKIP
        ...     client = OpenAI(base_url=sim.base_url, api_key="sim", max_retries=0)
    """
    sim = SimServer(config, host, port, batch=batch)
    started: Future[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = Future()

    async def main() -> None:
        stop = asyncio.Event()
        try:
            await sim.start()
        except BaseException as exc:
            started.set_exception(exc)
            return
        started.set_result((asyncio.get_running_loop(), stop))
        try:
            await stop.wait()
        finally:
            await sim.stop()

    thread = threading.Thread(target=lambda: asyncio.run(main()), name="nem-llm-sim", daemon=True)
    thread.start()
    try:
        loop, stop = started.result()
    except BaseException:
        thread.join()
        raise
    try:
        yield sim
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join()


def serve_forever(
    config: SimConfig,
    host: str = "127.0.0.1",
    port: int = 8089,
    *,
    on_ready: Callable[[SimServer], None] | None = None,
) -> None:
    """Serve the simulator until KeyboardInterrupt or SIGTERM, then stop cleanly (blocking).

    Prints nothing; pass ``on_ready`` to learn the server (e.g. to print ``base_url``) once
    it listens.
    """

    async def main() -> None:
        sim = SimServer(config, host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        for sig in (signal.SIGTERM,):
            try:
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover
                pass
        try:
            async with sim:
                if on_ready is not None:
                    on_ready(sim)
                await stop.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
