"""JSON schema -> regular expression, for structured outputs (vLLM's ``guided_json`` and
``response_format`` ``json_schema`` / ``json_object``).

``json_schema_regex(schema)`` returns a regex whose full matches are JSON texts valid under the
schema, written in one canonical layout:

- whitespace only where ``whitespace`` (itself a regex; default ``[ ]?``, one optional space; ``""``
  for none) matches it: once in every gap between two tokens of an object or array, i.e. after
  ``{`` and ``[``, before ``}`` and ``]``, before and after every ``:`` and every ``,`` (an empty
  container is ``{`` ws ``}`` / ``[`` ws ``]``, one ``whitespace``, not two), as outlines' and vLLM's
  ``guided_whitespace_pattern``; none before or after the top-level value, and none inside a token
  (a number, ``true`` / ``false`` / ``null``, an enum/const value; what a string holds is its
  content, as the schema allows it). E.g. with ``[ ]?``:
  ``{ "a" : 1 , "b" : [ 1 , 2 ] }``, ``{"a":1,"b":[1,2]}`` and any mix of the two; with ``[\n ]*``
  also ``json.dumps(v, indent=2)``;
- object members appear in the order the schema declares them (``properties``, then any key that
  is ``required`` but not declared, in ``required`` order), each at most once; keys not declared are
  never generated when the object has ``properties`` or ``required``: the text is valid under the
  schema whatever ``additionalProperties`` says, it is only a canonical choice among valid texts;
- keys and enum/const values are written as ``json.dumps(v, separators=(",", ":"),
  ensure_ascii=False)`` writes them (compact inside enum/const values, whatever ``whitespace``);
- numbers with bounds are written without an exponent; integers without a fraction or exponent.

So every match is valid, but not every valid text matches: the regex picks a canonical subset.

The regex uses only: literal characters; the escapes ``\\\\ \\" \\. \\[ \\] \\{ \\} \\( \\) \\* \\+
\\? \\| \\^ \\$ \\/ \\-`` and ``\\uXXXX``; classes ``[...]`` / ``[^...]`` with ranges; groups
``(?:...)``; ``|``; ``* + ? {n} {n,} {n,m}``. No anchors, lookaround, backreferences or flags, so
it is both a Python ``re`` pattern (for ``re.fullmatch``) and one the DFA of
``jaxllm.structured.regex`` compiles. A schema's own ``pattern`` is passed through and may also use
``\\d \\w \\s \\n \\t \\r``, ``.`` and ``(...)``.

Supported keywords
  type        "string", "integer", "number", "boolean", "null", "object", "array", or a list of them.
              Without ``type``, the types are inferred from the keywords present (properties /
              required / additionalProperties: object; items / minItems / maxItems: array;
              minLength / maxLength / pattern / format: string; minimum / maximum /
              exclusiveMinimum / exclusiveMaximum / multipleOf: number); with none of these, any
              JSON value.
  enum, const Alternation of the values, each written compactly (see above). Other constraining
              keywords beside them (``type``, ...) filter the values: a value is kept when its
              compact text matches the regex of the rest of the schema (so an object value whose
              keys are not in declared order is dropped: conservative, never invalid).
  string      minLength / maxLength (counted in code points: an escape is one, a surrogate pair
              escape ``\\uD83D\\uDE00`` is one); pattern; format "date" (YYYY-MM-DD, a real date,
              leap years included, year 0001-9999), "time" (HH:MM:SS, optional fraction, optional
              ``Z`` or ``+HH:MM`` / ``-HH:MM``; RFC 3339 requires the offset; this layout
              makes it optional), "date-time" (date ``T`` time), "uuid" (8-4-4-4-12 hex digits).
              A plain string allows any JSON string (escapes included).
  pattern     The regex is the whole string content between the quotes (a leading ``^`` and a
              trailing ``$`` are stripped; JSON Schema's "search anywhere" semantics is narrowed to
              "match all", which is still valid). It is matched against the *serialized* content,
              so it must only match JSON-string-safe text: no ``"``, no ``\\``, no control
              characters (e.g. ``[a-z]+``, ``[^"\\\\]{3}``; not ``.*``, which would let ``"``
              through). Its syntax must be the subset above: otherwise ValueError.
  integer     minimum, maximum, exclusiveMinimum, exclusiveMaximum (numbers, or draft-4 booleans),
              any bounds, exactly, with digit-range regexes; multipleOf 1.
  number      No bound: any JSON number. With bounds: the bounds must be whole numbers (e.g.
              ``minimum: 0, maximum: 1``; ``maximum: 0.5`` is a ValueError); the number is written
              without exponent. ``minimum: 0`` alone keeps the exponent. multipleOf 1: an integer.
  boolean, null
  object      properties, required, additionalProperties. With ``properties`` or ``required``:
              only declared keys (plus required keys not declared, whose value follows
              ``additionalProperties``, any value when it is absent; unsatisfiable when it is
              false). Without both: any object (JSON string keys) whose values match
              ``additionalProperties`` (any value when absent or true; only ``{}`` when false).
  array       items (one schema; absent: any value), minItems, maxItems, uniqueItems false.
  anyOf, oneOf  Alternation (oneOf's "exactly one" is not enforced). allOf with one subschema.
              Beside anyOf / oneOf / allOf / $ref only ``type`` may constrain (it narrows every
              branch); other constraining keywords beside them are a ValueError.
  $ref        Local references: "#", "#/$defs/NAME", "#/definitions/NAME" (any "#/..." JSON
              pointer), resolved against the root schema ($id is ignored). A reference reached
              again while it is being expanded is expanded up to ``max_depth`` times; deeper, that
              branch is not allowed (an optional property is left out, an array is empty, an anyOf
              branch is dropped); when that leaves nothing, e.g. a required recursive property,
              ValueError.
  boolean schemas  true: any value; false: nothing (a property with schema false is left out).
Ignored (annotations): title, description, examples, default, $schema, $id, $anchor, $comment,
  $defs / definitions (used through $ref), deprecated, readOnly, writeOnly, contentEncoding,
  contentMediaType, discriminator, and any keyword JSON Schema does not define.
Unsupported (ValueError naming the keyword and its location): patternProperties,
  propertyNames, minProperties, maxProperties, dependentRequired, dependentSchemas, dependencies,
  unevaluatedProperties, unevaluatedItems, prefixItems, additionalItems, items given as a list,
  contains, minContains, maxContains, uniqueItems true, not, if / then / else, $dynamicRef,
  $recursiveRef, contentSchema, multipleOf (other than 1 on integers), non-integer bounds on
  numbers, pattern or format together with minLength / maxLength (or each other), formats other
  than date, time, date-time and uuid, allOf with several subschemas, non-local $ref.

Depth: an unconstrained value (schema true or {}) is a JSON value with at most ``max_depth``
levels of nested containers; an array or object schema whose items / values are unconstrained
counts as one of those levels (``{"type": "object"}`` gives ``json_object_regex(max_depth)``).
Constrained nesting is limited only by the schema (and $ref recursion by ``max_depth``).

Size: arrays and objects mention each item / member regex at most twice, so the regex grows
linearly with the number of properties, and by a factor of at most 2 per level of nesting (4 per
level for unconstrained values, which may be an array or an object). ``whitespace`` is repeated
in every gap (up to four times per member or item), so a long ``whitespace`` adds to the length
linearly too.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from fractions import Fraction

__all__ = ["json_schema_regex", "json_object_regex", "json_value_regex"]

# -- regex building blocks ---------------------------------------------------------------------

# One character of a JSON string: anything but '"', '\\' and control characters, or an escape.
_CHAR = r'(?:[^"\\\u0000-\u001f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
# The same, counting code points: a \u escape of a surrogate is only allowed as a high+low pair,
# which is one character (used where lengths are counted).
_CODE_POINT = (r'(?:[^"\\\u0000-\u001f]|\\["\\/bfnrt]|\\u(?:[0-9a-cA-CefEF][0-9a-fA-F]{3}|[dD][0-7][0-9a-fA-F]{2})'
               r'|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2})')
_STRING = '"' + _CHAR + '*"'
_INTEGER = r"-?(?:0|[1-9][0-9]*)"
_FRACTION = r"(?:\.[0-9]+)?"
_EXPONENT = r"(?:[eE][+\-]?[0-9]+)?"
_NUMBER = _INTEGER + _FRACTION + _EXPONENT
_NONNEG_NUMBER = r"(?:0|[1-9][0-9]*)" + _FRACTION + _EXPONENT
_ZERO_FRACTION = r"(?:\.0+)?"
_NONZERO_FRACTION = r"\.[0-9]*[1-9][0-9]*"

_YEAR = r"(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"  # 0001-9999
_LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (r"(?:" + _YEAR + r"-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
         r"|02-(?:0[1-9]|1[0-9]|2[0-8]))|" + _LEAP_YEAR + r"-02-29)")
_HOUR_MINUTE = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]"
_TIME = _HOUR_MINUTE + r":[0-5][0-9](?:\.[0-9]+)?(?:Z|[+\-]" + _HOUR_MINUTE + ")?"
_FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": _DATE + "T" + _TIME,
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
}

_META = frozenset("\\.[]{}()*+?|^$/-")


def _literal(text: str) -> str:
    """A regex matching exactly ``text``: metacharacters escaped, characters outside printable
    ASCII as ``\\uXXXX`` (those beyond the BMP as themselves)."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _META:
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F or code > 0xFFFF:
            out.append(ch)
        else:
            out.append(f"\\u{code:04x}")
    return "".join(out)


