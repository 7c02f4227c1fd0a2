"""Log-probabilities on device: of sampled tokens, of prompt tokens, and the top-k of each.

Values are those of the model's raw distribution (log_softmax of the logits, before temperature
or filters), as vLLM returns by default and as transformers' ``log_softmax`` gives; the engine's
``logprobs_mode`` (vLLM's) may ask for the processed distribution, or logits. Both are
computed under ``lax.cond`` so a step with no request asking for them pays nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.engine.messages import TokenLogprobs

MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit; vLLM's default max_logprobs
# Prompt logprobs take the step's tokens this many rows at a time: the [rows, V] logits and their
# log_softmax exist for one chunk, not for the whole bucket (at 8192 tokens and a 128k vocabulary,
# 4 GB per array).
PROMPT_LOGPROBS_CHUNK = 256


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Logprobs:
    """For each of R rows: a target token's logprob and rank, and the top MAX_LOGPROBS."""

    token_logprob: jax.Array  # [R] float32
    token_rank: jax.Array  # [R] int32, 1-based
    top_ids: jax.Array  # [R, MAX_LOGPROBS] int32
    top_logprobs: jax.Array  # [R, MAX_LOGPROBS] float32


# vLLM's logprobs_mode: what the logprobs of sampled tokens are. "raw_*": of the model's logits;
# "processed_*": of what the token was chosen from (see sampler.sample); "*_logits": the logits
# themselves instead of their log_softmax (ranks are the same).
LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")


def _compute(logits, targets, as_logits: bool = False) -> Logprobs:
    # logits [R, V] float32; targets [R] int32 (out-of-range targets give garbage, ignored by host).
    lp = logits if as_logits else jax.nn.log_softmax(logits, axis=-1)
    target_lp = jnp.take_along_axis(lp, jnp.clip(targets, 0, lp.shape[-1] - 1)[:, None], axis=-1)
    rank = 1 + jnp.sum(lp > target_lp, axis=-1, dtype=jnp.int32)
    top_lp, top_ids = jax.lax.top_k(lp, MAX_LOGPROBS)
    return Logprobs(target_lp[:, 0], rank, top_ids.astype(jnp.int32), top_lp)


def _empty(logits, targets) -> Logprobs:
    rows = logits.shape[0]
    return Logprobs(
        jnp.zeros(rows, jnp.float32), jnp.zeros(rows, jnp.int32),
        jnp.zeros((rows, MAX_LOGPROBS), jnp.int32), jnp.zeros((rows, MAX_LOGPROBS), jnp.float32),
    )


def logprobs_if(wanted: jax.Array, logits: jax.Array, targets: jax.Array, as_logits: bool = False) -> Logprobs:
    """``_compute`` when the scalar ``wanted`` is true, zeros otherwise (no recompile either way)."""
    return jax.lax.cond(wanted, functools.partial(_compute, as_logits=as_logits), _empty, logits, targets)


def prompt_logprobs_if(wanted: jax.Array, logits_fn, hidden: jax.Array, targets: jax.Array,
                       as_logits: bool = False) -> Logprobs:
    """Logprobs of every token's successor: hidden [T, D] -> logits_fn -> [T, V], only if wanted,
    :data:`PROMPT_LOGPROBS_CHUNK` rows at a time (a row's values do not depend on the chunking).
    ``as_logits``: the logits instead (logprobs_mode "*_logits"; prompt positions have no
    processing, so "processed" and "raw" are the same there)."""
    compute_one = functools.partial(_compute, as_logits=as_logits)

    def compute(hidden, targets):
        T = hidden.shape[0]
        if T <= PROMPT_LOGPROBS_CHUNK:
            return compute_one(logits_fn(hidden), targets)
        n = -(-T // PROMPT_LOGPROBS_CHUNK)
        pad = n * PROMPT_LOGPROBS_CHUNK - T
        chunks = (jnp.pad(hidden, ((0, pad), (0, 0))).reshape(n, PROMPT_LOGPROBS_CHUNK, -1),
                  jnp.pad(targets, (0, pad)).reshape(n, PROMPT_LOGPROBS_CHUNK))
        out = jax.lax.map(lambda c: compute_one(logits_fn(c[0]), c[1]), chunks)
        return jax.tree.map(lambda x: x.reshape(n * PROMPT_LOGPROBS_CHUNK, *x.shape[2:])[:T], out)

    def empty(hidden, targets):
        return _empty(hidden, targets)

    return jax.lax.cond(wanted, compute, empty, hidden, targets)


def _entry(lp: dict, i: int, k: int, token_id: int) -> TokenLogprobs:
    top = tuple(zip(lp["top_ids"][i, :k].tolist(), lp["top_logprobs"][i, :k].tolist(), strict=True))
    return TokenLogprobs(token_id, float(lp["token_logprob"][i]), int(lp["token_rank"][i]), top)


def _to_host(lp: Logprobs) -> dict:
    return {k: np.asarray(v) for k, v in vars(lp).items()}


def host_sample_logprobs(rows, lp: Logprobs, token_ids: np.ndarray) -> dict[str, TokenLogprobs]:
    """Per sample id that asked for them: the sampled token's logprob, rank and top-k."""
    host = _to_host(lp)
    return {
        row.sample_id: _entry(host, i, row.sequence.logprobs, int(token_ids[i]))
        for i, row in enumerate(rows)
        if row.sequence.logprobs is not None
    }


def host_prompt_logprobs(sched, lp: Logprobs) -> dict[str, tuple[int, tuple[TokenLogprobs, ...]]]:
    """Per request that asked: (first prompt position covered, entries for each position).

    Flat index j predicts the token at position start + j + 1; only prompt positions count.
    """
    host = _to_host(lp)
    out, start = {}, 0
    for seq in sched.sequences:
        n = len(seq.token_ids)
        k = seq.prompt_logprobs
        last = min(seq.start_pos + n, seq.num_prompt_tokens - 1)  # positions predicted: start+1 .. last
        if k is not None and last > seq.start_pos:
            following = (*seq.token_ids[1:], seq.following_token_id)
            entries = tuple(_entry(host, start + j, k, following[j]) for j in range(last - seq.start_pos))
            out[seq.request_id] = (seq.start_pos + 1, entries)
        start += n
    return out
