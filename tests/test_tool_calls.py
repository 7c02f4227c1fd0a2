"""Tool calling: tool_choice resolution, the constraints of named and required calls, the hermes
parser, and streamed replies that hold back what may be a tool call."""

from __future__ import annotations

import json
import random
import re

import pytest

from jaxllm.entrypoints.openai.tool_calls import (
    TOOL_CALL_PARSER_TABLE,
    TOOL_CALL_PARSERS,
    StreamedReply,
    ToolChoice,
    constraint,
    parse_deepseek_v3,
    parse_glm45,
    parse_granite,
    parse_hermes,
    parse_internlm,
    parse_jamba,
    parse_kimi_k2,
    parse_llama3_json,
    parse_minimax,
    parse_mistral,
    parse_phi4_mini_json,
    parse_pythonic,
    parse_qwen3_coder,
    parse_reply,
    parse_xlam,
    resolve_tool_choice,
)
from jaxllm.structured.regex import compile_regex

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["C", "F"]}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"$ref": "#/$defs/Zone"}}, "required": ["zone"],
    "$defs": {"Zone": {"type": "string", "enum": ["UTC", "CET"]}}}}}
NO_PARAMETERS = {"type": "function", "function": {"name": "ping"}}
TOOLS = [WEATHER, TIME, NO_PARAMETERS]


@pytest.mark.parametrize("tools, tool_choice, want", [
    (None, None, ToolChoice("none")),
    (TOOLS, None, ToolChoice("auto")),
    (TOOLS, "none", ToolChoice("none")),
    (TOOLS, "required", ToolChoice("required")),
    (TOOLS, {"type": "function", "function": {"name": "get_time"}}, ToolChoice("named", "get_time")),
])
def test_tool_choice_resolution(tools, tool_choice, want):
    assert resolve_tool_choice(tools, tool_choice) == want


@pytest.mark.parametrize("tools, tool_choice, message", [
    (TOOLS, "sometimes", "must be 'none', 'auto', 'required' or a named function"),
    (None, "required", "needs tools"),
    (TOOLS, {"type": "function", "function": {"name": "fly"}}, "'fly', which is not in tools"),
    (TOOLS, {"function": {"name": "ping"}}, "a named tool_choice must be"),
    ([WEATHER, WEATHER], "auto", "duplicate function names: ['get_weather']"),
    ([{"type": "function", "function": {"name": ""}}], "auto", "tools[0].function.name"),
    ([{"type": "retrieval"}], "auto", "tools[0] must be"),
    ([{"type": "function", "function": {"name": "x", "parameters": "none"}}], "auto", "parameters must be"),
])
def test_bad_tools_and_tool_choices_are_named(tools, tool_choice, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_tool_choice(tools, tool_choice)


def test_named_and_required_constraints_match_calls_and_only_calls():
    named = compile_regex(constraint(TOOLS, ToolChoice("named", "get_weather")).pattern())
    assert named.fullmatch('{"city": "Paris", "unit": "C"}') and named.fullmatch('{"city":"Oslo"}')
    assert not named.fullmatch('{"unit": "C"}') and not named.fullmatch('{"city": "Paris", "unit": "K"}')
    required = compile_regex(constraint(TOOLS, ToolChoice("required")).pattern())
    good = [{"name": "get_weather", "parameters": {"city": "Rome"}},
            {"name": "get_time", "parameters": {"zone": "CET"}}, {"name": "ping", "parameters": {}}]
    for calls in (good[:1], good, good[1:]):
        assert required.fullmatch(json.dumps(calls)), calls
    for bad in ([], [{"name": "get_time", "parameters": {"zone": "PST"}}], [{"name": "fly", "parameters": {}}],
                [{"name": "ping"}]):
        assert not required.fullmatch(json.dumps(bad)), bad
    assert constraint(TOOLS, ToolChoice("auto")) is None and constraint(TOOLS, ToolChoice("none")) is None


def test_parse_reply_per_choice():
    named = parse_reply('{"city": "Paris"}', ToolChoice("named", "get_weather"), None)
    assert named.content is None and [c["function"] for c in named.tool_calls] == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert named.tool_calls[0]["id"].startswith("chatcmpl-tool-") and named.tool_calls[0]["type"] == "function"
    required = parse_reply('[{"name": "ping", "parameters": {}}, {"name": "get_time", "parameters": {"zone": "UTC"}}]',
                           ToolChoice("required"), None)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in required.tool_calls] == [
        ("ping", {}), ("get_time", {"zone": "UTC"})]
    cut = parse_reply('[{"name": "ping", "param', ToolChoice("required"), None)
    assert cut.content == '[{"name": "ping", "param' and cut.tool_calls == []
    assert parse_reply("<tool_call>{}</tool_call>", ToolChoice("auto"), None).tool_calls == []  # no parser
    assert parse_reply("hi", ToolChoice("none"), "hermes").content == "hi"


