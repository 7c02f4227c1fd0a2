"""Lark grammars in structured outputs (vLLM reads a grammar without '::=' as Lark): each compiles
to an automaton of exactly the strings Lark would parse, %ignore'd whitespace and common imports
included, and bad ones are refused by name."""

from __future__ import annotations

import pytest

from jaxllm import SamplingParams, StructuredOutputsParams
from jaxllm.structured.lark import is_lark
from jaxllm.structured.regex import compile_regex

JSON_LARK = r"""
?start: value
?value: object
      | array
      | ESCAPED_STRING
      | SIGNED_NUMBER      -> number
      | "true"             -> true
      | "false"            -> false
      | "null"             -> null
array  : "[" [value ("," value)*] "]"
object : "{" [pair ("," pair)*] "}"
pair   : ESCAPED_STRING ":" value
%import common.ESCAPED_STRING
%import common.SIGNED_NUMBER
%import common.WS
%ignore WS
"""


def _dfa(grammar: str):
    return compile_regex(StructuredOutputsParams(grammar=grammar).pattern())


def test_the_syntax_decides_as_vllm():
    assert is_lark(JSON_LARK) and is_lark("start: 'a'  // x ::= y in a comment")
    assert not is_lark("root ::= 'a'") and not is_lark("root ::= a\na ::= 'b'  # a: b")


def test_lark_json_with_ignored_whitespace():
    dfa = _dfa(JSON_LARK)
    good = ['{"a": [1, -2.5e3, true, null], "b": {"c": "x\\"y"}}', "[]", " [ 1 , 2 ] \n", '"s"', "-0.5", "{}"]
    bad = ['{"a" 1}', "[1,]", "tru e", '{"a": [1, 2}', '"line\nbreak"', "[1 2]", "01x"]
    assert [dfa.fullmatch(t) for t in good] == [True] * len(good)
    assert [dfa.fullmatch(t) for t in bad] == [False] * len(bad)


@pytest.mark.parametrize("grammar, good, bad", [
    # Terminals keep their insides together; without %ignore no whitespace is allowed anywhere.
    (r"""start: greeting " " NAME "!"?
         greeting: "hello"i | "hi"
         NAME: UCASE_LETTER LCASE_LETTER~2..4
         %import common (UCASE_LETTER, LCASE_LETTER)""",
     ["hello Anna", "HeLLo Bob!", "hi Boba"], ["hi  Anna", "hello Bo", "HI Anna", "hello Annabel"]),
    # The first rule starts when there is no 'start'; regular expressions, ranges, {m,n}, aliases.
    (r"""expr: term (("+" | "-") term)*
         term: NUMBER -> num | "(" expr ")"
         NUMBER: /[1-9][0-9]*/ | "0"
         DIGIT2: "0".."9"
         tag: DIGIT2{2}""",
     ["1+2-(30-4)", "0", "((7))"], ["01", "1+", "(1", "1 + 2"]),
    # Rules over several lines, optional groups, ~ n, imported terminals under an alias.
    (r"""start: "[" [items] "]"
         items: item
              | item "," items
         item: ID ~ 2
         %import common.LETTER -> ID""",
     ["[]", "[ab]", "[ab,cd,ef]"], ["[a]", "[ab,]", "[abc]"]),
])
def test_lark_grammars_compile_to_automata_of_exactly_their_outputs(grammar, good, bad):
    dfa = _dfa(grammar)
    assert [dfa.fullmatch(t) for t in good] == [True] * len(good)
    assert [dfa.fullmatch(t) for t in bad] == [False] * len(bad)


@pytest.mark.parametrize("grammar, message", [
    ("start: item", "rule 'start' uses 'item', which is not defined"),
    ("NAME: 'a'", "no rule (a lowercase 'name: ...')"),
    ("start: 'a'\nstart: 'b'", "'start' is defined twice"),
    ("start: ('a'", "'(' at offset 7 is not closed"),
    ("start: 'a' ~ 3..1", "has max < min"),
    ("start: /a/i", "regular expression flags 'i' at offset 7 are not supported"),
    ("start: 'ab'..'z'", "must go from one character to another"),
    ("start: X\n%import common.NOPE -> X", "common.NOPE is not one of the common terminals"),
    ("start: 'a'\n%import .other.X", "'%import .other.X' is not supported"),
    ("start: 'a'\n%declare X", "'%declare X' is not supported"),
    ("start: 'a' ; 'b'", "unexpected \"; 'b'\" at offset 11"),
])
def test_bad_lark_grammars_are_named(grammar, message):
    import re

    with pytest.raises(ValueError, match=re.escape(message)):
        StructuredOutputsParams(grammar=grammar).pattern()


def test_a_lark_grammar_in_sampling_params_and_the_guided_field():
    params = SamplingParams(structured_outputs={"grammar": JSON_LARK})
    assert compile_regex(params.structured_outputs.pattern()).fullmatch('{"k": 1}')
    from jaxllm.entrypoints.openai.protocol import CompletionRequest

    structured, field = CompletionRequest(prompt="x", guided_grammar="start: 'yes' | 'no'").structured_outputs_params()
    assert field == "guided_grammar" and compile_regex(structured.pattern()).fullmatch("no")
