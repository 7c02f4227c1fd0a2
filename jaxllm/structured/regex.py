"""Regular expressions compiled to a deterministic automaton over UTF-8 bytes.

Structured outputs need, for every state a generation can be in, the set of tokens that keep the
text a prefix of some match. Python's ``re`` cannot answer "is this a prefix of a match?", so
patterns are compiled here: parsed into a tree of code point ranges, built into a Thompson NFA
whose character edges are spelled out as the UTF-8 byte sequences of their ranges, then
determinised by subset construction over the byte values compressed into classes (bytes the
pattern treats alike). States from which no accepting state can be reached are merged into the
dead state, so "not dead" means "still a prefix of a match".

Why bytes and not characters: a byte-level vocabulary spells many characters (most CJK, emoji)
only with tokens that each hold part of the character's UTF-8 bytes. Over bytes such a token is
an ordinary step of the automaton, so a constrained output can contain any character.

Syntax: what JSON schema patterns and vLLM's guided_regex use in practice. Literals; ``.`` (any
character but a newline); classes ``[...]`` / ``[^...]`` with ranges; escapes ``\\d \\w \\s`` and
their negations (ASCII meanings, as in ECMAScript), ``\\n \\t \\r \\f \\v``, ``\\xHH``,
``\\uXXXX``, ``\\UXXXXXXXX`` and escaped punctuation; groups ``(...)``, ``(?:...)``,
``(?P<name>...)``; ``|``; ``* + ? {n} {n,} {,m} {n,m}`` (a lazy ``?`` suffix matches the same
strings). A pattern always matches the whole text: ``^`` at its start and ``$`` at its end are
accepted and mean nothing more. Anchors elsewhere, backreferences, lookaround, possessive
quantifiers, ``\\b`` and inline flags raise ValueError.

One extension, Onigmo's absent operator for literal strings: ``(?~abc|xy)`` matches any text
that contains none of ``abc`` and ``xy`` (structural tags' free text, params.py). It is built
as the Aho-Corasick automaton of the strings, every state accepting but those that end one.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import numpy as np

MAX_CODEPOINT = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)  # code points UTF-8 cannot encode: never matched
MAX_NFA_STATES = 200_000
MAX_DFA_STATES = 50_000

Ranges = tuple[tuple[int, int], ...]  # sorted, disjoint, inclusive code point ranges

_DIGIT: Ranges = ((48, 57),)
_WORD: Ranges = ((48, 57), (65, 90), (95, 95), (97, 122))
_SPACE: Ranges = ((9, 13), (32, 32))
_ANY_BUT_NEWLINE: Ranges = ((0, 9), (11, MAX_CODEPOINT))
_SIMPLE_ESCAPES = {"n": 10, "t": 9, "r": 13, "f": 12, "v": 11, "0": 0}
_CLASS_ESCAPES = {"d": _DIGIT, "w": _WORD, "s": _SPACE}


def _normalize(ranges) -> Ranges:
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


def _complement(ranges: Ranges) -> Ranges:
    out, start = [], 0
    for lo, hi in ranges:
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CODEPOINT:
        out.append((start, MAX_CODEPOINT))
    return tuple(out)


# -- parsing: pattern -> tree ------------------------------------------------------------------
# Nodes: ("chars", Ranges), ("cat", [nodes]), ("alt", [nodes]), ("repeat", node, lo, hi | None).
_EMPTY = ("cat", [])


class _Parser:
    def __init__(self, pattern: str):
        self.p, self.i = pattern, 0

    def error(self, message: str) -> ValueError:
        return ValueError(f"regex {self.p!r}: {message} at position {self.i}")

    def peek(self, k: int = 0) -> str | None:
        j = self.i + k
        return self.p[j] if j < len(self.p) else None

    def take(self) -> str:
        c = self.p[self.i]
        self.i += 1
        return c

    def parse(self):
        node = self.alternation()
        if self.i < len(self.p):
            raise self.error("unbalanced ')'")
        return node

    def alternation(self):
        branches = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def sequence(self):
        items = []
        while self.peek() is not None and self.peek() not in "|)":
            atom = self.atom()
            if atom is None:
                continue
            items.append(self.quantified(atom))
        return items[0] if len(items) == 1 else ("cat", items)

    def quantified(self, atom):
        bounds = self.quantifier()
        if bounds is None:
            return atom
        if self.peek() == "?":  # lazy: same strings
            self.i += 1
        elif self.peek() == "+":
            raise self.error("possessive quantifiers are not supported")
        if self.quantifier_ahead():
            raise self.error("multiple repeat")
        return ("repeat", atom, *bounds)

    def quantifier_ahead(self) -> bool:
        c = self.peek()
        return c in ("*", "+", "?") or (c == "{" and self._braces() is not None)

    def quantifier(self):
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        if c == "{":
            braces = self._braces()
            if braces is not None:
                (lo, hi), self.i = braces
                if hi is not None and hi < lo:
                    raise self.error(f"bad repeat {{{lo},{hi}}}")
                return lo, hi
        return None

    def _braces(self):
        """((lo, hi), end) when a valid {n}, {n,}, {,m} or {n,m} starts here, else None (a literal '{')."""
        end = self.p.find("}", self.i)
        if end < 0:
            return None
        body = self.p[self.i + 1 : end]
        lo, comma, hi = body.partition(",")
        if not (lo.isdigit() or (comma and lo == "")) or not (hi.isdigit() or hi == ""):
            return None
        if not comma:
            return (int(lo), int(lo)), end + 1
        return (int(lo or 0), int(hi) if hi else None), end + 1

    def atom(self):
        c = self.take()
        if c == "(":
            return self.group()
        if c == "[":
            return ("chars", self.char_class())
        if c == ".":
            return ("chars", _ANY_BUT_NEWLINE)
        if c == "\\":
            return ("chars", self.escape(in_class=False))
        if c == "^":
            if self.i == 1:
                return None
            raise self.error("'^' is only supported at the start of the pattern")
        if c == "$":
            if self.i == len(self.p):
                return None
            raise self.error("'$' is only supported at the end of the pattern")
        if c in "*+?" or (c == "{" and self._braces_at(self.i - 1)):
            self.i -= 1
            raise self.error("nothing to repeat")
        return ("chars", ((ord(c), ord(c)),))

    def _braces_at(self, i: int) -> bool:
        saved, self.i = self.i, i
        try:
            return self._braces() is not None
        finally:
            self.i = saved

    def group(self):
        if self.peek() == "?":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?P<", self.i):
                end = self.p.find(">", self.i)
                if end < 0:
                    raise self.error("unterminated group name")
                self.i = end + 1
            elif self.p.startswith("?~", self.i):
                self.i += 2
                words = self._absent_words(self.alternation())
                if self.peek() != ")":
                    raise self.error("missing ')'")
                self.i += 1
                return ("absent", words)
            elif self.p.startswith(("?=", "?!", "?<=", "?<!"), self.i):
                raise self.error("lookaround is not supported")
            else:
                raise self.error("inline flags and other (?...) groups are not supported")
        node = self.alternation()
        if self.peek() != ")":
            raise self.error("missing ')'")
        self.i += 1
        return node

    def _absent_words(self, node) -> tuple[str, ...]:
        """The literal strings of ``(?~...)``: alternatives of single characters in sequence."""
        words = []
        for branch in node[1] if node[0] == "alt" else [node]:
            items = branch[1] if branch[0] == "cat" else [branch]
            if not items or any(kind != "chars" or len(r) != 1 or r[0][0] != r[0][1] for kind, r, *_ in items):
                raise self.error("(?~...) takes non-empty literal strings separated by '|'")
            words.append("".join(chr(r[0][0]) for _, r in items))
        return tuple(words)

    def char_class(self) -> Ranges:
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise self.error("unterminated character class")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            lo = self.class_item()
            if isinstance(lo, tuple):  # \d, \w, \s inside a class
                ranges.extend(lo)
                continue
            if self.peek() == "-" and self.peek(1) not in (None, "]"):
                self.i += 1
                hi = self.class_item()
                if isinstance(hi, tuple):
                    raise self.error("a class escape cannot end a range")
                if hi < lo:
                    raise self.error(f"bad character range {chr(lo)!r}-{chr(hi)!r}")
                ranges.append((lo, hi))
            else:
                ranges.append((lo, lo))
        out = _normalize(ranges)
        return _complement(out) if negate else out

    def class_item(self):
        """A code point, or Ranges for a class escape."""
        c = self.take()
        if c != "\\":
            return ord(c)
        if self.peek() == "b":  # backspace inside a class
            self.i += 1
            return 8
        ranges = self.escape(in_class=True)
        return ranges[0][0] if len(ranges) == 1 and ranges[0][0] == ranges[0][1] else ranges

    def escape(self, in_class: bool) -> Ranges:
        if self.peek() is None:
            raise self.error("a pattern cannot end with '\\'")
        c = self.take()
        if c in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[c]
        if c.lower() in _CLASS_ESCAPES and c.isupper():
            return _complement(_CLASS_ESCAPES[c.lower()])
        if c in _SIMPLE_ESCAPES:
            if c == "0" and self.peek() is not None and self.peek().isdigit():
                raise self.error("octal escapes are not supported")
            return ((_SIMPLE_ESCAPES[c],) * 2,)
        for letter, width in (("x", 2), ("u", 4), ("U", 8)):
            if c == letter:
                digits = self.p[self.i : self.i + width]
                if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                    raise self.error(f"\\{letter} needs {width} hex digits")
                self.i += width
                cp = int(digits, 16)
                if cp > MAX_CODEPOINT:
                    raise self.error("code point out of range")
                return ((cp, cp),)
        if c.isdigit():
            raise self.error("backreferences are not supported")
        if c.isalnum():
            raise self.error(f"the escape \\{c} is not supported")
        return ((ord(c), ord(c)),)


# -- NFA ------------------------------------------------------------------------------------------
class _NFA:
    def __init__(self):
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[Ranges, int]]] = []

    def state(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise ValueError(f"the pattern is too large (over {MAX_NFA_STATES} automaton states); "
                             "lower its repetition counts or lengths")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def chars(self, a: int, ranges: Ranges, b: int) -> None:
        """Edges a -> b on the code points ``ranges``: one path of byte ranges per UTF-8 sequence."""
        for sequence in utf8_sequences(ranges):
            at = a
            for k, byte_range in enumerate(sequence):
                nxt = b if k == len(sequence) - 1 else self.state()
                self.edges[at].append(((byte_range,), nxt))
                at = nxt

    def build(self, node) -> tuple[int, int]:
        kind = node[0]
        if kind == "chars":
            a, b = self.state(), self.state()
            self.chars(a, node[1], b)
            return a, b
        if kind == "absent":
            return self.absent(node[1])
        if kind == "cat":
            a = b = self.state()
            for child in node[1]:
                s, e = self.build(child)
                self.eps[b].append(s)
                b = e
            return a, b
        if kind == "alt":
            a, b = self.state(), self.state()
            for child in node[1]:
                s, e = self.build(child)
                self.eps[a].append(s)
                self.eps[e].append(b)
            return a, b
        _, child, lo, hi = node
        a = b = self.state()
        for _ in range(lo):
            s, e = self.build(child)
            self.eps[b].append(s)
            b = e
        if hi is None:  # b -> child -> b, any number of times
            s, e = self.build(child)
            end = self.state()
            self.eps[b] += [s, end]
            self.eps[e] += [s, end]
            return a, end
        end = self.state()
        for _ in range(hi - lo):  # each optional copy may be skipped straight to the end
            self.eps[b].append(end)
            s, e = self.build(child)
            self.eps[b].append(s)
            b = e
        self.eps[b].append(end)
        return a, end

    def absent(self, words: tuple[str, ...]) -> tuple[int, int]:
        """Text containing none of ``words``: a state per prefix of a word (Aho-Corasick: on a
        character, the longest prefix that ends the text so far), each with an exit; no edge into
        a prefix that ends with a whole word."""
        prefixes = sorted({w[:k] for w in words for k in range(len(w))}, key=len)  # "" first
        alphabet = sorted({ord(c) for w in words for c in w})
        state = {p: self.state() for p in prefixes}
        end = self.state()
        others = _complement(tuple((c, c) for c in alphabet))
        for p in prefixes:
            self.eps[state[p]].append(end)
            targets: dict[str, list[tuple[int, int]]] = {"": list(others)}
            for c in alphabet:
                text = p + chr(c)
                if any(text.endswith(w) for w in words):
                    continue  # a whole word: no way on
                longest = next(text[k:] for k in range(len(text) + 1) if text[k:] in state)
                targets.setdefault(longest, []).append((c, c))
            for target, ranges in targets.items():
                if ranges:
                    self.chars(state[p], _normalize(ranges), state[target])
        return state[""], end

    def closure(self, states) -> frozenset[int]:
        seen, stack = set(states), list(states)
        while stack:
            for t in self.eps[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(seen)


# -- DFA ------------------------------------------------------------------------------------------
def utf8_sequences(ranges: Ranges) -> list[tuple[tuple[int, int], ...]]:
    """Sequences of byte ranges whose byte strings are exactly the UTF-8 encodings of the code
    points in ``ranges`` (surrogates, which UTF-8 cannot encode, left out)."""
    out: list[tuple[tuple[int, int], ...]] = []
    for lo, hi in ranges:
        pieces = [(lo, min(hi, _SURROGATES[0] - 1)), (max(lo, _SURROGATES[1] + 1), hi)]
        for a, b in pieces:
            for top in (0x7F, 0x7FF, 0xFFFF, MAX_CODEPOINT):  # one encoded length at a time
                if a <= min(b, top):
                    _split_same_length(a, min(b, top), out)
                a = max(a, top + 1)
    return out


def _split_same_length(lo: int, hi: int, out: list) -> None:
    """Split ``lo..hi`` (code points of one UTF-8 length) until each piece's encodings are the
    products of one byte range per position, then append those."""
    n = len(chr(lo).encode())
    for i in range(1, n):
        low_bits = (1 << (6 * i)) - 1  # the bits the last i continuation bytes carry
        if lo & ~low_bits != hi & ~low_bits:
            if lo & low_bits:
                _split_same_length(lo, lo | low_bits, out)
                _split_same_length((lo | low_bits) + 1, hi, out)
                return
            if hi & low_bits != low_bits:
                _split_same_length(lo, (hi & ~low_bits) - 1, out)
                _split_same_length(hi & ~low_bits, hi, out)
                return
    a, b = chr(lo).encode(), chr(hi).encode()
    out.append(tuple(zip(a, b, strict=True)))


@dataclass(frozen=True)
class DFA:
    """A deterministic automaton over UTF-8 bytes.

    ``transitions[s, byte_class[b]]`` is the state after byte ``b`` in state ``s``; the last row
    is the dead state (every transition stays dead). States are live: from each, some accepting
    state is reachable.
    """

    transitions: np.ndarray  # [num_states + 1, num_classes] int32
    accepting: np.ndarray  # [num_states + 1] bool
    byte_class: np.ndarray  # [256] intp: each byte value's class
    start: int

    @property
    def dead(self) -> int:
        return self.transitions.shape[0] - 1

    def step(self, state: int, data: bytes | str) -> int:
        """The state after ``data`` (text is taken as its UTF-8 bytes)."""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogatepass")
        for byte in data:
            if state == self.dead:
                break
            state = int(self.transitions[state, self.byte_class[byte]])
        return state

    def fullmatch(self, text: bytes | str) -> bool:
        return bool(self.accepting[self.step(self.start, text)])


def compile_regex(pattern: str) -> DFA:
    """The DFA of the strings ``pattern`` matches in full; ValueError names unsupported syntax.
    Cached: the server checks a request's pattern before the engine uses it."""
    if not isinstance(pattern, str):
        raise ValueError(f"a regex must be a string, got {type(pattern).__name__}")
    return _compile(pattern)


