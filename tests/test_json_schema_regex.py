"""JSON schema -> regex (jaxllm.structured.json_schema): full matches are exactly the canonical
layouts of instances valid under the schema. Both directions are checked with Python's ``re`` and
``jsonschema``: valid instances (compact, spaced, loose: one space in every gap, pretty-printed,
ASCII-escaped) match and validate; invalid texts, compact and loose, do not match and are
confirmed invalid (not JSON, or rejected by jsonschema with format checks). The layout: one
``whitespace`` in every gap between two tokens of an object or array (after '{' / '[', before
'}' / ']', around ':' and ','), none around the top-level value or inside a token."""

from __future__ import annotations

import datetime
import itertools
import json
import re
from fractions import Fraction

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxllm.structured.json_schema import json_object_regex, json_schema_regex, json_value_regex
from jaxllm.structured.regex import compile_regex

# -- helpers -----------------------------------------------------------------------------------

FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("time", raises=ValueError)
def _is_time(text):
    return not isinstance(text, str) or datetime.time.fromisoformat(text) is not None


@FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(text):
    return not isinstance(text, str) or (text[10:11] in ("T", "t") and datetime.datetime.fromisoformat(text) is not None)


def is_valid(schema, text: str) -> bool:
    """Whether ``text`` is JSON valid under ``schema`` (formats checked)."""
    try:
        instance = json.loads(text)
    except ValueError:
        return False
    return jsonschema.Draft202012Validator(schema, format_checker=FORMATS).is_valid(instance)


def compact(v, ascii=False):
    return json.dumps(v, separators=(",", ":"), ensure_ascii=ascii)


def spaced(v, ascii=False):
    return json.dumps(v, separators=(", ", ": "), ensure_ascii=ascii)


def pretty(v, ascii=False, indent=2):
    return json.dumps(v, indent=indent, ensure_ascii=ascii)


def gaps(text: str) -> list[int]:
    """The positions in a (possibly invalid) JSON-like text where the layout allows whitespace:
    after '{' '[' ',' ':' and before '}' ']' ',' ':', outside strings; never at either end."""
    out, in_string, escaped = [], False, False
    for i, c in enumerate(text):
        if in_string:
            in_string = escaped or c != '"'
            escaped = not escaped and c == "\\"
            continue
        if c == '"':
            in_string = True
            continue
        if c in "}],:" and 0 < i:
            out.append(i)
        if c in "{[,:" and i + 1 < len(text):
            out.append(i + 1)
    return sorted(set(out))


def loose(text: str, gap: str = " ") -> str:
    """``text`` with ``gap`` inserted in every gap: '{"a":[1]}' -> '{ "a" : [ 1 ] }'."""
    cuts = [0, *gaps(text), len(text)]
    return gap.join(text[a:b] for a, b in itertools.pairwise(cuts))


def strings_inside(text: str) -> set[int]:
    """The positions strictly inside string literals (between the quotes) of a JSON text."""
    out, start, escaped = set(), None, False
    for i, c in enumerate(text):
        if start is None:
            start = i if c == '"' else None
        elif escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            out.update(range(start + 1, i + 1))
            start = None
    return out


_ESCAPE_OK = set('\\".[]{}()*+?|^$/-dwsntr')
_QUANT = re.compile(r"\{[0-9]+(?:,[0-9]*)?\}")


def assert_supported_syntax(rx: str) -> None:
    """The regex uses only what the DFA engine accepts: literals, the listed escapes, \\uXXXX,
    classes (with \\xHH inside), (...) / (?:...) groups, |, * + ? {n} {n,} {n,m}; no anchors,
    lookaround, backreferences, flags or \\b."""
    i, depth = 0, 0

    def escape(i, in_class):
        nxt = rx[i + 1]
        if nxt == "u":
            assert re.fullmatch(r"[0-9a-fA-F]{4}", rx[i + 2: i + 6]), rx[i: i + 6]
            return i + 6
        if nxt == "x" and in_class:
            assert re.fullmatch(r"[0-9a-fA-F]{2}", rx[i + 2: i + 4]), rx[i: i + 4]
            return i + 4
        assert nxt in _ESCAPE_OK, f"escape \\{nxt} at {i}"
        return i + 2

    while i < len(rx):
        c = rx[i]
        if c == "\\":
            i = escape(i, False)
        elif c == "[":
            i += 2 if rx[i + 1] == "^" else 1
            assert rx[i] != "]", f"empty class or unescaped ']' at {i}"
            while rx[i] != "]":
                assert rx[i] != "[", f"unescaped '[' in a class at {i}"
                i = escape(i, True) if rx[i] == "\\" else i + 1
            i += 1
        elif c == "(":
            assert not rx.startswith("(?", i) or rx.startswith("(?:", i), f"group {rx[i: i + 4]!r} at {i}"
            depth += 1
            i += 3 if rx.startswith("(?:", i) else 1
        elif c == ")":
            depth -= 1
            assert depth >= 0, f"unbalanced ')' at {i}"
            i += 1
        elif c == "{":
            m = _QUANT.match(rx, i)
            assert m, f"bad quantifier or unescaped '{{' at {i}"
            i = m.end()
        else:
            assert c not in "^$}", f"{c!r} at {i}"
            i += 1
    assert depth == 0


_COMPILED: dict[str, re.Pattern] = {}


def regex(schema, **kw) -> re.Pattern:
    key = json.dumps([schema, kw], sort_keys=True)
    if key not in _COMPILED:
        rx = json_schema_regex(schema, **kw)
        assert_supported_syntax(rx)
        _COMPILED[key] = re.compile(rx)
    return _COMPILED[key]


def depth_of(v) -> int:
    if isinstance(v, list):
        return 1 + max((depth_of(x) for x in v), default=0)
    if isinstance(v, dict):
        return 1 + max((depth_of(x) for x in v.values()), default=0)
    return 0


