"""The provider Batch API, pure part: request lines in, decisions out (no I/O, no clock).

A Batch API request line carries exactly the body the live path sends: the messages of
``render_messages``, and instructor's request shaping of ``choice_model(k)`` for the mode
(for ``Mode.TOOLS`` the forced tool call), plus the adjudicator's create arguments
(``temperature``). Answers are parsed with the same response model and validation as the
live path, so a decision from a batch equals the live one. A schema-invalid answer yields
the body of instructor's re-ask (the answer and the validation error appended, as the live
re-ask sends it), for a follow-up batch.

Line format (the provider's)::

    {"custom_id": "<run key>:<row>:<round>", "method": "POST",
     "url": "/v1/chat/completions", "body": {...}}

Output and error files are JSONL keyed by ``custom_id``, in any order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import instructor
from instructor.v2.core.response import handle_reask_kwargs, handle_response_model
from openai.types.chat import ChatCompletion
from pydantic import ValidationError

from ..config import Limits, price_for
from ..errors import http_error_code
from ..models import Usage
from .adjudication import NONE, Decision, choice_model

__all__ = [
    "BATCH_ENDPOINT",
    "BATCH_PRICE_FACTOR",
    "MAX_FILE_BYTES",
    "MAX_FILE_LINES",
    "InvalidAnswer",
    "LineOutcome",
    "PlannedRequest",
    "batch_prices",
    "custom_id",
    "parse_answer",
    "parse_custom_id",
    "parse_result_line",
    "reask_body",
    "request_body",
    "request_line",
    "split_lines",
]

BATCH_ENDPOINT = "/v1/chat/completions"
#: The provider's limits for one input file.
MAX_FILE_LINES = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024
#: Batch requests cost half the live price (OpenAI's published discount).
BATCH_PRICE_FACTOR = 0.5


def batch_prices(model: str, limits: Limits | None = None) -> tuple[float, float]:
    """(input, output) USD per million tokens at the batch price: half the live price.

    The live price is ``limits``' explicit prices if set, else the model's list price.
    """
    list_in, list_out = price_for(model)
    live_in = (
        limits.input_usd_per_mtok if limits and limits.input_usd_per_mtok is not None else list_in
    )
    live_out = (
        limits.output_usd_per_mtok
        if limits and limits.output_usd_per_mtok is not None
        else list_out
    )
    return live_in * BATCH_PRICE_FACTOR, live_out * BATCH_PRICE_FACTOR


def request_body(
    messages: Sequence[Mapping[str, str]],
    k: int,
    *,
    model: str,
    mode: instructor.Mode = instructor.Mode.TOOLS,
    create_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The chat-completions body the live path sends for ``k`` numbered candidates.

    Example:
        >>> body = request_body([{"role": "user", "content": "hi"}], 2, model="m",
        ...                     create_kwargs={"temperature": 0.0})
        >>> body["tool_choice"]["function"]["name"], body["temperature"]
        ('EntityChoice', 0.0)
    """
    kwargs: dict[str, Any] = dict(create_kwargs or {})
    _, shaped = handle_response_model(
        choice_model(k), mode, messages=[dict(m) for m in messages], model=model, **kwargs
    )
    return shaped


def custom_id(run_key: str, index: int, round_: int) -> str:
    """The line's ``custom_id``: run key, input row and re-submission round."""
    return f"{run_key}:{index}:{round_}"


def parse_custom_id(value: str) -> tuple[str, int, int]:
    """Inverse of :func:`custom_id`: (run key, row, round).

    Raises:
        ValueError: ``value`` is not ``<key>:<row>:<round>``.
    """
    key, row, round_ = value.rsplit(":", 2)
    return key, int(row), int(round_)


def request_line(custom: str, body: Mapping[str, Any]) -> str:
    """One JSONL request line (no newline), compact and key-ordered."""
    return json.dumps(
        {"custom_id": custom, "method": "POST", "url": BATCH_ENDPOINT, "body": body},
        ensure_ascii=False,
        separators=(",", ":"),
    )


def split_lines(
    lines: Iterable[str], *, max_lines: int = MAX_FILE_LINES, max_bytes: int = MAX_FILE_BYTES
) -> list[list[str]]:
    """Group request lines into files of at most ``max_lines`` lines and ``max_bytes`` bytes.

    Order is kept. A single line larger than ``max_bytes`` cannot be sent at all.

    Raises:
        ValueError: a line alone exceeds ``max_bytes`` (its position is named).

    Example:
        >>> [len(f) for f in split_lines(["a", "b", "c"], max_lines=2)]
        [2, 1]
    """
    files: list[list[str]] = []
    current: list[str] = []
    size = 0
    for n, line in enumerate(lines):
        length = len(line.encode("utf-8")) + 1  # the newline
        if length > max_bytes:
            raise ValueError(f"request line {n} is {length} bytes, over the {max_bytes} limit")
        if current and (len(current) >= max_lines or size + length > max_bytes):
            files.append(current)
            current, size = [], 0
        current.append(line)
        size += length
    if current:
        files.append(current)
    return files


