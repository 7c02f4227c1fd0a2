"""What the EBNF (grammar.py) and Lark (lark.py) readers share: tokens with their offsets, the
lexing loop, and ``{m,n}`` repetition bounds."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Tok:
    kind: str  # the token pattern's group name
    text: str
    at: int  # offset in the grammar, for messages


def lex(text: str, pattern: re.Pattern, what: str) -> list[Tok]:
    """``text`` split by ``pattern``'s named groups, without its "space" group (whitespace and
    comments); ValueError (prefixed ``what``) where nothing matches."""
    toks, i = [], 0
    while i < len(text):
        m = pattern.match(text, i)
        if m is None:
            raise ValueError(f"{what}: unexpected {text[i:i + 20]!r} at offset {i}")
        if m.lastgroup != "space":
            toks.append(Tok(m.lastgroup, m.group(), i))
        i = m.end()
    return toks


def brace_bounds(tok: Tok, what: str) -> tuple[int, int | None]:
    """(min, max or None) of a ``{m}``, ``{m,}``, ``{,n}`` or ``{m,n}`` token."""
    inner = tok.text[1:-1].replace(" ", "")
    low, comma, high = inner.partition(",")
    if not low and not comma:
        raise ValueError(f"{what}: empty repetition {tok.text} at offset {tok.at}")
    lo = int(low) if low else 0
    hi = (int(high) if high else None) if comma else lo
    if hi is not None and hi < lo:
        raise ValueError(f"{what}: repetition {tok.text} at offset {tok.at} has max < min")
    return lo, hi
