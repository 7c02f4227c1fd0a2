"""From a character automaton to the tokens a request may sample next.

A :class:`TokenVocabulary` holds every token's bytes, longest first: the UTF-8 bytes it adds to
the text (a byte-level BPE token's own bytes, which may be part of a character; a SentencePiece
piece with its word-start mark as a space, or its byte-fallback byte). For a DFA state,
:meth:`TokenDFA.mask_words` runs all tokens through the automaton (which reads UTF-8 bytes) at
once: numpy, one gather per byte position over the tokens still that long; it keeps those that
end in a live state, and allows end-of-sequence ids where the state accepts. The result is a
bitmask of the vocabulary packed into uint32 words (bit ``i % 32`` of word ``i // 32``), cached
per state: a request pays for each state once, and requests with the same pattern share the cache.

Special tokens are never allowed by a mask (end-of-sequence only where the pattern may end).

What this costs on SmolLM2's vocabulary is measured by ``benchmarks/structured_outputs.py``
(cold: the vocabulary's byte table, each pattern's compile, the masks of the states visited).
"""

from __future__ import annotations

import collections
import json

import numpy as np

from jaxllm.engine.detokenizer import special_token_ids
from jaxllm.structured.regex import DFA, compile_regex

_SENTENCEPIECE_SPACE = "\u2581"


