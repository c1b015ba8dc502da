"""The governor: rate limits, the concurrency slot, retries, cooldown and the budget.

Every test drives :class:`nem_llm._llm.governor.Governor` with fake async ``fn`` callables that
raise real ``openai`` exceptions, on looptime's virtual clock: ``asyncio.sleep`` and
``loop.time()`` are virtual, so waits of minutes take no real time and times are exact.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from nem_llm import Limits, Matcher
from nem_llm._llm.governor import Governed, Governor, RequestPacer, TokenBucket, classify_error
from nem_llm.errors import AdjudicationError, BudgetExceededError, LLMError, http_error_code
from nem_llm.models import Usage
from nem_llm.testing import FakeEmbedder, FakeLLM

pytestmark = [pytest.mark.timeout(10), pytest.mark.usefixtures("no_loop_errors")]

REQUEST = httpx.Request("POST", "http://x/v1/chat/completions")
STATUS_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
    500: openai.InternalServerError,
    503: openai.InternalServerError,
}


def http_error(status: int, headers: dict[str, str] | None = None) -> openai.APIStatusError:
    """The exception the openai client raises for an HTTP ``status`` answer."""
    response = httpx.Response(status, headers=headers or {}, request=REQUEST)
    cls = STATUS_ERRORS.get(status, openai.APIStatusError)  # 408, 409: the base class
    return cls(f"status {status}", response=response, body=None)


def rate_limited(**headers: str) -> openai.RateLimitError:
    error = http_error(429, {k.replace("_", "-"): v for k, v in headers.items()})
    assert isinstance(error, openai.RateLimitError)
    return error


@dataclass
class Reply:
    """A fake LLM answer and the tokens it cost."""

    usage: Usage


def usage_of(reply: Reply) -> Usage:
    return reply.usage


def tokens(n: int) -> Usage:
    return Usage(prompt_tokens=n, total_tokens=n)


class Script:
    """An async ``fn`` whose n-th call raises or returns the n-th outcome (the last repeats).

    Records the loop time at which each call started, and how many calls are running.
    """

    def __init__(self, *outcomes: BaseException | Reply, duration: float = 0.0) -> None:
        self.outcomes = outcomes or (Reply(Usage()),)
        self.duration = duration
        self.starts: list[float] = []
        self.running = 0

    @property
    def calls(self) -> int:
        return len(self.starts)

    async def __call__(self) -> Reply:
        outcome = self.outcomes[min(self.calls, len(self.outcomes) - 1)]
        self.starts.append(asyncio.get_running_loop().time())
        self.running += 1
        try:
            if self.duration:
                await asyncio.sleep(self.duration)
        finally:
            self.running -= 1
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


async def call(governor: Governor, fn: Callable[[], Any], estimate: int = 1) -> Governed[Reply]:
    result: Governed[Reply] = await governor.call_async(
        fn, estimated_tokens=estimate, usage_of=usage_of
    )
    return result


TICK = 1e-6  # looptime's clock resolution: times closer than this are the same instant


def max_in_window(events: Sequence[tuple[float, float]], width: float = 60.0) -> float:
    """The largest total weight of events whose times fall in one window ``[t, t + width)``.

    A window holding the most weight can always be slid right until it starts at an event,
    so checking the windows that start at each event is enough.
    """
    ordered = sorted(events)
    return max(
        sum(w for t, w in ordered if start <= t < start + width - TICK) for start, _ in ordered
    )


def test_max_in_window_counts_half_open_windows() -> None:
    assert max_in_window([(0.0, 1), (30.0, 1), (60.0, 1)]) == 2
    assert max_in_window([(0.0, 1), (59.999, 1), (60.0, 1)]) == 2
    assert max_in_window([(0.0, 1), (60.0 - 1e-12, 1)]) == 1  # float noise: the same instant
    assert max_in_window([(0.0, 5), (10.0, 7), (80.0, 1)]) == 12


# -- requests per minute ---------------------------------------------------------------


@pytest.mark.looptime
@pytest.mark.parametrize("rpm", [7, 60, 500])
async def test_rpm_is_never_exceeded_in_any_60s_window(rpm: int) -> None:
    governor = Governor(Limits(rpm=rpm, concurrency=64))
    fn = Script(duration=0.3)

    await asyncio.gather(*(call(governor, fn) for _ in range(2 * rpm + 1)))

    assert fn.calls == 2 * rpm + 1
    assert max_in_window([(t, 1) for t in fn.starts]) == rpm


@pytest.mark.looptime
async def test_fresh_rpm_limiter_does_not_burst() -> None:
    governor = Governor(Limits(rpm=60, concurrency=100))
    fn = Script()

    await asyncio.gather(*(call(governor, fn) for _ in range(61)))

    assert fn.starts[0] == 0.0
    assert fn.starts[60] >= 60.0
    gaps = [b - a for a, b in zip(fn.starts, fn.starts[1:], strict=False)]
    assert min(gaps) >= 1.0 - 1e-9


@pytest.mark.looptime
@pytest.mark.timeout(5)
async def test_rpm_pacing_terminates_on_a_fake_clock() -> None:
    # slots 60 / 500 s apart leave float residue (a wait of ~1e-16 s rounds to "now"): a
    # clock that only moves when the loop idles would never move again if the pacer slept it
    governor = Governor(Limits(rpm=500, concurrency=8))
    fn = Script(duration=0.3)

    await asyncio.gather(*(call(governor, fn) for _ in range(20)))

    assert fn.calls == 20
    assert fn.starts[-1] == pytest.approx(19 * 60 / 500)


class LateSleep:
    """A sleep that wakes up to ``max_late`` seconds after its time, as a busy real loop does."""

    def __init__(self, max_late: float, seed: int = 0) -> None:
        self.max_late = max_late
        self.rng = random.Random(seed)

    async def __call__(self, delay: float) -> None:
        await asyncio.sleep(delay + self.rng.uniform(0.0, self.max_late))


async def paced_starts(pacer: RequestPacer, seconds: float, demand: int) -> list[float]:
    """Start times granted by ``pacer`` to ``demand`` waiting requests over ``seconds``."""
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def request() -> None:
        await pacer.acquire()
        starts.append(loop.time())

    tasks = [asyncio.create_task(request()) for _ in range(demand)]
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return starts


@pytest.mark.looptime
@pytest.mark.parametrize("rpm", [60, 600, 1000])
async def test_pacer_holds_the_rate_within_one_percent_over_five_minutes(rpm: int) -> None:
    period = 60 / rpm
    pacer = RequestPacer(rpm, sleep=LateSleep(max_late=0.8 * period))

    starts = await paced_starts(pacer, 300.0, demand=5 * rpm + 10)

    assert 5 * rpm * 0.99 <= len([t for t in starts if t < 300.0]) <= 5 * rpm


@pytest.mark.looptime
@pytest.mark.parametrize("late_periods", [0.0, 0.8, 3.0])
async def test_pacer_never_exceeds_rpm_in_any_60s_window_even_waking_late(
    late_periods: float,
) -> None:
    rpm = 120
    pacer = RequestPacer(rpm, sleep=LateSleep(max_late=late_periods * 60 / rpm, seed=7))

    starts = await paced_starts(pacer, 300.0, demand=5 * rpm + 10)

    assert max_in_window([(t, 1) for t in starts]) <= rpm


@pytest.mark.looptime
async def test_pacer_restarts_its_schedule_after_an_idle_spell() -> None:
    loop = asyncio.get_running_loop()
    pacer = RequestPacer(60)
    await pacer.acquire()
    await asyncio.sleep(100.0)

    await pacer.acquire()  # nobody queued: starts at once, no catch-up burst after it
    await pacer.acquire()

    assert loop.time() == pytest.approx(101.0)


@pytest.mark.looptime
async def test_cancelled_pacer_waiter_consumes_no_slot() -> None:
    loop = asyncio.get_running_loop()
    pacer = RequestPacer(60)
    await pacer.acquire()
    waiter = asyncio.create_task(pacer.acquire())
    await asyncio.sleep(0.5)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)

    await pacer.acquire()

    assert loop.time() == pytest.approx(1.0)


# -- tokens per minute -----------------------------------------------------------------


@pytest.mark.looptime
async def test_tpm_tokens_admitted_in_any_60s_window_stay_within_tpm() -> None:
    governor = Governor(Limits(tpm=6000, concurrency=16))
    fn = Script(Reply(tokens(50)), duration=0.5)

    await asyncio.gather(*(call(governor, fn, estimate=50) for _ in range(300)))

    admitted = [(t, 50) for t in fn.starts]
    assert max_in_window(admitted) <= 6000
    assert sum(w for t, w in admitted if t == 0.0) <= 6000 / 30  # the burst: 2 s of tokens


@pytest.mark.looptime
async def test_tpm_reconcile_charges_actual_usage_and_delays_later_calls() -> None:
    tpm = 6000
    bucket_rate = (tpm - tpm / 30) / 60  # tokens per second the bucket drains
    governor = Governor(Limits(tpm=tpm, concurrency=1))
    fn = Script(Reply(tokens(200)))  # estimated 10, costs 200

    for _ in range(2):
        await call(governor, fn, estimate=10)

    # the first call's 200 actual tokens fill the 200-token burst: the second waits for
    # room for its own estimate of 10
    assert fn.starts[1] == pytest.approx(10 / bucket_rate, abs=1e-5)


@pytest.mark.looptime
async def test_tpm_window_bound_holds_for_actual_usage_above_estimates() -> None:
    governor = Governor(Limits(tpm=3000, concurrency=1))
    fn = Script(Reply(tokens(90)))  # estimated 30, costs 90

    for _ in range(120):
        await call(governor, fn, estimate=30)

    assert max_in_window([(t, 90) for t in fn.starts]) <= 3000


@pytest.mark.looptime
async def test_tpm_request_larger_than_the_burst_is_charged_in_full() -> None:
    # tpm=3000 has a 100-token burst; each request is estimated at 1000 and takes 20 s, so
    # no reconcile comes in time: admission alone must hold concurrent requests to 3000
    # estimated tokens a minute (charging only the burst let 8 start in 15 s)
    governor = Governor(Limits(tpm=3000, concurrency=16))
    fn = Script(Reply(tokens(1000)), duration=20.0)

    await asyncio.gather(*(call(governor, fn, estimate=1000) for _ in range(8)))

    assert max_in_window([(t, 1000) for t in fn.starts]) <= 3000


@pytest.mark.looptime
async def test_token_bucket_serves_waiters_first_come_first_served() -> None:
    bucket = TokenBucket(3000)  # 100-token burst
    order: list[int] = []

    async def take(n: int, amount: float) -> None:
        await bucket.acquire(amount)
        order.append(n)

    await bucket.acquire(100)
    await asyncio.gather(take(0, 80), take(1, 10), take(2, 80))

    assert order == [0, 1, 2]


def test_token_bucket_rejects_a_burst_outside_zero_and_tpm() -> None:
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(100, burst=100)


# -- the concurrency slot --------------------------------------------------------------


@pytest.mark.looptime
async def test_at_most_concurrency_calls_run_at_once() -> None:
    governor = Governor(Limits(concurrency=3))
    release = asyncio.Event()
    running = peak = 0

    async def fn() -> Reply:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await release.wait()
        finally:
            running -= 1
        return Reply(Usage())

    calls = asyncio.gather(*(call(governor, fn) for _ in range(10)))
    await asyncio.sleep(5)
    assert running == 3
    release.set()
    await calls

    assert peak == 3


@pytest.mark.looptime
async def test_slot_is_held_until_the_response_has_arrived() -> None:
    governor = Governor(Limits(concurrency=1))
    response = asyncio.Event()
    started: list[str] = []

    async def slow() -> Reply:
        started.append("a")
        await response.wait()
        return Reply(Usage())

    async def fast() -> Reply:
        started.append("b")
        return Reply(Usage())

    a = asyncio.create_task(call(governor, slow))
    b = asyncio.create_task(call(governor, fast))
    await asyncio.sleep(20)  # under the 30 s attempt timeout
    assert started == ["a"]

    response.set()
    await asyncio.gather(a, b)
    assert started == ["a", "b"]


@pytest.mark.looptime
async def test_backoff_sleep_does_not_hold_the_slot() -> None:
    governor = Governor(Limits(concurrency=1))
    a = Script(http_error(503, {"retry-after": "5"}), Reply(Usage()))
    b = Script()

    await asyncio.gather(call(governor, a), call(governor, b))

    assert a.starts == [0.0, 5.0]
    assert b.starts == [0.0]  # ran while a was backing off


# -- backoff ---------------------------------------------------------------------------


@pytest.mark.looptime
async def test_backoff_is_full_jitter_and_each_wait_is_recorded_on_the_next_attempt() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await asyncio.sleep(seconds)

    limits = Limits(backoff_initial=0.5, backoff_max=30.0)
    governor = Governor(limits, rng=random.Random(0), sleep=sleep)
    fn = Script(http_error(500), http_error(500), Reply(Usage()))
    loop = asyncio.get_running_loop()

    governed = await call(governor, fn)

    same_seed = random.Random(0)
    expected = [same_seed.uniform(0, 0.5), same_seed.uniform(0, 1.0)]  # caps 0.5 * 2**(n-1)
    assert [a.outcome for a in governed.attempts] == ["retry", "retry", "ok"]
    assert slept == expected
    assert [a.waited_s for a in governed.attempts] == [0.0, *expected]
    assert fn.starts[2] == pytest.approx(sum(expected), abs=1e-5)
    assert loop.time() == pytest.approx(sum(expected), abs=1e-5)


@pytest.mark.looptime
async def test_backoff_waits_stay_under_the_full_jitter_caps() -> None:
    limits = Limits(backoff_initial=1.0, backoff_max=4.0, max_attempts=6)
    governor = Governor(limits, rng=random.Random(7))

    with pytest.raises(LLMError) as caught:
        await call(governor, Script(http_error(500)))

    waits = [a.waited_s for a in caught.value.attempts[1:]]
    caps = [1.0, 2.0, 4.0, 4.0, 4.0]  # min(backoff_max, initial * 2**(n-1))
    assert len(waits) == 5
    assert all(0.0 <= w <= cap for w, cap in zip(waits, caps, strict=True))


@pytest.mark.looptime
async def test_retry_after_seconds_sets_the_wait_before_the_next_attempt() -> None:
    governor = Governor(Limits(), rng=random.Random(0))
    fn = Script(rate_limited(retry_after="7"), Reply(Usage()))

    governed = await call(governor, fn)

    assert fn.starts == [0.0, 7.0]
    assert governed.attempts[1].waited_s == 7.0


@pytest.mark.looptime
async def test_retry_after_ms_sets_the_wait_before_the_next_attempt() -> None:
    governor = Governor(Limits(), rng=random.Random(0))
    fn = Script(rate_limited(retry_after_ms="1500", retry_after="9"), Reply(Usage()))

    await call(governor, fn)

    assert fn.starts == [0.0, 1.5]


@pytest.mark.looptime
async def test_malformed_retry_after_ms_falls_back_to_retry_after() -> None:
    governor = Governor(Limits(), rng=random.Random(0))
    fn = Script(rate_limited(retry_after_ms="soon", retry_after="3"), Reply(Usage()))

    await call(governor, fn)

    assert fn.starts == [0.0, 3.0]


@pytest.mark.looptime
async def test_retry_after_http_date_sets_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("nem_llm._llm.governor.time.time", lambda: 1_700_000_000.0)
    governor = Governor(Limits(), rng=random.Random(0))
    # 1_700_000_000 is Tue, 14 Nov 2023 22:13:20 GMT
    fn = Script(rate_limited(retry_after="Tue, 14 Nov 2023 22:13:32 GMT"), Reply(Usage()))

    await call(governor, fn)

    assert fn.starts == [0.0, 12.0]


@pytest.mark.looptime
async def test_malformed_retry_after_falls_back_to_backoff() -> None:
    governor = Governor(Limits(backoff_initial=0.5), rng=random.Random(0))
    fn = Script(rate_limited(retry_after="soon"), Reply(Usage()))

    governed = await call(governor, fn)

    assert [a.outcome for a in governed.attempts] == ["retry", "ok"]
    # no usable hint: a jittered backoff (0.42 s with this seed), then the rest of the 1 s
    # cooldown every 429 starts
    assert fn.starts == [0.0, 1.0]


# -- what is retried -------------------------------------------------------------------


@pytest.mark.looptime
@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_client_errors_are_not_retried(status: int) -> None:
    governor = Governor(Limits(max_attempts=5))
    error = http_error(status)
    fn = Script(error)

    with pytest.raises(LLMError) as caught:
        await call(governor, fn)

    assert fn.calls == 1
    assert caught.value.cause == http_error_code(status)
    assert caught.value.__cause__ is error
    assert [(a.outcome, a.status_code) for a in caught.value.attempts] == [("failed", status)]
    assert not isinstance(caught.value, BudgetExceededError)


TRANSIENT: dict[str, tuple[Callable[[], BaseException], str]] = {
    "429": (lambda: http_error(429), "rate_limit"),
    "408": (lambda: http_error(408), "timeout"),
    "409": (lambda: http_error(409), "bad_request"),
    "500": (lambda: http_error(500), "server"),
    "503": (lambda: http_error(503), "server"),
    "api-timeout": (lambda: openai.APITimeoutError(request=REQUEST), "timeout"),
    "connection": (lambda: openai.APIConnectionError(request=REQUEST), "connection"),
}


@pytest.mark.looptime
@pytest.mark.parametrize("name", list(TRANSIENT))
async def test_transient_errors_are_retried(name: str) -> None:
    make_error, cause = TRANSIENT[name]
    governor = Governor(Limits(), rng=random.Random(0))
    fn = Script(make_error(), Reply(Usage()))

    governed = await call(governor, fn)

    assert fn.calls == 2
    outcomes = [(a.outcome, a.error_type) for a in governed.attempts]
    assert outcomes == [("retry", cause), ("ok", None)]
    assert governor.stats.retries_by_cause == {cause: 1}


@pytest.mark.looptime
async def test_an_attempt_longer_than_the_timeout_is_cut_and_retried() -> None:
    governor = Governor(Limits(timeout=2.0), rng=random.Random(0))
    durations = iter([10.0, 0.5])
    finished: list[float] = []

    async def fn() -> Reply:
        duration = next(durations)
        await asyncio.sleep(duration)
        finished.append(duration)
        return Reply(Usage())

    governed = await call(governor, fn)

    assert finished == [0.5]
    first, second = governed.attempts
    assert (first.outcome, first.error_type, first.latency_s) == ("retry", "timeout", 2.0)
    assert (second.outcome, second.latency_s) == ("ok", 0.5)


@pytest.mark.looptime
async def test_gives_up_after_max_attempts_with_every_attempt_attached() -> None:
    governor = Governor(Limits(max_attempts=3), rng=random.Random(0))
    fn = Script(http_error(503))

    with pytest.raises(LLMError) as caught:
        await call(governor, fn)

    assert fn.calls == 3
    assert caught.value.cause == "server"
    assert "after 3 attempts" in str(caught.value)
    assert [a.outcome for a in caught.value.attempts] == ["retry", "retry", "failed"]
    assert [a.number for a in caught.value.attempts] == [1, 2, 3]
    assert governor.stats.failures == 1


def test_classify_error_sorts_final_from_transient() -> None:
    assert classify_error(http_error(400)).transient is False
    assert classify_error(http_error(502)).transient is True
    assert classify_error(TimeoutError()).cause == "timeout"
    assert classify_error(ValueError("bug")) == classify_error(ValueError("other bug"))
    assert classify_error(ValueError("bug")).transient is False


# -- the cooldown after a 429 ----------------------------------------------------------


@pytest.mark.looptime
async def test_429_with_retry_after_pauses_dispatch_for_every_caller() -> None:
    governor = Governor(Limits(concurrency=8))
    limited = Script(rate_limited(retry_after="7"), Reply(Usage()))
    others = Script()

    async def later() -> None:
        await asyncio.sleep(1.0)  # after the 429 landed
        await call(governor, others)

    await asyncio.gather(call(governor, limited), later(), later(), later())

    assert limited.starts == [0.0, 7.0]
    assert others.starts == [7.0, 7.0, 7.0]
    assert governor.stats.rate_limited == 1


@pytest.mark.looptime
async def test_cooldown_is_checked_again_after_waiting_for_a_slot() -> None:
    governor = Governor(Limits(concurrency=1))
    limited = Script(rate_limited(retry_after="7"), Reply(Usage()), duration=2.0)
    waiting = Script()

    # `waiting` queues for the slot at t=0; the 429 lands at t=2, when the slot frees
    await asyncio.gather(call(governor, limited), call(governor, waiting))

    assert waiting.starts[0] >= 9.0


# -- usage and the budget --------------------------------------------------------------


@pytest.mark.looptime
async def test_usage_is_counted_per_attempt_including_failed_ones() -> None:
    governor = Governor(Limits(), rng=random.Random(0))
    failed = http_error(500)
    failed.nem_llm_usage = tokens(30)  # type: ignore[attr-defined]
    fn = Script(failed, Reply(tokens(50)))

    governed = await call(governor, fn)

    assert [a.usage.total_tokens for a in governed.attempts] == [30, 50]
    assert governed.usage.total_tokens == 80
    assert governor.stats.usage.total_tokens == 80


@pytest.mark.looptime
async def test_final_failure_carries_the_usage_of_every_attempt() -> None:
    governor = Governor(Limits(), rng=random.Random(0))
    transient = http_error(500)
    transient.nem_llm_usage = tokens(10)  # type: ignore[attr-defined]
    invalid = AdjudicationError("never a valid choice", cause="invalid_answer")
    invalid.usage = tokens(40)
    fn = Script(transient, invalid)

    with pytest.raises(AdjudicationError) as caught:
        await call(governor, fn)

    assert caught.value is invalid
    assert caught.value.cause == "invalid_answer"
    assert caught.value.usage is not None and caught.value.usage.total_tokens == 50
    assert [a.usage.total_tokens for a in caught.value.attempts] == [10, 40]
    assert governor.stats.usage.total_tokens == 50


@pytest.mark.looptime
async def test_budget_stops_new_calls_once_spent() -> None:
    governor = Governor(Limits(budget_tokens=100, concurrency=1))
    fn = Script(Reply(tokens(60)))

    await call(governor, fn)
    await call(governor, fn)  # 60 < 100 spent: allowed, and it overspends to 120
    with pytest.raises(BudgetExceededError) as caught:
        await call(governor, fn)

    assert fn.calls == 2
    assert caught.value.cause == "budget"
    assert caught.value.attempts == []
    assert governor.budget_exhausted


@pytest.mark.looptime
async def test_budget_counts_the_estimates_of_calls_in_flight() -> None:
    governor = Governor(Limits(budget_tokens=100, concurrency=2))
    fn = Script(Reply(tokens(100)), duration=1.0)

    results = await asyncio.gather(
        call(governor, fn, estimate=100), call(governor, fn, estimate=100), return_exceptions=True
    )

    assert isinstance(results[0], Governed)
    assert isinstance(results[1], BudgetExceededError)
    assert fn.calls == 1


@pytest.mark.looptime
async def test_dollar_budget_stops_new_calls_once_spent() -> None:
    governor = Governor(Limits(budget_usd=0.01))
    fn = Script(Reply(Usage(total_tokens=10, cost_usd=0.006)))

    await call(governor, fn)
    await call(governor, fn)
    with pytest.raises(BudgetExceededError):
        await call(governor, fn)

    assert fn.calls == 2


def countries() -> list[dict[str, Any]]:
    names = ["Germany", "France", "Austria", "Spain", "Italy", "Norway", "Sweden", "Poland"]
    return [{"id": name[:2].upper(), "name": name} for name in names]


async def test_budget_through_the_matcher_turns_the_rest_into_review_records() -> None:
    llm = FakeLLM()
    http = httpx.AsyncClient(transport=httpx.MockTransport(llm))
    client = openai.AsyncOpenAI(api_key="t", base_url="http://fake/v1", http_client=http)
    entities = countries()
    queries = [e["name"] for e in entities] + [e["name"].lower() for e in entities]
    matcher = Matcher(
        entities,
        client=client,
        embedder=FakeEmbedder(),
        accept_threshold=1.01,  # every query goes to the LLM
        novel_threshold=0.45,
        limits=Limits(budget_tokens=1, concurrency=1),
    )
    try:
        await matcher.fit_async()
        results = await matcher.match_batch_async(queries)
    finally:
        await matcher.aclose()
        await http.aclose()

    assert len(llm.requests) == 1
    assert [r.index for r in results] == list(range(len(queries)))
    assert [r.query for r in results] == queries
    assert [r.status for r in results] == ["matched"] + ["review"] * (len(queries) - 1)
    assert results[0].decided_by == "llm" and results[0].usage.total_tokens > 0
    for r in results[1:]:
        assert r.error_type == "budget"
        assert r.error is not None and "budget" in r.error
    stats = matcher.last_run_stats
    assert stats is not None and stats.budget_exhausted and stats.total == len(queries)


@pytest.mark.looptime
async def test_instructor_reasks_wait_for_the_rpm_limiter_like_any_request() -> None:
    """A re-ask is one more HTTP request: it must not slip past the rate limiter."""
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []
    answers = iter(["not-offered", "1"] * 3)  # each query: an invalid answer, then a valid one

    def policy(_query: str, ids: tuple[str, ...]) -> str:
        arrivals.append(loop.time())
        answer = next(answers)
        return answer if answer != "1" else ids[0]

    http = httpx.AsyncClient(transport=httpx.MockTransport(FakeLLM(policy)))
    client = openai.AsyncOpenAI(api_key="t", base_url="http://fake/v1", http_client=http)
    entities = [{"id": f"E{i}", "name": f"Entity number {i}"} for i in range(5)]
    async with Matcher(
        entities,
        client=client,
        embedder=FakeEmbedder(),
        accept_threshold=1.01,
        novel_threshold=0.0,
        limits=Limits(rpm=60, concurrency=4),
    ) as matcher:
        await matcher.fit_async()
        results = await matcher.match_batch_async(["entity 1", "entity 2", "entity 3"])
    assert [r.status for r in results] == ["matched"] * 3
    assert sum(a.reasks for r in results for a in r.attempts) == 3
    assert len(arrivals) == 6  # 3 calls + 3 re-asks, every one paced at 60 per minute
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(gap >= 1.0 - TICK for gap in gaps), gaps
