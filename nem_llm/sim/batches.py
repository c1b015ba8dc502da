"""The simulator's provider Batch API: ``/v1/files`` and ``/v1/batches`` (OpenAI-shaped).

A batch is answered line by line with the same policy as the live chat endpoint (the
server passes its answer function in), after a configurable completion delay, with per-line
faults (error lines, schema-invalid answers) and whole-batch outcomes (``expired`` with a
part of the lines done, ``failed`` with no output). Every upload and every batch creation
is logged, and :meth:`BatchEndpoints.submissions` counts how often each ``custom_id`` was
submitted: the proof that a client never submitted a line twice.

Statuses follow the provider: ``validating`` -> ``in_progress`` -> ``finalizing`` ->
``completed`` (or ``failed``, ``expired``, ``cancelling`` -> ``cancelled``). Time comes from
an injectable clock; a batch's status is computed when it is read.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from ..errors import ConfigError
from .protocol import error_body

__all__ = [
    "BATCH_ENDPOINT",
    "BatchEndpoints",
    "BatchLogRecord",
    "BatchOutcome",
    "BatchSimConfig",
]

BATCH_ENDPOINT = "/v1/chat/completions"
BatchOutcome = Literal["completed", "expired", "failed"]
_OUTCOMES = ("completed", "expired", "failed")
#: Answers a chat-completions request body: ``answer(body, kind)`` with kind "ok" or
#: "invalid" returns the ``chat.completion`` body (the live endpoint's policy).
AnswerFn = Callable[[dict[str, Any], str], dict[str, Any]]


@dataclass(frozen=True, kw_only=True)
class BatchSimConfig:
    """How the simulated Batch API behaves (seeded, so runs are reproducible).

    Attributes:
        seed: Seed of the per-line fault draws.
        completion_delay: Seconds from ``batches.create`` until the batch is finished
            (``in_progress`` meanwhile, with ``request_counts.completed`` growing).
        rate_error_line: Probability that a line ends in the error file (HTTP 500 body).
        rate_invalid_answer: Probability that a line's answer is schema-invalid (an id that
            was not offered), like the live endpoint's ``rate_invalid``.
        outcomes: Outcome of the n-th created batch (0-based); batches beyond the tuple
            complete. ``"expired"`` answers the first ``expired_done_fraction`` of the lines
            and puts the rest in the error file as ``batch_expired``; ``"failed"`` produces
            no output at all.
        expired_done_fraction: Share of the lines an expired batch answered.
        max_lines: Lines a file may hold (the provider's 50,000).

    Example:
        >>> BatchSimConfig(completion_delay=2.0, rate_error_line=0.05, outcomes=("expired",))
        ... # doctest: +ELLIPSIS
        BatchSimConfig(seed=0, completion_delay=2.0, ...)
    """

    seed: int = 0
    completion_delay: float = 0.0
    rate_error_line: float = 0.0
    rate_invalid_answer: float = 0.0
    outcomes: tuple[BatchOutcome, ...] = ()
    expired_done_fraction: float = 0.5
    max_lines: int = 50_000

    def __post_init__(self) -> None:
        if self.completion_delay < 0:
            raise ConfigError(f"completion_delay must be >= 0, got {self.completion_delay!r}")
        for name in ("rate_error_line", "rate_invalid_answer", "expired_done_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value!r}")
        if self.rate_error_line + self.rate_invalid_answer > 1.0:
            raise ConfigError("rate_error_line + rate_invalid_answer must be <= 1")
        for outcome in self.outcomes:
            if outcome not in _OUTCOMES:
                raise ConfigError(f"outcomes must be among {_OUTCOMES}, got {outcome!r}")
        if self.max_lines < 1:
            raise ConfigError(f"max_lines must be >= 1, got {self.max_lines!r}")


@dataclass(frozen=True, slots=True)
class BatchLogRecord:
    """One Batch API call the simulator saw: ``kind`` is ``"upload"``, ``"create"``,
    ``"retrieve"``, ``"cancel"``, ``"list"`` or ``"content"``; ``ref`` the file/batch id."""

    at: float
    kind: str
    ref: str
    lines: int = 0


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def obj(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


@dataclass
class _Batch:
    id: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None
    created_at: float
    outcome: BatchOutcome
    total: int
    lines: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)  # validation errors
    status: str = "in_progress"
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0
    finished_at: float | None = None
    cancelled_at: float | None = None


class BatchEndpoints:
    """The in-memory files and batches of one simulator, and their HTTP handlers.

    Args:
        config: The batch behaviour.
        answer: The live endpoint's answer function (see ``AnswerFn``).
        clock: Seconds, monotonic (tests inject a fake one).
    """

    def __init__(
        self,
        config: BatchSimConfig,
        answer: AnswerFn,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._answer = answer
        self._clock = clock
        self._rng = random.Random(config.seed)
        self._files: dict[str, _File] = {}
        self._batches: dict[str, _Batch] = {}
        self._log: list[BatchLogRecord] = []
        self._submitted: Counter[str] = Counter()
        self._n = 0

    # -- what tests and benchmarks read ---------------------------------------------

    @property
    def log(self) -> list[BatchLogRecord]:
        """Every Batch API call, in arrival order."""
        return self._log

    def submissions(self) -> Counter[str]:
        """How many times each ``custom_id`` was submitted in a created batch."""
        return Counter(self._submitted)

    def duplicate_submissions(self) -> int:
        """How many submitted lines repeated a ``custom_id`` submitted before (0 is right)."""
        return sum(n - 1 for n in self._submitted.values() if n > 1)

    def batch_ids(self) -> list[str]:
        """Ids of every created batch, in creation order."""
        return list(self._batches)

    # -- routes ----------------------------------------------------------------------

    def register(self, app: web.Application) -> None:
        """Add the ``/v1/files`` and ``/v1/batches`` routes to ``app``."""
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{file_id}", self._file)
        app.router.add_get("/v1/files/{file_id}/content", self._content)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches", self._list)
        app.router.add_get("/v1/batches/{batch_id}", self._retrieve)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self._cancel)

    def _next_id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}-sim{self._n:06d}"

    def _record(self, kind: str, ref: str, lines: int = 0) -> None:
        self._log.append(BatchLogRecord(at=self._clock(), kind=kind, ref=ref, lines=lines))

    @staticmethod
    def _not_found(what: str) -> web.Response:
        return web.json_response(
            error_body(f"No such {what}", "invalid_request_error", "not_found"), status=404
        )

    @staticmethod
    def _bad(message: str) -> web.Response:
        return web.json_response(error_body(message, "invalid_request_error", None), status=400)

    # -- files -----------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        purpose = form.get("purpose")
        if not isinstance(upload, web.FileField):
            return self._bad("'file' must be a file upload")
        if purpose not in ("batch", "batch_output"):
            return self._bad(f"purpose must be 'batch', got {purpose!r}")
        data = upload.file.read()
        file = self._store_file(upload.filename or "upload.jsonl", "batch", data)
        self._record("upload", file.id, data.count(b"\n"))
        return web.json_response(file.obj())

    def _store_file(self, filename: str, purpose: str, data: bytes) -> _File:
        file = _File(self._next_id("file"), filename, purpose, data, int(time.time()))
        self._files[file.id] = file
        return file

    async def _file(self, request: web.Request) -> web.Response:
        file = self._files.get(request.match_info["file_id"])
        return self._not_found("file") if file is None else web.json_response(file.obj())

    async def _content(self, request: web.Request) -> web.Response:
        file = self._files.get(request.match_info["file_id"])
        if file is None:
            return self._not_found("file")
        self._record("content", file.id)
        return web.Response(body=file.data, content_type="application/octet-stream")

    # -- batches ---------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return self._bad("the body must be JSON")
        if not isinstance(body, dict):
            return self._bad("the body must be a JSON object")
        file = self._files.get(str(body.get("input_file_id")))
        if file is None:
            return self._not_found("file")
        if body.get("endpoint") != BATCH_ENDPOINT:
            return self._bad(f"endpoint must be {BATCH_ENDPOINT!r}")
        if body.get("completion_window") != "24h":
            return self._bad("completion_window must be '24h'")
        metadata = body.get("metadata")
        lines, errors = self._parse_input(file.data)
        outcome: BatchOutcome = "failed" if errors else "completed"
        index = len(self._batches)
        if not errors and index < len(self.config.outcomes):
            outcome = self.config.outcomes[index]
        batch = _Batch(
            id=self._next_id("batch"),
            input_file_id=file.id,
            completion_window="24h",
            metadata=metadata if isinstance(metadata, dict) else None,
            created_at=self._clock(),
            outcome=outcome,
            total=len(lines),
            lines=lines,
            errors=errors,
        )
        self._batches[batch.id] = batch
        for line in lines:
            self._submitted[str(line.get("custom_id"))] += 1
        self._record("create", batch.id, len(lines))
        return web.json_response(self._obj(batch))

    def _parse_input(self, data: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The request lines of an input file, and the provider-style validation errors."""
        lines: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()

        def error(number: int, code: str, message: str) -> None:
            errors.append({"code": code, "message": message, "param": None, "line": number})

        for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                error(number, "invalid_json_line", "This line is not parseable as valid JSON.")
                continue
            if not isinstance(line, dict):
                error(number, "invalid_json_line", "Each line must be a JSON object.")
                continue
            custom_id = line.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                error(number, "missing_required_parameter", "custom_id is required.")
            elif custom_id in seen:
                error(number, "duplicate_custom_id", f"custom_id {custom_id!r} is repeated.")
            else:
                seen.add(custom_id)
            if line.get("method") != "POST" or line.get("url") != BATCH_ENDPOINT:
                error(number, "invalid_url", f"method must be POST and url {BATCH_ENDPOINT}.")
            if not isinstance(line.get("body"), dict):
                error(number, "invalid_request", "body must be an object.")
            lines.append(line)
        if len(lines) > self.config.max_lines:
            error(0, "too_many_requests", f"at most {self.config.max_lines} lines a file")
        if not lines and not errors:
            error(0, "empty_file", "The input file is empty.")
        return lines, errors

    def _advance(self, batch: _Batch) -> None:
        """Bring ``batch`` up to the clock: progress counts, then its terminal state."""
        if batch.finished_at is not None:
            return
        now = self._clock()
        if batch.cancelled_at is not None:
            self._finish(batch, "cancelled", done=batch.completed + batch.failed)
            return
        if batch.errors:
            batch.status = "failed"
            batch.finished_at = now
            return
        delay = self.config.completion_delay
        elapsed = now - batch.created_at
        if elapsed < delay:
            batch.status = "in_progress"
            share = elapsed / delay if delay > 0 else 1.0
            if batch.outcome == "expired":
                share *= self.config.expired_done_fraction
            batch.completed = min(int(batch.total * share), batch.total)
            return
        if batch.outcome == "failed":
            batch.status = "failed"
            batch.errors = [
                {"code": "server_error", "message": "simulated batch failure", "line": None}
            ]
            batch.finished_at = now
            return
        if batch.outcome == "expired":
            done = int(batch.total * self.config.expired_done_fraction)
            self._finish(batch, "expired", done=done)
            return
        self._finish(batch, "completed", done=batch.total)

    def _finish(self, batch: _Batch, status: str, *, done: int) -> None:
        """Answer the first ``done`` lines; the rest go to the error file as unanswered."""
        out: list[str] = []
        err: list[str] = []
        failed = 0
        code = "batch_expired" if status == "expired" else "batch_cancelled"
        for n, line in enumerate(batch.lines):
            custom_id = line["custom_id"]
            record: dict[str, Any] = {"id": f"batch_req_{batch.id}_{n}", "custom_id": custom_id}
            if n >= done:
                record.update(
                    response=None,
                    error={"code": code, "message": f"This request was not executed ({code})."},
                )
                err.append(json.dumps(record))
                failed += 1
                continue
            u = self._rng.random()
            if u < self.config.rate_error_line:
                record.update(
                    response={
                        "status_code": 500,
                        "request_id": f"req_{batch.id}_{n}",
                        "body": error_body("simulated server error", "server_error", None),
                    },
                    error=None,
                )
                err.append(json.dumps(record))
                failed += 1
                continue
            invalid = u < self.config.rate_error_line + self.config.rate_invalid_answer
            try:
                answer = self._answer(line["body"], "invalid" if invalid else "ok")
            except ValueError as exc:  # the body is not a usable chat request
                record.update(
                    response={
                        "status_code": 400,
                        "request_id": f"req_{batch.id}_{n}",
                        "body": error_body(
                            f"invalid request: {exc}", "invalid_request_error", None
                        ),
                    },
                    error=None,
                )
                err.append(json.dumps(record))
                failed += 1
                continue
            record.update(
                response={"status_code": 200, "request_id": f"req_{batch.id}_{n}", "body": answer},
                error=None,
            )
            out.append(json.dumps(record))
        if out:
            data = ("\n".join(out) + "\n").encode()
            batch.output_file_id = self._store_file("output.jsonl", "batch_output", data).id
        if err:
            data = ("\n".join(err) + "\n").encode()
            batch.error_file_id = self._store_file("errors.jsonl", "batch_output", data).id
        batch.completed = len(out)
        batch.failed = failed
        batch.status = status
        batch.finished_at = self._clock()

    def _obj(self, batch: _Batch) -> dict[str, Any]:
        created = int(batch.created_at)
        finished = int(batch.finished_at) if batch.finished_at is not None else None
        status = batch.status
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": BATCH_ENDPOINT,
            "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
            "input_file_id": batch.input_file_id,
            "completion_window": batch.completion_window,
            "status": status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": created,
            "in_progress_at": created,
            "expires_at": created + 86400,
            "finalizing_at": finished if status == "completed" else None,
            "completed_at": finished if status == "completed" else None,
            "failed_at": finished if status == "failed" else None,
            "expired_at": finished if status == "expired" else None,
            "cancelling_at": int(batch.cancelled_at) if batch.cancelled_at else None,
            "cancelled_at": finished if status == "cancelled" else None,
            "request_counts": {
                "total": batch.total,
                "completed": batch.completed,
                "failed": batch.failed,
            },
            "metadata": batch.metadata,
        }

    async def _retrieve(self, request: web.Request) -> web.Response:
        batch = self._batches.get(request.match_info["batch_id"])
        if batch is None:
            return self._not_found("batch")
        self._advance(batch)
        self._record("retrieve", batch.id)
        return web.json_response(self._obj(batch))

    async def _cancel(self, request: web.Request) -> web.Response:
        batch = self._batches.get(request.match_info["batch_id"])
        if batch is None:
            return self._not_found("batch")
        self._advance(batch)
        if batch.finished_at is None:
            batch.cancelled_at = self._clock()
            batch.status = "cancelling"
        self._record("cancel", batch.id)
        return web.json_response(self._obj(batch))

    async def _list(self, request: web.Request) -> web.Response:
        # newest first, like the provider; ``after`` is a batch id, ``limit`` at most 100
        try:
            limit = max(1, min(100, int(request.query.get("limit", "20"))))
        except ValueError:
            return self._bad("limit must be an integer")
        ordered = list(reversed(self._batches.values()))
        after = request.query.get("after")
        if after:
            ids = [b.id for b in ordered]
            ordered = ordered[ids.index(after) + 1 :] if after in ids else []
        page = ordered[:limit]
        for batch in page:
            self._advance(batch)
        self._record("list", after or "")
        return web.json_response(
            {
                "object": "list",
                "data": [self._obj(b) for b in page],
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": len(ordered) > limit,
            }
        )