# -- schemas with valid instances and invalid texts --------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 10},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "title": "annotation only"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age"],
}
ALL_OPTIONAL = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}, "c": {"type": "null"}, "d": {"type": "string"}},
}
NESTED = {
    "type": "object",
    "properties": {
        "meta": {
            "type": "object",
            "properties": {"id": {"type": "integer"},
                           "labels": {"type": "object", "additionalProperties": {"type": "string"}}},
            "required": ["id"],
        },
        "lines": {
            "type": "array",
            "maxItems": 2,
            "items": {"type": "object", "required": ["sku", "qty"],
                      "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}},
        },
    },
    "required": ["meta"],
}
POINTS = {
    "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                        "required": ["x", "y"]}},
    "type": "object",
    "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point", "description": "x"},
                   "path": {"type": "array", "items": {"$ref": "#/$defs/point"}}},
    "required": ["start"],
}
FORMATS_SCHEMA = {
    "type": "object",
    "properties": {"d": {"type": "string", "format": "date"}, "t": {"type": "string", "format": "time"},
                   "dt": {"type": "string", "format": "date-time"}, "id": {"type": "string", "format": "uuid"}},
}
TREE = {
    "$defs": {"node": {"type": "object", "required": ["v"],
                       "properties": {"v": {"type": "integer"},
                                      "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
    "$ref": "#/$defs/node",
}

CASES = {
    "person": (
        PERSON,
        [{"name": "Al", "age": 30}, {"name": "Bé😀\n\"\\", "age": 0, "email": "a@b", "tags": [], "address": {"city": "X"}},
         {"name": "0123456789", "age": 12345678901234, "tags": ["a", "b", "c"], "address": {"city": "Y", "zip": "12345"}}],
        ['{"name":"Al"}', '{"age":1}', '{"name":"","age":1}', '{"name":"Al","age":-1}', '{"name":"Al","age":1.5}',
         '{"name":"Al","age":"1"}', '{"name":"Al","age":1,}', '{"name":"Al",,"age":1}', '{,"name":"Al","age":1}',
         '{"name":"Al","age":1,"tags":["a","b","c","d"]}', '{"name":"Al","age":1,"tags":[1]}',
         '{"name":"Al","age":1,"address":{"zip":"12345"}}', '{"name":"Al","age":1,"address":{"city":"X","zip":"1234"}}',
         '{"name":"Al","age":01}', '{"name":"12345678901","age":1}', '{"name":"Al","age":1,"tags":["a",]}'],
    ),
    "all_optional": (
        ALL_OPTIONAL,
        [{}, {"a": 1}, {"b": True}, {"d": "x"}, {"a": -1, "d": "x"}, {"b": False, "c": None},
         {"a": 0, "b": True, "c": None, "d": ""}],
        ['{,"b":true}', '{"a":1,}', '{"a":1"b":true}', '{"a":1,,"b":true}', '{"a":"1"}', '{"c":0}', '{,}', '{"b":1}'],
    ),
    "array_bounds": (
        {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
        [[1, 2], [1, 2, 3], [-5, 0, 7, 99]],
        ["[1]", "[]", "[1,2,3,4,5]", '[1,"2"]', "[1,2,]", "[,1,2]", "[1.5,2]", "[1,,2]"],
    ),
    "enum_mixed": (
        {"enum": ["red", 1, 2.5, None, True, {"a": [1, "x"]}, [1, 2], "a|b.c", "é\u2028"]},
        ["red", 1, 2.5, None, True, {"a": [1, "x"]}, [1, 2], "a|b.c", "é\u2028"],
        ['"blue"', "3", "false", '{"a":[1]}', "[1]", '"a"', '"abxc"', "2.6"],
    ),
    "enum_with_type": (
        {"type": "string", "enum": ["a", 1, None, "b"]},
        ["a", "b"],
        ["1", "null", '"c"'],
    ),
    "const": (
        {"const": {"k": "v", "n": [1, 2]}},
        [{"k": "v", "n": [1, 2]}],
        ['{"k":"v"}', '{"k":"v","n":[1]}', '"v"'],
    ),
    "any_of": (
        {"anyOf": [{"type": "string", "maxLength": 2}, {"type": "integer", "minimum": 10},
                   {"type": "array", "items": {"type": "boolean"}}]},
        ["ab", "", 10, 1234, [True, False], []],
        ['"abc"', "9", "[1]", "null", "10.5"],
    ),
    "refs": (
        POINTS,
        [{"start": {"x": 1, "y": 2.5}}, {"start": {"x": 0, "y": -1e-3}, "end": {"x": 1, "y": 1},
                                         "path": [{"x": 1, "y": 2}, {"x": 3, "y": 4}]}],
        ['{"end":{"x":1,"y":1}}', '{"start":{"x":1}}', '{"start":{"x":1,"y":2},"path":[{"x":1}]}',
         '{"start":{"x":"1","y":2}}'],
    ),
    "formats": (
        FORMATS_SCHEMA,
        [{"d": "2024-02-29"}, {"d": "2000-02-29", "t": "23:59:59"}, {"d": "2023-12-31", "t": "12:00:00.123Z"},
         {"t": "01:02:03+05:30", "dt": "2024-01-01T00:00:00Z"}, {"dt": "1999-06-30T08:15:00.5-03:00"},
         {"id": "123e4567-e89b-12d3-a456-426614174000"}, {"id": "123E4567-E89B-12D3-A456-426614174000"}],
        ['{"d":"2024-13-01"}', '{"d":"2023-02-29"}', '{"d":"1900-02-29"}', '{"d":"2024-04-31"}', '{"d":"2024-1-01"}',
         '{"d":"2024-00-10"}', '{"t":"24:00:00"}', '{"t":"12:60:00"}', '{"dt":"2024-01-01 00:00:00"}',
         '{"id":"123e4567-e89b-12d3-a456-42661417400"}', '{"id":"123e4567e89b12d3a456426614174000"}', '{"d":1}'],
    ),
    "string_lengths": (
        {"type": "string", "minLength": 2, "maxLength": 4},
        ["ab", "abcd", "\n\t", "é😀", "a😀", '"\\\x00'],
        ['"a"', '"abcde"', '"\\ud83d\\ude00"', '"😀"', '""', '"\\n\\n\\n\\n\\n"', "12"],
    ),
    "integer_min0": (
        {"type": "integer", "minimum": 0},
        [0, 7, 10, 1234567890123456789],
        ["-1", "01", '"1"', "1.5", "-1e3", "-5"],
    ),
    "nullable": (
        {"type": ["string", "null"], "maxLength": 3},
        ["abc", "", None],
        ['"abcd"', "1", "false", "nul"],
    ),
    "nested": (
        NESTED,
        [{"meta": {"id": 1}}, {"meta": {"id": 1, "labels": {}}, "lines": []},
         {"meta": {"id": -2, "labels": {"a": "x", "b": ""}}, "lines": [{"sku": "s", "qty": 1}, {"sku": "", "qty": 9}]}],
        ['{"lines":[]}', '{"meta":{}}', '{"meta":{"id":1,"labels":{"a":1}}}',
         '{"meta":{"id":1},"lines":[{"sku":"s","qty":0}]}', '{"meta":{"id":1},"lines":[{"sku":"s"}]}',
         '{"meta":{"id":1},"lines":[{"sku":"s","qty":1},{"sku":"s","qty":1},{"sku":"s","qty":1}]}',
         '{"meta":{"id":1,"labels":{"a":"x",}}}'],
    ),
    "map": (
        {"type": "object", "additionalProperties": {"type": "number"}},
        [{}, {"a": 1, "b": -2.5e3}, {"": 0, "ü\"": 1.0}],
        ['{"a":"x"}', '{"a":1,}', '{a:1}', "[]"],
    ),
    "tree": (
        TREE,
        [{"v": 1}, {"v": 1, "kids": []}, {"v": 1, "kids": [{"v": 2, "kids": [{"v": 3}]}, {"v": 4}]}],
        ['{"kids":[]}', '{"v":1,"kids":[{}]}', '{"v":1,"kids":[{"v":"2"}]}'],
    ),
    "number_ranges": (
        {"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1},
                                          "t": {"type": "number", "exclusiveMinimum": -5, "exclusiveMaximum": 5}}},
        [{"p": 0}, {"p": 1.0}, {"p": 0.25}, {"p": 1}, {"t": -4.99}, {"t": 0}, {"p": 0.0, "t": 4.5}],
        ['{"p":1.5}', '{"p":-0.1}', '{"t":5}', '{"t":-5.0}', '{"p":1.0001}', '{"p":2}', '{"t":-5}'],
    ),
    "optional_and_all_of": (
        {"type": "object", "definitions": {"c": {"enum": ["x", "y"]}},
         "properties": {"n": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None, "title": "N"},
                        "c": {"allOf": [{"$ref": "#/definitions/c"}], "description": "pydantic v1 style"}},
         "required": ["c"]},
        [{"c": "x"}, {"n": None, "c": "y"}, {"n": 3, "c": "x"}],
        ['{"n":1}', '{"n":"1","c":"x"}', '{"c":"z"}', '{"n":1.5,"c":"x"}'],
    ),
}


LITERAL_CASES = {"enum_mixed", "const"}


WIDE = r"[\n ]*"  # whitespace that pretty-printing (json.dumps(v, indent=...)) needs


@pytest.mark.parametrize("name", sorted(CASES))
def test_valid_instances_match_and_validate(name):
    schema, valid, _ = CASES[name]
    rx, wide = regex(schema), regex(schema, whitespace=WIDE)
    for v in valid:
        jsonschema.Draft202012Validator(schema, format_checker=FORMATS).validate(v)
        texts = [compact(v), spaced(v), loose(compact(v)), compact(v, ascii=True), spaced(v, ascii=True),
                 loose(compact(v, ascii=True))]
        if name in LITERAL_CASES:  # enum / const values: only as json.dumps writes them, compact
            for text in set(texts[:3] + [pretty(v)]) - {compact(v)}:
                assert not rx.fullmatch(text) and not wide.fullmatch(text), (name, text)
            texts = [compact(v)]
        for text in texts:
            assert rx.fullmatch(text), (name, text)
            assert wide.fullmatch(text), (name, text)


@pytest.mark.parametrize("name", sorted(CASES.keys() - LITERAL_CASES))
def test_pretty_printed_instances(name):
    """json.dumps(v, indent=...) matches with whitespace r"[\n ]*", not with the default "[ ]?"."""
    schema, valid, _ = CASES[name]
    rx, wide = regex(schema), regex(schema, whitespace=WIDE)
    for v in valid:
        for text in (pretty(v), pretty(v, ascii=True), pretty(v, indent=0), pretty(v, indent=4),
                     loose(compact(v), "\n  ")):
            assert wide.fullmatch(text), (name, text)
            # JSON strings hold a newline only escaped: a raw one is layout, which "[ ]?" does not allow
            assert "\n" not in text or not rx.fullmatch(text), (name, text)


@pytest.mark.parametrize("name", sorted(CASES))
def test_invalid_texts_do_not_match(name):
    """Invalid texts do not match, neither compact nor with whitespace in every gap."""
    schema, _, invalid = CASES[name]
    rx, wide = regex(schema), regex(schema, whitespace=WIDE)
    for text in invalid:
        for variant in (text, loose(text)):
            assert not is_valid(schema, variant), (name, variant)  # the test data itself is right
            assert not rx.fullmatch(variant), (name, variant)
            assert not wide.fullmatch(variant), (name, variant)
        assert not wide.fullmatch(loose(text, "\n  ")), (name, text)


@pytest.mark.parametrize("name", sorted(CASES))
def test_no_whitespace_option(name):
    schema, valid, _ = CASES[name]
    rx = regex(schema, whitespace="")
    for v in valid:
        assert rx.fullmatch(compact(v)), (name, compact(v))
        if name not in LITERAL_CASES:
            for text in {spaced(v), loose(compact(v)), pretty(v)} - {compact(v)}:
                assert not rx.fullmatch(text), (name, text)


def test_canonical_layout_only():
    """Texts valid under the schema but outside the canonical layout are not generated."""
    not_canonical = [
        (PERSON, '{"age":1,"name":"Al"}'),  # keys out of declared order
        (PERSON, '{"name":"Al","age":1,"extra":2}'),  # undeclared key (allowed: no additionalProperties)
        (PERSON, '{"name":"Al",  "age":1}'),  # two spaces (whitespace "[ ]?")
        (PERSON, '{  "name":"Al","age":1}'),
        (PERSON, '{"name":"Al","age":1  }'),
        (PERSON, '{"name"  :"Al","age":1}'),
        (PERSON, '{"name":"Al"  ,"age":1}'),
        (PERSON, '{"name":"Al",\n"age":1}'),  # other whitespace than "[ ]?" allows
        (PERSON, '{"name":"Al",\t"age":1}'),
        (PERSON, ' {"name":"Al","age":1}'),  # around the top-level value
        (PERSON, '{"name":"Al","age":1} '),
        ({"type": "integer", "minimum": 0}, "-0"),
        ({"type": "integer", "minimum": 0}, "1.0"),
        ({"type": "integer", "minimum": 0}, "1e3"),
        ({"type": "integer"}, " 1"),
        ({"type": "array"}, "[1 ,2  ]"),
        ({"type": "array"}, "[  ]"),
        ({"type": "object"}, "{  }"),
        ({"type": "object"}, '{"a":1 ,  "b":2}'),
        ({"enum": ["A"]}, '"\\u0041"'),  # enum values only as json.dumps writes them
        ({"const": {"a": 1, "b": 2}}, '{"a": 1,"b":2}'),  # enum/const objects compact
        ({"type": "number", "maximum": 1}, "1e-3"),  # no exponent under bounds
    ]
    for schema, text in not_canonical:
        assert is_valid(schema, text), text
        assert not regex(schema).fullmatch(text), text
    assert regex(PERSON).fullmatch('{"name":"\\u0041l","age":1}')  # escapes are fine inside free strings
    assert regex(PERSON).fullmatch('{ "name" : "Al" , "age" : 1 }')
    assert regex(PERSON).fullmatch('{"name" :"Al", "age": 1 }')  # any mix of gaps with and without


def test_whitespace_in_every_gap_and_nowhere_else():
    """One space inserted at each position of a text: it matches iff the position is a gap (after
    '{' '[' ',' ':' or before '}' ']' ',' ':'); two spaces never match with "[ ]?"; inside numbers,
    literals and keys it does not match (and the text is invalid or not the same instance)."""
    schema = {"type": "object", "required": ["ab", "n"],
              "properties": {"ab": {"type": "integer"}, "n": {"type": "array"}, "o": {"type": "object"},
                             "e": {"enum": [[1, 2], "x"]}}}
    text = '{"ab":-12,"n":[true,null,-1.5e3,[],{"k":[false]}],"o":{},"e":[1,2]}'
    enum_value = range(text.index("[1,2]") + 1, text.index("[1,2]") + 5)  # compact, whatever whitespace
    free_key = range(text.index('"k"') + 1, text.index('"k"') + 3)  # a space there is the key's content
    allowed = set(gaps(text)) - set(enum_value) | set(free_key)
    assert is_valid(schema, text)
    rx, wide = regex(schema), regex(schema, whitespace=WIDE)
    assert rx.fullmatch(text) and rx.fullmatch(loose(text).replace("[ 1 , 2 ]", "[1,2]"))
    for i in range(len(text) + 1):
        one, two = text[:i] + " " + text[i:], text[:i] + "  " + text[i:]
        assert bool(rx.fullmatch(one)) == (i in allowed), (i, one)
        assert bool(wide.fullmatch(two)) == (i in allowed), (i, two)
        assert not rx.fullmatch(two) or i in free_key, (i, two)
        if 0 < i < len(text) and i not in gaps(text):  # whitespace where JSON forbids it, or in a key
            assert not is_valid(schema, one) or json.loads(one) != json.loads(text), (i, one)
    # any value: the same, except that a space inside a free string is content
    value = '[{"k":[1,{}],"":-0.5E+2},[[],true],null,"a b"]'  # 4 levels deep
    inside = strings_inside(value)
    for d in (4, 5):
        depth_rx = re.compile(json_value_regex(max_depth=d))
        for i in range(len(value) + 1):
            one = value[:i] + " " + value[i:]
            assert bool(depth_rx.fullmatch(one)) == (i in gaps(value) or i in inside), (d, i, one)
    assert not re.fullmatch(json_value_regex(max_depth=3), loose(value))
    # empty containers: one whitespace, not two
    for empty in ("{ }", "[ ]", '{"a":{ },"b":[ ]}'):
        assert re.fullmatch(json_value_regex(), empty) and re.fullmatch(json_value_regex(), empty.replace(" ", ""))
        assert not re.fullmatch(json_value_regex(), empty.replace(" ", "  "))
    assert re.fullmatch(json_object_regex(), '{ "a" : [ 1 , 2 ] , "b" : { } }')


def test_whitespace_pattern():
    v = {"a": [1, 2], "b": {"c": None}}
    alt = regex({}, whitespace="(?: |\n  )?")  # a top-level alternation is grouped
    assert alt.fullmatch(json.dumps(v, separators=(",\n  ", ": ")))
    assert alt.fullmatch(compact(v))
    assert not alt.fullmatch(json.dumps(v, separators=(", \n", ":")))
    assert alt.fullmatch(loose_text := loose(compact(v), "\n  ")) and alt.fullmatch(loose(compact(v)))
    assert not alt.fullmatch(loose_text.replace("\n  ", "\n "))
    star = regex({}, whitespace="[ ]*")
    assert star.fullmatch(json.dumps(v, separators=(",   ", ":  ")))
    assert star.fullmatch(loose(compact(v), "   ")) and not star.fullmatch(pretty(v))
    assert regex({}, whitespace="").fullmatch(compact(v)) and not regex({}, whitespace="").fullmatch(loose(compact(v)))
    with pytest.raises(ValueError, match="whitespace"):
        json_schema_regex({}, whitespace="(?=x)")


# -- exhaustive checks -------------------------------------------------------------------------

def test_object_commas_every_subset():
    """Every subset of the optional properties, with all separator mistakes."""
    props = ["a", "b", "c", "d", "e"]
    for required in ([], ["b"], ["a", "e"], ["c", "d"], props):
        schema = {"type": "object", "properties": {k: {"type": "integer"} for k in props}, "required": required}
        rx = regex(schema)
        for n in range(len(props) + 1):
            for present in itertools.combinations(props, n):
                members = [f'"{k}":{i}' for i, k in enumerate(present)]
                ok = set(required) <= set(present)
                text = "{" + ",".join(members) + "}"
                assert bool(rx.fullmatch(text)) == ok, (required, present)
                assert bool(rx.fullmatch("{" + ", ".join(members) + "}")) == ok
                assert bool(rx.fullmatch(loose(text))) == ok
                if members:
                    bad_texts = ["{," + ",".join(members) + "}", "{" + ",".join(members) + ",}", "{,}"]
                    if n > 1:
                        bad_texts += ["{" + ",,".join(members) + "}", "{" + "".join(members) + "}"]
                    for bad in bad_texts:
                        assert not rx.fullmatch(bad) and not rx.fullmatch(loose(bad)), bad


def test_object_regex_is_linear_in_properties():
    def schema(n, required=()):
        return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)},
                "required": list(required)}

    for req in ((), ("p0",), ("p39",)):
        sizes = [len(json_schema_regex(schema(n, [r for r in req if int(r[1:]) < n]))) for n in (40, 80)]
        assert sizes[1] < 2.2 * sizes[0], sizes
    rx = regex(schema(60))
    assert rx.fullmatch('{"p59":1}') and rx.fullmatch('{"p3":1,"p58":2}') and not rx.fullmatch('{"p3":1,"p3":2}')
    # nesting: each level at most doubles the member regexes
    inner = {"type": "string"}
    lengths = []
    for _ in range(4):
        inner = {"type": "object", "properties": {f"k{i}": inner for i in range(3)}}
        lengths.append(len(json_schema_regex(inner)))
    assert all(b < 7 * a for a, b in itertools.pairwise(lengths)), lengths