@pytest.mark.parametrize("text, content, calls", [
    ("Just text.", "Just text.", []),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [("get_weather", {"city": "Paris"})]),
    ('Let me check.\n<tool_call>{"name": "ping", "arguments": {}}</tool_call>\n'
     '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>', "Let me check.",
     [("ping", {}), ("get_time", {"zone": "UTC"})]),
    ('<tool_call>{"name": "ping", "arguments": {"a": "ü"}}', None, [("ping", {"a": "ü"})]),  # left open at eos
    ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
])
def test_hermes_parser(text, content, calls):
    parsed = parse_hermes(text)
    assert parsed.content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls] == calls


def _calls(parsed) -> list:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls]


@pytest.mark.parametrize("text, content, calls", [
    ("The weather is fine.", "The weather is fine.", []),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "ping", "arguments": {}}', None, [("ping", {})]),
    ('  {"name": "ping", "parameters": {}}; {"name": "get_time", "parameters": {"zone": "UTC"}}\n', None,
     [("ping", {}), ("get_time", {"zone": "UTC"})]),
    ('{"name": "ping", "parameters": {}} and then text', '{"name": "ping", "parameters": {}} and then text', []),
    ('{"city": "Paris"}', '{"city": "Paris"}', []),  # JSON, but not a call
    ('{"name": "ping", "parameters": {', '{"name": "ping", "parameters": {', []),  # cut short
    ('Use {"name": "ping"} later.', 'Use {"name": "ping"} later.', []),  # only a whole reply is a call
])
def test_llama3_json_parser(text, content, calls):
    parsed = parse_llama3_json(text)
    assert (parsed.content, _calls(parsed)) == (content, calls)


@pytest.mark.parametrize("text, content, calls", [
    ("No tools needed.", "No tools needed.", []),
    ('[get_weather(city="Paris", unit="C")]', None, [("get_weather", {"city": "Paris", "unit": "C"})]),
    ("[ping(), get_time(zone='UTC')]", None, [("ping", {}), ("get_time", {"zone": "UTC"})]),
    ('<|python_tag|>[f(x=[1, 2.5, None, True], y={"a": -1})]', None, [("f", {"x": [1, 2.5, None, True], "y": {"a": -1}})]),
    ("[f(1)]", "[f(1)]", []),  # positional arguments name nothing
    ("[f(x=y)]", "[f(x=y)]", []),  # not a literal
    ("[os.system(x='ls')]", "[os.system(x='ls')]", []),
    ("[f(**k)]", "[f(**k)]", []),
    ("[1, 2]", "[1, 2]", []),
    ("[]", "[]", []),
    ("[f(x=1)", "[f(x=1)", []),  # cut short
])
def test_pythonic_parser(text, content, calls):
    parsed = parse_pythonic(text)
    assert (parsed.content, _calls(parsed)) == (content, calls)


@pytest.mark.parametrize("text, content, calls", [
    ("No tools needed.", "No tools needed.", []),
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "ping", "arguments": {}}]', None,
     [("get_weather", {"city": "Paris"}), ("ping", {})]),
    ('Let me check.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]ping[ARGS]{}', "Let me check.",
     [("get_weather", {"city": "Paris"}), ("ping", {})]),
    ('[TOOL_CALLS]{"name": "ping", "arguments": {}}', None, [("ping", {})]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": ', '[TOOL_CALLS]get_weather[ARGS]{"city": ', []),  # cut short
    ("[TOOL_CALLS][ARGS]{}", "[TOOL_CALLS][ARGS]{}", []),  # no name
    ("[TOOL_CALLS][]", "[TOOL_CALLS][]", []),
    ('[TOOL_CALLS][{"arguments": {}}]', '[TOOL_CALLS][{"arguments": {}}]', []),
])
def test_mistral_parser(text, content, calls):
    parsed = parse_mistral(text)
    assert (parsed.content, _calls(parsed)) == (content, calls)
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", c["id"]) for c in parsed.tool_calls)  # Mistral's id form


