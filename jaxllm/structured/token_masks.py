"""From a character automaton to the tokens a request may sample next.

A :class:`TokenVocabulary` holds every token's text as code points, longest first. For a DFA
state, :meth:`TokenDFA.mask_words` runs all tokens through the automaton at once (numpy, one
gather per character position over the tokens still that long) and keeps those that end in a
live state; end-of-sequence ids are allowed where the state accepts. The result is a bitmask of
the vocabulary packed into uint32 words (bit ``i % 32`` of word ``i // 32``), cached per state:
a request pays for each state once, and requests with the same pattern share the cache.

Tokens whose text alone is not whole characters (a byte-level token holding part of a UTF-8
sequence) and special tokens are never allowed by a mask: a constrained output is spelled with
tokens of whole characters, which every character of a byte-level vocabulary has.

SmolLM2's vocabulary (49,152 tokens): building the vocabulary takes about a second once per
engine; a state's mask a few milliseconds (``tests/test_structured_outputs.py`` measures nothing;
these are from development runs on the 2-core CPU).
"""

from __future__ import annotations

import collections
import threading

import numpy as np

from jaxllm.structured.regex import DFA, compile_regex

_SENTENCEPIECE_SPACE = "\u2581"


class TokenVocabulary:
    """Every token's text, as code points in a [tokens, longest] array sorted longest first."""

    def __init__(self, tokenizer, vocab_size: int):
        self.vocab_size = vocab_size
        texts = token_texts(tokenizer, vocab_size)
        special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        usable = [i for i, t in enumerate(texts) if t and "\ufffd" not in t and i not in special]
        usable.sort(key=lambda i: -len(texts[i]))
        self.token_ids = np.asarray(usable, np.int64)
        lengths = np.asarray([len(texts[i]) for i in usable], np.int64)
        longest = int(lengths[0]) if len(usable) else 0
        self.code_points = np.zeros((len(usable), longest), np.int64)
        for row, i in enumerate(usable):
            self.code_points[row, : len(texts[i])] = [ord(c) for c in texts[i]]
        # How many tokens are longer than each position: the rows still walking at that position.
        self.longer_than = np.asarray([(lengths > pos).sum() for pos in range(longest)], np.int64)
        self.texts = texts

    @property
    def num_words(self) -> int:
        return -(-self.vocab_size // 32)


def token_texts(tokenizer, vocab_size: int) -> list[str]:
    """The text each token id stands for inside a longer text ('' for ids the tokenizer lacks)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    texts = []
    for piece in pieces:
        if piece is None:
            texts.append("")
            continue
        text = tokenizer.convert_tokens_to_string([piece])
        # SentencePiece drops a word's leading space when a token is decoded alone.
        if piece.startswith(_SENTENCEPIECE_SPACE) and not text.startswith(" "):
            text = " " + text
        texts.append(text)
    return texts + [""] * (vocab_size - len(texts))


class TokenDFA:
    """A pattern's DFA over one vocabulary; masks are computed per state on first use."""

    def __init__(self, dfa: DFA, vocab: TokenVocabulary, eos_token_ids: tuple[int, ...]):
        self.dfa, self.vocab, self.eos_token_ids = dfa, vocab, tuple(eos_token_ids)
        self._classes = dfa.classes_of(vocab.code_points) if vocab.code_points.size else vocab.code_points
        self._masks: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    @property
    def start(self) -> int:
        return self.dfa.start

    def next_state(self, state: int, token_id: int) -> int:
        """The state after ``token_id``; an end-of-sequence id in an accepting state keeps it."""
        if token_id in self.eos_token_ids:
            return state if self.dfa.accepting[state] else self.dfa.dead
        if not 0 <= token_id < len(self.vocab.texts):
            return self.dfa.dead
        return self.dfa.step(state, self.vocab.texts[token_id]) if self.vocab.texts[token_id] else self.dfa.dead

    def allowed(self, state: int) -> np.ndarray:
        """[vocab_size] bool: the tokens that may follow in ``state``."""
        mask = np.zeros(self.vocab.vocab_size, bool)
        if state != self.dfa.dead:
            current = np.full(len(self.vocab.token_ids), state, np.int32)
            trans = self.dfa.transitions
            for pos, k in enumerate(self.vocab.longer_than):
                current[:k] = trans[current[:k], self._classes[:k, pos]]
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
            words = np.packbits(bits, bitorder="little").view("<u4").astype(np.uint32)
            with self._lock:
                self._masks[state] = words
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