def _escape_len(rx: str, i: int) -> int:
    """Length of the escape sequence starting at ``rx[i] == '\\'``."""
    nxt = rx[i + 1: i + 2]
    return 6 if nxt == "u" else 4 if nxt == "x" else 2


def _class_end(rx: str, i: int) -> int:
    """Index just past the class starting at ``rx[i] == '['``."""
    j = i + 1
    if rx[j: j + 1] == "^":
        j += 1
    if rx[j: j + 1] == "]":  # a ']' first in a class is a literal
        j += 1
    while j < len(rx) and rx[j] != "]":
        j += _escape_len(rx, j) if rx[j] == "\\" else 1
    return j + 1


def _group_end(rx: str, i: int) -> int:
    """Index just past the group starting at ``rx[i] == '('``."""
    depth, j = 0, i
    while j < len(rx):
        c = rx[j]
        if c == "\\":
            j += _escape_len(rx, j)
            continue
        if c == "[":
            j = _class_end(rx, j)
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return j


def _pieces(rx: str) -> list[tuple[str, str]]:
    """``rx`` split at top level into (atom, quantifier) pairs; a top-level ``|`` is the atom "|"."""
    out, i = [], 0
    while i < len(rx):
        c = rx[i]
        if c == "\\":
            j = i + _escape_len(rx, i)
        elif c == "[":
            j = _class_end(rx, i)
        elif c == "(":
            j = _group_end(rx, i)
        else:
            j = i + 1
        k = j
        while k < len(rx) and rx[k] in "*+?{" and c != "|":
            k = rx.index("}", k) + 1 if rx[k] == "{" else k + 1
        out.append((rx[i:j], rx[j:k]))
        i = k
    return out


