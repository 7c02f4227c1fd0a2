"""Lark grammars (https://lark-parser.readthedocs.io/en/latest/grammar.html) for structured
outputs: vLLM takes a ``grammar`` with no ``::=`` in it as Lark and converts it; so does jaxllm,
into the rule trees of grammar.py, which compiles them like EBNF ones.

    ?start: value
    ?value: object | array | ESCAPED_STRING | SIGNED_NUMBER -> number | "true" | "false" | "null"
    array : "[" [value ("," value)*] "]"
    object : "{" [pair ("," pair)*] "}"
    pair : ESCAPED_STRING ":" value
    %import common.ESCAPED_STRING
    %import common.SIGNED_NUMBER
    %import common.WS
    %ignore WS

What is read: rules ``name:`` (also ``?name:`` / ``!name:``) and terminals ``NAME:`` (also
``NAME.priority:``); alternatives ``|`` over several lines; strings ``"..."`` (``'...'`` too, as
vLLM) with an ``i`` suffix for case-insensitive ones; regular expressions ``/.../`` (regex.py's
syntax, no flags); ranges ``"a".."z"``; groups ``(...)``; optional ``[...]``; ``? * +``,
``~ n``, ``~ n..m`` and ``{m,n}``; aliases ``-> name`` (they only name tree nodes: dropped);
comments ``//`` and ``#``; ``%import common.NAME`` (also ``-> ALIAS`` and ``common (A, B)``) of
Lark's common terminals; ``%ignore``: as in Lark, what it names may come before every token a
rule matches and at the end (tokens are string literals, regular expressions and terminals named
in rules; never inside a terminal). The output starts at ``start``, or at the first rule when
there is none (as vLLM's conversion). Templates, ``%declare``, ``%override`` and imports from
other files raise ValueError.
"""

from __future__ import annotations

import re

from jaxllm.structured.grammar_lexing import Tok, brace_bounds, lex

_TOKEN = re.compile(r"""
    (?P<space>\s+|//[^\n]*|\#[^\n]*)
  | (?P<define>[?!]?[A-Za-z_][A-Za-z0-9_]*(?:\.-?\d+)?\s*:(?!:))
  | (?P<alias>->\s*[A-Za-z_][A-Za-z0-9_]*)
  | (?P<range>\.\.)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"i?|'(?:[^'\\\n]|\\.)*'i?)
  | (?P<regex>/(?:[^/\\\n]|\\.)+/[a-z]*)
  | (?P<repeat>\{\s*\d*\s*(?:,\s*\d*\s*)?\})
  | (?P<number>\d+)
  | (?P<op>[()\[\]|*+?~])
""", re.VERBOSE)

# Lark's common.lark terminals, written with what this module reads (its lookbehind-based
# ESCAPED_STRING as a plain pattern: a quoted run of non-quote characters and escapes).
COMMON = """
DIGIT: "0".."9"
HEXDIGIT: "a".."f" | "A".."F" | DIGIT
INT: DIGIT+
SIGNED_INT: ["+" | "-"] INT
DECIMAL: INT "." INT? | "." INT
_EXP: ("e" | "E") SIGNED_INT
FLOAT: INT _EXP | DECIMAL _EXP?
SIGNED_FLOAT: ["+" | "-"] FLOAT
NUMBER: FLOAT | INT
SIGNED_NUMBER: ["+" | "-"] NUMBER
ESCAPED_STRING: /"(?:[^"\\\\\\n]|\\\\[^\\n])*"/
LCASE_LETTER: "a".."z"
UCASE_LETTER: "A".."Z"
LETTER: UCASE_LETTER | LCASE_LETTER
WORD: LETTER+
CNAME: ("_" | LETTER) ("_" | LETTER | DIGIT)*
WS_INLINE: (" " | /\\t/)+
WS: /[ \\t\\f\\r\\n]/+
CR: /\\r/
LF: /\\n/
NEWLINE: (CR? LF)+
SH_COMMENT: /#[^\\n]*/
CPP_COMMENT: /\\/\\/[^\\n]*/
SQL_COMMENT: /--[^\\n]*/
"""

_IMPORT = re.compile(r"%import\s+common\s*(?:\.\s*(?P<one>[A-Za-z_]\w*)(?:\s*->\s*(?P<alias>[A-Za-z_]\w*))?"
                     r"|\((?P<many>[\w\s,]*)\))\s*$")


def is_lark(text: str) -> bool:
    """vLLM's test: a grammar with no ``::=`` outside comments is Lark."""
    return not any("::=" in re.sub(r"(#|//).*$", "", line) for line in text.splitlines())


