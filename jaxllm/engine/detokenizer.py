"""Incremental detokenization and stop strings.

Decoding token by token is wrong for byte-level BPE (one character split over several tokens
decodes to U+FFFD until its last byte arrives) and for sentencepiece (a token's leading space
depends on what precedes it). As in vLLM, each step decodes a short window twice, from
``prefix_offset`` to ``read_offset`` and from ``prefix_offset`` to the end, and emits the
difference, holding it back while it still ends in an incomplete character.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jaxllm.sampling_params import SamplingParams

# Prompt tokens decoded as context for the first output token (vLLM uses the same 5).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class StopStringMatch:
    stop: str  # the stop string found; it becomes the request's stop_reason
    # Which of the tokens given to ``update`` completed it (several come at once with speculative
    # decoding: the ones after it are dropped).
    token_index: int = 0


def special_token_ids(tokenizer) -> frozenset[int]:
    """What ``skip_special_tokens`` leaves out: the tokenizer's special tokens (bos, eos, ...) and
    every added token marked special, as transformers' ``decode`` and vLLM's detokenizer skip them."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return frozenset(getattr(tokenizer, "all_special_ids", ()) or ()) | {i for i, t in added.items() if t.special}


class IncrementalDetokenizer:
    """Text of one request's output, grown token by token.

    Args:
        tokenizer: a transformers tokenizer (``convert_ids_to_tokens``, ``convert_tokens_to_string``).
        prompt_token_ids: the prompt, for the context of the first output tokens.
        params: ``stop``, ``include_stop_str_in_output``, ``skip_special_tokens``, ``detokenize``.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.text = ""
        self.enabled = params.detokenize and tokenizer is not None
        self._special_ids = special_token_ids(tokenizer) if self.enabled else frozenset()
        context = prompt_token_ids[-_PROMPT_CONTEXT_TOKENS - 1:]
        self._tokens: list[str] = self._to_tokens(context) if self.enabled else []
        self._prefix_offset = max(len(self._tokens) - _PROMPT_CONTEXT_TOKENS, 0)
        self._read_offset = len(self._tokens)
        self._stopped = False

    def update(self, new_token_ids: list[int] | tuple[int, ...]) -> StopStringMatch | None:
        """Add sampled tokens; returns the stop string they completed, if any.

        After a match the text is cut before the stop string (or after it, with
        ``include_stop_str_in_output``) and later tokens add nothing.
        """
        if not self.enabled or self._stopped:
            return None
        for index, token_id in enumerate(new_token_ids):
            delta = self._decode_next(token_id)
            self.text += delta
            match = self._find_stop(len(delta))
            if match is not None:
                self._stopped = True
                return dataclasses.replace(match, token_index=index)
        return None

    def output_text(self, finished: bool) -> str:
        """The text to show now; while running, a possible start of a stop string is held back."""
        if finished or self._stopped:
            return self.text
        holdback = self.params.max_stop_str_len - 1 if not self.params.include_stop_str_in_output else 0
        return self.text[: len(self.text) - holdback] if holdback > 0 else self.text

    def _to_tokens(self, token_ids) -> list[str]:
        skip = self.params.skip_special_tokens
        tokens = self.tokenizer.convert_ids_to_tokens([t for t in token_ids if not (skip and t in self._special_ids)])
        return [t for t in tokens if t is not None]

    def _decode_next(self, token_id: int) -> str:
        self._tokens.extend(self._to_tokens([token_id]))
        # Fast tokenizers join special tokens without extra spaces, as vLLM's fast path does;
        # spaces_between_special_tokens only changes slow tokenizers there too.
        to_string = self.tokenizer.convert_tokens_to_string
        prefix_text = to_string(self._tokens[self._prefix_offset:self._read_offset])
        new_text = to_string(self._tokens[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        return new_text[len(prefix_text):]

    def _find_stop(self, num_new_chars: int) -> StopStringMatch | None:
        # A stop string that ends in the new text starts at most len(stop) - 1 characters before it.
        best: tuple[int, str] | None = None
        for stop in self.params.stop:
            start = max(len(self.text) - num_new_chars - len(stop) + 1, 0)
            index = self.text.find(stop, start)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        cut = index + len(stop) if self.params.include_stop_str_in_output else index
        self.text = self.text[:cut]
        return StopStringMatch(stop)