@functools.lru_cache(maxsize=64)
def _compile(pattern: str) -> DFA:
    tree = _Parser(pattern).parse()
    nfa = _NFA()
    start, accept = nfa.build(tree)
    # Alphabet compression: class boundaries are the ends of every byte range the pattern uses.
    cuts = {0}
    for edges in nfa.edges:
        for ranges, _ in edges:
            for lo, hi in ranges:
                cuts.add(lo)
                if hi < 255:
                    cuts.add(hi + 1)
    class_starts = sorted(cuts)
    spans = [[(bisect.bisect_left(class_starts, lo), bisect.bisect_right(class_starts, hi) - 1, target)
              for ranges, target in edges for lo, hi in ranges] for edges in nfa.edges]
    num_classes = len(class_starts)
    first = nfa.closure([start])
    index = {first: 0}
    order, rows = [first], []
    while len(rows) < len(order):
        current = order[len(rows)]
        moves: dict[int, set[int]] = {}
        for s in current:
            for c_lo, c_hi, target in spans[s]:
                for c in range(c_lo, c_hi + 1):
                    moves.setdefault(c, set()).add(target)
        row = [-1] * num_classes
        closures: dict[frozenset, frozenset] = {}
        for c, targets in moves.items():
            key = frozenset(targets)
            nxt = closures.get(key)
            if nxt is None:
                nxt = closures[key] = nfa.closure(key)
            if nxt not in index:
                if len(order) >= MAX_DFA_STATES:
                    raise ValueError(f"the pattern is too large (over {MAX_DFA_STATES} DFA states)")
                index[nxt] = len(order)
                order.append(nxt)
            row[c] = index[nxt]
        rows.append(row)
    accepting = [accept in s for s in order]
    return _prune(rows, accepting, np.asarray(class_starts, np.int64))


