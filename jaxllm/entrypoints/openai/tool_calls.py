"""Tool calling in chat completions, as vLLM's server does it.

``tool_choice``:

- ``"none"``: the tools reach the chat template; the reply is plain text.
- a named function (``{"type": "function", "function": {"name": ...}}``): the reply is constrained
  to a JSON object valid under that function's ``parameters`` schema (structured outputs) and
  returned as one call of it.
- ``"required"``: the reply is constrained to a JSON array of one or more
  ``{"name": <a tool's name>, "parameters": <its arguments>}`` objects, each returned as a call;
  finish_reason ``"tool_calls"``.
- ``"auto"`` (the default when tools are given): the model may answer in text or call tools in
  its own format, which a tool-call parser reads out of the reply. It needs the server started
  with ``--enable-auto-tool-choice --tool-call-parser NAME``, as in vLLM; the parser here is
  ``hermes`` (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``: Hermes, Qwen2.5/3 and
  other models trained on that format).

Named and required calls need no parser: the constraint makes the reply parseable.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from jaxllm.structured.params import StructuredOutputsParams

TOOL_CALL_PARSERS = ("hermes",)


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "none", "auto", "required" or "named"
    name: str | None = None  # the function of "named"


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def resolve_tool_choice(tools: list[dict[str, Any]] | None, tool_choice: str | dict | None) -> ToolChoice:
    """The request's tool choice, with its tools checked; ValueError names what is wrong."""
    names = [_tool_name(tool, i) for i, tool in enumerate(tools or ())]
    if len(set(names)) != len(names):
        raise ValueError(f"tools have duplicate function names: {sorted({n for n in names if names.count(n) > 1})}")
    if tool_choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice={tool_choice!r} must be 'none', 'auto', 'required' or a named function")
        if tool_choice != "none" and not tools:
            raise ValueError(f"tool_choice={tool_choice!r} needs tools")
        return ToolChoice(tool_choice)
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if tool_choice.get("type") != "function" or not isinstance(function, dict) or not isinstance(
            function.get("name"), str):
        raise ValueError("a named tool_choice must be {'type': 'function', 'function': {'name': ...}}")
    if function["name"] not in names:
        raise ValueError(f"tool_choice names the function {function['name']!r}, which is not in tools {names}")
    return ToolChoice("named", function["name"])


def _tool_name(tool: Any, index: int) -> str:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
        raise ValueError(f"tools[{index}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"tools[{index}].function.name must be a non-empty string")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ValueError(f"tools[{index}].function.parameters must be a JSON schema object")
    return name


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def constraint(tools: list[dict[str, Any]], choice: ToolChoice, **whitespace) -> StructuredOutputsParams | None:
    """The structured output a named or required tool choice imposes on the reply (None otherwise)."""
    by_name = {tool["function"]["name"]: tool for tool in tools or ()}
    if choice.mode == "named":
        return StructuredOutputsParams(json=_parameters(by_name[choice.name]), **whitespace)
    if choice.mode != "required":
        return None
    defs: dict[str, Any] = {}
    branches = []
    for name, tool in by_name.items():
        parameters = dict(_parameters(tool))
        defs.update(parameters.pop("$defs", {}))  # refs inside point at the root's $defs
        branches.append({"type": "object", "properties": {"name": {"enum": [name]}, "parameters": parameters},
                         "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": branches}}
    if defs:
        schema["$defs"] = defs
    return StructuredOutputsParams(json=schema, **whitespace)


@dataclass
class ParsedReply:
    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's {id, type, function}


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": tool_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def parse_reply(text: str, choice: ToolChoice, parser: str | None) -> ParsedReply:
    """The reply's content and tool calls under ``choice`` (``parser``: auto's tool-call parser)."""
    if choice.mode == "named":
        return ParsedReply(None, [_call(choice.name, text)])
    if choice.mode == "required":
        try:
            calls = json.loads(text)
        except json.JSONDecodeError:  # cut short by max_tokens or a stop string
            return ParsedReply(text)
        return ParsedReply(None, [_call(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in calls])
    if choice.mode == "auto" and parser == "hermes":
        return parse_hermes(text)
    return ParsedReply(text)


_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def parse_hermes(text: str) -> ParsedReply:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (the last may be left
    open at the end); the text before the first is the content. A block that is not such JSON
    leaves the whole reply as content, as vLLM's parser does."""
    start = text.find(_HERMES_OPEN)
    if start < 0:
        return ParsedReply(text)
    calls = []
    for body in _HERMES_CALL.findall(text, start):
        try:
            call = json.loads(body)
            name, arguments = call["name"], call.get("arguments", {})
        except (json.JSONDecodeError, KeyError, TypeError):
            return ParsedReply(text)
        if not isinstance(name, str):
            return ParsedReply(text)
        calls.append(_call(name, json.dumps(arguments, ensure_ascii=False)))
    content = text[:start].strip()
    return ParsedReply(content or None, calls)


class StreamedReply:
    """One choice's streamed reply: which text may go out as content now, and the tool calls once
    the reply is complete.

    Named: every piece of text is the call's arguments, sent as it comes. Required: nothing goes
    out before the end (the text is one JSON array). Auto with the hermes parser: text goes out as
    content until a ``<tool_call>`` starts (a possible start of one is held back); from there the
    rest is kept for the parser. None and auto without a parser: all text is content.
    """

    def __init__(self, choice: ToolChoice, parser: str | None):
        self.choice, self.parser = choice, parser
        self.text = ""  # everything so far
        self._sent = 0  # characters of ``text`` sent as content
        self._calling = False  # auto: a <tool_call> has started
        self.call_id = tool_call_id() if choice.mode == "named" else None
        self.named_sent = False  # the named call's first piece (with its id and name) went out

    @property
    def parses_calls(self) -> bool:
        return self.choice.mode in ("named", "required") or (self.choice.mode == "auto" and self.parser == "hermes")

    def content_delta(self, piece: str) -> str:
        """Add ``piece``; returns the text that may be sent as content now."""
        self.text += piece
        if self.choice.mode in ("named", "required"):
            return ""
        if not self.parses_calls:
            self._sent = len(self.text)
            return piece
        if self._calling:
            return ""
        start = self.text.find(_HERMES_OPEN, self._sent)
        if start >= 0:
            self._calling = True
            out, self._sent = self.text[self._sent:start], start
            return out
        held = _longest_marker_prefix(self.text, _HERMES_OPEN)
        end = len(self.text) - held
        out, self._sent = self.text[self._sent:end], max(self._sent, end)
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """At the end: the content not sent yet, and the tool calls (for auto: none when the held
        text turned out not to be a call)."""
        if not self.parses_calls or self.choice.mode == "named":
            return "", []
        if self.choice.mode == "required":
            parsed = parse_reply(self.text, self.choice, self.parser)
            return (parsed.content or ""), parsed.tool_calls
        parsed = parse_hermes(self.text[self._sent:]) if self._calling else ParsedReply(self.text[self._sent:])
        if not parsed.tool_calls:
            return self.text[self._sent:], []
        return (parsed.content or ""), parsed.tool_calls


def _longest_marker_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
