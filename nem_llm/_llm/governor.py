"""The governor: every LLM call in nem_llm goes through :meth:`Governor.call`.

Order of operations for one call::

    async for attempt in AsyncRetrying(...):      # tenacity: transient errors only,
        with attempt:                             # full-jitter backoff, Retry-After honoured
            check budget                          # spent + in flight >= budget -> stop
            wait for cooldown                     # a 429 pauses dispatch for every caller
            async with semaphore:                 # held until the response has arrived
                await rpm.acquire()               # scheduled starts, no initial burst
                await tpm.acquire(estimate)       # token bucket, reconciled with usage
                result = await asyncio.wait_for(fn(), timeout)

Backoff sleeps happen outside the semaphore and the limiters. The openai client's own
retries must be off (``max_retries=0``) and instructor re-asks only on invalid answers, so
this is the one retry layer.

Rate limiter burst behaviour: ``rpm`` uses :class:`RequestPacer`: consecutive requests are
scheduled ``60 / rpm`` seconds apart (no initial burst), a late wake-up does not shift the
schedule (so the rate holds under load), and a sliding window of the last ``rpm`` start
times makes sure no 60 s window ever holds more than ``rpm`` starts (a one-request
``aiolimiter`` bucket ran 0.7-7% under the rate here; see :class:`RequestPacer`). ``tpm``
uses :class:`TokenBucket`, ``aiolimiter``'s leaky bucket with a burst of 2 s of tokens and
a leak rate lowered by that burst, for the same guarantee in tokens.

Time comes from the running loop, so a fake loop clock (looptime in the tests) drives both.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import httpx
import openai
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from ..config import Limits, price_for
from ..errors import BudgetExceededError, LLMError, http_error_code
from ..models import Attempt, Usage

__all__ = ["Governed", "Governor", "RequestPacer", "TokenBucket", "classify_error"]

T = TypeVar("T")

_TRANSIENT_STATUS = frozenset({408, 409, 429})
_MAX_RETRY_AFTER = 600.0


class RequestPacer:
    """Starts requests on a fixed schedule: ``rpm`` a minute under load, never more in 60 s.

    Two rules decide when a request may start:

    1. **Scheduled starts.** Request ``k`` of a busy stretch is due at
       ``anchor + k * 60 / rpm``. A waiter that wakes late (a real loop wakes timers a
       little after their time, more so when busy) does not push the schedule back: the next
       request is still due at its own slot, so wake-up lateness never accumulates. A leaky
       bucket of one request (``aiolimiter.AsyncLimiter(1, 60 / rpm)``, used before) counts
       each period from the late start instead and so runs under the rate by the mean
       lateness per period (0.7% at 600 rpm, 7% at 6000 rpm on this 2-core machine).
       When a request arrives with nobody queued more than one period after its slot, the
       schedule restarts at now (no burst after an idle spell).
    2. **A sliding 60 s window.** The actual start times of the last ``rpm`` requests are
       kept; a request never starts before the oldest of them plus 60 s. So however late
       or early the loop wakes, no 60 s window ``[t, t + 60)`` holds more than ``rpm``
       starts. Under a fake clock rule 1 alone already satisfies this; on a real clock the
       window delays a request only after an earlier one was late.

    Waiters are served first come, first served (an ``asyncio.Lock``); a waiter cancelled
    before its start consumes no slot. Time comes from the running loop.
    """

    # times closer than this are the same instant: a sleep this short may not advance a
    # fake clock at all (and would spin), and no server can tell it apart
    _EPSILON = 1e-9

    def __init__(
        self,
        rpm: float,
        *,
        window: float = 60.0,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        if rpm <= 0:
            raise ValueError("rpm must be positive")
        self.rpm = float(rpm)
        self.window = float(window)
        self.period = self.window / self.rpm
        self._anchor = 0.0  # the slot of request 0 of the current busy stretch
        self._k = 0  # the index of the next request in that stretch
        self._started: deque[float] = deque(maxlen=max(int(self.rpm), 1))
        self._lock = asyncio.Lock()
        self._sleep = sleep or asyncio.sleep  # tests pass one that wakes late

    def _slot(self, now: float, queued: bool) -> float:
        slot = self._anchor + self._k * self.period
        # a request that queued behind others keeps the schedule even when the one before
        # it woke late (it catches up); one that found nobody waiting and a slot more than a
        # period gone is new demand after an idle spell: the schedule restarts now
        if self._k == 0 or (not queued and now - slot > self.period):
            self._anchor, self._k = now, 0
            return now
        return slot

    async def acquire(self) -> None:
        """Wait until this request may start, then record its start."""
        loop = asyncio.get_running_loop()
        queued = self._lock.locked()
        async with self._lock:
            slot = self._slot(loop.time(), queued)
            while True:
                due = slot
                if len(self._started) == self._started.maxlen:
                    due = max(due, self._started[0] + self.window)
                delay = due - loop.time()
                if delay <= self._EPSILON:
                    break
                await self._sleep(delay)
            self._started.append(max(loop.time(), due))
            self._k += 1


class TokenBucket:
    """Tokens per minute on ``aiolimiter``'s leaky bucket: never more than ``tpm`` in 60 s.

    An :class:`aiolimiter.AsyncLimiter` of capacity ``burst`` tokens that leaks
    ``(tpm - burst) / 60`` tokens a second, so the tokens admitted in any 60 s window are at
    most ``burst + (tpm - burst) = tpm`` (aiolimiter's own ``AsyncLimiter(tpm, 60)`` would
    let a full ``tpm`` burst start on top of a minute's rate). Two things aiolimiter does
    not do are added here:

    - **first come, first served**: aiolimiter wakes the *smallest* waiting amount first,
      so a long prompt could wait behind a stream of short ones; one waiter at a time
      (an ``asyncio.Lock``) keeps arrival order;
    - **requests larger than the burst, and reconciliation**: a request waits for room for
      ``min(tokens, burst)`` and is then charged in full (later requests wait until it
      has drained); :meth:`reconcile` replaces an estimate with the actual usage (credit
      or debit) once the response says it. Both adjust the bucket's level.

    Time comes from the running loop (aiolimiter reads ``loop.time()``), so a fake loop
    clock drives it.
    """

    def __init__(self, tpm: float, *, burst: float | None = None) -> None:
        self.tpm = float(tpm)
        self.capacity = float(burst) if burst is not None else max(self.tpm / 30.0, 1.0)
        if not 0 < self.capacity < self.tpm:
            raise ValueError("burst must be between 0 and tpm")
        self.rate = (self.tpm - self.capacity) / 60.0
        self._limiter = AsyncLimiter(self.capacity, self.capacity / self.rate)
        self._lock = asyncio.Lock()

    async def acquire(self, tokens: float) -> float:
        """Wait until ``tokens`` fit (or the bucket is empty); returns the amount charged."""
        amount = float(tokens)
        # charging only the capacity would let concurrent large requests through every
        # burst / rate seconds, far above tpm, until their usage is reconciled
        fit = min(amount, self.capacity)
        async with self._lock:  # FIFO: asyncio.Lock wakes waiters in arrival order
            await self._limiter.acquire(fit)
            self._adjust(amount - fit)
        return amount

    def reconcile(self, charged: float, actual: float) -> None:
        """Replace a charged estimate with the actual tokens (credit or debit)."""
        self._adjust(float(actual) - charged)

    def _adjust(self, delta: float) -> None:
        """Move the bucket's level by ``delta`` tokens (aiolimiter keeps it in ``_level``)."""
        if delta:
            limiter = self._limiter
            limiter._leak()
            limiter._level = max(0.0, limiter._level + delta)
            limiter._wake_next()


@dataclass(frozen=True)
class ErrorInfo:
    """How the governor classifies one exception."""

    transient: bool
    cause: str
    status_code: int | None = None
    retry_after: float | None = None


def _retry_after(headers: httpx.Headers | None) -> float | None:
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return min(float(ms) / 1000.0, _MAX_RETRY_AFTER)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return min(float(value), _MAX_RETRY_AFTER)
    except ValueError:
        pass
    try:  # an HTTP date; a malformed one means "no hint", not a failed call
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(parsed.timestamp() - time.time(), 0.0), _MAX_RETRY_AFTER)


