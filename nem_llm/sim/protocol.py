"""Pure request parsing and answer building for the simulator (no I/O, no clock).

The functions here read an OpenAI chat-completions request body the way instructor
sends it (Mode.TOOLS, JSON, MD_JSON, JSON_SCHEMA) and build the response bodies. The
answers are produced by a fixed policy, never by a language model.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = [
    "NONE_ID",
    "REWRITE_TOOL",
    "BadRequest",
    "ParsedRequest",
    "allowed_ids_from_schema",
    "chat_completion_body",
    "error_body",
    "extract_query",
    "load_gold",
    "lookup_gold",
    "names_answer_text",
    "parse_request",
    "propose_entity",
]

NONE_ID = "none"
#: Tool (function) name of the rewrite call: "which name(s) has this entity in the catalog?"
REWRITE_TOOL = "CatalogNames"

_SCHEMA_MARKER = "json_schema:"
_CANDIDATE_LINE = re.compile(r"^\s*\[(\d+)\]\s*id:\s*(.*?)\s*\|\s*name:", re.MULTILINE)
# the answer fields the simulator knows: nem_llm's numbered ``choice`` and a plain ``entity_id``
_ANSWER_FIELDS = ("choice", "entity_id")
_DECODER = json.JSONDecoder()


class BadRequest(ValueError):
    """The request body is not a usable chat-completions request (answered with HTTP 400)."""


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """What the simulator needs from one chat-completions request.

    Attributes:
        model: The ``model`` field of the request ("" if absent).
        tool_name: Name of the forced function in Mode.TOOLS, or None (answer in content).
        allowed: Allowed ``entity_id`` values in order (candidates in score order, then
            ``"none"``).
        query: The query text (between ``<query>`` and ``</query>``), unescaped.
        prompt_tokens: ``ceil(chars of message contents + schema JSON) / 4)``.
    """

    model: str
    tool_name: str | None
    allowed: tuple[str, ...]
    query: str
    prompt_tokens: int
    answer_field: str = "entity_id"
    labels: Mapping[str, str] | None = None
    proposal: str | None = None  # the answer to a discovery (EntityProposal) request
    rewrite: bool = False  # the rewrite call (CatalogNames): answer {"names": [...]}
    names_too: bool = False  # an adjudication whose schema also has ``names`` (for a none)

    def answer_text(
        self, entity_id: str, confidence: float, reason: str, names: Sequence[str] = ()
    ) -> str:
        """The answer JSON: ``entity_id`` as the schema wants it (an id, or its number), and
        ``names`` when the schema has them."""
        value = self.labels.get(entity_id, entity_id) if self.labels else entity_id
        answer: dict[str, Any] = {
            self.answer_field: value,
            "confidence": confidence,
            "reason": reason,
        }
        if self.names_too:
            answer["names"] = list(names)
        return json.dumps(answer)


def _text_of(content: Any) -> str:
    """Return the text of a message ``content`` (a string or a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, Mapping):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(parts)
    return ""


