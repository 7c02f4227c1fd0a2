"""Structural tags (vLLM's ``structured_outputs.structural_tag`` and ``response_format`` type
"structural_tag", xgrammar's format): free text with no trigger in it, where a trigger starts a
structure: its ``begin``, JSON matching its schema, its ``end``. Built on regex.py's absent
operator ``(?~...)`` (text containing none of some strings)."""

from __future__ import annotations

import json

import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.structured.params import StructuredOutputsParams
from jaxllm.structured.regex import compile_regex

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL_TAG = {"type": "structural_tag", "triggers": ["<function="],
            "structures": [{"begin": "<function=get_weather>", "schema": WEATHER, "end": "</function>"},
                           {"begin": "<function=get_time>", "schema": {"type": "integer"}, "end": "</function>"}]}


def test_the_absent_operator_matches_text_containing_none_of_its_strings():
    dfa = compile_regex("(?~<function=|<tool>)")
    for text, ok in [("", True), ("hello", True), ("a<functio", True), ("<<function", True), ("é<fun😀", True),
                     ("<function=", False), ("x<function=y", False), ("a<tool>b", False), ("<too<tool>", False)]:
        assert dfa.fullmatch(text) == ok, text
    # overlapping strings: "aab" contains "ab" though its first 'a' starts no match
    overlapping = compile_regex("(?~ab|bc)X")
    assert [overlapping.fullmatch(t) for t in ("aaX", "aabX", "bbX", "acbX", "X", "abcX")] == [
        True, False, True, True, True, False]
    for bad in ("(?~)", "(?~a*)", "(?~[ab])", "(?~a|)"):
        with pytest.raises(ValueError, match="takes non-empty literal strings"):
            compile_regex(bad)


def test_a_structural_tags_pattern():
    dfa = compile_regex(StructuredOutputsParams(structural_tag=json.dumps(TOOL_TAG)).pattern())
    good = ["Hello!", "", 'Let me check. <function=get_weather>{"city": "Paris"}</function> Done.',
            '<function=get_time>42</function><function=get_weather>{"city":"Oslo"}</function>', "a < b, <functio"]
    bad = ['<function=get_weather>{"town": "Paris"}</function>', "<function=other>{}</function>",
           "<function=get_time>forty</function>", '<function=get_weather>{"city": "Paris"}',
           "text <function= more"]
    assert [dfa.fullmatch(t) for t in good] == [True] * len(good)
    assert [dfa.fullmatch(t) for t in bad] == [False] * len(bad)
    # an unfinished structure is still a prefix of a match: generation may go on
    assert dfa.step(dfa.start, '<function=get_weather>{"city": "Pa') != dfa.dead
    # response_format's form (the type beside the structures) gives the same constraint
    assert StructuredOutputsParams(structural_tag=TOOL_TAG).pattern() == \
        StructuredOutputsParams(structural_tag=json.dumps(TOOL_TAG)).pattern()


@pytest.mark.parametrize("tag, match", [
    ("{not json", "structural_tag is not valid JSON"),
    ({**TOOL_TAG, "triggers": []}, "triggers=\\[\\] must be a non-empty list"),
    ({**TOOL_TAG, "structures": []}, "structures=\\[\\] must be a non-empty list"),
    ({**TOOL_TAG, "type": "json"}, "type='json' must be 'structural_tag'"),
    ({**TOOL_TAG, "structures": [{"begin": "<tool>", "schema": WEATHER, "end": "</tool>"}]},
     "structures\\[0\\] begin='<tool>' starts with none of the triggers"),
    ({**TOOL_TAG, "structures": [{"begin": "<function=f>", "end": "</function>"}]}, "structures\\[0\\] schema=None"),
])
def test_malformed_tags_are_refused_by_name(tag, match):
    with pytest.raises(ValueError, match=match):
        StructuredOutputsParams(structural_tag=tag if isinstance(tag, str) else json.dumps(tag))


LIMITS = dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64)  # test_llm's: its programs
# SmolLM2 answers this with "The weather in Paris is a mix of ...": " is" is the trigger here.
WEATHER_CHAT = [{"role": "system", "content": "You can call a tool by writing "
                 '<function=get_weather>{"city": "NAME"}</function>.'},
                {"role": "user", "content": "What is the weather in Paris? Call the tool."}]
IS_TAG = {"type": "structural_tag", "triggers": [" is"],
          "structures": [{"begin": " is ", "schema": {"enum": ["sunny", "rainy"]}, "end": "."}]}


def test_smollm2_writes_free_text_until_a_trigger_then_the_structure(smollm2_model):
    from server_client import client_for

    llm = LLM(smollm2_model, **LIMITS)
    greedy = dict(temperature=0.0, max_tokens=40)
    free = llm.chat(WEATHER_CHAT, SamplingParams(**greedy), use_tqdm=False)[0].outputs[0].text
    assert free.startswith("The weather in Paris is a mix of")
    tagged = StructuredOutputsParams(structural_tag=json.dumps(IS_TAG))
    out = llm.chat(WEATHER_CHAT, SamplingParams(**greedy, structured_outputs=tagged), use_tqdm=False)[0].outputs[0]
    assert out.text == 'The weather in Paris is "sunny"...'
    assert compile_regex(tagged.pattern()).fullmatch(out.text)
    # a reply with no trigger in it is left alone
    hello = [{"role": "user", "content": "Say hello."}]
    plain = llm.chat(hello, SamplingParams(**greedy), use_tqdm=False)[0].outputs[0].text
    assert " is" not in plain
    assert llm.chat(hello, SamplingParams(**greedy, structured_outputs=tagged), use_tqdm=False)[0].outputs[0].text == plain
    with client_for(llm.llm_engine, LIMITS["max_model_len"], LIMITS["max_num_seqs"]) as client:
        for extra in ({"response_format": IS_TAG}, {"structured_outputs": {"structural_tag": json.dumps(IS_TAG)}}):
            body = client.post("/v1/chat/completions", json={"messages": WEATHER_CHAT, **greedy, **extra}).json()
            assert body["choices"][0]["message"]["content"] == out.text, extra
        bad = {**IS_TAG, "structures": [{"begin": "<x>", "schema": {}, "end": "</x>"}]}
        response = client.post("/v1/chat/completions", json={"messages": WEATHER_CHAT, "response_format": bad})
        assert response.status_code == 400 and "starts with none of the triggers" in response.json()["error"]["message"]