def _unreachable(exc: BaseException) -> bool:
    """Whether a timeout is really a connection that never opened (a dead endpoint)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, httpx.ConnectTimeout | httpx.ConnectError | ConnectionError):
            return True
        if type(cur).__name__ in ("ClientConnectorError", "ServerDisconnectedError"):
            return True  # aiohttp's, under openai's aiohttp transport
        cur = cur.__cause__ or cur.__context__
    return False


def classify_error(exc: BaseException) -> ErrorInfo:
    """Transient (429, 408, 409, 5xx, timeouts, connection errors) or final, and why.

    The cause is one of :data:`nem_llm.errors.ERROR_TYPES`; a connection that never opened
    is ``"connection"`` even where the transport reports it as a connect timeout.
    """
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        transient = status in _TRANSIENT_STATUS or status >= 500
        ra = _retry_after(exc.response.headers) if transient else None
        return ErrorInfo(transient, http_error_code(status), status, ra)
    if isinstance(exc, openai.APITimeoutError | httpx.TimeoutException | TimeoutError):
        return ErrorInfo(True, "connection" if _unreachable(exc) else "timeout")
    if isinstance(exc, openai.APIConnectionError | httpx.TransportError | ConnectionError):
        return ErrorInfo(True, "connection")
    if isinstance(exc, LLMError):
        return ErrorInfo(False, exc.cause)
    return ErrorInfo(False, "internal")


@dataclass
class Governed(Generic[T]):
    """A successful governed call: the value, the attempt log and the tokens of all tries."""

    value: T
    attempts: list[Attempt]
    usage: Usage


@dataclass
class GovernorStats:
    """Running totals since the governor was made (the CLI's live counters)."""

    calls: int = 0
    attempts: int = 0
    failures: int = 0
    retries_by_cause: Counter[str] = field(default_factory=Counter)
    rate_limited: int = 0
    usage: Usage = field(default_factory=Usage)
    in_flight: int = 0


def _exc_usage(exc: BaseException) -> Usage:
    usage = getattr(exc, "usage", None) or getattr(exc, "nem_llm_usage", None)
    return usage if isinstance(usage, Usage) else Usage()


class Governor:
    """The one place LLM calls are admitted, paced, retried and paid for.

    Args:
        limits: concurrency, rates, timeout, retries, budget.
        model: the model name (for list prices when ``limits`` sets none).
        rng: random source for backoff jitter (seed it in tests).
        sleep: the sleep used between retries (tenacity's hook; a fake in tests).
    """

    def __init__(
        self,
        limits: Limits,
        *,
        model: str = "",
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self.limits = limits
        list_in, list_out = price_for(model)
        self.prices = (
            limits.input_usd_per_mtok if limits.input_usd_per_mtok is not None else list_in,
            limits.output_usd_per_mtok if limits.output_usd_per_mtok is not None else list_out,
        )
        self._sem = asyncio.Semaphore(limits.concurrency)
        self._rpm = RequestPacer(limits.rpm) if limits.rpm else None
        self._tpm = TokenBucket(limits.tpm) if limits.tpm else None
        self._rng = rng or random.Random()
        self._sleep = sleep or asyncio.sleep
        self._cooldown_until = 0.0
        self._reserved_tokens = 0
        self._reserved_usd = 0.0
        self.budget_exhausted = False
        self.stats = GovernorStats()

    # -- budget ------------------------------------------------------------------------

    def _budget_left(self) -> bool:
        lim, used = self.limits, self.stats.usage
        if lim.budget_tokens is not None and (
            used.total_tokens + self._reserved_tokens >= lim.budget_tokens
        ):
            return False
        return not (
            lim.budget_usd is not None and used.cost_usd + self._reserved_usd >= lim.budget_usd
        )

    def _estimate_usd(self, tokens: int) -> float:
        return tokens * self.prices[0] / 1_000_000

    # -- retry policy ------------------------------------------------------------------

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        info = classify_error(exc) if exc is not None else None
        if info is not None and info.retry_after is not None:
            return info.retry_after
        # full jitter: uniform(0, min(max, initial * 2**(n-1)))
        cap = min(
            self.limits.backoff_max, self.limits.backoff_initial * 2 ** (state.attempt_number - 1)
        )
        return self._rng.uniform(0.0, cap)

    async def _wait_cooldown(self) -> float:
        loop = asyncio.get_running_loop()
        waited = 0.0
        while (delay := self._cooldown_until - loop.time()) > 0:
            waited += delay
            await asyncio.sleep(delay)
        return waited

    def _start_cooldown(self, seconds: float) -> None:
        until = asyncio.get_running_loop().time() + seconds
        self._cooldown_until = max(self._cooldown_until, until)

    async def pace_async(self) -> None:
        """Wait as a new request must: the cooldown, then the RPM limiter.

        For requests made inside a governed call (instructor's re-asks): they already hold
        the call's slot, and their tokens are reconciled with the call's usage.
        """
        await self._wait_cooldown()
        if self._rpm is not None:
            await self._rpm.acquire()

    # -- the call ----------------------------------------------------------------------

    async def call_async(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        estimated_tokens: int,
        usage_of: Callable[[T], Usage],
    ) -> Governed[T]:
        """Run ``fn`` under the limits, retrying transient failures.

        Args:
            fn: makes one attempt (a fresh coroutine per call).
            estimated_tokens: prompt + completion estimate, for the TPM limiter and budget.
            usage_of: reads the tokens an answer cost.

        Raises:
            BudgetExceededError: the budget was spent before this call could start.
            LLMError: a final failure (non-transient, or attempts exhausted); ``attempts``
                and ``usage`` are attached. ``asyncio.CancelledError`` propagates.
        """
        loop = asyncio.get_running_loop()
        attempts: list[Attempt] = []
        total = Usage()
        next_wait = 0.0
        self.stats.calls += 1

        def before_sleep(state: RetryCallState) -> None:
            nonlocal next_wait
            next_wait = state.upcoming_sleep

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.limits.max_attempts),
            wait=self._wait,
            retry=retry_if_exception(lambda e: classify_error(e).transient),
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    number = attempt.retry_state.attempt_number
                    waited, next_wait = next_wait, 0.0
                    if not self._budget_left():
                        self.budget_exhausted = True
                        raise BudgetExceededError("budget spent: no new LLM calls", cause="budget")
                    waited += await self._wait_cooldown()
                    est_usd = self._estimate_usd(estimated_tokens)
                    self._reserved_tokens += estimated_tokens
                    self._reserved_usd += est_usd
                    charged = 0.0
                    started = loop.time()
                    try:
                        async with self._sem:
                            if self._rpm is not None:
                                await self._rpm.acquire()
                            if self._tpm is not None:
                                charged = await self._tpm.acquire(estimated_tokens)
                            waited += await self._wait_cooldown()  # a 429 may have landed meanwhile
                            started = loop.time()
                            self.stats.attempts += 1
                            self.stats.in_flight += 1
                            try:
                                async with asyncio.timeout(self.limits.timeout):
                                    value = await fn()
                            finally:
                                self.stats.in_flight -= 1
                    except BaseException as exc:
                        usage = _exc_usage(exc)
                        self._settle(usage, charged)
                        total += usage
                        failed = self._failed_attempt(number, exc, started, waited, usage)
                        failed.reasks = getattr(exc, "reasks", 0)
                        attempts.append(failed)
                        raise
                    finally:
                        self._reserved_tokens -= estimated_tokens
                        self._reserved_usd -= est_usd
                    usage = usage_of(value)
                    self._settle(usage, charged)
                    total += usage
                    attempts.append(
                        Attempt(
                            number=number,
                            outcome="ok",
                            latency_s=loop.time() - started,
                            waited_s=waited,
                            usage=usage,
                        )
                    )
                    return Governed(value, attempts, total)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.stats.failures += 1
            raise self._final_error(exc, attempts, total) from exc
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    def _settle(self, usage: Usage, charged: float) -> None:
        self.stats.usage += usage
        if self._tpm is not None and charged:
            self._tpm.reconcile(charged, usage.total_tokens)

    def _failed_attempt(
        self, number: int, exc: BaseException, started: float, waited: float, usage: Usage
    ) -> Attempt:
        latency = asyncio.get_running_loop().time() - started
        if isinstance(exc, asyncio.CancelledError):
            return Attempt(number=number, outcome="cancelled", latency_s=latency, usage=usage)
        info = classify_error(exc)
        if info.transient:
            will_retry = number < self.limits.max_attempts
            if will_retry:
                self.stats.retries_by_cause[info.cause] += 1
            if info.status_code == 429:
                self.stats.rate_limited += 1
                # pause dispatch for every caller, not only this one
                self._start_cooldown(info.retry_after if info.retry_after is not None else 1.0)
        else:
            will_retry = False
        return Attempt(
            number=number,
            outcome="retry" if will_retry else "failed",
            error_type=info.cause,
            error=_short(str(exc)),
            status_code=info.status_code,
            latency_s=latency,
            waited_s=waited,
            usage=usage,
        )

    def _final_error(self, exc: BaseException, attempts: list[Attempt], usage: Usage) -> LLMError:
        if isinstance(exc, LLMError):
            err = exc
        else:
            info = classify_error(exc)
            n = len(attempts)
            err = LLMError(
                f"{info.cause}: {_short(str(exc)) or type(exc).__name__} "
                f"(after {n} attempt{'s' if n != 1 else ''})",
                cause=info.cause,
            )
        err.attempts = attempts
        err.usage = usage
        return err


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
