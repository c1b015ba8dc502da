"""An OpenAI-compatible endpoint for a small local model, answering adjudication calls.

``python -m nem_llm._llm.local_server --model smollm2-135m --port 8090`` serves
``GET /v1/models`` and ``POST /v1/chat/completions`` on the standard library's HTTP server
(no web framework needed). It answers what nem_llm asks: a forced tool call (instructor
``Mode.TOOLS``) or a ``response_format`` JSON schema (``Mode.JSON_SCHEMA``) whose schema
has one ``enum`` property (the candidate numbers and "none"). That property is decided by
:class:`~nem_llm._llm.local_runtime.ChoiceScorer` (next-token probabilities restricted to
the allowed values), so every answer fits the schema; the other properties are filled from
that decision: a number (``confidence``) is the answer's probability, a string (``reason``)
says how the answer was chosen, a list (``names``) is empty: this model does not rewrite.

One model answers one call at a time (a lock): a CPU model gains nothing from parallel
calls, so clients should send one at a time (``local_llm.LOCAL_LIMITS``).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["answer_arguments", "find_schema", "main", "make_server"]

Chooser = Callable[[Sequence[dict[str, str]], Sequence[str]], tuple[int, list[float], int]]


class BadRequest(ValueError):
    """The request is not an adjudication call this server can answer."""


def find_schema(body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(the JSON schema of the answer, the tool name or ``None`` for ``response_format``)."""
    tools = body.get("tools") or []
    if tools:
        choice = body.get("tool_choice")
        name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        for tool in tools:
            function = tool.get("function", {})
            if name is None or function.get("name") == name:
                return dict(function.get("parameters") or {}), str(function.get("name"))
        raise BadRequest(f"tool_choice names {name!r}, which is not among the tools")
    response_format = body.get("response_format") or {}
    if response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema") or {}
        return dict(spec.get("schema") or {}), None
    raise BadRequest("send a forced tool call or a json_schema response_format")


def _enum_field(schema: dict[str, Any]) -> tuple[str, list[str]]:
    """The schema's one property with an ``enum`` (the answer to choose)."""
    for name, prop in (schema.get("properties") or {}).items():
        spec = prop
        if "$ref" in prop:  # pydantic puts a Literal in $defs when it is shared
            ref = str(prop["$ref"]).rsplit("/", 1)[-1]
            spec = (schema.get("$defs") or {}).get(ref, {})
        if isinstance(spec.get("enum"), list) and spec["enum"]:
            return name, [str(v) for v in spec["enum"]]
    raise BadRequest("the answer schema has no enum property: nothing to choose among")


def answer_arguments(
    schema: dict[str, Any], choose: Chooser, messages: Sequence[dict[str, str]], model: str
) -> tuple[dict[str, Any], int]:
    """(the answer object for ``schema``, prompt tokens): the enum chosen, the rest derived."""
    field, options = _enum_field(schema)
    index, probs, prompt_tokens = choose(messages, options)
    picked, p = options[index], probs[index]
    args: dict[str, Any] = {}
    for name, prop in (schema.get("properties") or {}).items():
        kind = prop.get("type")
        if name == field:
            args[name] = picked
        elif kind in ("number", "integer"):
            args[name] = round(p, 4)
        elif kind == "string":
            ranked = sorted(zip(options, probs, strict=True), key=lambda x: -x[1])[:3]
            shown = ", ".join(f"{o} {q:.2f}" for o, q in ranked)
            args[name] = f"{model}: most probable answer among {len(options)} ({shown})"
        elif kind == "array":
            args[name] = []
        elif kind == "boolean":
            args[name] = False
    return args, prompt_tokens


def completion(body: dict[str, Any], choose: Chooser, model: str) -> dict[str, Any]:
    """The ``chat.completion`` response for one request body."""
    messages = body.get("messages") or []
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    schema, tool = find_schema(body)
    args, prompt_tokens = answer_arguments(schema, choose, messages, model)
    text = json.dumps(args, ensure_ascii=False)
    message: dict[str, Any] = {"role": "assistant", "content": None if tool else text}
    if tool is not None:
        message["tool_calls"] = [
            {
                "id": f"call_{uuid.uuid4().hex[:12]}",
                "type": "function",
                "function": {"name": tool, "arguments": text},
            }
        ]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": message, "finish_reason": "tool_calls" if tool else "stop"}
        ],
        # one token is decided; the rest of the answer is derived, not generated
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 1,
            "total_tokens": prompt_tokens + 1,
        },
    }


def make_server(host: str, port: int, choose: Chooser, model: str) -> ThreadingHTTPServer:
    """An HTTP server answering with ``choose`` (one call at a time) as model ``model``."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per call is noise; errors are answered, not logged

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [{"id": model, "object": "model"}]})
            elif self.path.rstrip("/") == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with lock:
                    payload = completion(body, choose, model)
            except (BadRequest, ValueError, TypeError, KeyError) as exc:
                self._send(400, {"error": {"message": str(exc), "type": "invalid_request"}})
                return
            self._send(200, payload)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def main(argv: Sequence[str] | None = None) -> int:
    """Load the model, then serve until interrupted (the parent process stops it)."""
    from .local_models import MODELS, LocalLLMUnavailable, local_model
    from .local_runtime import ChoiceScorer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", choices=sorted(MODELS))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        spec = local_model(args.model)
        scorer = ChoiceScorer.load(spec, threads=args.threads)
    except LocalLLMUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = make_server(args.host, args.port, scorer.choose, spec.served_name)
    print(f"ready: http://{args.host}:{args.port}/v1 model={spec.served_name}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
