"""Fakes for your own tests: no model download, no network.

- :class:`FakeEmbedder`: deterministic character-trigram hashing vectors (fast, no torch).
- :class:`FakeLLM`: an ``httpx`` handler that answers chat-completions requests the way
  instructor expects; use it with ``httpx.MockTransport`` or ``respx``::

      llm = FakeLLM(lambda query, ids: ids[0])               # always the top candidate
      http = httpx.AsyncClient(transport=httpx.MockTransport(llm))
      client = AsyncOpenAI(api_key="test", base_url="http://fake/v1", http_client=http)
      matcher = Matcher(entities, client=client, embedder=FakeEmbedder())

Its answers come from your policy function, not from a language model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from .sim.protocol import BadRequest, chat_completion_body, parse_request

__all__ = ["FakeEmbedder", "FakeLLM", "completion_json"]

Policy = Callable[[str, tuple[str, ...]], str | dict[str, Any] | httpx.Response]


class FakeEmbedder:
    """Hashes lower-cased character trigrams into a unit vector (similar strings, similar
    vectors); deterministic across processes."""

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim
        self.calls = 0
        self.texts_encoded = 0

    @property
    def name(self) -> str:
        return f"fake-trigram-{self.dim}"

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.calls += 1
        self.texts_encoded += len(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            padded = f"  {text.lower()}  "
            for i in range(len(padded) - 2):
                digest = hashlib.blake2b(padded[i : i + 3].encode(), digest_size=4).digest()
                out[row, int.from_bytes(digest, "little") % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        result: npt.NDArray[np.float32] = out / norms
        return result


def completion_json(
    answer: dict[str, Any] | str,
    *,
    tool_name: str | None = "EntityChoice",
    prompt_tokens: int = 100,
    completion_tokens: int = 20,
) -> dict[str, Any]:
    """An OpenAI ``chat.completion`` body carrying ``answer`` as tool-call arguments.

    ``answer`` may be a dict (serialized as JSON) or raw text (e.g. malformed JSON).
    """
    text = answer if isinstance(answer, str) else json.dumps(answer)
    return chat_completion_body(
        completion_id="chatcmpl-fake",
        created=0,
        model="fake",
        tool_name=tool_name,
        call_id="call_fake",
        text=text,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )


class FakeLLM:
    """An httpx request handler that answers chat completions from a policy function.

    The policy gets ``(query, allowed_ids)`` (candidate ids in score order, then "none")
    and returns an id, a full answer dict (``entity_id``, ``confidence``, ``reason``), or
    an ``httpx.Response`` (to simulate errors); ids are sent back the way the request's
    schema asks (nem_llm's numbered ``choice``). Discovery's ``EntityProposal`` requests
    are answered by the simulator's rule (``sim.protocol.propose_entity``) unless the
    policy returns an ``httpx.Response``. Every request is kept in ``requests``.
    """

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy: Policy = policy or (lambda _query, ids: ids[0])
        self.requests: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": []})
        body = json.loads(request.content)
        self.requests.append(body)
        try:
            parsed = parse_request(body)
        except BadRequest as exc:
            return httpx.Response(400, json={"error": {"message": str(exc), "type": "bad"}})
        answer = self.policy(parsed.query, parsed.allowed)
        if isinstance(answer, httpx.Response):
            return answer
        if parsed.proposal is not None:  # a discovery request: the simulator's rule answers
            text = parsed.proposal
        elif isinstance(answer, str):
            text = parsed.answer_text(answer, 0.9, "fake policy")
        else:
            answer = dict(answer)
            entity_id = str(answer.pop("entity_id", ""))
            mapped = json.loads(parsed.answer_text(entity_id, 0.9, "fake policy"))
            text = json.dumps({**mapped, **answer})
        return httpx.Response(
            200,
            json=completion_json(
                text, tool_name=parsed.tool_name, prompt_tokens=parsed.prompt_tokens
            ),
        )
