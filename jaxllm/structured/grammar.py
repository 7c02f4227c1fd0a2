"""Grammars for structured outputs (vLLM's ``structured_outputs.grammar`` / ``guided_grammar``),
compiled to one regular expression.

Syntax: the EBNF of xgrammar (vLLM's default backend) and llama.cpp's GBNF::

    root      ::= "SELECT " column " FROM " table (" WHERE " condition)?
    column    ::= "id" | "name"       # a comment
    condition ::= column " = " [0-9]+

Rules ``name ::= body``; ``root`` is where the output starts. A body is alternatives ``|`` of
sequences of: string literals in double or single quotes (escapes ``\\n \\t \\r \\\\ \\" \\'
\\xHH \\uHHHH \\UHHHHHHHH``), character classes ``[...]`` / ``[^...]`` (as in regexes), rule
names, groups ``( ... )``, each optionally followed by ``* + ?`` or ``{m}``, ``{m,}``, ``{m,n}``.
A body may span lines; a rule ends where the next ``name ::=`` begins. A grammar without
``::=`` is read as Lark's syntax (lark.py), as vLLM does.

Recursion. The output's automaton is finite, so a rule reached again while it is being expanded
is expanded at most ``max_depth`` times on that path; deeper, that alternative is not allowed
(an optional or repeated part is left out). Outputs therefore always match the grammar, and nest
at most ``max_depth`` levels, as JSON schema ``$ref`` recursion does here (json_schema.py). Each
level multiplies the automaton by the number of times a recursive body names itself, so when
``max_depth`` levels would exceed regex.py's limits the deepest unrolling that fits is used (and
logged). A grammar with no way out of its recursion is a ValueError.
"""

from __future__ import annotations

import functools
import logging
import re

from jaxllm.structured.grammar_lexing import Tok, brace_bounds, lex
from jaxllm.structured.lark import is_lark, lark_rules
from jaxllm.structured.regex import compile_regex, literal

logger = logging.getLogger("jaxllm")

GRAMMAR_MAX_DEPTH = 4
MAX_PATTERN_CHARS = 150_000  # the expanded pattern; about as many automaton states as regex.py allows

_TOKEN = re.compile(r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<define>::=)
  | (?P<name>[A-Za-z_][A-Za-z0-9_.-]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<cls>\[(?:[^\]\\\n]|\\.)*\])
  | (?P<repeat>\{\s*\d*\s*(?:,\s*\d*\s*)?\})
  | (?P<op>[()|*+?])