def test_integer_ranges_exhaustive():
    bounds = [None, -1001, -1000, -999, -100, -99, -10, -9, -1, 0, 1, 9, 10, 11, 99, 100, 101, 999, 1000, 12345]
    values = sorted({*range(-1100, 1101, 1)} | {b + d for b in bounds if b is not None for d in (-1, 0, 1)}
                    | {-12346, 12344, 12346, 99999, 100000, 10 ** 20, -(10 ** 20)})
    texts = [(v, str(v)) for v in values]
    for lo, hi in itertools.product(bounds, bounds):
        if lo is not None and hi is not None and lo > hi:
            continue
        schema = {"type": "integer"}
        if lo is not None:
            schema["minimum"] = lo
        if hi is not None:
            schema["maximum"] = hi
        rx = re.compile(json_schema_regex(schema))
        for v, text in texts:
            expected = (lo is None or v >= lo) and (hi is None or v <= hi)
            assert bool(rx.fullmatch(text)) == expected, (lo, hi, v)
    assert_supported_syntax(json_schema_regex({"type": "integer", "minimum": -1000, "maximum": 12345}))


def test_integer_fractional_and_exclusive_bounds():
    cases = [({"exclusiveMinimum": 3}, 4, None), ({"minimum": 0.5}, 1, None), ({"exclusiveMaximum": 3}, None, 2),
             ({"maximum": -0.5}, None, -1), ({"minimum": 2, "exclusiveMinimum": 2}, 3, None),
             ({"minimum": 5, "exclusiveMinimum": True}, 6, None),  # draft 4
             ({"exclusiveMinimum": -1}, 0, None), ({"minimum": 3, "maximum": 3}, 3, 3), ({"multipleOf": 1}, None, None)]
    for extra, lo, hi in cases:
        rx = regex({"type": "integer", **extra})
        for v in range(-20, 21):
            assert bool(rx.fullmatch(str(v))) == ((lo is None or v >= lo) and (hi is None or v <= hi)), (extra, v)
    with pytest.raises(ValueError, match="unsatisfiable"):
        json_schema_regex({"type": "integer", "minimum": 3, "exclusiveMaximum": 3})


