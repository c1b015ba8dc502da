"""Secrets out of every answer and log line: the bearer token and the LLM client's key."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["REDACTED", "RedactingRecords", "Redactor"]

REDACTED = "[redacted]"


class Redactor:
    """Replace known secrets in text and bytes (keys shorter than 6 chars are not secrets)."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        self.secrets = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)
        self._bytes = [s.encode() for s in self.secrets]

    def text(self, value: str) -> str:
        """``value`` with every secret replaced by ``[redacted]``."""
        for secret in self.secrets:
            value = value.replace(secret, REDACTED)
        return value

    def data(self, value: bytes) -> bytes:
        """The bytes twin of :meth:`text` (response bodies)."""
        for secret in self._bytes:
            value = value.replace(secret, REDACTED.encode())
        return value


class RedactingRecords:
    """A log-record factory that redacts secrets from every record, whichever library logs.

    Installed for the app's lifetime (instructor and openai log provider error messages,
    which may quote a key; a client may put a key in a query string). The message and
    each text argument are redacted in place, so formatters that read ``record.args``
    (uvicorn's access log unpacks them) keep working; only a secret that appears once
    formatted (in an object's ``str``) makes the record one plain, redacted message.
    Tracebacks are formatted and redacted up front.
    """

    def __init__(self, redactor: Redactor, previous: Callable[..., logging.LogRecord]) -> None:
        self.redactor = redactor
        self.previous = previous

    def _arg(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redactor.text(value)
        if isinstance(value, bytes):
            return self.redactor.data(value)
        return value

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.previous(*args, **kwargs)
        if isinstance(record.msg, str):
            record.msg = self.redactor.text(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self._arg(a) for a in record.args)
        elif isinstance(record.args, Mapping):
            record.args = {k: self._arg(v) for k, v in record.args.items()}
        try:
            message = record.getMessage()
        except Exception:  # a broken record is the logging module's to report
            message = ""
        redacted = self.redactor.text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[0] is not None:
            text = "".join(traceback.format_exception(*record.exc_info))
            record.exc_text = self.redactor.text(text).rstrip("\n")
        return record
