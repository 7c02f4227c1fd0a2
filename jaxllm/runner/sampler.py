"""On-device sampling of one token per sequence, every request with its own parameters.

Each row draws from its own key ``fold_in(PRNGKey(seed), num_generated)``, so a seeded
request's output does not depend on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxllm.runner.penalties import PenaltyTensors, apply_penalties

MAX_BANNED_IDS = 16


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingTensors:
    """Per-sequence sampling parameters, padded to the batch's S rows."""

    temperature: jax.Array  # [S] float32, 0 = greedy
    top_k: jax.Array  # [S] int32, <= 0 = off
    top_p: jax.Array  # [S] float32, 1 = off
    min_p: jax.Array  # [S] float32, 0 = off
    seeds: jax.Array  # [S] uint32
    steps: jax.Array  # [S] int32 tokens generated so far (folded into the key)
    # [S, MAX_BANNED_IDS] int32 ids that may not be sampled yet (min_tokens holds back eos and
    # stop tokens); padded with vocab_size, which is out of range and dropped.
    banned: jax.Array
    penalties: PenaltyTensors | None = None  # None: no penalty, bias or bad word in this program
    # [S] int32: the row of the mask table (structured outputs) that limits each row's tokens; -1 none.
    mask_rows: jax.Array | None = None
    # Per custom logits processor (jaxllm.logits_processor): (states [S, *state_shape], whether
    # each row uses it [S] bool); None when the engine has no processors.
    custom: tuple | None = None


_BISECT_STEPS = 32  # halvings of the logit range: far below float32 spacing at logit scale


def _bisect_threshold(logits, keep_above):
    """Per row, a value lo just below the smallest kept logit, found by bisection.

    ``keep_above(t) -> [S] bool`` says whether the set {x > t} already satisfies the filter; it
    must be monotone in t. XLA's sort over a 50k vocabulary is slow on CPU; 32 masked
    reductions over the rows are not.
    """
    lo = jnp.min(logits, axis=-1) - 1.0
    hi = jnp.max(logits, axis=-1)

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        ok = keep_above(mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    lo, _ = jax.lax.fori_loop(0, _BISECT_STEPS, halve, (lo, hi))
    return lo[:, None]


def _filter(logits, top_k, top_p, min_p):
    # logits [S, V] (already divided by temperature); dropped entries become -inf.
    # Order as in vLLM: top-k, then top-p on the renormalised survivors, then min-p.
    # Each bisection (32 passes over [S, V]) runs only when some row of the batch uses its filter;
    # a row without it keeps everything either way, so skipping changes no result.
    def top_k_threshold():
        k = jnp.where(top_k > 0, top_k, logits.shape[-1])
        return _bisect_threshold(logits, lambda t: jnp.sum(logits > t[:, None], axis=-1) < k)

    none_below = jnp.full((logits.shape[0], 1), -jnp.inf, logits.dtype)
    lo_k = jax.lax.cond(jnp.any(top_k > 0), top_k_threshold, lambda: none_below)
    logits = jnp.where(logits > lo_k, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)

    def top_p_keep():
        # A token stays while the mass strictly above it is below top_p.
        mass_above = lambda t: jnp.sum(jnp.where(logits > t[:, None], probs, 0.0), axis=-1)  # noqa: E731
        lo_p = _bisect_threshold(jnp.where(jnp.isfinite(logits), logits, lo_k), lambda t: mass_above(t) < top_p)
        return logits > lo_p

    keep = jax.lax.cond(jnp.any(top_p < 1.0), top_p_keep, lambda: jnp.ones(logits.shape, bool))
    keep |= top_p[:, None] >= 1.0
    keep &= probs >= min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(keep, logits, -jnp.inf)


def argmax(x: jax.Array, block: int = 256) -> jax.Array:
    """``jnp.argmax(x, axis=-1)`` (first index of the maximum), in two levels.

    XLA:CPU lowers argmax to a variadic (value, index) reduction, far slower than a plain max
    over a 50k vocabulary (``benchmarks/step_profile.py`` times both); reducing blocks of
    ``block`` with max, then taking the argmax of the block maxima and of the winning block, is
    exact, ties included (the first winning tile, then its first maximum).
    """
    *lead, V = x.shape
    if V <= block:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    pad = -V % block
    if pad:
        fill = jnp.full((*lead, pad), -jnp.inf, x.dtype)
        x = jnp.concatenate([x, fill], axis=-1)
    tiles = x.reshape(*lead, -1, block)
    best_tile = jnp.argmax(jnp.max(tiles, axis=-1), axis=-1)
    tile = jnp.take_along_axis(tiles, best_tile[..., None, None], axis=-2)[..., 0, :]
    return (best_tile * block + jnp.argmax(tile, axis=-1)).astype(jnp.int32)


def _last_positive(x: jax.Array) -> jax.Array:
    # Index of the last entry > 0 along the last axis (0 if none).
    return jnp.max(jnp.where(x > 0, jnp.arange(x.shape[-1]), 0), axis=-1)


def categorical(keys: jax.Array, logits: jax.Array, block: int = 256) -> jax.Array:
    """One draw per row from ``softmax(logits)`` [S, V] by inverse CDF, with one uniform per row.

    ``jax.random.categorical`` adds Gumbel noise to all S x V logits: ~40x the time of this
    draw for 64 rows over a 49152 vocabulary on this CPU (``benchmarks/sampler.py``). Here a row's uniform picks a tile of
    ``block`` tokens by the tiles' cumulative mass, then a token inside it by the tile's own
    cumulative sum; -inf logits have zero mass and are never drawn (float rounding at the top
    end falls back to the last token with mass).
    """
    S, V = logits.shape
    u = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(keys)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    probs = jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0))  # unnormalised
    tiles = jnp.pad(probs, ((0, 0), (0, -V % block))).reshape(S, -1, block)
    mass = jnp.sum(tiles, axis=-1)  # [S, tiles]
    cum = jnp.cumsum(mass, axis=-1)
    target = u * cum[:, -1]
    t = jnp.minimum(jnp.sum(cum <= target[:, None], axis=-1), _last_positive(mass))
    tile = jnp.take_along_axis(tiles, t[:, None, None], axis=1)[:, 0]  # [S, block]
    before = jnp.where(t > 0, jnp.take_along_axis(cum, jnp.maximum(t - 1, 0)[:, None], axis=1)[:, 0], 0.0)
    within = jnp.cumsum(tile, axis=-1)
    i = jnp.minimum(jnp.sum(within <= (target - before)[:, None], axis=-1), _last_positive(tile))
    return (t * block + i).astype(jnp.int32)


