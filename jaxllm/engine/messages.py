"""The only data that crosses between the host scheduler and the device runner.

Plain Python, no jax: the scheduler builds a :class:`SchedulerOutput`, the runner answers
with a :class:`RunnerOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SamplingOptions:
    """Per-request sampling knobs the device sampler needs (a subset of SamplingParams)."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None  # None: drawn from the engine's generator
    # While num_generated < min_tokens these ids (eos unless ignore_eos, plus stop_token_ids)
    # must get -inf logits, so a request cannot stop before its min_tokens.
    min_tokens: int = 0
    min_tokens_masked_ids: tuple[int, ...] = ()
    # Penalties as in vLLM: presence/frequency over output tokens, repetition over prompt and output.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    # Token sequences of each bad word: the last token is banned once the outputs end in the rest.
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    allowed_token_ids: tuple[int, ...] = ()  # empty: any token; else every other logit is -inf

    @property
    def needs_token_history(self) -> bool:
        """Whether the device needs the request's prompt + output ids to apply these options."""
        penalised = (self.presence_penalty, self.frequency_penalty, self.repetition_penalty) != (0.0, 0.0, 1.0)
        return penalised or any(len(w) > 1 for w in self.bad_words_token_ids)


# Fixed widths of the per-row penalty tables, so every step has the shapes warm-up compiled.
MAX_LOGIT_BIAS = 300  # entries per request: OpenAI's own cap on logit_bias
MAX_BAD_WORDS = 32  # token sequences per request (a word gives one or two: with a leading space)
MAX_BAD_WORD_TOKENS = 8  # tokens per bad-word sequence
MAX_ALLOWED_TOKEN_IDS = 300  # allowed_token_ids per request (as many as logit_bias entries)


@dataclass(frozen=True)
class ScheduledSequence:
    """One request's share of a step: ``token_ids`` are computed at positions
    ``start_pos .. start_pos + len(token_ids) - 1`` and written into the pool through
    ``block_ids`` (the request's whole block table, logical block i -> physical block id)."""

    request_id: str
    token_ids: tuple[int, ...]  # the new tokens of this step (a prompt chunk or one decode token)
    start_pos: int  # num_computed_tokens before this step
    block_ids: tuple[int, ...]
    sample: bool  # True when the last new token is the end of the known sequence: sample after it
    sampling: SamplingOptions
    num_generated: int  # output tokens so far; with ``seed`` it makes sampling reproducible
    logprobs: int | None = None  # top logprobs wanted for each sampled token (None: none)
    prompt_logprobs: int | None = None  # top logprobs wanted for each prompt token (None: none)
    num_prompt_tokens: int = 0  # positions below this are prompt tokens (for prompt_logprobs)
    following_token_id: int | None = None  # the known token after this chunk, if any
    # Parallel sampling: more completions to sample from the same last position. Child i samples
    # with seed + i + 1 when the request is seeded; the request itself is completion 0.
    fork_ids: tuple[str, ...] = ()
    # Prompt + output ids so far (read-only int32), only when ``sampling.needs_token_history``.
    token_history: np.ndarray | None = field(default=None, compare=False, repr=False)
    # Structured outputs: (TokenDFA, state) whose mask of allowed next tokens applies to this
    # sequence's samples (see jaxllm.structured.token_masks); None: any token.
    token_mask_key: Any = field(default=None, compare=False, repr=False)
    # The scheduler's own Request (host only): a step's results apply to the request it scheduled,
    # not to a later one that reuses the id. The runner ignores it.
    request: Any = field(default=None, compare=False, repr=False)
    # Speculative decoding: the last ``num_draft_tokens`` of ``token_ids`` are proposed tokens, not
    # yet the request's. A token is sampled after each position from the last real token on; the
    # samples decide how many proposals the request keeps (see ``draft_sample_id``).
    num_draft_tokens: int = 0
    # Structured outputs: the mask key after each draft token (the state the sample after draft j
    # is limited by), like ``token_mask_key``.
    draft_mask_keys: tuple = field(default=(), compare=False, repr=False)
    # Pooling requests: "LAST", "MEAN", "CLS" or "ALL" (the runner returns this chunk's part).
    pooling: str | None = None
    # The request's LoRA adapter (a jaxllm.lora.LoRARequest), None: the base model.
    lora_request: Any = None
    # Each custom logits processor's state of the request (numpy, or None: not used); empty when
    # the engine has none (see jaxllm.logits_processor).
    logits_states: tuple = field(default=(), compare=False, repr=False)
    # vLLM's prompt_embeds: the request's float32 [num_prompt_tokens, hidden] inputs, while this
    # step computes prompt positions (their token ids are placeholders).
    prompt_embeds: Any = field(default=None, compare=False, repr=False)

    @property
    def sample_ids(self) -> tuple[str, ...]:
        """Ids that get a sampled token from this sequence's last position."""
        return (self.request_id, *self.fork_ids) if self.sample else ()

    @property
    def draft_token_ids(self) -> tuple[int, ...]:
        return self.token_ids[len(self.token_ids) - self.num_draft_tokens:]


def draft_sample_id(request_id: str, index: int) -> str:
    """The sample id of the token sampled after a sequence's ``index``-th draft token (1-based;
    the sample after its last real token has the request's own id)."""
    return f"{request_id}\x1fdraft{index}"


@dataclass(frozen=True)
class DraftJob:
    """Ask a draft model for ``num_tokens`` proposals after one request's last token ``token_id``,
    which sits at ``position`` (not yet computed); ``block_ids`` covers the positions up to
    ``position + num_tokens - 1``."""

    request_id: str
    token_id: int
    position: int
    block_ids: tuple[int, ...]
    num_tokens: int


@dataclass(frozen=True)
class SchedulerOutput:
    """What one engine step computes."""

    sequences: tuple[ScheduledSequence, ...]
    # Block copies to perform before the step (copy-on-write of a shared partial block).
    block_copies: tuple[tuple[int, int], ...] = ()  # (src block id, dst block id)
    preempted_ids: tuple[str, ...] = ()
    finished_ids: tuple[str, ...] = ()  # freed since the last step (aborted or finished)
    # Preemption by swapping, done before the step: first every swap-out, then block copies,
    # then every swap-in (a swapped-out block may be handed out again in the same step).
    swap_out: tuple[tuple[int, int], ...] = ()  # (device block id, host slot)
    swap_in: tuple[tuple[int, int], ...] = ()  # (host slot, device block id)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)

    @property
    def is_empty(self) -> bool:
        return not self.sequences


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probability of one token under the model's raw distribution, and the top ones there."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class RunnerOutput:
    """Sampled tokens keyed by sample id (a request id, or a fork child's id)."""

    sampled: dict[str, int] = field(default_factory=dict)
    # For requests that asked for logprobs: the sampled token's, keyed like ``sampled``.
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # For requests that asked for prompt_logprobs: (first position, one entry per position).
    prompt_logprobs: dict[str, tuple[int, tuple[TokenLogprobs, ...]]] = field(default_factory=dict)
    # For pooling sequences: (the chunk's first position, float32 [hidden]: the last token's hidden
    # state (LAST, on the prompt's last chunk), the first token's (CLS, on the first chunk) or the
    # sum over the chunk's tokens (MEAN); or float32 [chunk tokens, hidden]: each token's (ALL)).
    pooled: dict[str, tuple[int, Any]] = field(default_factory=dict)
