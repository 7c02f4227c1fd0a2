"""Flash-decoding over the paged pool: one new token per sequence, long contexts split across programs.

Pool layout and the layer-folded page view are those of ragged_paged_attention.py. When every
sequence of a batch brings one token, a query tile holds only the G heads of one token, so the
ragged kernel's grid of ``S * K`` programs each walking a whole context leaves most of a GPU idle
at small batch sizes. Here the grid is ``(sequence, kv head, split)``: split p walks pages
``[p * pages_per_split, (p + 1) * pages_per_split)`` of the block table with an online softmax and
writes an unnormalised partial result plus its running max and sum; a log-sum-exp merge in jnp
combines the splits (``num_splits * S * N * H`` floats, small next to the keys read). The G heads
are padded to 16 rows for Triton's smallest dot; the padding rows are zero queries, discarded.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.ragged_paged_attention import (
    fold_layer,
    load_pages,
    ragged_paged_attention_reference,
    validate_ragged_inputs,
    validate_scales,
)

_M_INIT = -1e30
_MIN_DOT_ROWS = 16


@dataclasses.dataclass(frozen=True)
class DecodeAttentionConfig:
    """Tuning knobs of the split-K decode kernel (reasoned defaults, not yet measured on a GPU)."""

    pages_per_compute_block: int = 4  # pages gathered per step of the key loop
    max_splits: int = 16  # most programs one sequence's context is split over
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("pages_per_compute_block", "max_splits"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name}={value} must be a positive power of two")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"{self.num_warps=} and {self.num_stages=} must be positive")

    def splits(self, blocks_per_seq: int) -> tuple[int, int]:
        """(number of splits, pages per split) for block tables ``blocks_per_seq`` wide."""
        steps = pl.cdiv(blocks_per_seq, self.pages_per_compute_block)
        num_splits = min(self.max_splits, steps)
        return num_splits, pl.cdiv(steps, num_splits) * self.pages_per_compute_block


def _decode_kernel(
    q_ref,  # [Gp, H] the sequence's last token, G heads of this kv head (zero-padded rows)
    tables_ref,  # [S, Bp] int32 page ids (layer folded in)
    kv_lens_ref,  # [S] int32
    k_ref,  # [L * num_blocks, block_size, H] (one kv head)
    v_ref,  # [L * num_blocks, block_size, H]
    *refs,  # quantised pool: k_scale_ref, v_scale_ref [L * num_blocks, block_size] float32; then:
    # o_ref [Gp, H] float32 unnormalised partial output of this split,
    # m_ref [Gp] float32 running max (log2 units), l_ref [Gp] float32 running sum
    pages_per_step: int,
    pages_per_split: int,
    sm_scale: float,
    window: int | None,
):
    scale_refs, (o_ref, m_ref, l_ref) = refs[:-3], refs[-3:]
    seq, split = pl.program_id(0), pl.program_id(2)
    rows, head_dim = q_ref.shape
    block_k = pages_per_step * k_ref.shape[1]
    kv_len = kv_lens_ref[seq]
    query_pos = kv_len - 1
    split_keys = pages_per_split * k_ref.shape[1]
    lo = split * split_keys
    if window is not None:
        lo = jnp.maximum(lo, query_pos - window + 1)
    hi = jnp.minimum(kv_len, (split + 1) * split_keys)
    q = q_ref[...]

    def body(step, carry):
        acc, m, l = carry
        pages = tables_ref[seq, pl.ds(step * pages_per_step, pages_per_step)]
        key_pos = step * block_k + jnp.arange(block_k)
        k, k_scale, v = load_pages(k_ref, v_ref, scale_refs, pages, key_pos < kv_len, q.dtype)
        visible = (key_pos < kv_len) & (key_pos >= lo)
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * (sm_scale * math.log2(math.e))
        s = jnp.where(visible[None, :], s if k_scale is None else s * k_scale[None, :], -jnp.inf)
        m_next = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp2(s - m_next[:, None])
        alpha = jnp.exp2(m - m_next)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_next, l * alpha + p.sum(axis=1)

    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), _M_INIT, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(lo // block_k, pl.cdiv(hi, block_k), body, init)
    o_ref[...], m_ref[...], l_ref[...] = acc, m, l


def _build_decode_call(q_shape, pool_shape, num_splits, pages_per_split, *, quantized, config, sm_scale, window,
                       interpret):
    num_seqs, num_kv_heads, rows, head_dim = q_shape
    pages, page_size = pool_shape[:2]
    kernel = functools.partial(_decode_kernel, pages_per_step=config.pages_per_compute_block,
                               pages_per_split=pages_per_split, sm_scale=sm_scale, window=window)
    per_head_kv = pl.BlockSpec((pages, page_size, None, head_dim), lambda s, h, p: (0, 0, h, 0))
    per_head_scale = pl.BlockSpec((pages, page_size, None), lambda s, h, p: (0, 0, h))
    partial_shape = (num_splits, num_seqs, num_kv_heads, rows)
    return pl.pallas_call(
        kernel,
        grid=(num_seqs, num_kv_heads, num_splits),
        in_specs=[
            pl.BlockSpec((None, None, rows, head_dim), lambda s, h, p: (s, h, 0, 0)),
            pl.no_block_spec, pl.no_block_spec,  # block tables, kv_lens: whole, indexed in the kernel
            per_head_kv, per_head_kv, *([per_head_scale] * 2 if quantized else []),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda s, h, p: (p, s, h, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda s, h, p: (p, s, h, 0)),
            pl.BlockSpec((None, None, None, rows), lambda s, h, p: (p, s, h, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct(partial_shape, jnp.float32),
                   jax.ShapeDtypeStruct(partial_shape, jnp.float32)],
        compiler_params=plt.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )


def merge_splits(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Log-sum-exp merge of partial results o [P, ..., H], m, l [P, ...] (log2 units) -> [..., H]."""
    weight = jnp.exp2(m - m.max(axis=0))
    total = (weight * l).sum(axis=0)
    out = (weight[..., None] * o).sum(axis=0)
    return out / jnp.where(total == 0, 1.0, total)[..., None]