""", re.VERBOSE)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "[": "[", "]": "]", "-": "-"}




def _unescape(body: str, at: int) -> str:
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        nxt = body[i + 1]
        width = {"x": 2, "u": 4, "U": 8}.get(nxt)
        if width is not None:
            digits = body[i + 2:i + 2 + width]
            if len(digits) != width or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise ValueError(f"grammar: bad escape \\{nxt}{digits} in the string at offset {at}")
            out.append(chr(int(digits, 16)))
            i += 2 + width
        elif nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        else:
            raise ValueError(f"grammar: unknown escape \\{nxt} in the string at offset {at}")
    return "".join(out)


class _Parser:
    """Rules as trees: ("lit", text) ("cls", regex) ("ref", name) ("seq", items) ("alt", items)
    ("rep", item, min, max | None)."""

    def __init__(self, text: str):
        self.toks = lex(text, _TOKEN, "grammar")
        self.i = 0

    def peek(self, offset: int = 0) -> Tok | None:
        j = self.i + offset
        return self.toks[j] if j < len(self.toks) else None

    def rules(self) -> dict[str, tuple]:
        rules: dict[str, tuple] = {}
        while self.peek() is not None:
            name, define = self.peek(), self.peek(1)
            if name.kind != "name" or define is None or define.kind != "define":
                raise ValueError(f"grammar: expected a rule 'name ::= ...' at offset {name.at}, got {name.text!r}")
            if name.text in rules:
                raise ValueError(f"grammar: rule {name.text!r} is defined twice")
            self.i += 2
            rules[name.text] = self.alternatives()
        return rules

    def _starts_rule(self) -> bool:
        tok, nxt = self.peek(), self.peek(1)
        return tok is not None and tok.kind == "name" and nxt is not None and nxt.kind == "define"

    def alternatives(self) -> tuple:
        options = [self.sequence()]
        while (tok := self.peek()) is not None and tok.text == "|":
            self.i += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else ("alt", tuple(options))

    def sequence(self) -> tuple:
        items = []
        while (tok := self.peek()) is not None and tok.text not in ("|", ")") and not self._starts_rule():
            items.append(self.postfix())
        return items[0] if len(items) == 1 else ("seq", tuple(items))

    def postfix(self) -> tuple:
        item = self.atom()
        while (tok := self.peek()) is not None and (tok.text in ("*", "+", "?") or tok.kind == "repeat"):
            self.i += 1
            if tok.text == "*":
                item = ("rep", item, 0, None)
            elif tok.text == "+":
                item = ("rep", item, 1, None)
            elif tok.text == "?":
                item = ("rep", item, 0, 1)
            else:
                item = ("rep", item, *brace_bounds(tok, "grammar"))
        return item

    def atom(self) -> tuple:
        tok = self.peek()
        if tok is None:
            raise ValueError("grammar: a rule ends in the middle of an expression")
        self.i += 1
        if tok.kind == "string":
            return ("lit", _unescape(tok.text[1:-1], tok.at))
        if tok.kind == "cls":
            return ("cls", tok.text)
        if tok.kind == "name":
            return ("ref", tok.text)
        if tok.text == "(":
            inner = self.alternatives()
            close = self.peek()
            if close is None or close.text != ")":
                raise ValueError(f"grammar: '(' at offset {tok.at} is not closed")
            self.i += 1
            return inner
        raise ValueError(f"grammar: unexpected {tok.text!r} at offset {tok.at}")


class _TooLarge(ValueError):
    pass


class _Emitter:
    def __init__(self, rules: dict[str, tuple], max_depth: int):
        self.rules, self.max_depth = rules, max_depth
        self._memo: dict[tuple, str | None] = {}

    def rule(self, name: str, stack: tuple[str, ...]) -> str | None:
        if stack.count(name) > self.max_depth:  # entered again max_depth times on this path already
            return None
        # What a rule expands to depends only on how often each rule is on the path already.
        key = (name, tuple(sorted((n, stack.count(n)) for n in set(stack))))
        if key not in self._memo:
            self._memo[key] = self.emit(self.rules[name], (*stack, name))
        return self._memo[key]

    def emit(self, node: tuple, stack: tuple[str, ...]) -> str | None:
        kind = node[0]
        if kind == "lit":
            return literal(node[1])
        if kind in ("cls", "re"):  # a character class, or a Lark regular expression
            return node[1]
        if kind == "ref":
            return self.rule(node[1], stack)
        if kind == "seq":
            parts = [self.emit(item, stack) for item in node[1]]
            return None if any(p is None for p in parts) else self._checked("".join(f"(?:{p})" for p in parts))
        if kind == "alt":
            options = [p for p in (self.emit(item, stack) for item in node[1]) if p is not None]
            return self._checked("|".join(f"(?:{p})" for p in options)) if options else None
        _, item, lo, hi = node
        inner = self.emit(item, stack)
        if inner is None:
            return "" if lo == 0 else None
        suffix = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((lo, hi))
        if suffix is None:
            suffix = f"{{{lo},}}" if hi is None else f"{{{lo},{hi}}}"
        return f"(?:{inner}){suffix}"

    def _checked(self, pattern: str) -> str:
        if len(pattern) > MAX_PATTERN_CHARS:
            raise _TooLarge(f"unrolled to {self.max_depth} levels of recursion the grammar is too large (over "
                             f"{MAX_PATTERN_CHARS} pattern characters)")
        return pattern


def grammar_regex(text: str, max_depth: int = GRAMMAR_MAX_DEPTH) -> str:
    """The regular expression of the outputs ``text`` allows (see the module docstring)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("grammar: must be a non-empty string of rules 'name ::= ...'")
    return _grammar_regex(text, max_depth)


@functools.lru_cache(maxsize=32)
def _grammar_regex(text: str, max_depth: int) -> str:
    if is_lark(text):  # no '::=': Lark's syntax, as vLLM decides
        rules, root = lark_rules(text)
    else:
        rules, root = _Parser(text).rules(), "root"
    if root not in rules:
        raise ValueError(f"grammar: no 'root' rule (the output's start); rules: {sorted(rules)}")
    for name, body in rules.items():
        for ref in _references(body):
            if ref not in rules:
                raise ValueError(f"grammar: rule {name!r} uses {ref!r}, which is not defined")
    # The deepest unrolling whose automaton fits regex.py's limits; the automaton is cached there.
    too_large, previous = None, None
    for depth in range(max_depth, -1, -1):
        try:
            pattern = _Emitter(rules, depth).rule(root, ())
        except _TooLarge as exc:
            too_large = exc
            continue
        if pattern is None:
            if too_large is None:
                raise ValueError(f"grammar: {root!r} never ends within {depth} levels of recursion")
            break
        if pattern == previous:  # no recursion left to cut
            break
        previous = pattern
        try:
            compile_regex(pattern)
        except ValueError as exc:
            if "too large" not in str(exc):
                raise ValueError(f"grammar: {exc}") from exc
            too_large = exc
            continue
        if depth < max_depth:
            logger.warning("grammar: recursion unrolled to %d levels; %d would exceed the automaton's limits (%s)",
                           depth, depth + 1, too_large)
        return pattern
    raise ValueError(f"grammar: too large to unroll even once: {too_large}")


def _references(node: tuple):
    if node[0] == "ref":
        yield node[1]
    elif node[0] in ("seq", "alt"):
        for item in node[1]:
            yield from _references(item)
    elif node[0] == "rep":
        yield from _references(node[1])