def _number_texts():
    out = set()
    for i in list(range(0, 13)) + [99, 100, 101, 123]:
        for frac in ("", ".0", ".00", ".5", ".05", ".999", ".0001", ".10"):
            out.add(f"{i}{frac}")
            out.add(f"-{i}{frac}")
    return sorted(out)


def test_number_ranges_exhaustive():
    texts = [(t, Fraction(t)) for t in _number_texts()]
    bounds = [None, -10, -1, 0, 1, 7, 10, 100]
    for lo, hi in itertools.product(bounds, bounds):
        for lo_excl, hi_excl in itertools.product((False, True), repeat=2):
            if (lo is None and lo_excl) or (hi is None and hi_excl):
                continue
            schema = {"type": "number"}
            if lo is not None:
                schema["exclusiveMinimum" if lo_excl else "minimum"] = lo
            if hi is not None:
                schema["exclusiveMaximum" if hi_excl else "maximum"] = hi
            try:
                rx = re.compile(json_schema_regex(schema))
            except ValueError as exc:
                assert "unsatisfiable" in str(exc)
                assert lo is not None and hi is not None and (lo > hi or (lo == hi and (lo_excl or hi_excl)))
                continue
            for text, value in texts:
                inside = ((lo is None or value > lo or (value == lo and not lo_excl))
                          and (hi is None or value < hi or (value == hi and not hi_excl)))
                negative_zero = text.startswith("-") and value == 0 and len(schema) > 1  # "-0" only unbounded
                assert bool(rx.fullmatch(text)) == (inside and not negative_zero), (schema, text)