def _has_top_alternation(rx: str) -> bool:
    return any(atom == "|" for atom, _ in _pieces(rx))


def _group(rx: str) -> str:
    """``rx`` as one atom, ready for a quantifier."""
    pieces = _pieces(rx)
    if len(pieces) == 1 and not pieces[0][1] and pieces[0][0] != "|":
        return rx
    return "(?:" + rx + ")"


def _alt(parts) -> str | None:
    """Alternation of the regexes in ``parts`` (None: impossible, left out; duplicates dropped)."""
    seen: list[str] = []
    for p in parts:
        if p is not None and p not in seen:
            seen.append(p)
    if not seen:
        return None
    return seen[0] if len(seen) == 1 else "(?:" + "|".join(seen) + ")"


def _repeat(rx: str, lo: int, hi: int | None) -> str:
    """``rx`` repeated lo..hi times (hi None: unbounded)."""
    if hi == 0:
        return ""
    if lo == hi == 1:
        return rx
    atom = _group(rx)
    if hi is None:
        return atom + ("*" if lo == 0 else "+" if lo == 1 else f"{{{lo},}}")
    if lo == hi:
        return atom + f"{{{lo}}}"
    return atom + ("?" if (lo, hi) == (0, 1) else f"{{{lo},{hi}}}")


# -- integer and number ranges -----------------------------------------------------------------

def _digit_class(a: int, b: int) -> str:
    if a == b:
        return str(a)
    return f"[{a}{b}]" if b == a + 1 else f"[{a}-{b}]"


def _same_length(a: str, b: str) -> str:
    """Digit strings of ``len(a) == len(b)`` digits between ``a`` and ``b`` inclusive."""
    if a == b:
        return a
    i = 0
    while a[i] == b[i]:
        i += 1
    prefix, a, b = a[:i], a[i:], b[i:]
    k = len(a) - 1
    low_full, high_full = a[1:] == "0" * k, b[1:] == "9" * k
    first = int(a[0]) if low_full else int(a[0]) + 1
    last = int(b[0]) if high_full else int(b[0]) - 1
    alts = []
    if not low_full:
        alts.append(a[0] + _same_length(a[1:], "9" * k))
    if first <= last:
        alts.append(_digit_class(first, last) + _repeat("[0-9]", k, k))
    if not high_full:
        alts.append(b[0] + _same_length("0" * k, b[1:]))
    return prefix + _alt(alts)