def _resolve(node: Any, root: Mapping[str, Any], depth: int = 0) -> Any:
    """Follow a local ``$ref`` (``#/$defs/X`` or ``#/definitions/X``) inside ``root``."""
    while isinstance(node, Mapping) and "$ref" in node and depth < 16:
        ref = node["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return node
        target: Any = root
        for key in ref[2:].split("/"):
            if not isinstance(target, Mapping) or key not in target:
                return node
            target = target[key]
        node = target
        depth += 1
    return node


def _values_of(node: Any, root: Mapping[str, Any], depth: int = 0) -> list[str] | None:
    node = _resolve(node, root)
    if not isinstance(node, Mapping) or depth > 8:
        return None
    if isinstance(node.get("enum"), list):
        return [str(v) for v in node["enum"] if v is not None]
    if "const" in node and node["const"] is not None:
        return [str(node["const"])]
    for key in ("anyOf", "oneOf", "allOf"):
        branches = node.get(key)
        if isinstance(branches, list):
            values: list[str] = []
            found = False
            for branch in branches:
                sub = _values_of(branch, root, depth + 1)
                if sub is not None:
                    found = True
                    values.extend(v for v in sub if v not in values)
            if found:
                return values
    return None


def allowed_ids_from_schema(schema: Any) -> list[str] | None:
    """Return the allowed values of ``properties.entity_id`` in a JSON schema, or None.

    Resolves ``$ref`` into ``$defs``/``definitions`` and reads ``enum``, ``const`` and
    ``anyOf``/``oneOf``/``allOf`` branches.
    """
    found = _answer_enum(schema)
    return found[1] if found is not None and found[0] == "entity_id" else None


def _answer_enum(schema: Any) -> tuple[str, list[str] | None] | None:
    """(answer field, its allowed values) of a JSON schema, or None if it has neither."""
    if not isinstance(schema, Mapping):
        return None
    props = _resolve(schema.get("properties"), schema)
    if not isinstance(props, Mapping):
        return None
    for name in _ANSWER_FIELDS:
        if name in props:
            return name, _values_of(props[name], schema)
    return None


def _schema_in_text(text: str) -> Any:
    """Find the JSON schema instructor's JSON modes embed in the system message."""
    start = text.find(_SCHEMA_MARKER)
    start = text.find("{", start + len(_SCHEMA_MARKER) if start >= 0 else 0)
    attempts = 0
    while start >= 0 and attempts < 32:
        attempts += 1
        try:
            value, _ = _DECODER.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, Mapping) and "properties" in value:
            return value
        start = text.find("{", start + 1)
    return None


def _candidates_in_text(text: str) -> list[str]:
    """Parse ``[N] id: <ID> | name: ...`` lines of the ``<candidates>`` block of ``text``."""
    start = text.find("<candidates>")
    if start < 0:
        return []
    end = text.find("</candidates>", start)
    block = text[start : end if end >= 0 else len(text)]
    return [cid for _, cid in _numbered_candidates(block)]


