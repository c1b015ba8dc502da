"""How results go out past a deadline: the NDJSON stream, and the ``deadline`` record."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing

from fastapi.responses import Response
from starlette.types import Message, Receive, Scope, Send

from ..._matching.pipeline import query_text
from ...models import MatchResult

__all__ = ["ResultStream", "deadline_result"]


def deadline_result(index: int, query: object, seconds: float) -> MatchResult:
    """The record of a query the request's deadline stopped (its LLM call is cancelled)."""
    return MatchResult(
        query=query_text(query)[:1000],
        index=index,
        status="error",
        error=f"the request's deadline ({seconds:g} s) passed before a decision",
        error_type="deadline",
        latency_s=seconds,
    )


class ResultStream(Response):
    """Streams results as NDJSON lines with plain awaits (no task group), until a deadline.

    Starlette's ``StreamingResponse`` runs the body in an anyio task group; cancelling
    it there interrupts the clean-up of the Matcher's stream, so httpcore never closes the
    LLM connection of a cancelled call (the provider keeps working for nobody). Here a
    disconnect cancels the request task (see ``Guard``) and the clean-up runs whole. At
    the deadline the stream is closed and every query not answered yet gets its
    ``deadline`` record: one line per query, always.
    """

    media_type = "application/x-ndjson"

    def __init__(
        self,
        results: AsyncGenerator[MatchResult, None],
        queries: Sequence[object],
        *,
        deadline_at: float,
        seconds: float,
        line: Callable[[MatchResult], bytes],
    ) -> None:
        super().__init__(media_type=self.media_type)
        self.results = results
        self.queries = queries
        self.deadline_at = deadline_at
        self.seconds = seconds
        self.line = line

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        sent: set[int] = set()
        try:
            async with asyncio.timeout_at(self.deadline_at), aclosing(self.results):
                async for result in self.results:
                    sent.add(result.index)
                    await send(_chunk(self.line(result)))
        except TimeoutError:
            for i, query in enumerate(self.queries):
                if i not in sent:
                    await send(_chunk(self.line(deadline_result(i, query, self.seconds))))
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _chunk(body: bytes) -> Message:
    return {"type": "http.response.body", "body": body, "more_body": True}