def _nonneg_int_range(lo: int, hi: int | None) -> str | None:
    """Decimal integers (no leading zeros) in [lo, hi], 0 <= lo; hi None: unbounded."""
    alts = []
    if lo == 0:
        alts.append("0")
        lo = 1
    if hi is not None and hi < lo:
        return _alt(alts)
    s = str(lo)
    n = len(s)
    if hi is None:
        if s == "1" + "0" * (n - 1):
            alts.append("[1-9]" + _repeat("[0-9]", n - 1, None))
        else:
            alts += [_same_length(s, "9" * n), "[1-9]" + _repeat("[0-9]", n, None)]
        return _alt(alts)
    t = str(hi)
    m = len(t)
    if n == m:
        alts.append(_same_length(s, t))
    else:
        alts.append(_same_length(s, "9" * n))
        if m - n >= 2:
            alts.append("[1-9]" + _repeat("[0-9]", n, m - 2))
        alts.append(_same_length("1" + "0" * (m - 1), t))
    return _alt(alts)


def _int_range(lo: int | None, hi: int | None) -> str | None:
    """Integers in [lo, hi] (None: unbounded), written canonically."""
    if lo is None and hi is None:
        return _INTEGER
    if lo is not None and hi is not None and lo > hi:
        return None
    alts = []
    if lo is None or lo < 0:  # negatives -m, m in [max(1, -hi), -lo]
        neg = _nonneg_int_range(1 if hi is None or hi >= 0 else -hi, None if lo is None else -lo)
        alts.append("-" + neg)
    if hi is None or hi >= 0:
        alts.append(_nonneg_int_range(0 if lo is None else max(lo, 0), hi))
    return _alt(alts)


def _nonneg_real(a: int, a_excl: bool, b: int | None, b_excl: bool) -> str | None:
    """Non-negative decimals (no exponent) x with a <(=) x <(=) b, for whole a >= 0 and b."""
    alts = []
    lo, hi = a + 1 if a_excl else a, None if b is None else b - 1
    if hi is None or lo <= hi:  # integer part strictly inside: any fraction
        alts.append(_nonneg_int_range(lo, hi) + _FRACTION)
    if a_excl and (b is None or a < b):
        alts.append(str(a) + _NONZERO_FRACTION)
    if b is not None and not b_excl and (b > a or not a_excl):
        alts.append(str(b) + _ZERO_FRACTION)
    return _alt(alts)


def _real_range(lo: int | None, lo_excl: bool, hi: int | None, hi_excl: bool) -> str | None:
    """Decimal numbers (no exponent) between whole bounds lo and hi (None: unbounded)."""
    if lo is not None and hi is not None and (lo > hi or (lo == hi and (lo_excl or hi_excl))):
        return None
    alts = []
    if hi is None or hi > 0 or (hi == 0 and not hi_excl):
        a, a_excl = (0, False) if lo is None or lo < 0 else (lo, lo_excl)
        alts.append(_nonneg_real(a, a_excl, hi, hi_excl))
    if lo is None or lo < 0:  # -y with y > 0
        a, a_excl = (0, True) if hi is None or hi >= 0 else (-hi, hi_excl)
        neg = _nonneg_real(a, a_excl, None if lo is None else -lo, lo_excl)
        alts.append(None if neg is None else "-" + neg)
    return _alt(alts)


# -- checking regex syntax (a schema's pattern, the whitespace) --------------------------------

_ESCAPES = frozenset('\\".[]{}()*+?|^$/-dwsntr')
_QUANTIFIER = re.compile(r"\{[0-9]+(?:,[0-9]*)?\}")
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
_HEX2 = re.compile(r"[0-9a-fA-F]{2}")


def _check_syntax(rx: str, what: str) -> None:
    """ValueError unless ``rx`` is a Python regex using only the supported syntax."""
    try:
        re.compile(rx)
    except re.error as exc:
        raise ValueError(f"{what} {rx!r} is not a valid regex: {exc}") from None

    def bad(i: int, why: str) -> ValueError:
        return ValueError(f"{what} {rx!r} uses unsupported regex syntax at position {i}: {why}")

    def escape(i: int, in_class: bool) -> int:
        c = rx[i + 1: i + 2]
        if c == "u":
            if not _HEX4.fullmatch(rx, i + 2, i + 6):
                raise bad(i, "\\u needs 4 hex digits")
            return i + 6
        if c == "x" and in_class:
            if not _HEX2.fullmatch(rx, i + 2, i + 4):
                raise bad(i, "\\x needs 2 hex digits")
            return i + 4
        if c not in _ESCAPES:
            raise bad(i, f"escape \\{c}")
        return i + 2

    i, after_atom = 0, False
    while i < len(rx):
        c = rx[i]
        if c == "\\":
            i, after_atom = escape(i, False), True
        elif c == "[":
            j = i + 1
            if rx[j: j + 1] == "^":
                j += 1
            if rx[j: j + 1] == "]":
                raise bad(j, "a literal ']' in a class must be escaped")
            while rx[j] != "]":
                if rx[j] == "[":
                    raise bad(j, "a literal '[' in a class must be escaped")
                j = escape(j, True) if rx[j] == "\\" else j + 1
            i, after_atom = j + 1, True
        elif c == "(":
            if rx.startswith("(?", i) and not rx.startswith("(?:", i):
                raise bad(i, "only (...) and (?:...) groups")
            i, after_atom = i + (3 if rx.startswith("(?:", i) else 1), False
        elif c in "^$":
            raise bad(i, "anchors")
        elif c == "{":
            m = _QUANTIFIER.match(rx, i)
            if not m or not after_atom:
                raise bad(i, "a literal '{' must be escaped")
            i = m.end()
        elif c == "}":
            raise bad(i, "a literal '}' must be escaped")
        else:
            after_atom = c not in "|"
            i += 1