def _numbered_candidates(text: str) -> list[tuple[str, str]]:
    """(number, id) of each ``[N] id: <ID> | name: ...`` line, in order, ids unique."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for match in _CANDIDATE_LINE.finditer(text):
        cid = html.unescape(match.group(2).strip())
        if cid and cid not in seen:
            seen.add(cid)
            out.append((match.group(1), cid))
    return out


def extract_query(text: str) -> str | None:
    """Return the text between the first ``<query>`` and the last ``</query>``, or None.

    The text is stripped and HTML-unescaped.
    """
    start = text.find("<query>")
    if start < 0:
        return None
    end = text.rfind("</query>")
    if end < start:
        return None
    return html.unescape(text[start + len("<query>") : end].strip())


def _usage_chars(messages: Sequence[Any], body: Mapping[str, Any]) -> int:
    chars = 0
    for message in messages:
        if isinstance(message, Mapping):
            chars += len(_text_of(message.get("content")))
    tools = body.get("tools")
    if tools:
        chars += len(json.dumps(tools))
    fmt = body.get("response_format")
    if isinstance(fmt, Mapping) and isinstance(fmt.get("json_schema"), Mapping):
        chars += len(json.dumps(fmt["json_schema"]))
    return chars


def parse_request(body: Any) -> ParsedRequest:
    """Read what the simulator needs from a decoded chat-completions request body.

    Raises:
        BadRequest: ``body`` is not an object with a non-empty ``messages`` list.
    """
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    model = body.get("model")

    tool_name: str | None = None
    found: tuple[str, list[str] | None] | None = None
    schema: Any = None  # the answer's JSON schema, wherever the request carries it
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        functions = [
            t["function"]
            for t in tools
            if isinstance(t, Mapping) and isinstance(t.get("function"), Mapping)
        ]
        choice = body.get("tool_choice")
        wanted: Any = None
        if isinstance(choice, Mapping) and isinstance(choice.get("function"), Mapping):
            wanted = choice["function"].get("name")
        function = next((f for f in functions if f.get("name") == wanted), None)
        if function is None and functions:
            function = functions[0]
        if function is not None:
            tool_name = str(function.get("name") or "answer")
            schema = function.get("parameters")
            found = _answer_enum(schema)
    else:
        fmt = body.get("response_format")
        if isinstance(fmt, Mapping) and isinstance(fmt.get("json_schema"), Mapping):
            schema = fmt["json_schema"].get("schema")
            found = _answer_enum(schema)
        if found is None:
            for message in messages:
                if isinstance(message, Mapping) and message.get("role") == "system":
                    text = _text_of(message.get("content"))
                    if any(name in text for name in _ANSWER_FIELDS):
                        schema = _schema_in_text(text)
                        found = _answer_enum(schema)
                        if found is not None:
                            break

    query: str | None = None
    user_text = ""
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            text = _text_of(message.get("content"))
            query = extract_query(text)
            if query is not None:
                user_text = text
                break
    field, values = found if found is not None else ("entity_id", None)
    labels: dict[str, str] | None = None
    allowed: list[str]
    if field == "choice":
        # numbered answers: the policy still works on ids; the answer maps back to numbers
        start = user_text.find("<candidates>")
        numbered = _numbered_candidates(user_text[start:] if start >= 0 else "")
        offered = set(values or [])
        labels = {cid: num for num, cid in numbered if not offered or num in offered}
        allowed = [*labels, NONE_ID]
    elif values is not None:
        allowed = values
    else:
        allowed = _candidates_in_text(user_text)
        if NONE_ID not in allowed:
            allowed.append(NONE_ID)
    if not allowed:
        allowed = [NONE_ID]

    return ParsedRequest(
        model=model if isinstance(model, str) else "",
        tool_name=tool_name,
        allowed=tuple(allowed),
        query=query or "",
        prompt_tokens=math.ceil(_usage_chars(messages, body) / 4),
        answer_field=field,
        labels=labels,
        proposal=propose_entity(messages) if tool_name == PROPOSAL_TOOL else None,
        rewrite=_asks_for_names(body, messages, tool_name),
        names_too=found is not None and _has_names(schema),
    )


PROPOSAL_TOOL = "EntityProposal"
_MENTION_LINE = re.compile(r"^\[(\d+)\] \(x(\d+)\) (.*)$", re.MULTILINE)
_NAMED_CANDIDATE = re.compile(r"^\[(\d+)\] id: .*? \| name: (.*?)(?: \| |$)", re.MULTILINE)


def propose_entity(messages: Sequence[Any]) -> str:
    """The simulator's answer to a discovery request (nem_llm's ``EntityProposal`` tool).

    A fixed rule, not a model: the most frequent mention is the name, the other distinct
    mentions are aliases, every mention is a member, and a candidate whose name equals a
    mention (case-insensitively) is the existing entity; otherwise "none".
    """
    user = next(
        (_text_of(m.get("content")) for m in reversed(messages)
         if isinstance(m, Mapping) and m.get("role") == "user"),
        "",
    )  # fmt: skip
    found = [(n, int(c), html.unescape(t.strip())) for n, c, t in _MENTION_LINE.findall(user)]
    ranked = sorted(found, key=lambda m: -m[1])
    name = ranked[0][2] if ranked else "unnamed"
    aliases: list[str] = []
    for _, _, text in ranked[1:]:
        if text.casefold() != name.casefold() and text not in aliases and len(aliases) < 5:
            aliases.append(text)
    said = {t.casefold() for _, _, t in found}
    start = user.find("<candidates>")
    existing = next(
        (n for n, cname in _NAMED_CANDIDATE.findall(user[start:] if start >= 0 else "")
         if html.unescape(cname).casefold() in said),
        NONE_ID,
    )  # fmt: skip
    return json.dumps(
        {
            "name": name,
            "aliases": aliases,
            "description": f"simulated: proposed from {len(found)} distinct mentions",
            "members": [n for n, _, _ in found],
            "existing": existing,
            "confidence": 0.8,
            "reason": "simulated: the most frequent mention",
        }
    )


def _properties(schema: Any) -> Mapping[str, Any]:
    """The ``properties`` of a JSON schema (``{}`` if it has none)."""
    props = _resolve(schema.get("properties"), schema) if isinstance(schema, Mapping) else None
    return props if isinstance(props, Mapping) else {}


def _names_schema(schema: Any) -> bool:
    """True if a JSON schema has a ``names`` property and none of the choice fields."""
    props = _properties(schema)
    return "names" in props and not any(name in props for name in _ANSWER_FIELDS)


def _has_names(schema: Any) -> bool:
    """True if a JSON schema has a ``names`` property."""
    return "names" in _properties(schema)


def _asks_for_names(
    body: Mapping[str, Any], messages: Sequence[Any], tool_name: str | None
) -> bool:
    """True for the rewrite call: tool/schema named ``CatalogNames`` or a ``names`` schema."""
    if tool_name is not None:
        if tool_name == REWRITE_TOOL:
            return True
        tools = body.get("tools")
        return any(
            isinstance(t, Mapping)
            and isinstance(t.get("function"), Mapping)
            and t["function"].get("name") == tool_name
            and _names_schema(t["function"].get("parameters"))
            for t in (tools if isinstance(tools, list) else [])
        )
    fmt = body.get("response_format")
    if isinstance(fmt, Mapping) and isinstance(fmt.get("json_schema"), Mapping):
        spec = fmt["json_schema"]
        if spec.get("name") == REWRITE_TOOL or _names_schema(spec.get("schema")):
            return True
    for message in messages:
        if isinstance(message, Mapping) and message.get("role") == "system":
            text = _text_of(message.get("content"))
            if '"names"' in text and _names_schema(_schema_in_text(text)):
                return True
    return False


def names_answer_text(names: Sequence[str]) -> str:
    """The rewrite call's answer JSON: ``{"names": [...]}``."""
    return json.dumps({"names": list(names)})