def _is_terminal(name: str) -> bool:
    return name.lstrip("_")[:1].isupper()


class _Parser:
    """Definitions as grammar.py's trees; ("re", pattern) for a regular expression."""

    def __init__(self, text: str):
        self.toks, self.i = lex(text, _TOKEN, "grammar (Lark)"), 0

    def peek(self) -> Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def definitions(self) -> list[tuple[str, tuple, int]]:
        out = []
        while (tok := self.peek()) is not None:
            if tok.kind != "define":
                raise ValueError(f"grammar (Lark): expected a definition 'name: ...' at offset {tok.at}, got "
                                 f"{tok.text!r}")
            self.i += 1
            name = tok.text.rstrip(":").strip().lstrip("?!").split(".")[0]
            out.append((name, self.alternatives(), tok.at))
        return out

    def alternatives(self) -> tuple:
        options = [self.sequence()]
        while (tok := self.peek()) is not None and tok.text == "|":
            self.i += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else ("alt", tuple(options))

    def sequence(self) -> tuple:
        items = []
        while (tok := self.peek()) is not None and tok.text not in ("|", ")", "]") and tok.kind != "define":
            if tok.kind == "alias":  # names a tree node: nothing to generate
                self.i += 1
                continue
            items.append(self.postfix())
        return items[0] if len(items) == 1 else ("seq", tuple(items))

    def postfix(self) -> tuple:
        item = self.atom()
        while (tok := self.peek()) is not None:
            if tok.text in ("*", "+", "?"):
                bounds = {"*": (0, None), "+": (1, None), "?": (0, 1)}[tok.text]
                self.i += 1
            elif tok.kind == "repeat":
                bounds = brace_bounds(tok, "grammar (Lark)")
                self.i += 1
            elif tok.text == "~":
                bounds = self._tilde_bounds(tok)
            else:
                break
            item = ("rep", item, *bounds)
        return item

    def _tilde_bounds(self, tilde: Tok) -> tuple[int, int]:
        self.i += 1
        low = self._number(tilde)
        high = low
        if (tok := self.peek()) is not None and tok.kind == "range":
            self.i += 1
            high = self._number(tilde)
        if high < low:
            raise ValueError(f"grammar (Lark): repetition ~ {low}..{high} at offset {tilde.at} has max < min")
        return low, high

    def _number(self, after: Tok) -> int:
        tok = self.peek()
        if tok is None or tok.kind != "number":
            raise ValueError(f"grammar (Lark): '~' at offset {after.at} needs a count")
        self.i += 1
        return int(tok.text)

    def atom(self) -> tuple:
        tok = self.peek()
        if tok is None:
            raise ValueError("grammar (Lark): a definition ends in the middle of an expression")
        self.i += 1
        if tok.kind == "string":
            if (nxt := self.peek()) is not None and nxt.kind == "range":
                self.i += 1
                end = self.peek()
                if end is None or end.kind != "string":
                    raise ValueError(f"grammar (Lark): range at offset {nxt.at} needs a string after '..'")
                self.i += 1
                return _char_range(tok, end)
            return _string(tok)
        if tok.kind == "regex":
            body, _, flags = tok.text[1:].rpartition("/")
            if flags:
                raise ValueError(f"grammar (Lark): regular expression flags {flags!r} at offset {tok.at} are not "
                                 "supported")
            return ("re", body)
        if tok.kind == "name":
            return ("ref", tok.text)
        if tok.text in ("(", "["):
            close = ")" if tok.text == "(" else "]"
            inner = self.alternatives()
            end = self.peek()
            if end is None or end.text != close:
                raise ValueError(f"grammar (Lark): {tok.text!r} at offset {tok.at} is not closed")
            self.i += 1
            return inner if close == ")" else ("rep", inner, 0, 1)
        raise ValueError(f"grammar (Lark): unexpected {tok.text!r} at offset {tok.at}")


def _unquote(tok: Tok) -> tuple[str, bool]:
    """A string token's text (escapes as in Python) and whether it is case-insensitive."""
    insensitive = tok.text.endswith("i")
    body = tok.text[1:-2] if insensitive else tok.text[1:-1]
    try:
        text = body.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as exc:
        raise ValueError(f"grammar (Lark): bad escape in the string at offset {tok.at}: {exc}") from exc
    return text, insensitive