def test_number_without_bounds_and_min_zero():
    rx, nonneg = regex({"type": "number"}), regex({"type": "number", "minimum": 0})
    for text in ("0", "-0", "1.5", "-2e10", "3E-4", "1.25e+3", "123456789012345678901234567890"):
        assert rx.fullmatch(text)
        assert bool(nonneg.fullmatch(text)) == (not text.startswith("-"))
    for text in ("01", "1.", ".5", "+1", "1e", "NaN", "Infinity", "- 1"):
        assert not rx.fullmatch(text) and not nonneg.fullmatch(text)


def test_dates_exhaustive():
    rx = regex({"type": "string", "format": "date"})
    for year, month, day in itertools.product((1, 4, 100, 1900, 2000, 2023, 2024, 9999), range(0, 14), range(0, 33)):
        try:
            datetime.date(year, month, day)
            real = True
        except ValueError:
            real = False
        assert bool(rx.fullmatch(f'"{year:04d}-{month:02d}-{day:02d}"')) == real, (year, month, day)
    assert not rx.fullmatch('"0000-01-01"')


# -- property-based ----------------------------------------------------------------------------

# No lone surrogates: they are no Unicode text, and the patterns allow a surrogate escape only as a
# high + low pair (json_schema.py); a pair comes from astral characters such as the emoji.
_CHARS = st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from('"\\/\x00\x1f\x7f\u2028😀\n\t\b'))
_TEXT = st.text(_CHARS, max_size=8)
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), _TEXT)
_JSON = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(_TEXT, inner, max_size=3)), max_leaves=12)
_VALUE_RX = {d: re.compile(json_value_regex(max_depth=d)) for d in range(6)}
_OBJECT_RX = {d: re.compile(json_object_regex(max_depth=d)) for d in range(1, 5)}
_WIDE_VALUE_RX = {d: re.compile(json_value_regex(WIDE, max_depth=d)) for d in range(6)}
_WIDE_OBJECT_RX = {d: re.compile(json_object_regex(WIDE, max_depth=d)) for d in range(1, 5)}
_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# what each whitespace pattern may put in one gap (a sample of it)
_GAPS = {"[ ]?": ["", " "], WIDE: ["", " ", "\n", "  ", "\n    ", " \n ", "\n\n"]}


