"""vLLM's ``StructuredOutputsParams`` (formerly ``GuidedDecodingParams``): what a request's output
must match. Every kind becomes one regular expression (:meth:`StructuredOutputsParams.pattern`)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from jaxllm.structured.grammar import grammar_regex
from jaxllm.structured.json_schema import json_object_regex, json_schema_regex
from jaxllm.structured.regex import literal

_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
DEFAULT_WHITESPACE = "[ ]?"  # one optional space in each gap JSON allows inside objects and arrays


@dataclass
class StructuredOutputsParams:
    """Exactly one of ``json`` (a JSON schema: dict, JSON text or a pydantic model class),
    ``regex``, ``choice`` (a list of strings), ``json_object`` (True: any JSON object) or
    ``grammar`` (EBNF rules from ``root``, as xgrammar and GBNF write them, or a Lark grammar from
    ``start``; recursion is unrolled to ``GRAMMAR_MAX_DEPTH`` levels: see
    jaxllm/structured/grammar.py and lark.py) or ``structural_tag`` (xgrammar's structural tag, as
    vLLM passes it: JSON text or a dict ``{"type": "structural_tag", "structures": [{"begin",
    "schema", "end"}, ...], "triggers": [...]}``: free text that contains no trigger, where each
    trigger starts one of the structures whose ``begin`` starts with it: ``begin``, JSON matching
    its ``schema``, ``end``, and free text again).

    In generated JSON, ``whitespace_pattern`` (a regex; default one optional space) may fill each gap
    JSON allows inside objects and arrays (after '{' and '[', before '}' and ']', around ':' and ','),
    as outlines' and vLLM's ``guided_whitespace_pattern``; ``r"[\n ]*"`` allows pretty-printed JSON;
    ``disable_any_whitespace`` allows none.
    """

    json: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict | None = None
    disable_any_whitespace: bool = False
    whitespace_pattern: str | None = None

    def __post_init__(self):
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of {list(_KINDS)}; got {given or 'none'}")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise ValueError(f"structured_outputs.grammar={self.grammar!r} must be a string of EBNF rules (or a Lark grammar)")
        if self.regex is not None and not isinstance(self.regex, str):
            raise ValueError(f"structured_outputs.regex={self.regex!r} must be a string")
        if self.choice is not None:
            if (not isinstance(self.choice, list | tuple) or not self.choice
                    or not all(isinstance(c, str) for c in self.choice)):
                raise ValueError(f"structured_outputs.choice={self.choice!r} must be a non-empty list of strings")
            self.choice = list(self.choice)
        if self.structural_tag is not None:
            _structural_tag(self.structural_tag)  # malformed ones fail here, by name
        if self.json_object not in (None, True):
            raise ValueError(f"structured_outputs.json_object={self.json_object!r} must be True or None")
        if hasattr(self.json, "model_json_schema"):  # a pydantic model class, as vLLM accepts
            self.json = self.json.model_json_schema()
        if self.whitespace_pattern is not None and not isinstance(self.whitespace_pattern, str):
            raise ValueError(f"structured_outputs.whitespace_pattern={self.whitespace_pattern!r} must be a regex string")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def whitespace(self) -> str:
        if self.disable_any_whitespace:
            return ""
        return DEFAULT_WHITESPACE if self.whitespace_pattern is None else self.whitespace_pattern

    def pattern(self) -> str:
        """The regular expression the whole output must match; ValueError names what is unsupported."""
        if self.regex is not None:
            return self.regex
        if self.grammar is not None:
            return grammar_regex(self.grammar)
        if self.choice is not None:
            return "|".join(f"(?:{literal(c)})" for c in self.choice)
        if self.json_object:
            return _json_object_pattern(self.whitespace)
        if self.structural_tag is not None:
            return _structural_tag_pattern(json.dumps(_structural_tag(self.structural_tag)), self.whitespace)
        schema = self.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from exc
        try:
            text = json.dumps(schema)  # insertion order kept: it is the order keys are generated in
        except (TypeError, ValueError) as exc:
            raise ValueError(f"structured_outputs.json is not a JSON schema: {exc}") from exc
        return _json_schema_pattern(text, self.whitespace)


# Cached: the server converts a request's schema to check it, and the engine thread then finds it here.
@functools.lru_cache(maxsize=64)
def _json_schema_pattern(schema_text: str, whitespace: str) -> str:
    return json_schema_regex(json.loads(schema_text), whitespace=whitespace)


@functools.lru_cache(maxsize=8)
def _json_object_pattern(whitespace: str) -> str:
    return json_object_regex(whitespace=whitespace)


def _structural_tag(value) -> dict:
    """A structural tag as a dict, checked: ValueError names what is wrong."""
    name = "structured_outputs.structural_tag"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {type(value).__name__}")
    if value.get("type", "structural_tag") != "structural_tag":
        raise ValueError(f"{name} type={value.get('type')!r} must be 'structural_tag'")
    structures, triggers = value.get("structures"), value.get("triggers")
    if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise ValueError(f"{name} triggers={triggers!r} must be a non-empty list of non-empty strings")
    if not isinstance(structures, list) or not structures:
        raise ValueError(f"{name} structures={structures!r} must be a non-empty list of {{begin, schema, end}}")
    for i, s in enumerate(structures):
        if not isinstance(s, dict) or not isinstance(s.get("begin"), str) or not isinstance(s.get("end"), str):
            raise ValueError(f"{name} structures[{i}] must be an object with string 'begin' and 'end' and a 'schema'")
        if not isinstance(s.get("schema"), dict | bool):
            raise ValueError(f"{name} structures[{i}] schema={s.get('schema')!r} must be a JSON schema object")
        if not any(s["begin"].startswith(t) for t in triggers):
            raise ValueError(f"{name} structures[{i}] begin={s['begin']!r} starts with none of the triggers {triggers}")
    return {"type": "structural_tag", "structures": structures, "triggers": triggers}


@functools.lru_cache(maxsize=16)
def _structural_tag_pattern(tag_text: str, whitespace: str) -> str:
    """Free text without a trigger ((?~...), regex.py's absent operator), then any number of
    structures, each followed by free text again."""
    tag = json.loads(tag_text)
    free = "(?~" + "|".join(literal(t) for t in tag["triggers"]) + ")"
    structures = "|".join(
        f"(?:{literal(s['begin'])}(?:{json_schema_regex(s['schema'], whitespace=whitespace)}){literal(s['end'])})"
        for s in tag["structures"])
    return f"{free}(?:(?:{structures}){free})*"


GuidedDecodingParams = StructuredOutputsParams  # vLLM's name before 0.11