def _normal(text: str) -> str:
    return " ".join(text.split()).casefold()


def load_gold(path: str) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """Load a labelled JSONL file into (exact query -> gold id, normalized query -> gold id).

    Each non-blank line is an object with ``query`` (string) and ``gold_id`` (string or
    null); other keys (``qid``...) are ignored; later lines override earlier ones.

    Raises:
        ConfigError: the file cannot be read, or a line is not such an object (the message
            names the line).
    """
    exact: dict[str, str | None] = {}
    normal: dict[str, str | None] = {}
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.readlines()
    except OSError as exc:
        raise ConfigError(f"gold_path {path!r} cannot be read: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON: {exc}") from exc
        if not isinstance(row, dict) or not isinstance(row.get("query"), str):
            raise ConfigError(f"{path}:{number}: expected an object with a string 'query'")
        gold = row.get("gold_id")
        if gold is not None and not isinstance(gold, (str, int)):
            raise ConfigError(f"{path}:{number}: 'gold_id' must be a string or null")
        gold_id = None if gold is None else str(gold)
        query = row["query"].strip()
        exact[query] = gold_id
        normal[_normal(query)] = gold_id
    return exact, normal


def lookup_gold(
    gold: tuple[dict[str, str | None], dict[str, str | None]], query: str
) -> tuple[bool, str | None]:
    """Return (known, gold id) for ``query``: exact text first, then whitespace/case-folded.

    A record query's block is its text and then a ``fields: name=value; ...`` line (the
    SDK's prompt): the gold is looked up by the text.
    """
    exact, normal = gold
    if query in exact:
        return True, exact[query]
    key = _normal(query)
    if key in normal:
        return True, normal[key]
    text, sep, _ = query.rpartition("\nfields: ")
    if sep:
        return lookup_gold(gold, text)
    return False, None


def error_body(message: str, type_: str, code: str | None) -> dict[str, Any]:
    """Return an OpenAI-shaped error body ``{"error": {message, type, param, code}}``."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def chat_completion_body(
    *,
    completion_id: str,
    created: int,
    model: str,
    tool_name: str | None,
    call_id: str,
    text: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """Return a ``chat.completion`` body carrying ``text`` as tool arguments or as content."""
    message: dict[str, Any]
    if tool_name is not None:
        message = {
            "role": "assistant",
            "content": None,
            "refusal": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": tool_name, "arguments": text},
                }
            ],
        }
        finish_reason = "tool_calls"
    else:
        message = {"role": "assistant", "content": text, "refusal": None}
        finish_reason = "stop"
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "system_fingerprint": None,
    }