def _string(tok: Tok) -> tuple:
    text, insensitive = _unquote(tok)
    if not insensitive or text.lower() == text.upper():
        return ("lit", text)
    parts = [("cls", f"[{c.lower()}{c.upper()}]") if c.lower() != c.upper() else ("lit", c) for c in text]
    return parts[0] if len(parts) == 1 else ("seq", tuple(parts))


def _char_range(start: Tok, end: Tok) -> tuple:
    (lo, _), (hi, _) = _unquote(start), _unquote(end)
    if len(lo) != 1 or len(hi) != 1 or ord(lo) > ord(hi):
        raise ValueError(f"grammar (Lark): range {start.text}..{end.text} at offset {start.at} must go from one "
                         "character to another, not below it")
    return ("cls", f"[\\U{ord(lo):08X}-\\U{ord(hi):08X}]")


def _directives(text: str) -> tuple[str, list[tuple[str, str]], list[str]]:
    """The grammar without its ``%`` lines (blanked, so offsets stay), the common terminals it
    imports as (name, alias), and the %ignore'd expressions."""
    imports, ignores, lines = [], [], []
    for line in text.split("\n"):
        stripped = re.sub(r"(//|#).*$", "", line).strip()
        if not stripped.startswith("%"):
            lines.append(line)
            continue
        lines.append(" " * len(line))
        if stripped.startswith("%ignore"):
            ignores.append(stripped[len("%ignore"):].strip())
            continue
        m = _IMPORT.match(stripped)
        if m is None:
            raise ValueError(f"grammar (Lark): {stripped!r} is not supported (only %import common.NAME and %ignore)")
        if m.group("one"):
            imports.append((m.group("one"), m.group("alias") or m.group("one")))
        else:
            imports.extend((n, n) for n in re.split(r"[\s,]+", m.group("many").strip()) if n)
    return "\n".join(lines), imports, ignores


_COMMON = {name: body for name, body, _ in _Parser(COMMON).definitions()}


def lark_rules(text: str) -> tuple[dict[str, tuple], str]:
    """(rules, the start rule's name) of a Lark grammar, as grammar.py's trees: terminals and
    rules alike, with %ignore'd tokens spliced in before each token of a rule."""
    body, imports, ignores = _directives(text)
    definitions = _Parser(body).definitions()
    if not any(not _is_terminal(name) for name, _, _ in definitions):
        raise ValueError("grammar (Lark): no rule (a lowercase 'name: ...'); the output starts at 'start'")
    rules: dict[str, tuple] = {}
    for name, alias in imports:
        if name not in _COMMON:
            raise ValueError(f"grammar (Lark): common.{name} is not one of the common terminals here: "
                             f"{sorted(n for n in _COMMON if not n.startswith('_'))}")
        _import(name, alias, rules)
    for name, tree, at in definitions:
        if name in rules:
            raise ValueError(f"grammar (Lark): {name!r} is defined twice (offset {at})")
        rules[name] = tree
    start = "start" if "start" in rules else next(name for name, _, _ in definitions if not _is_terminal(name))
    if ignores:
        ignored = ("alt", tuple(_Parser(expr).alternatives() for expr in ignores))
        rules = {name: tree if _is_terminal(name) else _with_ignored(tree, rules) for name, tree in rules.items()}
        rules["%ignored"] = ("rep", ignored, 0, None)
        rules["%start"] = ("seq", (("ref", start), ("ref", "%ignored")))
        start = "%start"
    return rules, start


def _import(name: str, alias: str, rules: dict[str, tuple]) -> None:
    """common.NAME as ``alias``, with the common terminals it uses (under their own names)."""
    if alias in rules:
        return
    rules[alias] = _COMMON[name]
    for ref in _refs(_COMMON[name]):
        _import(ref, ref, rules)


def _refs(tree: tuple):
    if tree[0] == "ref":
        yield tree[1]
    elif tree[0] in ("seq", "alt"):
        for item in tree[1]:
            yield from _refs(item)
    elif tree[0] == "rep":
        yield from _refs(tree[1])


def _with_ignored(tree: tuple, rules: dict[str, tuple]) -> tuple:
    """A rule's tree with optional ignored tokens before each of its tokens."""
    kind = tree[0]
    if kind in ("lit", "cls", "re") or (kind == "ref" and _is_terminal(tree[1])):
        return ("seq", (("ref", "%ignored"), tree))
    if kind in ("seq", "alt"):
        return (kind, tuple(_with_ignored(item, rules) for item in tree[1]))
    if kind == "rep":
        return ("rep", _with_ignored(tree[1], rules), *tree[2:])
    return tree  # a rule: its own tokens get theirs