class TokenVocabulary:
    """Every token's bytes, in a [tokens, longest] array sorted longest first."""

    def __init__(self, tokenizer, vocab_size: int):
        self.vocab_size = vocab_size
        self.token_bytes = token_bytes(tokenizer, vocab_size)
        usable = [i for i, b in enumerate(self.token_bytes) if b]
        usable.sort(key=lambda i: -len(self.token_bytes[i]))
        self.token_ids = np.asarray(usable, np.int64)
        lengths = np.asarray([len(self.token_bytes[i]) for i in usable], np.int64)
        longest = int(lengths[0]) if len(usable) else 0
        self.byte_values = np.zeros((len(usable), longest), np.uint8)
        for row, i in enumerate(usable):
            self.byte_values[row, : lengths[row]] = np.frombuffer(self.token_bytes[i], np.uint8)
        # How many tokens are longer than each position: the rows still walking at that position.
        self.longer_than = np.asarray([(lengths > pos).sum() for pos in range(longest)], np.int64)

    @property
    def num_words(self) -> int:
        return -(-self.vocab_size // 32)


def token_bytes(tokenizer, vocab_size: int) -> list[bytes | None]:
    """The UTF-8 bytes each token id adds to a text; None for special tokens and missing ids."""
    ids = list(range(min(vocab_size, len(tokenizer))))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = special_token_ids(tokenizer)
    byte_level = _is_byte_level(tokenizer)
    out: list[bytes | None] = []
    for i, piece in zip(ids, pieces, strict=True):
        if piece is None or i in special:
            out.append(None)
        elif i in added:  # an added, non-special token is its literal text
            out.append(added[i].content.encode())
        elif byte_level:
            try:
                out.append(bytes(_BYTE_OF_CHAR[c] for c in piece))
            except KeyError:  # not a byte-level piece after all
                out.append(tokenizer.convert_tokens_to_string([piece]).encode())
        else:
            out.append(_sentencepiece_bytes(piece, tokenizer))
    return out + [None] * (vocab_size - len(out))


def _is_byte_level(tokenizer) -> bool:
    """Whether the tokenizer's pieces are GPT-2 style byte-level (each char one byte)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    return '"ByteLevel"' in json.dumps(json.loads(backend.to_str()).get("decoder"))


def _sentencepiece_bytes(piece: str, tokenizer) -> bytes:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte fallback
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    if _SENTENCEPIECE_SPACE in piece:
        return piece.replace(_SENTENCEPIECE_SPACE, " ").encode()
    return tokenizer.convert_tokens_to_string([piece]).encode()


def _gpt2_byte_chars() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte (the byte-level BPE alphabet)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in kept:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _gpt2_byte_chars()


class TokenDFA:
    """A pattern's DFA over one vocabulary; masks are computed per state on first use."""

    def __init__(self, dfa: DFA, vocab: TokenVocabulary, eos_token_ids: tuple[int, ...]):
        self.dfa, self.vocab, self.eos_token_ids = dfa, vocab, tuple(eos_token_ids)
        self._masks: dict[int, np.ndarray] = {}

    @property
    def start(self) -> int:
        return self.dfa.start

    def next_state(self, state: int, token_id: int) -> int:
        """The state after ``token_id``; an end-of-sequence id in an accepting state keeps it."""
        if token_id in self.eos_token_ids:
            return state if self.dfa.accepting[state] else self.dfa.dead
        data = self.vocab.token_bytes[token_id] if 0 <= token_id < len(self.vocab.token_bytes) else None
        return self.dfa.dead if not data else self.dfa.step(state, data)

    def allowed(self, state: int) -> np.ndarray:
        """[vocab_size] bool: the tokens that may follow in ``state``."""
        mask = np.zeros(self.vocab.vocab_size, bool)
        if state != self.dfa.dead:
            current = np.full(len(self.vocab.token_ids), state, np.int32)
            trans, byte_values = self.dfa.transitions, self.vocab.byte_values
            for pos, k in enumerate(self.vocab.longer_than):
                current[:k] = trans[current[:k], self.dfa.byte_class[byte_values[:k, pos]]]
            mask[self.vocab.token_ids[current != self.dfa.dead]] = True
        if state == self.dfa.dead or self.dfa.accepting[state]:
            # Accepting: the text may end here. Dead (a token the mask did not allow was forced
            # in): ending is all that is left.
            mask[[i for i in self.eos_token_ids if i < len(mask)]] = True
        return mask

    def mask_words(self, state: int) -> np.ndarray:
        """``allowed(state)`` packed little-endian into [num_words] uint32, cached."""
        words = self._masks.get(state)
        if words is None:
            bits = np.zeros(self.vocab.num_words * 32, bool)
            bits[: self.vocab.vocab_size] = self.allowed(state)
            words = self._masks[state] = np.packbits(bits, bitorder="little").view("<u4").astype(np.uint32)
        return words


class TokenMatcher:
    """One request's position in its pattern; advanced by each sampled token."""

    def __init__(self, token_dfa: TokenDFA, state: int | None = None):
        self.token_dfa = token_dfa
        self.state = token_dfa.start if state is None else state

    def advance(self, token_id: int) -> None:
        self.state = self.token_dfa.next_state(self.state, token_id)

    def copy(self) -> TokenMatcher:
        return TokenMatcher(self.token_dfa, self.state)

    @property
    def key(self) -> tuple[TokenDFA, int]:
        """What the device mask of this position depends on."""
        return self.token_dfa, self.state


class TokenDFACache:
    """Compiled patterns of one engine's vocabulary, least recently used dropped beyond ``capacity``."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...], capacity: int = 64):
        self._tokenizer, self._vocab_size, self._eos = tokenizer, vocab_size, tuple(eos_token_ids)
        self._vocab: TokenVocabulary | None = None
        self._compiled: collections.OrderedDict[str, TokenDFA] = collections.OrderedDict()
        self._capacity = capacity

    @property
    def vocab(self) -> TokenVocabulary:
        if self._vocab is None:
            if self._tokenizer is None:
                raise ValueError("structured outputs need a tokenizer; this engine has none")
            self._vocab = TokenVocabulary(self._tokenizer, self._vocab_size)
        return self._vocab

    def get(self, pattern: str) -> TokenDFA:
        found = self._compiled.get(pattern)
        if found is None:
            found = TokenDFA(compile_regex(pattern), self.vocab, self._eos)
            self._compiled[pattern] = found
            if len(self._compiled) > self._capacity:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(pattern)
        return found