def _prune(rows: list[list[int]], accepting: list[bool], class_starts: np.ndarray) -> DFA:
    """Drop states that cannot reach acceptance (they become the dead state) and renumber."""
    n = len(rows)
    incoming: list[list[int]] = [[] for _ in range(n)]
    for s, row in enumerate(rows):
        for t in set(row):
            if t >= 0:
                incoming[t].append(s)
    live = [False] * n
    stack = [s for s in range(n) if accepting[s]]
    for s in stack:
        live[s] = True
    while stack:
        for s in incoming[stack.pop()]:
            if not live[s]:
                live[s] = True
                stack.append(s)
    if not live[0]:
        raise ValueError("the pattern matches nothing")
    new_id = np.cumsum(live) - 1
    dead = int(sum(live))
    table = np.full((dead + 1, len(class_starts)), dead, np.int32)
    for s, row in enumerate(rows):
        if live[s]:
            table[new_id[s]] = [new_id[t] if t >= 0 and live[t] else dead for t in row]
    acc = np.zeros(dead + 1, bool)
    acc[:dead] = [a for a, keep in zip(accepting, live, strict=True) if keep]
    byte_class = np.searchsorted(class_starts, np.arange(256), side="right") - 1
    return DFA(table, acc, byte_class.astype(np.intp), 0)


def literal(text: str) -> str:
    """A pattern matching exactly ``text``."""
    return "".join("\\" + c if c in _METACHARACTERS else c for c in text)


_METACHARACTERS = set("\\.[]{}()*+?|^$")
