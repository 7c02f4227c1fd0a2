"""Penalties, logit bias, bad words and allowed token ids, applied on device per sampling row
before temperature.

Semantics are vLLM's: allowed token ids (every other logit -inf), bad words and logit bias first, then repetition (prompt and output tokens:
positive logits divided by r, the others multiplied), frequency and presence (output tokens only:
``logits -= frequency * count + presence * (count > 0)``).

Axes: S sampling rows, V vocabulary, W history positions, N bad-word sequences, L their tokens.

Why a token history [S, W] and not a host-built count table [S, V]: W is the step's block bucket
times block_size (a sampling row's sequence always fits its block table), so it adds no compiled
shapes, and it is far narrower than V (SmolLM2: V = 49152, W <= max_model_len). The host copies
each penalised row from a per-request buffer that grows by appending (see
``jaxllm.engine.token_history``); the device turns it into counts with one scatter-add.

Measured at SmolLM2's V = 49152 on the 2-core CPU dev box (busy; medians of 50): with S = 16,
W = 256 (71 kB of tables per step) the host build takes 0.01 ms (0.04 ms with every row
penalised) and the device adds 0.9 ms over a bare argmax of the logits when no row uses any of
this (the ``lax.cond`` pass-through), 1.3 ms with one penalised row and 1.8 ms with all rows
using penalties, bias and bad words. At S = 256, W = 2048 the tables are 3 MB and build in 1 ms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.engine.messages import (
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORD_TOKENS,
    MAX_BAD_WORDS,
    MAX_LOGIT_BIAS,
    ScheduledSequence,
)

NO_PREFIX = -1  # a bad-word prefix slot that matches anything (shorter words are right-aligned)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PenaltyTensors:
    """Per-row penalty parameters; ids equal to V are out of range and dropped."""

    history: jax.Array  # [S, W] int32 prompt + output ids, padded with V (rows without penalties: all V)
    num_prompt: jax.Array  # [S] int32 positions below this are prompt tokens
    num_tokens: jax.Array  # [S] int32 prompt + output tokens in the history
    presence: jax.Array  # [S] float32, 0 = off
    frequency: jax.Array  # [S] float32, 0 = off
    repetition: jax.Array  # [S] float32, 1 = off
    bias_ids: jax.Array  # [S, MAX_LOGIT_BIAS] int32
    bias_values: jax.Array  # [S, MAX_LOGIT_BIAS] float32
    # [S, N, L] int32 token sequences right-aligned, NO_PREFIX on the left; unused ones end in V.
    bad_words: jax.Array
    allowed: jax.Array  # [S, MAX_ALLOWED_TOKEN_IDS] int32 padded with V; a row starting with V allows all


def apply_penalties(logits: jax.Array, pt: PenaltyTensors) -> jax.Array:
    """logits [S, V] float32 -> logits [S, V] with allowed ids, bad words, bias and penalties applied.

    Each part runs only when some row uses it (``lax.cond``), so a batch without any costs
    three small reductions; only the allowed-ids part builds an [S, V] mask.
    """
    V = logits.shape[-1]
    logits = jax.lax.cond(jnp.any(pt.allowed[:, 0] < V), _allowed_only, lambda x, _: x, logits, pt)
    sparse = jnp.any(pt.bias_ids < V) | jnp.any(pt.bad_words[:, :, -1] < V)
    logits = jax.lax.cond(sparse, _bias_and_bad_words, lambda x, _: x, logits, pt)
    penalised = jnp.any((pt.presence != 0.0) | (pt.frequency != 0.0) | (pt.repetition != 1.0))
    return jax.lax.cond(penalised, _history_penalties, lambda x, _: x, logits, pt)


def _allowed_only(logits: jax.Array, pt: PenaltyTensors) -> jax.Array:
    """-inf for every id a row with an allowed list does not list (rows without one: untouched)."""
    S, V = logits.shape
    listed = jnp.zeros((S, V), jnp.bool_).at[jnp.arange(S)[:, None], pt.allowed].set(True, mode="drop")
    return jnp.where((pt.allowed[:, :1] < V) & ~listed, -jnp.inf, logits)


def _bias_and_bad_words(logits: jax.Array, pt: PenaltyTensors) -> jax.Array:
    rows = jnp.arange(logits.shape[0])[:, None]
    logits = logits.at[rows, _banned_last_tokens(pt)].set(-jnp.inf, mode="drop")
    return logits.at[rows, pt.bias_ids].add(pt.bias_values, mode="drop")


def _banned_last_tokens(pt: PenaltyTensors) -> jax.Array:
    """[S, N]: each bad word's last token where the outputs end in the rest of it, else V."""
    L = pt.bad_words.shape[-1]
    pos = pt.num_tokens[:, None] - (L - 1) + jnp.arange(L - 1)[None, :]  # [S, L-1]
    prev = jnp.take_along_axis(pt.history, jnp.clip(pos, 0, pt.history.shape[1] - 1), axis=1)
    is_output = pos >= pt.num_prompt[:, None]
    prefix = pt.bad_words[:, :, :-1]  # [S, N, L-1]
    match = (prefix == NO_PREFIX) | ((prefix == prev[:, None, :]) & is_output[:, None, :])
    out_of_range = jnp.iinfo(jnp.int32).max  # dropped by the caller's scatter
    return jnp.where(jnp.all(match, axis=-1), pt.bad_words[:, :, -1], out_of_range)


