"""Error answers: ``{"error": {"type", "message", "field"}}`` with the right status.

Every error the service answers goes through :func:`error_json`; :class:`ApiError` is what
a handler raises to answer one, :func:`invalid_json` turns pydantic's validation errors
into one naming the deepest field, and :func:`nem_error_json` maps nem_llm's own errors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse

from ...errors import ConfigError, InputError, NemLLMError, NotReadyError
from .redaction import Redactor
from .schemas import ErrorDetail, ErrorResponse

__all__ = ["ApiError", "error_json", "field_of", "invalid_json", "nem_error_json"]

log = logging.getLogger("nem_llm.service")


class ApiError(Exception):
    """An error answer a handler raises: its status, type, message and field."""

    def __init__(self, status: int, type_: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.field = field


def error_json(
    status: int, type_: str, message: str, field: str | None = None, *, close: bool = False
) -> JSONResponse:
    """The error answer (401 says how to authenticate, 503 when to come back; ``close``:
    the connection is closed after it)."""
    body = ErrorResponse(error=ErrorDetail(type=type_, message=message, field=field))
    response = JSONResponse(body.model_dump(), status_code=status)
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    elif status == 503:
        response.headers["Retry-After"] = "1"
    if close:
        response.headers["Connection"] = "close"
    return response


def field_of(loc: Sequence[int | str]) -> str | None:
    """``("body", "query", "list[str]", 3)`` -> ``"query[3]"`` (pydantic's union tags dropped)."""
    parts = [p for p in loc if p != "body" and not (isinstance(p, str) and _is_type_tag(p))]
    if not parts:
        return None
    out = str(parts[0])
    for p in parts[1:]:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _is_type_tag(part: str) -> bool:
    return part in {"str", "int", "float", "bool", "dict", "list"} or "[" in part


def invalid_json(errors: Sequence[Any]) -> JSONResponse:
    """The 422 answer of a body that fails validation, naming its deepest field."""
    # the deepest location names the field best (a union reports every branch)
    first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {}
    message = str(first.get("msg", "invalid request"))
    return error_json(422, "invalid_request", message, field_of(first.get("loc", ())))


def nem_error_json(exc: NemLLMError, redactor: Redactor) -> JSONResponse:
    """The answer to one of nem_llm's errors raised by a request (secrets redacted)."""
    message = redactor.text(str(exc))
    if isinstance(exc, NotReadyError):
        return error_json(503, "not_ready", message)
    if isinstance(exc, ConfigError):
        field = next((f for f in ("where", "threshold", "top_k") if f in message), None)
        return error_json(422, "invalid_option", message, field)
    if isinstance(exc, InputError):
        return error_json(422, "invalid_query", message, "query")
    log.error("request failed: %s", message)
    return error_json(500, type(exc).__name__, message)