@pytest.mark.parametrize("parse, text, content, calls", [
    (parse_granite, '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "ping", '
                    '"arguments": {}}]', None, [("get_weather", {"city": "Paris"}), ("ping", {})]),
    (parse_granite, '<tool_call>[{"name": "ping", "arguments": {}}]', None, [("ping", {})]),  # Granite 3.1
    (parse_granite, '[{"name": "ping", "arguments": {}}]', None, [("ping", {})]),
    (parse_granite, "Sunny [mostly].", "Sunny [mostly].", []),
    (parse_granite, '<|tool_call|>[{"name": "ping", "arguments": {', '<|tool_call|>[{"name": "ping", "arguments": {',
     []),
    (parse_jamba, 'Checking.<tool_calls>[{"name": "ping", "arguments": {"a": 1}}]</tool_calls>', "Checking.",
     [("ping", {"a": 1})]),
    (parse_jamba, '<tool_calls>[{"name": "ping", "arguments": {}}]', None, [("ping", {})]),  # left open at eos
    (parse_jamba, "<tool_calls>nope</tool_calls>", "<tool_calls>nope</tool_calls>", []),
    (parse_internlm, 'I will look.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": '
                     '"Paris"}}<|action_end|>', "I will look.", [("get_weather", {"city": "Paris"})]),
    (parse_internlm, "<|action_start|><|plugin|>{oops}<|action_end|>", "<|action_start|><|plugin|>{oops}<|action_end|>",
     []),
    (parse_phi4_mini_json, 'functools[{"name": "ping", "arguments": {}}, {"name": "get_time", "arguments": '
                           '{"zone": "UTC"}}]', None, [("ping", {}), ("get_time", {"zone": "UTC"})]),
    (parse_phi4_mini_json, "Use functools[...] in Python.", "Use functools[...] in Python.", []),
    (parse_deepseek_v3, "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
                        '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>'
                        "ping\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>", "Let me check.",
     [("get_weather", {"city": "Paris"}), ("ping", {})]),
    (parse_deepseek_v3, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{bad}\n```"
                        "<｜tool▁call▁end｜>", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n"
                        "```json\n{bad}\n```<｜tool▁call▁end｜>", []),
    (parse_xlam, '[{"name": "ping", "arguments": {}}, {"name": "get_time", "arguments": {"zone": "UTC"}}]', None,
     [("ping", {}), ("get_time", {"zone": "UTC"})]),
    (parse_xlam, '```json\n[{"name": "ping", "arguments": {"a": 1}}]\n```', None, [("ping", {"a": 1})]),
    (parse_xlam, "[1, 2] are numbers", "[1, 2] are numbers", []),
    (parse_minimax, 'Checking.\n<tool_calls>\n{"name": "ping", "arguments": {}}\n{"name": "get_time", "arguments": '
                    '{"zone": "UTC"}}\n</tool_calls>', "Checking.", [("ping", {}), ("get_time", {"zone": "UTC"})]),
    (parse_minimax, "<tool_calls>\nnot json\n</tool_calls>", "<tool_calls>\nnot json\n</tool_calls>", []),
    (parse_glm45, "I'll check.<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
                  "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>", "I'll check.",
     [("get_weather", {"city": "Paris", "days": 3})]),  # untyped: JSON when it parses
    (parse_glm45, "<tool_call>\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",
     "<tool_call>\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>", []),  # no name
])
def test_more_vllm_parsers(parse, text, content, calls):
    parsed = parse(text)
    assert (parsed.content, _calls(parsed)) == (content, calls)


QWEN3_TOOLS = ({"type": "function", "function": {"name": "book", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "nights": {"type": "integer"}, "budget": {"type": "number"},
    "pets": {"type": "boolean"}, "extras": {"type": "array"}, "zip": {"type": "string"}}}}},)


def test_qwen3_coder_parser_types_values_by_the_tools():
    text = ("Booking.\n<tool_call>\n<function=book>\n<parameter=city>\nNew York\n</parameter>\n"
            "<parameter=nights>\n3\n</parameter>\n<parameter=budget>\n120.5\n</parameter>\n<parameter=pets>\n"
            "true\n</parameter>\n<parameter=extras>\n[\"breakfast\"]\n</parameter>\n<parameter=zip>\n01234\n"
            "</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=ping>\n<parameter=n>\n7\n</parameter>\n"
            "<parameter=note>\nhello\n</parameter>\n</function>\n</tool_call>")
    parsed = parse_qwen3_coder(text, QWEN3_TOOLS)
    assert parsed.content == "Booking."
    assert _calls(parsed) == [("book", {"city": "New York", "nights": 3, "budget": 120.5, "pets": True,
                                        "extras": ["breakfast"], "zip": "01234"}),
                              ("ping", {"n": 7, "note": "hello"})]  # untyped: JSON when it parses
    bad = parse_qwen3_coder("<tool_call><function=book><parameter=nights>many</parameter></function></tool_call>",
                            QWEN3_TOOLS)
    assert _calls(bad) == [("book", {"nights": "many"})]  # not an integer: kept as text
    assert parse_qwen3_coder("No calls.", QWEN3_TOOLS).content == "No calls."
    choice = resolve_tool_choice(list(QWEN3_TOOLS), None)
    reply = parse_reply(text, choice, "qwen3_coder")
    assert _calls(reply)[0][1]["nights"] == 3  # the request's tools reach the parser


def test_kimi_k2_parser_keeps_its_call_ids():
    text = ("Let me see.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
            '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_call_begin|>functions.ping:1'
            "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>")
    parsed = parse_kimi_k2(text)
    assert (parsed.content, _calls(parsed)) == ("Let me see.", [("get_weather", {"city": "Paris"}), ("ping", {})])
    assert [c["id"] for c in parsed.tool_calls] == ["functions.get_weather:0", "functions.ping:1"]
    broken = "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{<|tool_call_end|>"
    assert (parse_kimi_k2(broken).content, parse_kimi_k2(broken).tool_calls) == (broken, [])


def test_glm45_parser_types_values_by_the_tools():
    text = ("<tool_call>book\n<arg_key>city</arg_key>\n<arg_value>New York</arg_value>\n<arg_key>nights</arg_key>\n"
            "<arg_value>3</arg_value>\n<arg_key>zip</arg_key>\n<arg_value>01234</arg_value>\n</tool_call>")
    assert _calls(parse_glm45(text, QWEN3_TOOLS)) == [("book", {"city": "New York", "nights": 3, "zip": "01234"})]


STREAM_CASES = {
    "hermes": ["Plain answer with < and <tool and <tool_cal but no call.",
               'Checking <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
               '<tool_call>{"name": "ping", "arguments": {}}</tool_call>', "Almost <tool_call>broken</tool_call> call",
               "ends with a partial marker <tool_c"],
    "llama3_json": ['{"name": "ping", "parameters": {}}; {"name": "get_time", "parameters": {"zone": "UTC"}}',
                    '  <|python_tag|>{"name": "ping", "arguments": {}}', "A plain {reply} with braces.",
                    '{"not": "a call"}', "<|python", "   "],
    "pythonic": ['[get_weather(city="Paris"), ping()]', " [f(x=1)", "Text [with] brackets.", "[1, 2]"],
    "mistral": ['Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', '[TOOL_CALLS][{"name": "ping", "arguments": {}}]',
                "An [ordinary] reply [TOOL_CALL", "[TOOL_CALLS]not json"],
    "granite": ['<|tool_call|>[{"name": "ping", "arguments": {}}]', ' [{"name": "ping", "arguments": {}}]',
                "Text [with] brackets.", "<|tool_ca"],
    "jamba": ['Checking <tool_calls>[{"name": "ping", "arguments": {}}]</tool_calls>', "a <tool_c", "no <b>calls</b>"],
    "internlm": ['Look.<|action_start|><|plugin|>{"name": "ping", "parameters": {}}<|action_end|>', "x <|action_st"],
    "phi4_mini_json": ['functools[{"name": "ping", "arguments": {}}]', "functools are nice", "func"],
    "deepseek_v3": ["Hm.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>ping\n```json\n{}\n```"
                    "<｜tool▁call▁end｜><｜tool▁calls▁end｜>", "plain <｜tool▁calls"],
    "qwen3_coder": ["Ok.\n<tool_call>\n<function=ping>\n<parameter=n>\n7\n</parameter>\n</function>\n</tool_call>",
                    "a <tool_cal"],
}
STREAM_CASES["xlam"] = ['[{"name": "ping", "arguments": {}}]', '```json\n[{"name": "ping", "arguments": {}}]\n```',
                        "Text [with] brackets.", "`code`", "[1, 2]"]
STREAM_CASES["minimax"] = ['Ok.\n<tool_calls>\n{"name": "ping", "arguments": {}}\n</tool_calls>', "a <tool_c"]
STREAM_CASES["kimi_k2"] = ["Hm.<|tool_calls_section_begin|><|tool_call_begin|>functions.ping:0<|tool_call_argument_begin|>"
                           "{}<|tool_call_end|><|tool_calls_section_end|>", "plain <|tool_calls_sec"]
STREAM_CASES["glm45"] = ["Ok.<tool_call>ping\n<arg_key>n</arg_key>\n<arg_value>7</arg_value>\n</tool_call>",
                         "a <tool_cal"]
STREAM_CASES["llama4_json"] = STREAM_CASES["llama3_json"]
STREAM_CASES["llama4_pythonic"] = STREAM_CASES["pythonic"]


@pytest.mark.parametrize("parser, text", [(p, t) for p, texts in STREAM_CASES.items() for t in texts])
def test_streamed_auto_reply_equals_the_whole_reply_however_it_is_cut(parser, text):
    assert set(STREAM_CASES) == set(TOOL_CALL_PARSERS)
    whole = TOOL_CALL_PARSER_TABLE[parser].parse(text)
    rng = random.Random(text)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(0, 8))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        reply = StreamedReply(ToolChoice("auto"), parser)
        sent = "".join(reply.content_delta(p) for p in pieces)
        rest, calls = reply.finish()
        if whole.tool_calls:
            assert (sent + rest).strip() == (whole.content or "")
            assert [c["function"] for c in calls] == [c["function"] for c in whole.tool_calls]
            assert not any(m in sent for m in ("<tool_call>", "<|python_tag|>", "{", "[", "TOOL_CALLS"))  # calls never leak
        else:
            assert sent + rest == text and calls == []


def test_streamed_named_and_required_replies_send_no_content():
    named = StreamedReply(ToolChoice("named", "ping"), None)
    assert named.content_delta("{}") == "" and named.finish() == ("", [])
    required = StreamedReply(ToolChoice("required"), None)
    assert required.content_delta('[{"name": "ping", ') == "" and required.content_delta('"parameters": {}}]') == ""
    rest, calls = required.finish()
    assert rest == "" and [c["function"] for c in calls] == [{"name": "ping", "arguments": "{}"}]
    free = StreamedReply(ToolChoice("auto"), None)
    assert free.content_delta("<tool_call>") == "<tool_call>" and free.finish() == ("", [])


def test_auto_tool_choice_flag_needs_a_parser():
    import argparse

    from jaxllm.entrypoints.openai.api_server import build_async_engine

    with pytest.raises(SystemExit, match="--enable-auto-tool-choice requires --tool-call-parser"):
        build_async_engine(argparse.Namespace(enable_auto_tool_choice=True, tool_call_parser=None))


@pytest.mark.parametrize("parser, reply, content", [
    ("hermes", 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
               '<tool_call>{"name": "ping", "arguments": {}}</tool_call>', "Sure."),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "ping", "parameters": {}}',
     None),
    ("pythonic", '[get_weather(city="Paris"), ping()]', None),
    # [TOOL_CALLS] and [ARGS] are special tokens of Mistral's tokenizers (added to SmolLM2's below):
    # the reply keeps them only because the parser asks for skip_special_tokens=False.
    ("mistral", 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]ping[ARGS]{}', "Sure."),
])
def test_auto_tool_calls_through_the_server(smollm2_model, parser, reply, content):
    """Each parser behind --tool-call-parser, on a runner that writes a fixed reply: the whole
    response and the streamed one carry the same calls, and no call text as content."""
    import copy

    from test_reasoning import _client, _stream

    want = [("get_weather", {"city": "Paris"}), ("ping", {})]
    body = {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [WEATHER, NO_PARAMETERS], "temperature": 0}
    tokenizer = smollm2_model.tokenizer
    if parser == "mistral":
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_tokens(["[TOOL_CALLS]", "[ARGS]"], special_tokens=True)
        assert tokenizer.decode(tokenizer.encode(reply), skip_special_tokens=True) == 'Sure.get_weather{"city": "Paris"}ping{}'
    with _client(tokenizer, None, reply, tool_call_parser=parser) as client:
        choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == content
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                for c in choice["message"]["tool_calls"]] == want
        chunks = _stream(client, body)
    deltas = [c["delta"] for chunk in chunks for c in chunk["choices"]]
    streamed = [t for d in deltas for t in d.get("tool_calls") or ()]
    assert [(t["function"]["name"], json.loads(t["function"]["arguments"])) for t in streamed] == want
    assert "".join(d.get("content") or "" for d in deltas).strip() == (content or "")
    assert [c["finish_reason"] for chunk in chunks for c in chunk["choices"]][-1] == "tool_calls"
