"""Sampling parameters with vLLM's field names and defaults.

Fields that vLLM has but jaxllm does not implement yet are accepted only at their neutral value;
anything else raises ``ValueError`` saying the field is not supported yet, so a request never
silently samples differently from what was asked.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from jaxllm.engine.messages import (
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORD_TOKENS,
    MAX_BAD_WORDS,
    MAX_LOGIT_BIAS,
    SamplingOptions,
)
from jaxllm.structured.params import GuidedDecodingParams, StructuredOutputsParams

__all__ = ["GuidedDecodingParams", "RequestOutputKind", "SamplingParams", "StructuredOutputsParams"]

# field -> the only value accepted until the feature exists.
_UNSUPPORTED_UNLESS_NEUTRAL = {
    "best_of": None,
}


_MAX_HELD_BACK_STOP_IDS = 12
MAX_LOGPROBS = 20  # as the device side returns (jaxllm.runner.logprobs) and OpenAI allows


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_str_list(name: str, value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name}={value!r} must be a non-empty string or a list of non-empty strings")
    return list(value)


def _as_int_list(name: str, value) -> list[int]:
    if value is None:
        return []
    if _is_int(value):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) and v >= 0 for v in value):
        raise ValueError(f"{name}={value!r} must be a list of non-negative integer token ids")
    return list(value)


class RequestOutputKind(Enum):
    """What ``LLMEngine.step`` returns for a request (vLLM's names)."""

    CUMULATIVE = 0  # every step: the whole output so far
    DELTA = 1  # every step: only what is new (tokens, text, logprobs; cumulative_logprob stays a total)
    FINAL_ONLY = 2  # nothing until the request finishes, then the whole output


@dataclass
class SamplingParams:
    """How to sample one request's completion (vLLM's ``SamplingParams``).

    ``stop`` and ``stop_token_ids`` are normalised to lists; ``top_k`` 0 and -1 both mean off.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: as many as max_model_len leaves after the prompt
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    # Only these token ids can be sampled (every other logit is -inf); None: any.
    allowed_token_ids: list[int] | None = None
    # Keep only the prompt's last k tokens (left truncation); -1: the last max_model_len tokens.
    truncate_prompt_tokens: int | None = None
    # The output must match a regex, a JSON schema, any JSON object or one of some strings
    # (jaxllm.structured); ``guided_decoding`` is vLLM's older name for the same thing.
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: StructuredOutputsParams | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # vLLM's custom arguments (the server's ``vllm_xargs``): read by the engine's custom logits
    # processors (jaxllm.logits_processor), not by the built-in sampler.
    extra_args: dict[str, Any] | None = None
    # bad_words as token id sequences, set by update_from_tokenizer (a field so that copies keep it).
    _bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False, compare=False)
    # Each of the engine's custom logits processors' state of this request (None: not used), set
    # when the engine adds the request (see LogitsProcessor.row_state).
    _logits_states: tuple = field(default=(), repr=False, compare=False)

    def __post_init__(self):
        self.stop = _as_str_list("stop", self.stop)
        self.bad_words = _as_str_list("bad_words", self.bad_words) or None
        self.logit_bias = _as_logit_bias(self.logit_bias)
        self._check_penalties()
        self.stop_token_ids = _as_int_list("stop_token_ids", self.stop_token_ids)
        self._check_allowed_token_ids()
        self._check_structured_outputs()
        self._check_unsupported()
        self._check_logprobs()
        self._check_sampling()
        self._check_lengths()
        if self.extra_args is not None and not (isinstance(self.extra_args, dict)
                                                and all(isinstance(k, str) for k in self.extra_args)):
            raise ValueError(f"extra_args={self.extra_args!r} must be a dict with str keys, or None")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind={self.output_kind!r} must be a RequestOutputKind")
        if self.stop and not self.detokenize:
            raise ValueError(f"stop={self.stop!r} needs detokenize=True: stop strings are matched on text")

    def _check_unsupported(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n={self.n!r} must be an integer >= 1")
        for name, neutral in _UNSUPPORTED_UNLESS_NEUTRAL.items():
            if getattr(self, name) != neutral:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported yet; leave it at {neutral!r}")

    def _check_structured_outputs(self) -> None:
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError("give structured_outputs or guided_decoding (its older name), not both")
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        value = self.structured_outputs
        if isinstance(value, dict):
            try:
                value = StructuredOutputsParams(**value)
            except TypeError as exc:
                raise ValueError(f"structured_outputs={value!r}: {exc}") from exc
        if value is not None and not isinstance(value, StructuredOutputsParams):
            raise ValueError(f"structured_outputs={value!r} must be a StructuredOutputsParams (or a dict of its fields)")
        self.structured_outputs = value

    def _check_allowed_token_ids(self) -> None:
        if self.allowed_token_ids is None:
            return
        ids = _as_int_list("allowed_token_ids", self.allowed_token_ids)
        if not ids:
            raise ValueError("allowed_token_ids=[] must hold at least one token id (None allows every token)")
        ids = list(dict.fromkeys(ids))
        if len(ids) > MAX_ALLOWED_TOKEN_IDS:
            raise ValueError(f"allowed_token_ids has {len(ids)} distinct ids; at most {MAX_ALLOWED_TOKEN_IDS}")
        self.allowed_token_ids = ids

    def _check_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name}={value!r} must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r} must be > 0 and finite")

    def update_from_tokenizer(self, tokenizer) -> None:
        """Tokenize ``bad_words`` and check ``logit_bias`` ids against the vocabulary (as vLLM).

        Args:
            tokenizer: a transformers tokenizer, or None for an engine fed token ids only.
        """
        if tokenizer is None:
            if self.bad_words:
                raise ValueError(f"bad_words={self.bad_words!r} need a tokenizer; the engine has none")
            return
        self.check_vocabulary(len(tokenizer))
        if self.bad_words:
            self._bad_words_token_ids = _tokenize_bad_words(tokenizer, self.bad_words)

    def check_vocabulary(self, vocab_size: int) -> None:
        """Raises ValueError when ``logit_bias`` or ``allowed_token_ids`` name an id >= vocab_size."""
        for name, ids in (("logit_bias", self.logit_bias), ("allowed_token_ids", self.allowed_token_ids)):
            outside = sorted(t for t in ids or () if t >= vocab_size)
            if outside:
                raise ValueError(f"{name} has token ids {outside[:8]} outside the vocabulary of {vocab_size}")

    def truncated_prompt(self, token_ids: list[int], max_model_len: int) -> list[int]:
        """The prompt ids ``truncate_prompt_tokens`` keeps (see :func:`truncate_prompt`)."""
        return truncate_prompt(token_ids, self.truncate_prompt_tokens, max_model_len)

    def _check_logprobs(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name}={value!r} must be an integer in [0, {MAX_LOGPROBS}] or None")

    def _check_sampling(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= -1 (0 or -1: off)")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed={self.seed!r} must be an integer or None")

    def _check_lengths(self) -> None:
        _check_truncate_prompt_tokens(self.truncate_prompt_tokens)
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an integer >= 1 or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens={self.min_tokens!r} must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} must be <= max_tokens={self.max_tokens}")
        if self.min_tokens and len(self.stop_token_ids or ()) > _MAX_HELD_BACK_STOP_IDS:
            # The sampler holds back eos + stop ids in a fixed-width row (MAX_BANNED_IDS).
            raise ValueError(
                f"stop_token_ids has {len(self.stop_token_ids)} ids; at most {_MAX_HELD_BACK_STOP_IDS} "
                "can be combined with min_tokens > 0"
            )

    def clone(self) -> SamplingParams:
        """A deep copy (vLLM's ``clone``)."""
        return copy.deepcopy(self)

    @property
    def max_stop_str_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    def sampling_options(self, eos_token_ids: tuple[int, ...] = ()) -> SamplingOptions:
        """The subset the device sampler needs.

        Args:
            eos_token_ids: the model's end-of-sequence ids; masked with ``stop_token_ids`` while
                fewer than ``min_tokens`` tokens are generated (unless ``ignore_eos``).
        """
        eos = () if self.ignore_eos else tuple(eos_token_ids)
        masked = tuple(dict.fromkeys(eos + tuple(self.stop_token_ids))) if self.min_tokens else ()
        return SamplingOptions(
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            top_k=0 if self.top_k == -1 else self.top_k,
            min_p=float(self.min_p),
            seed=self.seed,
            min_tokens=self.min_tokens,
            min_tokens_masked_ids=masked,
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty),
            repetition_penalty=float(self.repetition_penalty),
            logit_bias=tuple((self.logit_bias or {}).items()),
            bad_words_token_ids=self._bad_words_options(),
            allowed_token_ids=tuple(self.allowed_token_ids or ()),
        )

    def _bad_words_options(self) -> tuple[tuple[int, ...], ...]:
        if self.bad_words and self._bad_words_token_ids is None:
            raise ValueError(f"bad_words={self.bad_words!r} are not tokenized yet; call update_from_tokenizer")
        return tuple(tuple(ids) for ids in self._bad_words_token_ids or ())


def _check_truncate_prompt_tokens(k) -> None:
    if k is not None and (not _is_int(k) or not (k == -1 or k >= 1)):
        raise ValueError(f"truncate_prompt_tokens={k!r} must be an integer >= 1, -1 (max_model_len) or None")


def truncate_prompt(token_ids: list[int], truncate_prompt_tokens: int | None, max_model_len: int) -> list[int]:
    """vLLM's left truncation: the prompt's last k ids (k = -1: the last max_model_len); None keeps
    them all. Raises ValueError for an invalid k or one above max_model_len."""
    k = truncate_prompt_tokens
    _check_truncate_prompt_tokens(k)
    if k is None:
        return token_ids
    if k > max_model_len:
        raise ValueError(f"truncate_prompt_tokens={k} is greater than max_model_len={max_model_len}")
    return token_ids[-(max_model_len if k == -1 else k):]


def _as_logit_bias(value) -> dict[int, float] | None:
    """Integer ids (JSON gives strings) -> bias clamped to [-100, 100], as vLLM and OpenAI do."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"logit_bias={value!r} must be a dict of token id -> bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias has {len(value)} entries; at most {MAX_LOGIT_BIAS}")
    out = {}
    for token, bias in value.items():
        token_id = int(token) if isinstance(token, str) and token.isdigit() else token
        if not _is_int(token_id) or token_id < 0:
            raise ValueError(f"logit_bias key {token!r} must be a non-negative integer token id")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not math.isfinite(bias):
            raise ValueError(f"logit_bias[{token!r}]={bias!r} must be a finite number")
        out[token_id] = min(100.0, max(-100.0, float(bias)))
    return out


def _tokenize_bad_words(tokenizer, words: list[str]) -> list[list[int]]:
    """vLLM's rule: each word alone, and with a leading space when that is a different token
    sequence of the same length (so the word is banned at the start and in mid-text)."""
    seqs: list[list[int]] = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        seqs.append(plain)
        if spaced and plain and spaced[0] != plain[0] and len(spaced) == len(plain):
            seqs.append(spaced)
    if len(seqs) > MAX_BAD_WORDS:
        raise ValueError(f"bad_words={words!r} give {len(seqs)} token sequences; at most {MAX_BAD_WORDS}")
    if any(not 0 < len(ids) <= MAX_BAD_WORD_TOKENS for ids in seqs):
        raise ValueError(f"bad_words={words!r}: each word must tokenize to 1..{MAX_BAD_WORD_TOKENS} tokens")
    return seqs