@st.composite
def _laid_out(draw, value, gap_choices, ascii=False):
    """``value`` serialized with an independently drawn gap (from ``gap_choices``) in every place
    where the layout allows whitespace, and none around the top-level value."""

    def gap():
        return draw(st.sampled_from(gap_choices))

    def dump(v):
        if isinstance(v, dict):
            items = [json.dumps(k, ensure_ascii=ascii) + gap() + ":" + gap() + dump(x) for k, x in v.items()]
            opener, closer = "{", "}"
        elif isinstance(v, list):
            items, opener, closer = [dump(x) for x in v], "[", "]"
        else:
            return json.dumps(v, ensure_ascii=ascii)
        body = gap()
        for j, item in enumerate(items):
            body += (gap() + "," + gap() if j else "") + item
        return opener + body + (gap() if items else "") + closer

    return dump(value)


@_SETTINGS
@given(_JSON, st.booleans(), st.booleans())
def test_json_value_depth(value, ascii, space):
    """A value of nesting depth k matches json_value_regex(max_depth=d) iff k <= d."""
    text = (spaced if space else compact)(value, ascii=ascii)
    k = depth_of(value)
    for d, rx in _VALUE_RX.items():
        assert bool(rx.fullmatch(text)) == (k <= d), (d, k, text)
    for d, rx in _OBJECT_RX.items():
        assert bool(rx.fullmatch(text)) == (isinstance(value, dict) and k <= d), (d, k, text)


@_SETTINGS
@given(_JSON, st.booleans(), st.integers(0, 4), st.data())
def test_json_value_any_layout(value, ascii, indent, data):
    """Whitespace drawn independently for every gap, and pretty-printing (json.dumps with indent):
    depth k matches json_value_regex(whitespace, max_depth=d) iff k <= d, for whitespace "[ ]?"
    (one optional space per gap) and r"[\n ]*"; newlines or two spaces never match "[ ]?"."""
    k = depth_of(value)
    narrow = data.draw(_laid_out(value, _GAPS["[ ]?"], ascii), label="narrow")
    wide = data.draw(_laid_out(value, _GAPS[WIDE], ascii), label="wide")
    indented = pretty(value, ascii, indent)
    for d in _VALUE_RX:
        assert bool(_VALUE_RX[d].fullmatch(narrow)) == (k <= d), (d, k, narrow)
        for text in (narrow, wide, indented):
            assert bool(_WIDE_VALUE_RX[d].fullmatch(text)) == (k <= d), (d, k, text)
        for text in (wide, indented):
            inside = strings_inside(text)
            skeleton = "".join(c for i, c in enumerate(text) if not {i, i + 1} <= inside)  # strings emptied
            fits = "\n" not in skeleton and "  " not in skeleton
            assert bool(_VALUE_RX[d].fullmatch(text)) == (k <= d and fits), (d, k, text)
    for d, rx in _WIDE_OBJECT_RX.items():
        assert bool(rx.fullmatch(indented)) == (isinstance(value, dict) and k <= d), (d, k, indented)


@_SETTINGS
@given(_JSON, st.integers(0, 3), st.booleans())
def test_json_value_one_level_too_deep(value, d, wrap_in_list):
    """Wrapping a value until it is exactly max_depth + 1 deep makes it not match."""
    while depth_of(value) <= d:
        value = [value] if wrap_in_list else {"k": value}
    assert not _VALUE_RX[d].fullmatch(compact(value))
    assert _VALUE_RX[depth_of(value)].fullmatch(compact(value))


def _ordered(schema, value: dict) -> dict:
    return {k: value[k] for k in schema["properties"] if k in value}


_PERSON = st.fixed_dictionaries(
    {"name": st.text(_CHARS, min_size=1, max_size=10), "age": st.integers(0, 10 ** 15)},
    optional={
        "email": _TEXT,
        "tags": st.lists(_TEXT, max_size=3),
        "address": st.fixed_dictionaries({"city": _TEXT}, optional={"zip": st.from_regex(r"[0-9]{5}", fullmatch=True)})
        .map(lambda a: {k: a[k] for k in ("city", "zip") if k in a}),
    },
)


@_SETTINGS
@given(_PERSON, st.booleans(), st.booleans(), st.data())
def test_person_instances(person, ascii, space, data):
    person = _ordered(PERSON, person)
    jsonschema.validate(person, PERSON)
    assert regex(PERSON).fullmatch((spaced if space else compact)(person, ascii=ascii))
    assert regex(PERSON).fullmatch(data.draw(_laid_out(person, _GAPS["[ ]?"], ascii)))
    wide = regex(PERSON, whitespace=WIDE)
    assert wide.fullmatch(data.draw(_laid_out(person, _GAPS[WIDE], ascii)))
    assert wide.fullmatch(pretty(person, ascii)) and not regex(PERSON).fullmatch(pretty(person, ascii))


CONFIG = {
    "type": "object",
    "properties": {
        "mode": {"enum": ["fast", "slow", 3, None]},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "retries": {"type": "integer", "minimum": -3, "maximum": 250},
        "extra": {"type": "object", "additionalProperties": {"type": ["integer", "boolean"]}},
        "target": {"anyOf": [{"type": "string", "format": "uuid"}, {"type": "array", "items": {"type": "null"},
                                                                        "minItems": 1, "maxItems": 2}]},
        "anything": {},
    },
    "required": ["mode", "retries"],
}
_CONFIG = st.fixed_dictionaries(
    {"mode": st.sampled_from(["fast", "slow", 3, None]), "retries": st.integers(-3, 250)},
    optional={
        "ratio": st.one_of(st.integers(0, 1), st.decimals(0, 1, places=4).map(float)),
        "extra": st.dictionaries(_TEXT, st.one_of(st.integers(), st.booleans()), max_size=4),
        "target": st.one_of(st.uuids().map(str), st.lists(st.none(), min_size=1, max_size=2)),
        "anything": _JSON.filter(lambda v: depth_of(v) <= 3),
    },
)


@_SETTINGS
@given(_CONFIG, st.booleans(), st.data())
def test_config_instances(config, space, data):
    config = _ordered(CONFIG, config)
    jsonschema.Draft202012Validator(CONFIG, format_checker=FORMATS).validate(config)
    assert regex(CONFIG).fullmatch((spaced if space else compact)(config))
    assert regex(CONFIG).fullmatch(data.draw(_laid_out(config, _GAPS["[ ]?"])))
    wide = regex(CONFIG, whitespace=WIDE)
    assert wide.fullmatch(data.draw(_laid_out(config, _GAPS[WIDE])))
    assert wide.fullmatch(pretty(config)) and wide.fullmatch(pretty(config, indent=4))