# -- the compiler ------------------------------------------------------------------------------

_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_ALL_TYPES = frozenset(_TYPES)
_UNSUPPORTED = frozenset({
    "patternProperties", "propertyNames", "minProperties", "maxProperties", "dependentRequired",
    "dependentSchemas", "dependencies", "unevaluatedProperties", "unevaluatedItems", "prefixItems",
    "additionalItems", "contains", "minContains", "maxContains", "not", "if", "then", "else",
    "$dynamicRef", "$recursiveRef", "contentSchema",
})
_OBJECT_KEYWORDS = frozenset({"properties", "required", "additionalProperties"})
_ARRAY_KEYWORDS = frozenset({"items", "minItems", "maxItems"})
_STRING_KEYWORDS = frozenset({"minLength", "maxLength", "pattern", "format"})
_NUMBER_KEYWORDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
_COMBINATORS = ("$ref", "anyOf", "oneOf", "allOf")
_CONSTRAINING = (_OBJECT_KEYWORDS | _ARRAY_KEYWORDS | _STRING_KEYWORDS | _NUMBER_KEYWORDS
                 | {"type", "enum", "const", "uniqueItems", *_COMBINATORS})


def _unsupported(keyword: str, path: str, detail: str = "") -> ValueError:
    return ValueError(f"json schema keyword {keyword!r}{detail} at {path} is not supported")


def _join(path: str, *tokens) -> str:
    return "/".join([path, *(str(t).replace("~", "~0").replace("/", "~1") for t in tokens)])


def _intersect(a: frozenset | None, b: frozenset | None) -> frozenset | None:
    """Intersection of two sets of JSON types (None: all), with integer a subset of number."""
    if a is None or b is None:
        return b if a is None else a
    out = set((a & b) - {"number", "integer"})
    if "number" in a and "number" in b:
        out.add("number")
    elif ("number" in a or "integer" in a) and ("number" in b or "integer" in b):
        out.add("integer")
    return frozenset(out)


def _dump(value, path: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"json schema enum/const value at {path} is not JSON: {exc}") from None