def _scaled(logits, st: SamplingTensors):
    """The distribution each drawing row draws from: its logits over its temperature, then its
    top-k / top-p / min-p (filtered entries -inf). When any row filters, the filters' bisections
    are the costliest part of sampling."""
    scaled = logits / jnp.where(st.temperature > 0, st.temperature, 1.0)[:, None]
    needs_filter = jnp.any((st.temperature > 0) & ((st.top_k > 0) | (st.top_p < 1.0) | (st.min_p > 0.0)))
    return jax.lax.cond(needs_filter, _filter, lambda x, *_: x, scaled, st.top_k, st.top_p, st.min_p)


def _categorical(scaled, st: SamplingTensors):
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.PRNGKey(s), n))(st.seeds, st.steps)
    return categorical(keys, scaled)


def _draw(logits, st: SamplingTensors):
    # Temperature, filters and a seeded categorical draw for every row (all-greedy batches skip this).
    return _categorical(_scaled(logits, st), st)


def apply_token_masks(logits: jax.Array, mask_rows: jax.Array, table: jax.Array) -> jax.Array:
    """-inf for the tokens a row's mask does not allow. ``table`` [M, ceil(V / 32)] uint32 holds
    allowed-token bitmasks (bit i % 32 of word i // 32); ``mask_rows`` [S] picks one per row, -1: none."""
    S, V = logits.shape
    words = table[jnp.maximum(mask_rows, 0)]
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    allowed = bits.reshape(S, -1)[:, :V] != 0
    return jnp.where((mask_rows[:, None] < 0) | allowed, logits, -jnp.inf)


def sample(logits: jax.Array, st: SamplingTensors, mask_table: jax.Array | None = None,
           processors: tuple = (), processed: bool = False):
    """logits [S, V] float32 -> token ids [S] int32 (``mask_table``: see :func:`apply_token_masks`;
    ``processors``: the engine's custom logits processors, whose inputs are ``st.custom``).

    With ``processed``, (token ids, the processed logits [S, V]): what each row's token was chosen
    from, after masks, processors, penalties and min_tokens, and for drawing rows also temperature
    and the top-k / top-p / min-p filters (vLLM's ``logprobs_mode="processed_..."``); the same tokens."""
    rows = jnp.arange(logits.shape[0])[:, None]
    if mask_table is not None and st.mask_rows is not None:
        logits = jax.lax.cond(jnp.any(st.mask_rows >= 0), apply_token_masks, lambda x, *_: x,
                              logits, st.mask_rows, mask_table)
    for processor, (states, used) in zip(processors, st.custom or (), strict=True):
        logits = apply_processor(processor, logits, states, used, st.temperature)
    if st.penalties is not None:
        logits = apply_penalties(logits, st.penalties)
    logits = logits.at[rows, st.banned].set(-jnp.inf, mode="drop")
    greedy = argmax(logits)
    drawing = st.temperature > 0
    if not processed:
        drawn = jax.lax.cond(jnp.any(drawing), _draw, lambda *_: greedy, logits, st)
        return jnp.where(drawing, drawn, greedy)
    scaled = jnp.where(drawing[:, None], _scaled(logits, st), logits)
    drawn = jax.lax.cond(jnp.any(drawing), _categorical, lambda *_: greedy, scaled, st)
    return jnp.where(drawing, drawn, greedy), scaled


def apply_processor(processor, logits: jax.Array, states: jax.Array, used: jax.Array,
                    temperature: jax.Array) -> jax.Array:
    """A custom logits processor on the rows that use it (an argmax-invariant one: only on the
    rows that draw); the other rows keep their logits, and no row using it skips it altogether."""
    if processor.is_argmax_invariant():
        used = used & (temperature > 0)

    def run(x):
        out = processor.apply(x, states)
        if out.shape != x.shape:
            raise ValueError(f"logits processor {processor.name}: apply returned shape {out.shape}, not {x.shape}")
        return jnp.where(used[:, None], out.astype(x.dtype), x)

    return jax.lax.cond(jnp.any(used), run, lambda x: x, logits)
