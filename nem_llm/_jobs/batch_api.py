"""``nem-llm match --engine batch-api``: the ambiguous rows go through the provider's Batch API.

The job, in four resumable phases, all state in ``<out>.state/run.sqlite``:

1. **Plan.** Every input row is routed (retrieval and routing only, no LLM call). Rows
   that need no LLM (matched, novel, cached decisions, bad input) are recorded at once;
   each ambiguous row becomes a request line (``custom_id`` = run key, row, round) whose
   body is exactly what the live path would send.
2. **Submit.** Unsent lines are grouped into files of at most 50,000 lines / 200 MB,
   each file is uploaded (``purpose="batch"``) and submitted (``/v1/chat/completions``,
   ``24h``). The batch row is written *before* the upload and the batch id right after
   the create; a create that may have happened but was not recorded is looked up by its
   metadata (run key and sequence number) before it is ever repeated, so nothing is
   submitted twice.
3. **Poll.** Every open batch is retrieved every ``poll_interval`` seconds (status and
   counts go to ``on_batch``). Killing the process here loses nothing: rerunning the same
   command finds the batch ids in the state file and polls on.
4. **Collect.** A finished batch's output and error files are joined on ``custom_id``. A
   valid answer becomes the row's result (and goes to the decision cache); a
   schema-invalid answer is re-asked in a **follow-up batch** with instructor's re-ask
   body (the invalid answer and the validation error appended, as live), at most
   ``limits.max_reasks`` times; an error line, an expired or a cancelled line is
   resubmitted unchanged at most ``max_resubmits`` times. After that the row is an error
   record (``error_type`` ``invalid_answer``, ``batch_api``, ``server``...). A
   ``failed`` batch (the provider rejected the file) makes its rows error records
   (``batch_failed``) at once: resubmitting the same file would fail again. The rows of a
   batch are recorded, and its follow-up lines written, in one transaction.

Cost is counted at the batch price (half the live price, ``llm.batch_api.batch_prices``).
A budget (``limits.budget_usd`` / ``budget_tokens``) is checked before each submission
against the tokens spent plus the estimate of every line in flight; lines beyond it become
``review`` records (``error_type="budget"``), as in live mode.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import instructor
import openai
from openai import AsyncOpenAI

from .._llm.batch_api import (
    MAX_FILE_BYTES,
    MAX_FILE_LINES,
    InvalidAnswer,
    LineOutcome,
    batch_prices,
    custom_id,
    parse_answer,
    parse_result_line,
    reask_body,
    request_line,
    split_lines,
)
from .._llm.cache import CachedDecision, DecisionCache
from .._llm.stats import StatsCollector
from .._matching.decision import Pending
from ..errors import ConfigError, LLMError
from ..matcher import Matcher
from ..models import Attempt, MatchResult, RunStats, Usage
from .batch import job_workload, load_job_catalog
from .batch_api_store import BatchApiStore, Line
from .checkpoint import RunStore
from .io import QueryRow, count_rows
from .runs import (
    JobSummary,
    MatchJob,
    error_row,
    output_row,
    row_filter,
    row_query,
    run_key,
    write_output,
)

__all__ = [
    "BatchApiOptions",
    "BatchApiStore",
    "BatchApiSummary",
    "BatchProgress",
    "run_batch_api_job",
]

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_PLAN_CHUNK = 256


@dataclass(frozen=True, kw_only=True)
class BatchApiOptions:
    """Knobs of the Batch API engine.

    Attributes:
        poll_interval: Seconds between two polls of the open batches.
        max_lines, max_bytes: Limits of one input file (the provider's 50,000 / 200 MB).
        max_resubmits: How often an error, expired or cancelled line is resubmitted.
        wait: Poll until every batch is finished (False: submit, poll once, return; the
            next run polls on).
    """

    poll_interval: float = 30.0
    max_lines: int = MAX_FILE_LINES
    max_bytes: int = MAX_FILE_BYTES
    max_resubmits: int = 2
    wait: bool = True

    def __post_init__(self) -> None:
        if self.poll_interval < 0:
            raise ConfigError(f"poll_interval must be >= 0, got {self.poll_interval!r}")
        if not 1 <= self.max_lines <= MAX_FILE_LINES:
            raise ConfigError(f"max_lines must be in 1..{MAX_FILE_LINES}, got {self.max_lines}")
        if not 1 <= self.max_bytes <= MAX_FILE_BYTES:
            raise ConfigError(f"max_bytes must be in 1..{MAX_FILE_BYTES}, got {self.max_bytes}")
        if self.max_resubmits < 0:
            raise ConfigError(f"max_resubmits must be >= 0, got {self.max_resubmits}")


@dataclass(frozen=True)
class BatchProgress:
    """One poll of one batch: what ``on_batch`` receives."""

    seq: int
    batch_id: str
    status: str
    total: int
    completed: int
    failed: int


def _row_json(plan: Mapping[str, Any], result: MatchResult) -> str:
    row = QueryRow(
        index=result.index,
        line=int(plan["line"]),
        id=str(plan["id"]),
        query=None,
        error=None,
        record=None,
    )
    return output_row(row, result)


@dataclass
class _Collector:
    """What processing one batch produced."""

    finals: list[tuple[int, str]] = field(default_factory=list)
    follow_ups: list[Line] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    cache: list[tuple[str, CachedDecision]] = field(default_factory=list)


class _Engine:
    """One run of the Batch API engine (see the module docstring for the phases)."""

    def __init__(
        self,
        job: MatchJob,
        options: BatchApiOptions,
        client: AsyncOpenAI,
        store: BatchApiStore,
        cache: DecisionCache,
        matcher: Matcher,
        run_key: str,
        on_batch: Callable[[BatchProgress], None] | None,
    ) -> None:
        self.job = job
        self.options = options
        self.client = client
        self.store = store
        self.cache = cache
        self.matcher = matcher
        self.run_key = run_key
        self.on_batch = on_batch
        self.mode = instructor.Mode(job.settings.instructor_mode)
        self.prices = batch_prices(job.settings.model, job.settings.limits)

    # -- plan --------------------------------------------------------------------------

    async def plan(self, rows: Any, stop: asyncio.Event | None) -> bool:
        """Route every row not yet routed, a chunk per transaction; False if stopped."""
        done = await self.store.done_indexes_async(self.run_key)
        lined = await self.store.line_indexes_async(self.run_key)
        chunk: list[QueryRow] = []
        for row in rows:
            if row.index in done or row.index in lined:
                continue
            chunk.append(row)
            if len(chunk) >= _PLAN_CHUNK:
                await self._plan_chunk(chunk)
                chunk = []
                if stop is not None and stop.is_set():
                    return False
        if chunk:
            await self._plan_chunk(chunk)
        await self.store.mark_planned_async(self.run_key)
        return True

    async def _plan_chunk(self, rows: list[QueryRow]) -> None:
        good = [r for r in rows if r.error is None and r.query is not None]
        where = self.job.where
        planned = await asyncio.gather(
            *(
                self.matcher.prepare_async(
                    r.index, row_query(self.job, r), where=row_filter(where, r) or None
                )
                for r in good
            )
        )
        finals = [(r.index, output_row(r, error_row(r))) for r in rows if r not in good]
        lines: list[Line] = []
        decider = self.matcher.decider
        for row, prepared in zip(good, planned, strict=True):
            if not isinstance(prepared, Pending):
                finals.append((row.index, output_row(row, prepared)))
                continue
            plan = {
                "line": row.line,
                "id": row.id,
                "result": prepared.provisional.model_dump(mode="json"),
                "ids": list(prepared.ids),
                "cache_key": prepared.key,
                "reasks": 0,
                "resubmits": 0,
                "usage": Usage().model_dump(),
                "attempts": [],
            }
            body = decider.request_body(prepared)
            lines.append(Line(custom_id(self.run_key, row.index, 0), row.index, 0, body, plan))
        await self.store.add_plan_async(self.run_key, finals, lines)

    # -- submit ------------------------------------------------------------------------

    async def submit(self) -> None:
        """Put every unassigned line into a batch (budget permitting), then send them."""
        pending = await self.store.unassigned_async(self.run_key)
        if pending:
            pending = await self._within_budget(pending)
            files = split_lines(
                (text for _, _, text, _ in pending),
                max_lines=self.options.max_lines,
                max_bytes=self.options.max_bytes,
            )
            start = 0
            for lines in files:
                ids = [c for c, _, _, _ in pending[start : start + len(lines)]]
                start += len(lines)
                await self.store.new_batch_async(self.run_key, ids, time.time())
        for batch in await self.store.open_batches_async(self.run_key):
            if batch["batch_id"] is None:
                await self._send(batch)

    async def _within_budget(
        self, pending: list[tuple[str, int, str, int]]
    ) -> list[tuple[str, int, str, int]]:
        limits = self.job.settings.limits
        if limits.budget_tokens is None and limits.budget_usd is None:
            return pending
        in_flight, spent = await self.store.in_flight_async(self.run_key)
        tokens, usd = (
            spent.total_tokens + in_flight,
            spent.cost_usd + in_flight * self.prices[0] / 1e6,
        )
        keep: list[tuple[str, int, str, int]] = []
        over: list[str] = []
        for item in pending:
            est = item[3]
            cost = est * self.prices[0] / 1e6
            if (limits.budget_tokens is not None and tokens + est > limits.budget_tokens) or (
                limits.budget_usd is not None and usd + cost > limits.budget_usd
            ):
                over.append(item[0])
                continue
            tokens, usd = tokens + est, usd + cost
            keep.append(item)
        if over:
            await self._budget_records(over)
        return keep

    async def _budget_records(self, custom_ids: list[str]) -> None:
        lines = {
            line.custom_id: line for line in await self.store.batch_lines_by_ids_async(custom_ids)
        }
        out = _Collector()
        for cid in custom_ids:
            line = lines[cid]
            result = MatchResult.model_validate(line.plan["result"])
            message = "the run's budget is spent: not submitted to the Batch API"
            result.reason = f"{result.reason}; {message}"
            result.error, result.error_type = message, "budget"
            result.usage = Usage.model_validate(line.plan["usage"])
            out.finals.append((line.index, _row_json(line.plan, result)))
            out.done.append(cid)
        await self.store.add_done_async(self.run_key, out.finals, out.done)

    async def _send(self, batch: Mapping[str, Any]) -> None:
        seq = int(batch["seq"])
        file_id = batch["input_file_id"]
        if file_id is None:
            lines = await self.store.batch_lines_async(seq)
            text = "".join(request_line(line.custom_id, line.body) + "\n" for line in lines)
            uploaded = await self.client.files.create(
                file=(f"nem-llm-{self.run_key[:8]}-{seq}.jsonl", text.encode("utf-8")),
                purpose="batch",
            )
            file_id = uploaded.id
            await self.store.set_batch_async(seq, input_file_id=file_id)
        metadata = {"nem_llm_run": self.run_key, "nem_llm_seq": str(seq)}
        found = await self._find(metadata) if batch["state"] == "creating" else None
        if found is None:
            await self.store.set_batch_async(seq, state="creating")
            created = await self.client.with_options(max_retries=0).batches.create(
                input_file_id=file_id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata=metadata,
            )
            found = created.id
        await self.store.set_batch_async(seq, state="submitted", batch_id=found)

    async def _find(self, metadata: Mapping[str, str]) -> str | None:
        """The id of a batch created with ``metadata`` (a create whose answer was lost)."""
        async for batch in self.client.batches.list(limit=100):
            if batch.metadata and all(batch.metadata.get(k) == v for k, v in metadata.items()):
                return batch.id
        return None

    # -- poll and collect ----------------------------------------------------------------

    async def poll_once(self) -> int:
        """Retrieve every open batch once; collect the finished ones. Returns how many
        batches are still open."""
        still_open = 0
        for batch in await self.store.open_batches_async(self.run_key):
            if batch["batch_id"] is None:
                still_open += 1
                continue
            info = await self.client.batches.retrieve(batch["batch_id"])
            counts = info.request_counts
            if self.on_batch is not None:
                self.on_batch(
                    BatchProgress(
                        seq=int(batch["seq"]),
                        batch_id=info.id,
                        status=info.status,
                        total=counts.total if counts else 0,
                        completed=counts.completed if counts else 0,
                        failed=counts.failed if counts else 0,
                    )
                )
            if info.status not in TERMINAL:
                still_open += 1
                continue
            await self._collect(int(batch["seq"]), info)
        return still_open

    async def _read(self, file_id: str | None) -> dict[str, LineOutcome]:
        if not file_id:
            return {}
        content = await self.client.files.content(file_id)
        out: dict[str, LineOutcome] = {}
        for raw in content.text.splitlines():
            if raw.strip():
                outcome = parse_result_line(raw)
                out[outcome.custom_id] = outcome
        return out

    async def _collect(self, seq: int, info: Any) -> None:
        lines = await self.store.batch_lines_async(seq)
        outcomes = await self._read(info.error_file_id)
        outcomes.update(await self._read(info.output_file_id))
        failed_message = ""
        if info.status == "failed":
            errors = info.errors.data if info.errors and info.errors.data else []
            failed_message = "; ".join(f"{e.code}: {e.message}" for e in errors[:3])
        out = _Collector()
        for line in lines:
            if info.status == "failed":
                self._final_error(out, line, "batch_api", f"batch failed: {failed_message}")
                continue
            outcome = outcomes.get(line.custom_id)
            if outcome is None:
                why = f"batch {info.status}" if info.status != "completed" else "missing result"
                outcome = LineOutcome(line.custom_id, None, None, "batch_api", f"no result ({why})")
            self._take(out, line, outcome)
        for key, decision in out.cache:
            await self.cache.put_async(key, decision)
        await self.store.process_async(
            self.run_key, seq, info.status, out.finals, out.follow_ups, out.done, out.usage
        )

    def _take(self, out: _Collector, line: Line, outcome: LineOutcome) -> None:
        plan = line.plan
        out.done.append(line.custom_id)
        usage = Usage.model_validate(plan["usage"])
        attempts = [Attempt.model_validate(a) for a in plan["attempts"]]
        number = len(attempts) + 1
        if not outcome.ok:
            attempts.append(
                Attempt(
                    number=number,
                    outcome="retry",
                    error_type=outcome.error_code,
                    error=outcome.error,
                    status_code=outcome.status_code,
                )
            )
            if int(plan["resubmits"]) < self.options.max_resubmits:
                self._follow_up(out, line, line.body, resubmits=1, attempts=attempts)
            else:
                attempts[-1].outcome = "failed"
                self._final_error(
                    out, line, outcome.error_code or "batch_api", outcome.error or "", attempts
                )
            return
        assert outcome.body is not None
        ids = tuple(plan["ids"])
        try:
            decision = parse_answer(
                outcome.body,
                ids,
                prices=self.prices,
                mode=self.mode,
                reasks=int(plan["reasks"]),
            )
        except InvalidAnswer as exc:
            out.usage = out.usage + exc.usage
            plan_usage = usage + exc.usage
            if int(plan["reasks"]) < self.job.settings.limits.max_reasks:
                body = reask_body(line.body, outcome.body, exc, mode=self.mode)
                self._follow_up(
                    out, line, body, reasks=1, attempts=attempts, usage=plan_usage, retry=False
                )
            else:
                attempts.append(
                    Attempt(
                        number=number,
                        outcome="failed",
                        error_type="invalid_answer",
                        error=str(exc),
                        status_code=200,
                        reasks=int(plan["reasks"]),
                        usage=plan_usage,
                    )
                )
                message = f"no valid choice after {int(plan['reasks']) + 1} answer(s): {exc}"
                self._final_error(out, line, "invalid_answer", message, attempts, plan_usage)
            return
        total = usage + decision.usage
        out.usage = out.usage + decision.usage
        attempts.append(
            Attempt(
                number=number, outcome="ok", status_code=200, reasks=decision.reasks, usage=total
            )
        )
        provisional = MatchResult.model_validate(plan["result"])
        result = self.matcher.decider.resolve(provisional, decision)
        result.usage = total
        result.attempts = attempts
        out.finals.append((line.index, _row_json(plan, result)))
        if plan.get("cache_key"):
            out.cache.append(
                (
                    str(plan["cache_key"]),
                    CachedDecision(
                        entity_id=decision.entity_id,
                        confidence=decision.confidence,
                        reason=decision.reason,
                        usage=total,
                        model=self.job.settings.model,
                    ),
                )
            )

    def _follow_up(
        self,
        out: _Collector,
        line: Line,
        body: dict[str, Any],
        *,
        attempts: list[Attempt],
        reasks: int = 0,
        resubmits: int = 0,
        usage: Usage | None = None,
        retry: bool = True,
    ) -> None:
        plan = dict(line.plan)
        plan["reasks"] = int(plan["reasks"]) + reasks
        plan["resubmits"] = int(plan["resubmits"]) + resubmits
        plan["attempts"] = (
            [a.model_dump(mode="json") for a in attempts] if retry else plan["attempts"]
        )
        if usage is not None:
            plan["usage"] = usage.model_dump()
        nxt = line.round + 1
        out.follow_ups.append(
            Line(custom_id(self.run_key, line.index, nxt), line.index, nxt, body, plan)
        )

    def _final_error(
        self,
        out: _Collector,
        line: Line,
        error_type: str,
        message: str,
        attempts: list[Attempt] | None = None,
        usage: Usage | None = None,
    ) -> None:
        if line.custom_id not in out.done:
            out.done.append(line.custom_id)
        result = MatchResult.model_validate(line.plan["result"])
        result.status = "error"
        result.error, result.error_type = message, error_type
        result.usage = usage or Usage.model_validate(line.plan["usage"])
        result.attempts = attempts if attempts is not None else []
        out.finals.append((line.index, _row_json(line.plan, result)))


@dataclass
class BatchApiSummary(JobSummary):
    """A :class:`JobSummary` plus how many batches the run created (all sessions)."""

    batches: int = 0


def _stats(store: RunStore, run_key: str, seconds: float) -> RunStats:
    """Run figures over every recorded row (this session's and earlier ones)."""
    collector = StatsCollector()
    for _, text in store.iter_rows(run_key, order="completion"):
        collector.add(MatchResult.model_validate_json(text), seconds)
    return collector.finish(seconds)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


#: Options the Batch API engine cannot honour, each with why (refused up front).
BATCH_API_REFUSES: dict[str, str] = {
    "rewrite": "a rewrite needs a second LLM round per row after retrieval runs again; "
    "the Batch API engine sends one round (use the local or Ray engine)",
    "audit_rate": "an audit is a second LLM call on a row already decided, which the "
    "Batch API engine does not send (use the local or Ray engine; unset, it is off here)",
}


def refuse_batch_api(job: MatchJob) -> None:
    """A :class:`ConfigError` naming the first set option this engine cannot honour."""
    if job.settings.rewrite:
        raise ConfigError(f"--rewrite with the Batch API: {BATCH_API_REFUSES['rewrite']}")
    if not job.settings.llm:
        raise ConfigError("the Batch API engine sends rows to an LLM: --llm off makes it moot")
    if job.settings.audit_rate:
        raise ConfigError(f"--audit-rate with the Batch API: {BATCH_API_REFUSES['audit_rate']}")


def _client_for(job: MatchJob) -> AsyncOpenAI:
    base_url = job.settings.base_url or os.environ.get("OPENAI_BASE_URL")
    api_key = os.environ.get("OPENAI_API_KEY")
    if not base_url and not api_key:
        raise ConfigError(
            "--engine batch-api needs a provider: set OPENAI_API_KEY (and OPENAI_BASE_URL "
            "or --base-url for another endpoint)"
        )
    return AsyncOpenAI(
        base_url=base_url, api_key=api_key or "not-needed", max_retries=3, timeout=120.0
    )


async def run_batch_api_job(
    job: MatchJob,
    *,
    options: BatchApiOptions | None = None,
    client: AsyncOpenAI | None = None,
    stop: asyncio.Event | None = None,
    on_progress: Callable[[int, int | None, Any], None] | None = None,
    on_batch: Callable[[BatchProgress], None] | None = None,
    matcher_factory: Callable[..., Matcher] = Matcher,
) -> JobSummary:
    """Run (or resume) a match job whose LLM decisions go through the provider's Batch API.

    Every input row ends as exactly one output row, as with :func:`run_match_job`; the
    output file is written from the checkpoint once every batch is collected.

    Args:
        job: The inputs and settings (``strategy`` and ``limits.concurrency`` do not apply:
            the provider runs the batch; options the engine cannot honour are refused by
            :func:`refuse_batch_api` before any work).
        options: Polling and file limits.
        client: The ``AsyncOpenAI`` client for files and batches (default: from
            ``job.settings.base_url`` / ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY``).
        stop: Set it to stop polling; batches in flight stay with the provider and the
            next run with the same command polls them on (the summary says interrupted).
        on_progress: ``hook(rows done, total, None)`` after each collected batch.
        on_batch: ``hook(BatchProgress)`` after each poll of a batch.
        matcher_factory: Builds the Matcher (tests inject a fake embedder).
    """
    options = options or BatchApiOptions()
    loop = asyncio.get_running_loop()
    started = loop.time()
    refuse_batch_api(job)
    catalog = await loop.run_in_executor(None, load_job_catalog, job)
    total = count_rows(job.queries)
    state = job.state_dir
    state.mkdir(parents=True, exist_ok=True)
    key, meta = await loop.run_in_executor(None, run_key, job, "batch-api")
    own_client = client is None
    api = client or _client_for(job)
    store = BatchApiStore(state / "run.sqlite")
    cache = DecisionCache(state / "run.sqlite")
    matcher = matcher_factory(catalog, job.matcher_settings(), client=api, cache=cache)
    interrupted = False
    try:
        await store.open_run_async(key, meta)
        resumed = len(await store.done_indexes_async(key))
        engine = _Engine(job, options, api, store, cache, matcher, key, on_batch)
        if not await store.planned_async(key):
            await matcher.fit_async(workload=await job_workload(job, matcher))
            rows = job.read_rows()
            try:
                interrupted = not await engine.plan(rows, stop)
            finally:
                rows.close()
        while not interrupted:
            try:
                await engine.submit()
                still_open = await engine.poll_once()
            except openai.APIError as exc:
                # the client has already retried; every id is saved, so a rerun resumes
                raise LLMError(
                    f"the Batch API failed ({type(exc).__name__}: {_short(str(exc))}); the run "
                    "is saved in the state directory: run the same command again to resume",
                    cause="batch_api",
                ) from exc
            if on_progress is not None:
                on_progress(await store.count_async(key), total, None)
            if still_open == 0:
                if not await store.unassigned_async(key):
                    break
                continue  # follow-up lines to submit now
            if not options.wait or (stop is not None and stop.is_set()):
                interrupted = True
                break
            if stop is None:
                await asyncio.sleep(options.poll_interval)
            else:
                try:
                    await asyncio.wait_for(stop.wait(), options.poll_interval)
                except TimeoutError:
                    pass
        if not interrupted:
            await store.mark_complete_async(key)
        await loop.run_in_executor(
            None, write_output, job.out, store, key, job.order if not interrupted else "completion"
        )
        finished = await store.count_async(key)
        batches = await store.batch_count_async(key)
        stats = await loop.run_in_executor(None, _stats, store, key, loop.time() - started)
    finally:
        await matcher.aclose()
        if own_client:
            await api.close()
        store.close()
        cache.close()
    return BatchApiSummary(
        stats=stats,
        rows_total=finished,
        rows_resumed=resumed,
        interrupted=interrupted,
        out=job.out,
        state_dir=state,
        llm_configured=True,
        calibration=matcher.calibration,
        batches=batches,
    )