# -- refs and recursion ------------------------------------------------------------------------

def test_recursive_ref_depth():
    rx = regex(TREE, max_depth=3)
    node = {"v": 0}
    for _ in range(2):
        node = {"v": 0, "kids": [node]}
    assert rx.fullmatch(compact(node))  # 3 nodes deep
    assert not rx.fullmatch(compact({"v": 0, "kids": [node]}))  # 4
    assert regex(TREE, max_depth=4).fullmatch(compact({"v": 0, "kids": [node]}))
    # a recursion through "#" itself
    linked = {"type": "object", "properties": {"next": {"$ref": "#"}, "x": {"type": "integer"}}, "required": ["x"]}
    rx = regex(linked, max_depth=2)
    assert rx.fullmatch('{"next":{"x":1},"x":2}') and not rx.fullmatch('{"next":{"next":{"x":1},"x":2},"x":3}')
    # required recursion can never end: unsatisfiable
    with pytest.raises(ValueError, match="recursive"):
        json_schema_regex({"$defs": {"a": {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}},
                                           "required": ["a"]}}, "$ref": "#/$defs/a"})


def test_ref_forms():
    assert regex({"definitions": {"n": {"type": "null"}}, "$ref": "#/definitions/n"}).fullmatch("null")
    assert regex({"$defs": {"a/b": {"type": "null"}}, "$ref": "#/$defs/a~1b"}).fullmatch("null")
    assert regex({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"const": 1}}, "$ref": "#/$defs/a"}).fullmatch("1")
    with pytest.raises(ValueError, match="does not resolve"):
        json_schema_regex({"$ref": "#/$defs/missing"})


# -- other semantics ---------------------------------------------------------------------------

def test_string_pattern_and_literals():
    rx = regex({"type": "string", "pattern": "^[a-z]+\\d{2}$"})
    assert rx.fullmatch('"abc12"') and not rx.fullmatch('"abc"') and not rx.fullmatch('"ABC12"')
    assert is_valid({"type": "string", "pattern": "^[a-z]+\\d{2}$"}, '"abc12"')
    rx = regex({"type": "string", "pattern": "a|b"})  # a top-level alternation stays inside the quotes
    assert rx.fullmatch('"a"') and rx.fullmatch('"b"') and not rx.fullmatch('"a')
    rx = regex({"type": "string", "pattern": "x\\$"})  # an escaped final $ is kept
    assert rx.fullmatch('"x$"') and not rx.fullmatch('"x"')
    # literal text with regex metacharacters, in keys, enums and const
    special = "a.b*c+d?e|f^g$h/i-j[k]l{m}n(o)p\\q\"r #s\u00e9\u0001😀"
    rx = regex({"type": "object", "properties": {special: {"const": special}}, "required": [special]})
    assert rx.fullmatch(compact({special: special}))
    assert not rx.fullmatch(compact({special: special.replace(".", "x")}))


def test_pattern_syntax_checked():
    for pattern in ("(?=a)b", "a\\bb", "(a)\\1", "a^b", "a$b", "\\Sx", "(?i)a", "(?P<n>a)", "a{x"):
        with pytest.raises(ValueError, match="pattern"):
            json_schema_regex({"type": "string", "pattern": pattern})


def test_type_inference_and_unconstrained():
    assert regex({"properties": {"a": {"type": "null"}}}).fullmatch('{"a":null}')
    assert not regex({"properties": {"a": {"type": "null"}}}).fullmatch("1")
    assert not regex({"minLength": 1}).fullmatch("5") and regex({"minLength": 1}).fullmatch('"5"')
    assert regex({"maximum": 3}).fullmatch("2.5")
    any_value = json_value_regex()
    assert json_schema_regex({}) == json_schema_regex(True) == json_schema_regex("{}") == any_value
    annotated = {"type": "string", "title": "t", "description": "d", "examples": ["e"], "default": "x",
                 "$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "urn:x", "$comment": "c",
                 "deprecated": True, "readOnly": True, "writeOnly": False, "x-vendor": {"anything": 1}}
    assert json_schema_regex(annotated) == json_schema_regex({"type": "string"})
    assert json_schema_regex({"type": "object"}) == json_object_regex()
    # array items and map values: the container counts as one of the max_depth levels
    assert not regex({"type": "array"}, max_depth=1).fullmatch("[[]]") and regex({"type": "array"}, max_depth=1).fullmatch("[1]")
    assert regex({"type": "array", "items": {}}, max_depth=1).fullmatch("[1]")
    # a property with an unconstrained value: up to max_depth levels below it
    rx = regex({"type": "object", "properties": {"a": True}}, max_depth=1)
    assert rx.fullmatch('{"a":[1]}') and not rx.fullmatch('{"a":[[1]]}')


def test_objects_special_cases():
    # required but not declared: value from additionalProperties, after the declared ones
    rx = regex({"type": "object", "properties": {"a": {"type": "null"}}, "required": ["z"],
                "additionalProperties": {"type": "boolean"}})
    assert rx.fullmatch('{"z":true}') and rx.fullmatch('{"a":null,"z":false}') and not rx.fullmatch('{"z":1}')
    assert regex({"type": "object", "required": ["k"]}).fullmatch('{"k":[1]}')
    with pytest.raises(ValueError, match="unsatisfiable"):
        json_schema_regex({"type": "object", "required": ["k"], "additionalProperties": False})
    # false property schemas are left out; additionalProperties false without properties: {}
    rx = regex({"type": "object", "properties": {"a": False, "b": {"type": "null"}}})
    assert rx.fullmatch('{"b":null}') and not rx.fullmatch('{"a":null}')
    assert regex({"type": "object", "additionalProperties": False}).fullmatch("{}")
    assert not regex({"type": "object", "additionalProperties": False}).fullmatch('{"a":1}')
    assert regex({"type": "object", "properties": {}}).pattern == r"\{[ ]?\}"
    assert regex({"type": "object", "properties": {}}, whitespace="").pattern == r"\{\}"