def _history_penalties(logits: jax.Array, pt: PenaltyTensors) -> jax.Array:
    S, V = logits.shape
    rows = jnp.arange(S)[:, None]
    pos = jnp.arange(pt.history.shape[1])[None, :]
    is_output = (pos >= pt.num_prompt[:, None]) & (pos < pt.num_tokens[:, None])
    counts = jnp.zeros((S, V), jnp.int32).at[rows, pt.history].add(is_output.astype(jnp.int32), mode="drop")
    seen = jnp.zeros((S, V), jnp.bool_).at[rows, pt.history].set(True, mode="drop")
    r = pt.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    return logits - pt.frequency[:, None] * counts - pt.presence[:, None] * (counts > 0)


def penalty_tensors(seqs: Sequence[ScheduledSequence], S: int, W: int, vocab_size: int,
                    drafts_before: Sequence[int] | None = None) -> PenaltyTensors:
    """Numpy tensors for sampling rows ``seqs`` (one per row, a sequence repeated for its forks
    and its speculative drafts). ``drafts_before[i]``: how many of the sequence's draft tokens row
    i samples after; they extend its token history, as they would be outputs by then."""
    history = np.full((S, W), vocab_size, np.int32)
    num_prompt, num_tokens = np.zeros(S, np.int32), np.zeros(S, np.int32)
    presence, frequency, repetition = np.zeros(S, np.float32), np.zeros(S, np.float32), np.ones(S, np.float32)
    bias_ids = np.full((S, MAX_LOGIT_BIAS), vocab_size, np.int32)
    bias_values = np.zeros((S, MAX_LOGIT_BIAS), np.float32)
    bad_words = np.full((S, MAX_BAD_WORDS, MAX_BAD_WORD_TOKENS), NO_PREFIX, np.int32)
    bad_words[:, :, -1] = vocab_size
    allowed = np.full((S, MAX_ALLOWED_TOKEN_IDS), vocab_size, np.int32)
    for i, s in enumerate(seqs):
        o = s.sampling
        presence[i], frequency[i], repetition[i] = o.presence_penalty, o.frequency_penalty, o.repetition_penalty
        if s.token_history is not None:
            n = len(s.token_history)
            history[i, :n], num_tokens[i], num_prompt[i] = s.token_history, n, s.num_prompt_tokens
            extra = drafts_before[i] if drafts_before is not None else 0
            if extra:
                history[i, n : n + extra] = s.draft_token_ids[:extra]
                num_tokens[i] = n + extra
        if o.logit_bias:
            ids, values = zip(*o.logit_bias, strict=True)
            bias_ids[i, : len(ids)], bias_values[i, : len(ids)] = ids, values
        for j, word in enumerate(o.bad_words_token_ids):
            bad_words[i, j, MAX_BAD_WORD_TOKENS - len(word) :] = word
        allowed[i, : len(o.allowed_token_ids)] = o.allowed_token_ids
    return PenaltyTensors(history, num_prompt, num_tokens, presence, frequency, repetition,
                          bias_ids, bias_values, bad_words, allowed)