@dataclass(frozen=True)
class PlannedRequest:
    """An adjudication routed but not sent: the live request body, for a Batch API line.

    Attributes:
        body: The chat-completions body (exactly what the live path would send).
        candidate_ids: The numbered candidates' ids, in order (``"1"`` is the first).
        cache_key: The decision-cache key of this decision (None without a cache).
    """

    body: dict[str, Any]
    candidate_ids: tuple[str, ...]
    cache_key: str | None


@dataclass(frozen=True)
class LineOutcome:
    """One line of an output or error file.

    Attributes:
        custom_id: The request's ``custom_id``.
        status_code: HTTP status of the request (None when it never ran, e.g. expired).
        body: The response body (a ``chat.completion`` when ``status_code`` is 200).
        error_code: an :data:`~nem_llm.errors.ERROR_TYPES` code: from the HTTP status of a
            request that ran, else ``"batch_api"`` (expired, failed); the provider's own
            code is kept in ``error``.
        error: A short message for error lines.
    """

    custom_id: str
    status_code: int | None
    body: dict[str, Any] | None
    error_code: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status_code == 200 and self.body is not None


def parse_result_line(raw: str) -> LineOutcome:
    """Read one line of a batch output or error file.

    Raises:
        ValueError: the line is not JSON or has no ``custom_id``.
    """
    data = json.loads(raw)
    if not isinstance(data, dict) or not isinstance(data.get("custom_id"), str):
        raise ValueError("a batch result line must be an object with a string custom_id")
    response = data.get("response")
    error = data.get("error")
    status: int | None = None
    body: dict[str, Any] | None = None
    if isinstance(response, dict):
        status = int(response["status_code"]) if "status_code" in response else None
        body = response.get("body") if isinstance(response.get("body"), dict) else None
    if status == 200 and body is not None and not error:
        return LineOutcome(data["custom_id"], status, body)
    code: str | None = None
    message = ""
    if isinstance(error, dict):
        code, message = error.get("code"), str(error.get("message") or "")
    elif body is not None and isinstance(body.get("error"), dict):
        code = body["error"].get("code") or body["error"].get("type")
        message = str(body["error"].get("message") or "")
    text = f"HTTP {status}: {message}" if status is not None else message
    if code:
        text = f"{text} ({code})"
    closed = http_error_code(status) if status is not None else "batch_api"
    return LineOutcome(data["custom_id"], status, body, closed, text.strip())


class InvalidAnswer(ValueError):
    """The answer failed the response model's validation (instructor would re-ask).

    Attributes:
        usage: The tokens the invalid answer cost.
        cause: The validation error.
    """

    def __init__(self, message: str, *, usage: Usage, cause: Exception) -> None:
        super().__init__(message)
        self.usage = usage
        self.cause = cause


def _usage(body: Mapping[str, Any], prices: tuple[float, float]) -> Usage:
    raw = body.get("usage") if isinstance(body.get("usage"), Mapping) else {}
    assert isinstance(raw, Mapping)
    prompt = int(raw.get("prompt_tokens") or 0)
    completion = int(raw.get("completion_tokens") or 0)
    total = int(raw.get("total_tokens") or 0) or prompt + completion
    cost = (prompt * prices[0] + completion * prices[1]) / 1_000_000
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=total, cost_usd=cost
    )


def parse_answer(
    body: Mapping[str, Any],
    candidate_ids: Sequence[str],
    *,
    prices: tuple[float, float],
    mode: instructor.Mode = instructor.Mode.TOOLS,
    reasks: int = 0,
) -> Decision:
    """Validate a ``chat.completion`` body with the live path's response model.

    Raises:
        InvalidAnswer: the answer does not validate (carries its usage).
    """
    usage = _usage(body, prices)
    try:
        completion = ChatCompletion.model_validate(body)
        model: Any = choice_model(len(candidate_ids))
        choice = model.from_response(completion, mode=mode)
    except (ValidationError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise InvalidAnswer(_short(str(exc)), usage=usage, cause=exc) from exc
    label = str(choice.choice)
    return Decision(
        entity_id=None if label == NONE else candidate_ids[int(label) - 1],
        confidence=float(choice.confidence),
        reason=str(choice.reason),
        usage=usage,
        reasks=reasks,
    )


def reask_body(
    body: Mapping[str, Any],
    answer: Mapping[str, Any],
    error: InvalidAnswer,
    *,
    mode: instructor.Mode = instructor.Mode.TOOLS,
) -> dict[str, Any]:
    """The body of instructor's re-ask: the request plus the invalid answer and the error."""
    completion = ChatCompletion.model_validate(answer)
    kwargs = json.loads(json.dumps(body))  # a deep copy: instructor appends to messages
    return dict(handle_reask_kwargs(kwargs, mode, completion, error.cause))


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
