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
  with ``--enable-auto-tool-choice --tool-call-parser NAME``, as in vLLM. Parsers (vLLM's names):
  ``hermes`` (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``: Hermes, Qwen2.5/3 and
  other models trained on that format), ``llama3_json`` (Llama 3.1/3.2: the reply is
  ``{"name": ..., "parameters": {...}}``, several joined by ``;``; also ``llama4_json``),
  ``pythonic`` (Llama 3.2/4 and others: ``[get_weather(city="Paris")]``; also
  ``llama4_pythonic``), ``mistral`` (``[TOOL_CALLS]``), ``granite`` (Granite 3.x:
  ``<|tool_call|>[{...}]``), ``jamba`` (``<tool_calls>[...]</tool_calls>``), ``internlm``
  (``<|action_start|><|plugin|>{...}<|action_end|>``), ``phi4_mini_json`` (``functools[...]``),
  ``deepseek_v3`` (DeepSeek-V3 / R1's ``<｜tool▁calls▁begin｜>`` blocks) and ``qwen3_coder``
  (Qwen3-Coder's ``<function=NAME><parameter=KEY>value</parameter>``, typed by the tools' schemas),
  ``xlam``, ``minimax``, ``kimi_k2`` and ``glm45`` (those models' formats).

Named and required calls need no parser: the constraint makes the reply parseable.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
import string
import uuid
from dataclasses import dataclass, field
from typing import Any

from jaxllm.structured.params import StructuredOutputsParams


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "none", "auto", "required" or "named"
    name: str | None = None  # the function of "named"
    # The request's tools: parsers whose calls carry untyped text (qwen3_coder) read each
    # parameter's type from them.
    tools: tuple = field(default=(), compare=False)


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def resolve_tool_choice(tools: list[dict[str, Any]] | None, tool_choice: str | dict | None) -> ToolChoice:
    """The request's tool choice, with its tools checked; ValueError names what is wrong."""
    names = [_tool_name(tool, i) for i, tool in enumerate(tools or ())]
    if len(set(names)) != len(names):
        raise ValueError(f"tools have duplicate function names: {sorted({n for n in names if names.count(n) > 1})}")
    if tool_choice is None:
        return ToolChoice("auto" if tools else "none", tools=tuple(tools or ()))
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice={tool_choice!r} must be 'none', 'auto', 'required' or a named function")
        if tool_choice != "none" and not tools:
            raise ValueError(f"tool_choice={tool_choice!r} needs tools")
        return ToolChoice(tool_choice, tools=tuple(tools or ()))
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
    if choice.mode == "auto" and parser is not None:
        return TOOL_CALL_PARSER_TABLE[parser].parse_with(text, choice.tools)
    return ParsedReply(text)


_HERMES_OPEN = "<tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def _named_calls(items: Any, arguments_keys: tuple[str, ...]) -> list[dict[str, Any]] | None:
    """OpenAI calls of JSON objects ``{"name": str, <an arguments key>: ...}``; None if any is not one."""
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = next((item[k] for k in arguments_keys if k in item), {})
        calls.append(_call(item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls


def parse_hermes(text: str) -> ParsedReply:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (the last may be left
    open at the end); the text before the first is the content. A block that is not such JSON
    leaves the whole reply as content, as vLLM's parser does."""
    start = text.find(_HERMES_OPEN)
    if start < 0:
        return ParsedReply(text)
    items = []
    for body in _HERMES_CALL.findall(text, start):
        try:
            items.append(json.loads(body))
        except json.JSONDecodeError:
            return ParsedReply(text)
    calls = _named_calls(items, ("arguments",))
    if calls is None:
        return ParsedReply(text)
    return ParsedReply(text[:start].strip() or None, calls)


_PYTHON_TAG = "<|python_tag|>"


def _json_objects(text: str, separator: str) -> list | None:
    """The JSON values of ``text``, one after another, each followed by ``separator`` or the end
    (whitespace around them allowed); None if it is not exactly that."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)
        rest = text[i:].lstrip()
        if not rest:
            return values
        if not rest.startswith(separator):
            return None
        i = len(text) - len(rest) + len(separator)


def parse_llama3_json(text: str) -> ParsedReply:
    """Llama 3.1 / 3.2 JSON tool calls (vLLM's ``llama3_json``): the whole reply, after an optional
    ``<|python_tag|>``, is ``{"name": ..., "parameters": {...}}`` (or ``"arguments"``), several
    joined by ``;``. Anything else is content."""
    body = text.strip().removeprefix(_PYTHON_TAG)
    if not body.lstrip().startswith("{"):
        return ParsedReply(text)
    values = _json_objects(body, ";")
    calls = None if values is None else _named_calls(values, ("parameters", "arguments"))
    return ParsedReply(text) if calls is None else ParsedReply(None, calls)


def parse_pythonic(text: str) -> ParsedReply:
    """Python-style tool calls (vLLM's ``pythonic``: Llama 3.2 / 4 and others): the whole reply is a
    list of calls with keyword arguments of literal values, ``[get_weather(city="Paris"), ping()]``.
    Anything else is content."""
    body = text.strip().removeprefix(_PYTHON_TAG).strip()
    if not body.startswith("["):
        return ParsedReply(text)
    try:
        tree = ast.parse(body, mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            return ParsedReply(text)
        calls = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                return ParsedReply(text)
            if any(k.arg is None for k in node.keywords):  # **kwargs
                return ParsedReply(text)
            arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            calls.append(_call(node.func.id, json.dumps(arguments, ensure_ascii=False)))
    except (SyntaxError, ValueError, TypeError, RecursionError):
        return ParsedReply(text)
    return ParsedReply(None, calls)


_MISTRAL_CALLS, _MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"
_ALPHANUMERIC = string.ascii_letters + string.digits


def mistral_tool_call_id() -> str:
    """Mistral's chat templates take 9 letters and digits as a tool call's id, as vLLM generates them."""
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))


def parse_mistral(text: str) -> ParsedReply:
    """Mistral tool calls (vLLM's ``mistral``): after ``[TOOL_CALLS]``, a JSON list of
    ``{"name": ..., "arguments": {...}}`` (tokenizers before v11), or ``name[ARGS]{...}``, one
    ``[TOOL_CALLS]`` per call (v11 and later). The text before the first is the content; a reply
    whose calls do not parse is all content."""
    start = text.find(_MISTRAL_CALLS)
    if start < 0:
        return ParsedReply(text)
    items = []
    for part in text[start:].split(_MISTRAL_CALLS)[1:]:
        name, has_args, arguments = part.partition(_MISTRAL_ARGS)
        try:
            if has_args:
                items.append({"name": name.strip(), "arguments": json.loads(arguments)})
            else:
                value = json.loads(part)
                items += value if isinstance(value, list) else [value]
        except json.JSONDecodeError:
            return ParsedReply(text)
    calls = _named_calls(items, ("arguments",)) if items else None
    if calls is None or any(not c["function"]["name"] for c in calls):
        return ParsedReply(text)
    for call in calls:
        call["id"] = mistral_tool_call_id()
    return ParsedReply(text[:start].strip() or None, calls)


def parse_granite(text: str) -> ParsedReply:
    """IBM Granite 3.x tool calls (vLLM's ``granite``): the whole reply, after an optional
    ``<|tool_call|>`` (3.0) or ``<tool_call>`` (3.1), is a JSON list of ``{"name": ...,
    "arguments": {...}}``. Anything else is content."""
    body = text.strip()
    for marker in (_GRANITE_CALL, _HERMES_OPEN):
        body = body.removeprefix(marker).strip()
    if not body.startswith("["):
        return ParsedReply(text)
    try:
        items = json.loads(body)
    except json.JSONDecodeError:
        return ParsedReply(text)
    calls = _list_calls(items, ("arguments",))
    return ParsedReply(text) if calls is None else ParsedReply(None, calls)


def _list_calls(items: Any, arguments_keys: tuple[str, ...]) -> list[dict[str, Any]] | None:
    """``_named_calls`` of a non-empty JSON list; None for anything else."""
    return _named_calls(items, arguments_keys) if isinstance(items, list) and items else None


def _tagged_calls(text: str, open_tag: str, close_tag: str, read, arguments_keys: tuple[str, ...]) -> ParsedReply:
    """Calls between ``open_tag`` and ``close_tag`` (which may be missing at the end): ``read``
    turns that text into a list of ``{"name": ..., <an arguments key>: ...}``; the text before is
    content, and a body that does not read is all content."""
    start = text.find(open_tag)
    if start < 0:
        return ParsedReply(text)
    try:
        calls = _list_calls(read(text[start + len(open_tag):].split(close_tag)[0]), arguments_keys)
    except json.JSONDecodeError:
        return ParsedReply(text)
    return ParsedReply(text) if calls is None else ParsedReply(text[:start].strip() or None, calls)


def parse_jamba(text: str) -> ParsedReply:
    """AI21 Jamba tool calls (vLLM's ``jamba``): ``<tool_calls>[{"name": ..., "arguments": {...}},
    ...]</tool_calls>``; the text before is content."""
    return _tagged_calls(text, _JAMBA_OPEN, _JAMBA_CLOSE, json.loads, ("arguments",))


def parse_internlm(text: str) -> ParsedReply:
    """InternLM2 / 2.5 tool calls (vLLM's ``internlm``): ``<|action_start|><|plugin|>`` then one
    ``{"name": ..., "parameters": {...}}`` (or ``"arguments"``) and ``<|action_end|>``; the text
    before is content."""
    return _tagged_calls(text, _INTERNLM_OPEN, _INTERNLM_CLOSE, lambda body: [json.loads(body)],
                         ("parameters", "arguments"))


def parse_phi4_mini_json(text: str) -> ParsedReply:
    """Phi-4-mini tool calls (vLLM's ``phi4_mini_json``): the whole reply is ``functools[...]``, a
    JSON list of ``{"name": ..., "arguments": {...}}``. Anything else is content."""
    body = text.strip()
    if not body.startswith(_PHI4_CALLS):
        return ParsedReply(text)
    try:
        calls = _list_calls(json.loads(body[len(_PHI4_CALLS) - 1:]), ("arguments", "parameters"))
    except json.JSONDecodeError:
        return ParsedReply(text)
    return ParsedReply(text) if calls is None else ParsedReply(None, calls)


_DEEPSEEK_CALL = re.compile(r"<｜tool▁call▁begin｜>(?P<type>.*?)<｜tool▁sep｜>(?P<name>.*?)\n```(?:json)?\n"
                            r"(?P<arguments>.*?)\n```\s*<｜tool▁call▁end｜>", re.DOTALL)


def parse_deepseek_v3(text: str) -> ParsedReply:
    """DeepSeek-V3 / R1 tool calls (vLLM's ``deepseek_v3``): after ``<｜tool▁calls▁begin｜>``, each
    ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME`` then the arguments in a ```json block and
    ``<｜tool▁call▁end｜>``; the text before is content."""
    start = text.find(_DEEPSEEK_OPEN)
    if start < 0:
        return ParsedReply(text)
    calls = []
    for match in _DEEPSEEK_CALL.finditer(text, start):
        try:
            arguments = json.loads(match["arguments"])
        except json.JSONDecodeError:
            return ParsedReply(text)
        calls.append(_call(match["name"].strip(), json.dumps(arguments, ensure_ascii=False)))
    return ParsedReply(text[:start].strip() or None, calls) if calls else ParsedReply(text)


_QWEN3_FUNCTION = re.compile(r"<function=(?P<name>[^>\n]+)>(?P<body>.*?)(?:</function>|$)", re.DOTALL)
_QWEN3_PARAMETER = re.compile(r"<parameter=(?P<name>[^>\n]+)>(?P<value>.*?)(?:</parameter>|(?=<parameter=)|$)",
                              re.DOTALL)


def parse_qwen3_coder(text: str, tools: tuple = ()) -> ParsedReply:
    """Qwen3-Coder tool calls (vLLM's ``qwen3_coder``): ``<tool_call><function=NAME>`` with one
    ``<parameter=KEY>value</parameter>`` per argument, then ``</function></tool_call>``; the text
    before the first is content. Values are text: each becomes its parameter's JSON type in the
    request's tools (string: as is; integer, number, boolean, object, array: parsed), a value that
    does not parse as its type stays a string, and an untyped one is JSON if it parses."""
    def found(start: int):
        for function in _QWEN3_FUNCTION.finditer(text, start):
            yield function["name"], [(p["name"], _strip_newline(p["value"]))
                                     for p in _QWEN3_PARAMETER.finditer(function["body"])]

    return _typed_tool_calls(text, tools, found)


def _strip_newline(value: str) -> str:
    """A parameter's text without the one newline after its tag and the one before the end tag."""
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


def _typed(value: str, schema: dict | None) -> Any:
    kind = (schema or {}).get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if "string" in kinds:
        return value
    try:
        if "integer" in kinds:
            return int(value)
        if "number" in kinds:
            number = float(value)
            return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
        if "boolean" in kinds:
            lowered = value.strip().lower()
            if lowered in ("true", "false"):
                return lowered == "true"
            return value
        return json.loads(value)  # object, array, null or no type: JSON when it is
    except ValueError:
        return value


def parse_xlam(text: str) -> ParsedReply:
    """Salesforce xLAM tool calls (vLLM's ``xlam``): the whole reply is a JSON list of
    ``{"name": ..., "arguments": {...}}``, bare or as a ```json block. Anything else is content."""
    body = text.strip()
    block = _CODE_BLOCK.fullmatch(body)
    if block is not None:
        body = block["body"].strip()
    if not body.startswith("["):
        return ParsedReply(text)
    try:
        items = json.loads(body)
    except json.JSONDecodeError:
        return ParsedReply(text)
    calls = _list_calls(items, ("arguments", "parameters"))
    return ParsedReply(text) if calls is None else ParsedReply(None, calls)


def parse_minimax(text: str) -> ParsedReply:
    """MiniMax-M1 tool calls (vLLM's ``minimax``): ``<tool_calls>`` then one ``{"name": ...,
    "arguments": {...}}`` object per line, then ``</tool_calls>``; the text before is content."""
    return _tagged_calls(text, _JAMBA_OPEN, _JAMBA_CLOSE,
                         lambda body: [json.loads(line) for line in body.splitlines() if line.strip()],
                         ("arguments", "parameters"))


_KIMI_CALL = re.compile(r"<\|tool_call_begin\|>\s*(?P<id>[^<]+?)\s*<\|tool_call_argument_begin\|>(?P<arguments>.*?)"
                        r"<\|tool_call_end\|>", re.DOTALL)


def parse_kimi_k2(text: str) -> ParsedReply:
    """Kimi K2 tool calls (vLLM's ``kimi_k2``): after ``<|tool_calls_section_begin|>``, each
    ``<|tool_call_begin|>functions.NAME:INDEX<|tool_call_argument_begin|>{...}<|tool_call_end|>``;
    the call id is ``functions.NAME:INDEX`` (as vLLM returns it). The text before is content."""
    start = text.find(_KIMI_OPEN)
    if start < 0:
        return ParsedReply(text)
    calls = []
    for match in _KIMI_CALL.finditer(text, start):
        call_id = match["id"].strip()
        name = call_id.split(":")[0].removeprefix("functions.")
        try:
            arguments = json.loads(match["arguments"])
        except json.JSONDecodeError:
            return ParsedReply(text)
        call = _call(name, json.dumps(arguments, ensure_ascii=False))
        call["id"] = call_id
        calls.append(call)
    return ParsedReply(text[:start].strip() or None, calls) if calls else ParsedReply(text)


_GLM_CALL = re.compile(r"<tool_call>(?P<name>[^<\n]*)(?P<body>.*?)(?:</tool_call>|$)", re.DOTALL)
_GLM_ARG = re.compile(r"<arg_key>(?P<key>.*?)</arg_key>\s*<arg_value>(?P<value>.*?)</arg_value>", re.DOTALL)


def parse_glm45(text: str, tools: tuple = ()) -> ParsedReply:
    """GLM-4.5 tool calls (vLLM's ``glm45``): ``<tool_call>NAME`` then ``<arg_key>KEY</arg_key>
    <arg_value>VALUE</arg_value>`` pairs and ``</tool_call>``; values are typed by the request's
    tools as ``qwen3_coder``'s are. The text before the first call is content."""
    def found(start: int):
        for match in _GLM_CALL.finditer(text, start):
            yield match["name"], [(a["key"], a["value"]) for a in _GLM_ARG.finditer(match["body"])]

    return _typed_tool_calls(text, tools, found)


def _typed_tool_calls(text: str, tools: tuple, found) -> ParsedReply:
    """The calls of a format whose argument values are text (qwen3_coder, glm45), each typed by its
    parameter's schema in the request's tools (``_typed``). ``found(start)`` yields (name, [(key,
    value text)]) per call from the first ``<tool_call>``; the text before it is content. A call
    without a name leaves the whole reply as content."""
    start = text.find(_HERMES_OPEN)
    if start < 0:
        return ParsedReply(text)
    properties = _tool_properties(tools)
    calls = []
    for name, pairs in found(start):
        name = name.strip()
        if not name:
            return ParsedReply(text)
        schema = properties.get(name, {})
        arguments = {key.strip(): _typed(value, schema.get(key.strip())) for key, value in pairs}
        calls.append(_call(name, json.dumps(arguments, ensure_ascii=False)))
    return ParsedReply(text[:start].strip() or None, calls) if calls else ParsedReply(text)


def _tool_properties(tools: tuple) -> dict[str, dict]:
    """Each tool's name -> its parameters' properties (JSON schemas)."""
    return {tool["function"]["name"]: (tool["function"].get("parameters") or {}).get("properties") or {}
            for tool in tools}


_CODE_BLOCK = re.compile(r"```(?:json)?\s*(?P<body>.*?)```", re.DOTALL)
_KIMI_OPEN = "<|tool_calls_section_begin|>"
_GRANITE_CALL = "<|tool_call|>"
_JAMBA_OPEN, _JAMBA_CLOSE = "<tool_calls>", "</tool_calls>"
_INTERNLM_OPEN, _INTERNLM_CLOSE = "<|action_start|><|plugin|>", "<|action_end|>"
_PHI4_CALLS = "functools["
_DEEPSEEK_OPEN = "<｜tool▁calls▁begin｜>"


@dataclass(frozen=True)
class ToolCallParser:
    """How ``"auto"`` replies carry tool calls: ``markers`` open the calls; ``anchored``: only at the
    start of the reply (after whitespace), else anywhere (the text before is content)."""

    parse: Any  # text -> ParsedReply (text, tools -> ParsedReply with ``needs_tools``)
    markers: tuple[str, ...]
    anchored: bool = False
    # The markers are special tokens the reply's text must keep (skip_special_tokens=False).
    keeps_special_tokens: bool = False
    needs_tools: bool = False  # the parser reads parameter types from the request's tools

    def parse_with(self, text: str, tools: tuple = ()) -> ParsedReply:
        return self.parse(text, tools) if self.needs_tools else self.parse(text)

    def calls_start(self, text: str, sent: int) -> int | None:
        """Where the calls begin in ``text`` at or after ``sent`` (None: not seen yet)."""
        if self.anchored:
            at = len(text) - len(text.lstrip())
            return at if at >= sent and text.startswith(self.markers, at) else None
        found = [i for i in (text.find(m, sent) for m in self.markers) if i >= 0]
        return min(found) if found else None

    def held(self, text: str) -> int:
        """Trailing characters of ``text`` that may still turn out to open a call."""
        if self.anchored:
            rest = text.lstrip()
            return len(text) if not rest or any(m.startswith(rest) for m in self.markers) else 0
        return max(_longest_marker_prefix(text, m) for m in self.markers)


TOOL_CALL_PARSER_TABLE = {
    "hermes": ToolCallParser(parse_hermes, (_HERMES_OPEN,)),
    "llama3_json": ToolCallParser(parse_llama3_json, (_PYTHON_TAG, "{"), anchored=True),
    "llama4_json": ToolCallParser(parse_llama3_json, (_PYTHON_TAG, "{"), anchored=True),
    "mistral": ToolCallParser(parse_mistral, (_MISTRAL_CALLS,), keeps_special_tokens=True),
    "pythonic": ToolCallParser(parse_pythonic, (_PYTHON_TAG, "["), anchored=True),
    "llama4_pythonic": ToolCallParser(parse_pythonic, (_PYTHON_TAG, "["), anchored=True),
    "granite": ToolCallParser(parse_granite, (_GRANITE_CALL, _HERMES_OPEN, "["), anchored=True,
                              keeps_special_tokens=True),
    "jamba": ToolCallParser(parse_jamba, (_JAMBA_OPEN,), keeps_special_tokens=True),
    "internlm": ToolCallParser(parse_internlm, (_INTERNLM_OPEN,), keeps_special_tokens=True),
    "phi4_mini_json": ToolCallParser(parse_phi4_mini_json, (_PHI4_CALLS,), anchored=True),
    "deepseek_v3": ToolCallParser(parse_deepseek_v3, (_DEEPSEEK_OPEN,), keeps_special_tokens=True),
    "qwen3_coder": ToolCallParser(parse_qwen3_coder, (_HERMES_OPEN,), needs_tools=True),
    "xlam": ToolCallParser(parse_xlam, ("[", "```"), anchored=True),
    "minimax": ToolCallParser(parse_minimax, (_JAMBA_OPEN,)),
    "kimi_k2": ToolCallParser(parse_kimi_k2, (_KIMI_OPEN,), keeps_special_tokens=True),
    "glm45": ToolCallParser(parse_glm45, (_HERMES_OPEN,), needs_tools=True),
}
TOOL_CALL_PARSERS = tuple(TOOL_CALL_PARSER_TABLE)


class StreamedReply:
    """One choice's streamed reply: which text may go out as content now, and the tool calls once
    the reply is complete.

    Named: every piece of text is the call's arguments, sent as it comes. Required: nothing goes
    out before the end (the text is one JSON array). Auto with a parser: text goes out as content
    until the calls start (what may be their start is held back); from there the rest is kept for
    the parser. None and auto without a parser: all text is content.
    """

    def __init__(self, choice: ToolChoice, parser: str | None):
        self.choice, self.parser = choice, parser
        self._parser = TOOL_CALL_PARSER_TABLE.get(parser) if choice.mode == "auto" else None
        self.text = ""  # everything so far
        self._sent = 0  # characters of ``text`` sent as content
        self._calling = False  # auto: the calls have started
        self.call_id = tool_call_id() if choice.mode == "named" else None
        self.named_sent = False  # the named call's first piece (with its id and name) went out

    @property
    def parses_calls(self) -> bool:
        return self.choice.mode in ("named", "required") or self._parser is not None

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
        start = self._parser.calls_start(self.text, self._sent)
        if start is not None:
            self._calling = True
            if self._parser.anchored:  # only whitespace before it: kept with the calls' text
                return ""
            out, self._sent = self.text[self._sent:start], start
            return out
        end = len(self.text) - self._parser.held(self.text)
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
        rest = self.text[self._sent:]
        parsed = self._parser.parse_with(rest, self.choice.tools) if self._calling else ParsedReply(rest)
        if not parsed.tool_calls:
            return rest, []
        return (parsed.content or ""), parsed.tool_calls


def _longest_marker_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