@functools.partial(jax.jit, static_argnames=("sliding_window", "config", "interpret"))
def paged_decode_attention(
    q: jax.Array,  # [S, N, H]
    k_pool: jax.Array,  # [L, num_blocks, block_size, K, H]
    v_pool: jax.Array,  # [L, num_blocks, block_size, K, H]
    layer: jax.Array,  # [] int32
    block_tables: jax.Array,  # [S, B] int32
    kv_lens: jax.Array,  # [S] int32
    *,
    k_scale: jax.Array | None = None,  # [L, num_blocks, block_size, K] float32
    v_scale: jax.Array | None = None,  # [L, num_blocks, block_size, K] float32
    sliding_window: int | None = None,
    config: DecodeAttentionConfig = DecodeAttentionConfig(),
    interpret: bool = False,
) -> jax.Array:
    """Attention of each sequence's newest token (at position kv_len - 1) over its paged context.

    Args:
      q: one query token per sequence.
      k_pool, v_pool: the whole pool, the new tokens' K/V already written.
      k_scale, v_scale: for a quantised (fp8/int8) pool, the scale of each token and kv head:
        keys are ``k_pool * k_scale[..., None]``; both or neither.
      layer: which layer of the pool to read.
      block_tables: physical block ids of each sequence.
      kv_lens: keys of each sequence, its new token included; a row with 0 gets zeros.
      sliding_window: keys at positions ``<= kv_len - 1 - sliding_window`` are not seen.
      config: split and launch parameters.
      interpret: run in Pallas interpret mode (CPU).

    Returns:
      ``[S, N, H]`` in q's dtype.
    """
    num_seqs, num_heads, head_dim = q.shape
    cu = jnp.arange(num_seqs + 1, dtype=jnp.int32)
    validate_ragged_inputs(q, k_pool, v_pool, block_tables, cu, kv_lens, kv_lens, sliding_window)
    scales = validate_scales(k_pool, k_scale, v_scale)
    num_layers, num_blocks, page_size, num_kv_heads, _ = k_pool.shape
    group = num_heads // num_kv_heads
    rows = max(group, _MIN_DOT_ROWS)
    q4 = q.reshape(num_seqs, num_kv_heads, group, head_dim)
    q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    num_splits, pages_per_split = config.splits(block_tables.shape[1])
    tables = fold_layer(block_tables, layer, num_blocks, num_splits * pages_per_split)
    pool_shape = (num_layers * num_blocks, page_size, num_kv_heads, head_dim)
    call = _build_decode_call(q4.shape, pool_shape, num_splits, pages_per_split, quantized=bool(scales),
                              config=config, sm_scale=head_dim**-0.5, window=sliding_window, interpret=interpret)
    o, m, l = call(q4, tables, kv_lens, k_pool.reshape(pool_shape), v_pool.reshape(pool_shape),
                   *(x.reshape(pool_shape[:3]) for x in scales))
    out = merge_splits(o, m, l)[:, :, :group]  # [S, K, G, H]
    return out.reshape(num_seqs, num_heads, head_dim).astype(q.dtype)


def paged_decode_attention_reference(q, k_pool, v_pool, layer, block_tables, kv_lens, *, sliding_window=None):
    """Plain jnp: the ragged reference with one token per sequence at position kv_len - 1."""
    cu = jnp.arange(q.shape[0] + 1, dtype=jnp.int32)
    return ragged_paged_attention_reference(q, k_pool, v_pool, layer, block_tables, cu, kv_lens,
                                            jnp.maximum(kv_lens - 1, 0), sliding_window=sliding_window)