def _json_equal(a, b) -> bool:
    """JSON equality: 1 == 1.0, but true != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _count(schema: dict, keyword: str, path: str) -> int | None:
    v = schema.get(keyword)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"json schema keyword {keyword!r} at {path} must be a non-negative integer, not {v!r}")
    return v


class _Compiler:
    def __init__(self, root, whitespace: str, max_depth: int):
        self.root = root
        self.max_depth = max_depth
        # Insignificant whitespace: one ``ws`` in every gap between two tokens of a container (after
        # '{' / '[', before '}' / ']', around ':' and ','), never two in a row.
        self.ws = "(?:" + whitespace + ")" if _has_top_alternation(whitespace) else whitespace
        self.sep = self.ws + "," + self.ws
        self.colon = self.ws + ":" + self.ws
        self.refs: list[str] = []  # the $refs being expanded, outermost first
        self.cut: str | None = None  # a recursive $ref that was cut at max_depth
        self._any: dict[int, str | None] = {}

    # - unconstrained values -
    def any_value(self, depth: int) -> str | None:
        """Any JSON value with at most ``depth`` levels of nested containers (depth < 0: none)."""
        if depth < 0:
            return None
        if depth not in self._any:
            alts = [_STRING, _NUMBER, "true", "false", "null"]
            if depth > 0:
                inner = self.any_value(depth - 1)
                alts += [self.array_of(inner, 0, None), self.map_of(inner)]
            self._any[depth] = _alt(alts)
        return self._any[depth]

    def array_of(self, item: str | None, lo: int, hi: int | None) -> str | None:
        if hi is not None and hi < lo:
            return None
        if item is None or hi == 0:
            return self.container(r"\[", None, r"\]") if lo == 0 else None
        body = item + _repeat("(?:" + self.sep + item + ")", max(lo - 1, 0), None if hi is None else hi - 1)
        return self.container(r"\[", body, r"\]", optional=lo == 0)

    def map_of(self, value: str | None) -> str:
        if value is None:
            return self.container(r"\{", None, r"\}")
        member = _STRING + self.colon + value
        return self.container(r"\{", member + _repeat("(?:" + self.sep + member + ")", 0, None), r"\}", optional=True)

    def container(self, open_: str, body: str | None, close: str, optional: bool = False) -> str:
        """``open_ ws body ws close``; body None: empty (``open_ ws close``); optional: body may be
        left out, with its trailing ``ws`` (so an empty container has one ``ws``, not two)."""
        if body is None:
            return open_ + self.ws + close
        return open_ + self.ws + (_repeat(body + self.ws, 0, 1) if optional else body + self.ws) + close

    def unconstrained(self, schema) -> bool:
        return schema is True or (isinstance(schema, dict) and not any(
            (k in _CONSTRAINING or k in _UNSUPPORTED) and (k, v) != ("uniqueItems", False) for k, v in schema.items()))

    # - schemas -
    def compile(self, schema, path: str, types: frozenset | None = None) -> str | None:
        """The regex of ``schema`` narrowed to ``types`` (None: all types); None when nothing matches."""
        if schema is False:
            return None
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise ValueError(f"json schema at {path} must be an object or a boolean, not {type(schema).__name__}")
        for keyword in schema:
            if keyword in _UNSUPPORTED:
                raise _unsupported(keyword, path)
        if schema.get("uniqueItems", False) is not False:
            raise _unsupported("uniqueItems", path, f" = {schema['uniqueItems']!r}")
        if "type" in schema:
            types = _intersect(types, self.parse_type(schema["type"], path))
        if types is not None and not types:
            return None
        keywords = {k for k in schema if k in _CONSTRAINING}
        if "enum" in keywords or "const" in keywords:
            return self.enum(schema, path, types)
        for combinator in _COMBINATORS:
            if combinator in keywords:
                others = sorted(keywords - {combinator, "type"})
                if others:
                    raise _unsupported(others[0], path, f" beside {combinator!r}")
                return getattr(self, {"$ref": "ref", "anyOf": "any_of", "oneOf": "any_of",
                                      "allOf": "all_of"}[combinator])(schema, combinator, path, types)
        if types is None:
            inferred = set()
            for kws, t in ((_OBJECT_KEYWORDS, "object"), (_ARRAY_KEYWORDS, "array"),
                           (_STRING_KEYWORDS, "string"), (_NUMBER_KEYWORDS, "number")):
                if keywords & kws:
                    inferred.add(t)
            if not inferred:
                return self.any_value(self.max_depth)
            types = frozenset(inferred)
        alts = []
        for t in _TYPES:
            if t not in types or (t == "integer" and "number" in types):
                continue
            alts.append(getattr(self, "type_" + t)(schema, path))
        return _alt(alts)

    def parse_type(self, t, path: str) -> frozenset:
        names = [t] if isinstance(t, str) else t
        if not isinstance(names, list) or not names or any(n not in _ALL_TYPES for n in names):
            raise ValueError(f"json schema keyword 'type' at {path} must be one of {list(_TYPES)} or a non-empty "
                             f"list of them, not {t!r}")
        return frozenset(names)

    def enum(self, schema: dict, path: str, types: frozenset | None) -> str | None:
        if "enum" in schema and not isinstance(schema["enum"], list):
            raise ValueError(f"json schema keyword 'enum' at {path} must be a list")
        if "const" in schema:
            values = [schema["const"]]
            if "enum" in schema:
                values = [v for v in values if any(_json_equal(v, e) for e in schema["enum"])]
        else:
            values = schema["enum"]
        texts = [_dump(v, path) for v in values]
        rest = {k: v for k, v in schema.items() if k not in ("enum", "const")}
        if types is not None or any(k in _CONSTRAINING for k in rest):
            sub = _Compiler(self.root, "", self.max_depth)
            sub.refs = list(self.refs)
            rx = sub.compile(rest, path, types)
            pattern = None if rx is None else re.compile(rx)
            texts = [t for t in texts if pattern is not None and pattern.fullmatch(t)]
        return _alt(_literal(t) for t in texts)

    def resolve(self, ref, path: str):
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise _unsupported("$ref", path, f" {ref!r} (only local references '#...')")
        fragment = urllib.parse.unquote(ref[1:])
        if not fragment:
            return self.root, "#"
        if not fragment.startswith("/"):
            raise _unsupported("$ref", path, f" {ref!r} (anchors)")
        node = self.root
        for token in fragment[1:].split("/"):
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                raise ValueError(f"json schema $ref {ref!r} at {path} does not resolve")
        return node, "#" + fragment

    def ref(self, schema: dict, keyword: str, path: str, types: frozenset | None) -> str | None:
        ref = schema["$ref"]
        target, target_path = self.resolve(ref, path)
        if self.refs.count(target_path) >= self.max_depth:
            self.cut = ref
            return None
        self.refs.append(target_path)
        try:
            return self.compile(target, target_path, types)
        finally:
            self.refs.pop()

    def any_of(self, schema: dict, keyword: str, path: str, types: frozenset | None) -> str | None:
        branches = schema[keyword]
        if not isinstance(branches, list) or not branches:
            raise ValueError(f"json schema keyword {keyword!r} at {path} must be a non-empty list")
        return _alt(self.compile(b, _join(path, keyword, i), types) for i, b in enumerate(branches))

    def all_of(self, schema: dict, keyword: str, path: str, types: frozenset | None) -> str | None:
        branches = schema[keyword]
        if not isinstance(branches, list) or len(branches) != 1:
            n = len(branches) if isinstance(branches, list) else branches
            raise _unsupported("allOf", path, f" with {n} subschemas (only one)")
        return self.compile(branches[0], _join(path, keyword, 0), types)

    # - one type each -
    def type_null(self, schema: dict, path: str) -> str:
        return "null"

    def type_boolean(self, schema: dict, path: str) -> str:
        return "(?:true|false)"

    def type_string(self, schema: dict, path: str) -> str | None:
        lo, hi = _count(schema, "minLength", path), _count(schema, "maxLength", path)
        lengths = [k for k in ("minLength", "maxLength") if schema.get(k) is not None]
        pattern, fmt = schema.get("pattern"), schema.get("format")
        if pattern is not None:
            if fmt is not None or lengths:
                other = "format" if fmt is not None else lengths[0]
                raise _unsupported("pattern", path, f" together with {other!r}")
            if not isinstance(pattern, str):
                raise ValueError(f"json schema keyword 'pattern' at {path} must be a string")
            if pattern.startswith("^"):
                pattern = pattern[1:]
            if pattern.endswith("$") and (len(pattern) - 1 - len(pattern[:-1].rstrip("\\"))) % 2 == 0:
                pattern = pattern[:-1]  # an unescaped final '$'
            _check_syntax(pattern, f"json schema pattern at {path}")
            return '"(?:' + pattern + ')"'
        if fmt is not None:
            if lengths:
                raise _unsupported("format", path, f" together with {lengths[0]!r}")
            if fmt not in _FORMATS:
                raise _unsupported("format", path, f" {fmt!r} (supported: {', '.join(_FORMATS)})")
            return '"' + _FORMATS[fmt] + '"'
        if lengths:
            lo = lo or 0
            if hi is not None and hi < lo:
                return None
            return '"' + _repeat(_CODE_POINT, lo, hi) + '"'
        return _STRING

    def bounds(self, schema: dict, path: str):
        """((value, exclusive, keyword) | None, same for the upper bound), the tightest of each."""

        def number(keyword):
            v = schema[keyword]
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"json schema keyword {keyword!r} at {path} must be a finite number, not {v!r}")
            return Fraction(v)

        bounds = []
        for inclusive, exclusive, tighter in (("minimum", "exclusiveMinimum", lambda a, b: a > b),
                                              ("maximum", "exclusiveMaximum", lambda a, b: a < b)):
            bound = (number(inclusive), False, inclusive) if inclusive in schema else None
            excl = schema.get(exclusive)
            if isinstance(excl, bool):  # draft 4: a flag on minimum / maximum
                if excl and bound is not None:
                    bound = (bound[0], True, exclusive)
            elif excl is not None:
                v = number(exclusive)
                if bound is None or tighter(v, bound[0]) or v == bound[0]:
                    bound = (v, True, exclusive)
            bounds.append(bound)
        return bounds

    def multiple_of_one(self, schema: dict, path: str) -> bool:
        m = schema.get("multipleOf")
        if m is None:
            return False
        if isinstance(m, bool) or m != 1:
            raise _unsupported("multipleOf", path, f" = {m!r} (only 1)")
        return True

    def type_integer(self, schema: dict, path: str) -> str | None:
        self.multiple_of_one(schema, path)
        lo, hi = self.bounds(schema, path)
        ilo = None if lo is None else math.floor(lo[0]) + 1 if lo[1] else math.ceil(lo[0])
        ihi = None if hi is None else math.ceil(hi[0]) - 1 if hi[1] else math.floor(hi[0])
        return _int_range(ilo, ihi)

    def type_number(self, schema: dict, path: str) -> str | None:
        if self.multiple_of_one(schema, path):
            return self.type_integer(schema, path)
        lo, hi = self.bounds(schema, path)
        if lo is None and hi is None:
            return _NUMBER
        for b in (lo, hi):
            if b is not None and b[0].denominator != 1:
                raise _unsupported(b[2], path, f" = {float(b[0])!r} on a number (only whole-number bounds)")
        if lo == (0, False, "minimum") and hi is None:
            return _NONNEG_NUMBER
        return _real_range(None if lo is None else int(lo[0]), lo is not None and lo[1],
                           None if hi is None else int(hi[0]), hi is not None and hi[1])

    def type_array(self, schema: dict, path: str) -> str | None:
        items = schema.get("items", True)
        if isinstance(items, list):
            raise _unsupported("items", path, " given as a list (tuple validation)")
        lo, hi = _count(schema, "minItems", path) or 0, _count(schema, "maxItems", path)
        if self.unconstrained(items):
            item = self.any_value(self.max_depth - 1)
        else:
            item = self.compile(items, _join(path, "items"))
        return self.array_of(item, lo, hi)

    def value_of(self, schema, path: str, depth: int) -> str | None:
        return self.any_value(depth) if self.unconstrained(schema) else self.compile(schema, path)

    def type_object(self, schema: dict, path: str) -> str | None:
        properties = schema.get("properties")
        required = schema.get("required", [])
        additional = schema.get("additionalProperties", True)
        if properties is not None and not isinstance(properties, dict):
            raise ValueError(f"json schema keyword 'properties' at {path} must be an object")
        if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
            raise ValueError(f"json schema keyword 'required' at {path} must be a list of strings")
        if properties is None and not required:
            return self.map_of(self.value_of(additional, _join(path, "additionalProperties"), self.max_depth - 1))
        properties = properties or {}
        members = [(k, v, _join(path, "properties", k)) for k, v in properties.items()]
        for k in dict.fromkeys(required):
            if k not in properties:
                members.append((k, additional, _join(path, "additionalProperties")))
        # chain: head = the members so far, at least one present, comma-separated; empty_ok = all optional so far
        head, empty_ok = None, True
        for key, sub, sub_path in members:
            is_required = key in required
            value = self.value_of(sub, sub_path, self.max_depth)
            if value is None:
                if is_required:
                    return None
                continue
            member = _literal(_dump(key, path)) + self.colon + value
            if is_required:
                if head is None:
                    head = member
                elif empty_ok:
                    head = "(?:" + head + self.sep + ")?" + member
                else:
                    head = head + self.sep + member
                empty_ok = False
            else:
                if head is None:
                    head = member
                else:
                    tail = head + "(?:" + self.sep + member + ")?"
                    head = "(?:" + tail + "|" + member + ")" if empty_ok else tail
        if head is None:
            return self.container(r"\{", None, r"\}")
        return self.container(r"\{", head, r"\}", optional=empty_ok)


def _check_args(whitespace: str, max_depth: int) -> None:
    if not isinstance(whitespace, str):
        raise ValueError(f"whitespace must be a regex string, not {whitespace!r}")
    if whitespace:
        _check_syntax(whitespace, "whitespace")
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0:
        raise ValueError(f"max_depth must be a non-negative integer, not {max_depth!r}")


def json_schema_regex(schema: dict | str | bool, whitespace: str = "[ ]?", max_depth: int = 3) -> str:
    """A regex whose full matches are JSON texts valid under ``schema`` (see the module docstring for
    the layout and the supported keywords). ``schema`` may be a JSON string; ``True`` or ``{}``
    means any JSON value. ValueError for bad JSON, unsupported keywords (named, with their location)
    and unsatisfiable schemas."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ValueError(f"json schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict | bool):
        raise ValueError(f"json schema must be an object or a boolean, not {type(schema).__name__}")
    _check_args(whitespace, max_depth)
    compiler = _Compiler(schema, whitespace, max_depth)
    compiler.refs.append("#")
    rx = compiler.compile(schema, "#")
    if rx is None:
        why = f" (recursive $ref {compiler.cut!r} expanded {max_depth} times)" if compiler.cut else ""
        raise ValueError(f"json schema is unsatisfiable: no JSON text matches it{why}")
    return rx


def json_object_regex(whitespace: str = "[ ]?", max_depth: int = 3) -> str:
    """Any JSON object (``response_format`` ``json_object``) with at most ``max_depth`` levels of
    nested containers, the object itself included (``max_depth >= 1``)."""
    if isinstance(max_depth, int) and not isinstance(max_depth, bool) and max_depth < 1:
        raise ValueError(f"max_depth must be at least 1 for an object, not {max_depth}")
    return json_schema_regex({"type": "object"}, whitespace, max_depth)


def json_value_regex(whitespace: str = "[ ]?", max_depth: int = 3) -> str:
    """Any JSON value with at most ``max_depth`` levels of nested containers (0: scalars only)."""
    return json_schema_regex(True, whitespace, max_depth)