def test_arrays_special_cases():
    assert regex({"type": "array", "maxItems": 0}).fullmatch("[]")
    assert regex({"type": "array", "items": False}).fullmatch("[]")
    rx = regex({"type": "array", "items": {"type": "null"}, "minItems": 3, "uniqueItems": False})
    assert rx.fullmatch("[null,null,null,null]") and not rx.fullmatch("[null,null]")
    with pytest.raises(ValueError, match="unsatisfiable"):
        json_schema_regex({"type": "array", "minItems": 3, "maxItems": 2})


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "object", "patternProperties": {"^a": {}}}, "patternProperties"),
    ({"type": "object", "propertyNames": {"maxLength": 3}}, "propertyNames"),
    ({"type": "object", "minProperties": 1}, "minProperties"),
    ({"type": "object", "maxProperties": 1}, "maxProperties"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"type": "object", "dependentSchemas": {"a": {}}}, "dependentSchemas"),
    ({"type": "object", "dependencies": {"a": ["b"]}}, "dependencies"),
    ({"type": "object", "unevaluatedProperties": False}, "unevaluatedProperties"),
    ({"type": "array", "unevaluatedItems": False}, "unevaluatedItems"),
    ({"type": "array", "prefixItems": [{}]}, "prefixItems"),
    ({"type": "array", "items": [{}], "additionalItems": False}, "additionalItems"),
    ({"type": "array", "items": [{"type": "null"}]}, "items"),
    ({"type": "array", "contains": {"type": "null"}}, "contains"),
    ({"type": "array", "minContains": 1}, "minContains"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "null"}}, "not"),
    ({"if": {"type": "null"}, "then": {"const": None}}, "if"),
    ({"type": "integer", "multipleOf": 3}, "multipleOf"),
    ({"type": "number", "multipleOf": 0.5}, "multipleOf"),
    ({"type": "number", "maximum": 0.5}, "maximum"),
    ({"type": "number", "exclusiveMinimum": -1.5}, "exclusiveMinimum"),
    ({"type": "string", "format": "email"}, "format"),
    ({"type": "string", "pattern": "a+", "minLength": 2}, "pattern"),
    ({"type": "string", "format": "date", "maxLength": 20}, "format"),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "allOf"),
    ({"anyOf": [{"type": "string"}], "properties": {"a": {}}}, "properties"),
    ({"$ref": "#/$defs/a", "maxLength": 3, "$defs": {"a": {}}}, "maxLength"),
    ({"$ref": "https://example.com/schema.json"}, "$ref"),
    ({"$dynamicRef": "#node"}, "$dynamicRef"),
])
def test_unsupported_keywords_raise(schema, keyword):
    with pytest.raises(ValueError, match=re.escape(repr(keyword))):
        json_schema_regex(schema)


def test_unsupported_keyword_location():
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "object",
                                                                                "patternProperties": {}}}}}
    with pytest.raises(ValueError, match=re.escape("json schema keyword 'patternProperties' at #/properties/a/items "
                                                   "is not supported")):
        json_schema_regex(schema)
    with pytest.raises(ValueError, match=re.escape("'contains' at #/$defs/x")):
        json_schema_regex({"$defs": {"x": {"contains": {}}}, "properties": {"p": {"$ref": "#/$defs/x"}}})


def test_bad_input_raises():
    for schema in ('{"type": ', "[1]", 5, None, {"type": "str"}, {"type": []}, False, {"enum": "ab"},
                   {"type": "string", "minLength": -1}, {"type": "integer", "minimum": "1"}):
        with pytest.raises(ValueError):
            json_schema_regex(schema)
    for kw in ({"max_depth": -1}, {"max_depth": 1.5}, {"whitespace": "^ "}, {"whitespace": None}):
        with pytest.raises(ValueError):
            json_schema_regex({}, **kw)
    with pytest.raises(ValueError):
        json_object_regex(max_depth=0)
    assert re.fullmatch(json_value_regex(max_depth=0), "[]") is None


# -- syntax and size ---------------------------------------------------------------------------

def test_regexes_use_only_supported_syntax():
    regexes = [json_value_regex(max_depth=d) for d in range(5)] + [json_object_regex(), json_value_regex("")]
    regexes += [json_schema_regex(schema) for schema, _, _ in CASES.values()] + [json_schema_regex(CONFIG)]
    for rx in regexes:
        assert_supported_syntax(rx)
        re.compile(rx)
    for bad in ("(?=a)", "^a", "a$", "a\\b", "(?<=a)b", "(?!a)", "a{", "\\1", "(?i)a"):
        with pytest.raises(AssertionError):
            assert_supported_syntax(bad)


def test_sizes():
    sizes = [len(json_value_regex(max_depth=d)) for d in range(1, 5)]
    assert sizes[2] < 20_000 and sizes[3] < 80_000, sizes
    assert len(json_object_regex(max_depth=3)) < 10_000
    # DFA states (whitespace in every gap adds about 2% over whitespace after ':' and ',' only:
    # 5849 -> 5975 and 2929 -> 2993)
    assert compile_regex(json_value_regex(max_depth=3)).transitions.shape[0] - 1 < 7_000
    assert compile_regex(json_object_regex(max_depth=3)).transitions.shape[0] - 1 < 3_500


def test_dfa_agrees_with_re():
    """The DFA engine that enforces the regex accepts the same layouts as Python's re."""
    v = {"a": [1, {"b": None, "c": 2}], "d": {}, "e": "x y", "f": -1.5, "g": []}  # 3 levels deep
    texts = [compact(v), spaced(v), loose(compact(v)), pretty(v), loose(compact(v), "  "), " " + compact(v),
             loose(compact(v), "\n"), compact(v).replace("-1.5", "-1. 5"), compact(v).replace('"a"', '"a "'),
             "{ }", "[ ]", "{  }", "[1 , 2 ]"]
    texts += [loose(compact(p)) for p in CASES["person"][1]] + [pretty(p) for p in CASES["person"][1]]
    accepted = set()
    for whitespace in ("[ ]?", WIDE, ""):
        for pattern in (json_value_regex(whitespace), json_schema_regex(PERSON, whitespace)):
            dfa, rx = compile_regex(pattern), re.compile(pattern)
            for text in texts:
                assert dfa.fullmatch(text) == bool(rx.fullmatch(text)), (whitespace, text)
                if dfa.fullmatch(text):
                    accepted.add((whitespace, text))
    assert {("[ ]?", loose(compact(v))), (WIDE, pretty(v)), (WIDE, loose(compact(v), "  ")), ("", compact(v))} <= accepted
    assert len(accepted) < 3 * len(texts)  # and some are rejected
