"""Ragged paged attention for the flat mixed batch, on Pallas's Triton backend.

The batch is flat over tokens: prefill chunks and decode tokens of many sequences lie one after
another, sequence s owning tokens ``cu_q_lens[s]:cu_q_lens[s + 1]``. Each token attends causally
(and within ``sliding_window`` when set) over its own sequence's keys, read from the paged pool.

KV pool layout ``k, v: [L, num_blocks, block_size, K, H]`` (the engine's, see
jaxllm/models/attention.py). The kernel folds the layer into the page index by viewing the pool
as ``[L * num_blocks, block_size, K, H]`` (a free reshape), so a program reads a page of one kv
head as ``block_size`` rows of H contiguous elements, strided by ``K * H``. Token-major pages keep
the engine's write (one scatter of ``[T, K, H]`` rows, in place under donation) a contiguous row
store; a head-major layout (``[L, K, num_blocks, block_size, H]``) would make each page of a head
one contiguous run, which matters for TMA (see the Mosaic GPU kernel) but for Triton's gathered
loads of 128-256 byte rows it is the same number of full memory transactions. The engine's default
``block_size`` is 16; a compute block gathers ``pages_per_compute_block`` pages, so the kernel's key
tile is 64-128 keys at any page size, which is why 16 is kept (least waste per sequence, and
prefix-cache hits at 16-token granularity). None of this has been measured on a GPU: none was
available when it was written; benchmarks/attention.py is the sweep to run.

Design: the grid is ``(query tile, kv head)``. A query tile is ``block_q`` consecutive tokens of ONE
sequence times the G query heads sharing kv head k, so a tile is a ``[block_q * G, H]`` matrix and
GQA reuses every key load G times. The tile -> (sequence, first token, valid rows) map is computed
on device from ``cu_q_lens`` (a searchsorted over per-sequence tile counts) and passed as an input,
because the Triton lowering has no scalar prefetch. Each program loops over its sequence's pages,
``pages_per_compute_block`` at a time, gathering them through the block table with computed
pointers (``k_ref[page_ids]``) and keeping an online softmax (flash attention); the loop runs only
over the pages the tile's positions can see (causal upper bound, sliding-window lower bound).
Output rows no tile covers (the batch's padding tokens) are zero. Compiled for a GPU, Triton needs
power-of-two tile shapes, so head_dim must be a power of two there (interpret mode takes any).

Quantised pools (fp8 e4m3 / int8 with a float32 scale per token and kv head, see
jaxllm/models/kv_quant.py): the scales ``[L * num_blocks, block_size]`` of the program's kv head
are gathered with the pages (``load_pages``): keys are cast to q's dtype and their scales multiply
the float32 scores' columns; values are dequantised to q's dtype before the PV dot.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jaxllm.models.kv_quant import unpack

# Finite start for the running max: a row that sees no key keeps l = 0 instead of exp(-inf + inf).
_M_INIT = -1e30


@dataclasses.dataclass(frozen=True)
class RaggedAttentionConfig:
    """Tuning knobs of the ragged kernel (defaults are reasoned, not yet measured on a GPU)."""

    block_q_rows: int = 64  # query rows per tile (block_q tokens x G heads); tl.dot needs >= 16
    pages_per_compute_block: int = 4  # pages gathered per step of the key loop
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q_rows", "pages_per_compute_block"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name}={value} must be a positive power of two")
        if self.block_q_rows < 16:
            raise ValueError(f"block_q_rows={self.block_q_rows} must be >= 16 (Triton's smallest dot)")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"{self.num_warps=} and {self.num_stages=} must be positive")

    def block_q(self, group: int) -> int:
        """Tokens per tile for G = ``group`` query heads per kv head (at least one)."""
        return max(1, self.block_q_rows // group)


def _ragged_kernel(
    tiles_ref,  # [4] int32: sequence, first token, valid rows, first loaded token
    tables_ref,  # [S, Bp] int32 page ids (layer already folded in)
    kv_lens_ref,  # [S] int32
    positions_ref,  # [T] int32
    q_ref,  # [T, G, H]
    k_ref,  # [L * num_blocks, block_size, H] (one kv head)
    v_ref,  # [L * num_blocks, block_size, H]
    *refs,  # quantised pool: k_scale_ref, v_scale_ref [L * num_blocks, block_size] float32; then:
    # _zeros_ref [T, G, H] aliased to o_ref, o_ref [T, G, H]
    block_q: int,
    pages_per_step: int,
    sm_scale: float,
    window: int | None,
):
    scale_refs, o_ref = refs[:-2], refs[-1]
    group, head_dim = q_ref.shape[1:]
    page_size = k_ref.shape[1]
    block_k = pages_per_step * page_size
    seq, first, valid, load_at = tiles_ref[0], tiles_ref[1], tiles_ref[2], tiles_ref[3]
    kv_len = kv_lens_ref[seq]

    tokens = load_at + jnp.arange(block_q)  # [bq] flat token index of each loaded row
    row_ok = (tokens >= first) & (tokens < first + valid)
    pos = jnp.where(row_ok, positions_ref[pl.ds(load_at, block_q)], -1)  # -1: sees nothing
    pos = jnp.broadcast_to(pos[:, None], (block_q, group)).reshape(block_q * group)
    q = q_ref[pl.ds(load_at, block_q)].reshape(block_q * group, head_dim)

    last_pos = positions_ref[jnp.maximum(first + valid - 1, 0)]
    hi = jnp.where(valid > 0, jnp.minimum(kv_len, last_pos + 1), 0)
    lo = 0 if window is None else jnp.maximum(positions_ref[first] - window + 1, 0)

    def body(step, carry):
        acc, m, l = carry
        pages = tables_ref[seq, pl.ds(step * pages_per_step, pages_per_step)]
        key_pos = step * block_k + jnp.arange(block_k)
        written = key_pos < kv_len
        k, k_scale, v = load_pages(k_ref, v_ref, scale_refs, pages, written, q.dtype)
        visible = (key_pos[None, :] <= pos[:, None]) & written[None, :]
        if window is not None:
            visible &= key_pos[None, :] > pos[:, None] - window
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * (sm_scale * math.log2(math.e))
        s = jnp.where(visible, s if k_scale is None else s * k_scale[None, :], -jnp.inf)
        m_next = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp2(s - m_next[:, None])
        alpha = jnp.exp2(m - m_next)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_next, l * alpha + p.sum(axis=1)

    rows = block_q * group
    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), _M_INIT, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, _, l = jax.lax.fori_loop(lo // block_k, pl.cdiv(hi, block_k), body, init)
    out = (acc / jnp.where(l == 0, 1.0, l)[:, None]).astype(o_ref.dtype)
    store_ok = jnp.broadcast_to(row_ok[:, None, None], (block_q, group, head_dim))
    plt.store(o_ref.at[pl.ds(load_at, block_q)], out.reshape(block_q, group, head_dim), mask=store_ok)


def load_pages(k_ref, v_ref, scale_refs, pages, written, dtype):
    """Keys [block_k, H], their scales [block_k] (None for an unquantised pool), values [block_k, H].

    A quantised pool's one-byte keys (fp8 as uint8 bits: bitcast first, see
    jaxllm/models/kv_quant.py) are cast to ``dtype`` (exact: e4m3 and int8 fit bf16) and
    their scales returned to multiply the float32 scores' columns. Values are dequantised here, in
    float32 then ``dtype``: folding their scales into the probabilities instead could underflow
    float16 (p * scale). Either costs ``block_k * H`` multiplies per page, small next to the
    ``rows * block_k * H`` of each dot. Unwritten slots may hold NaN (values and scales alike) and
    0 * NaN = NaN, so their values are zeroed after dequantising.
    """
    block_k, head_dim = written.shape[0], k_ref.shape[-1]
    k = k_ref[pages].reshape(block_k, head_dim)
    v = v_ref[pages].reshape(block_k, head_dim)
    if not scale_refs:
        return k, None, jnp.where(written[:, None], v, 0)
    k_scale_ref, v_scale_ref = scale_refs
    k = unpack(k).astype(dtype)
    v = unpack(v).astype(jnp.float32) * v_scale_ref[pages].reshape(block_k)[:, None]
    return k, k_scale_ref[pages].reshape(block_k), jnp.where(written[:, None], v, 0).astype(dtype)


def query_tiles(cu_q_lens: jax.Array, num_tokens: int, block_q: int) -> jax.Array:
    """Map each query tile to ``[sequence, first token, valid rows, first loaded token]``.

    Sequence s has ``cdiv(q_len_s, block_q)`` tiles; the static count ``num_tokens // block_q + S``
    bounds their sum. Spare tiles get 0 valid rows. A tile loads ``block_q`` rows from
    ``min(first, T - block_q)`` so it never reads past the batch; rows outside
    ``[first, first + valid)`` are masked.
    """
    num_seqs = cu_q_lens.shape[0] - 1
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    tiles_per_seq = pl.cdiv(q_lens, block_q)
    ends = jnp.cumsum(tiles_per_seq)
    tile = jnp.arange(num_tokens // block_q + num_seqs)
    seq = jnp.minimum(jnp.searchsorted(ends, tile, side="right"), num_seqs - 1)
    within = tile - (ends[seq] - tiles_per_seq[seq])
    valid = jnp.clip(q_lens[seq] - within * block_q, 0, block_q)
    first = jnp.where(valid > 0, cu_q_lens[seq] + within * block_q, 0)
    load_at = jnp.clip(first, 0, num_tokens - block_q)
    return jnp.stack([seq, first, valid, load_at], axis=1).astype(jnp.int32)


def _build_ragged_call(q_shape, pool_shape, num_tiles, dtype, *, quantized, config, sm_scale, window, interpret):
    num_tokens, num_kv_heads, group, head_dim = q_shape
    pages, page_size = pool_shape[:2]
    block_q = config.block_q(group)
    kernel = functools.partial(_ragged_kernel, block_q=block_q, pages_per_step=config.pages_per_compute_block,
                               sm_scale=sm_scale, window=window)
    per_head_q = pl.BlockSpec((num_tokens, None, group, head_dim), lambda i, h: (0, h, 0, 0))
    per_head_kv = pl.BlockSpec((pages, page_size, None, head_dim), lambda i, h: (0, 0, h, 0))
    per_head_scale = pl.BlockSpec((pages, page_size, None), lambda i, h: (0, 0, h))
    scale_specs = [per_head_scale] * 2 if quantized else []
    return pl.pallas_call(
        kernel,
        grid=(num_tiles, num_kv_heads),
        in_specs=[
            pl.BlockSpec((None, 4), lambda i, h: (i, 0)),
            *[pl.no_block_spec] * 3,  # block tables, kv_lens, positions: whole, indexed in the kernel
            per_head_q, per_head_kv, per_head_kv, *scale_specs, per_head_q,
        ],
        out_specs=per_head_q,
        out_shape=jax.ShapeDtypeStruct(q_shape, dtype),
        input_output_aliases={7 + len(scale_specs): 0},
        compiler_params=plt.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )


@functools.partial(jax.jit, static_argnames=("sliding_window", "config", "interpret"))
def ragged_paged_attention(
    q: jax.Array,  # [T, N, H]
    k_pool: jax.Array,  # [L, num_blocks, block_size, K, H]
    v_pool: jax.Array,  # [L, num_blocks, block_size, K, H]
    layer: jax.Array,  # [] int32
    block_tables: jax.Array,  # [S, B] int32
    cu_q_lens: jax.Array,  # [S + 1] int32
    kv_lens: jax.Array,  # [S] int32
    positions: jax.Array,  # [T] int32
    *,
    k_scale: jax.Array | None = None,  # [L, num_blocks, block_size, K] float32
    v_scale: jax.Array | None = None,  # [L, num_blocks, block_size, K] float32
    sliding_window: int | None = None,
    config: RaggedAttentionConfig = RaggedAttentionConfig(),
    interpret: bool = False,
) -> jax.Array:
    """Causal attention of a flat ragged batch over ``layer`` of a paged KV pool.

    Args:
      q: queries of every token, sequences back to back as ``cu_q_lens`` says.
      k_pool, v_pool: the whole pool; the new tokens' K/V must already be written.
      k_scale, v_scale: for a quantised (fp8/int8) pool, the scale of each token and kv head:
        keys are ``k_pool * k_scale[..., None]``; both or neither.
      layer: which layer of the pool to read.
      block_tables: physical block ids of each sequence's positions ``[i * block_size, ...)``.
      cu_q_lens: sequence s owns tokens ``cu_q_lens[s]:cu_q_lens[s + 1]``; tokens past
        ``cu_q_lens[-1]`` are padding and get zeros.
      kv_lens: keys of each sequence in the pool (its tokens included); 0 for an empty row.
      positions: position of each token in its sequence (< its kv_len).
      sliding_window: keys at positions ``<= position - sliding_window`` are not seen.
      config: tile sizes and launch parameters.
      interpret: run in Pallas interpret mode (CPU).

    Returns:
      ``[T, N, H]`` attention outputs in q's dtype.
    """
    validate_ragged_inputs(q, k_pool, v_pool, block_tables, cu_q_lens, kv_lens, positions, sliding_window)
    scales = validate_scales(k_pool, k_scale, v_scale)
    num_tokens, num_heads, head_dim = q.shape
    num_layers, num_blocks, page_size, num_kv_heads, _ = k_pool.shape
    group = num_heads // num_kv_heads
    block_q = config.block_q(group)
    pad = max(0, block_q - num_tokens)  # a tile loads block_q rows: tiny batches get padded
    q4 = jnp.pad(q, ((0, pad), (0, 0), (0, 0))).reshape(num_tokens + pad, num_kv_heads, group, head_dim)
    positions = jnp.pad(positions, (0, pad))
    tables = fold_layer(block_tables, layer, num_blocks, config.pages_per_compute_block)
    tiles = query_tiles(cu_q_lens, num_tokens + pad, block_q)
    pool_shape = (num_layers * num_blocks, page_size, num_kv_heads, head_dim)
    call = _build_ragged_call(q4.shape, pool_shape, tiles.shape[0], q.dtype, quantized=bool(scales), config=config,
                              sm_scale=head_dim**-0.5, window=sliding_window, interpret=interpret)
    out = call(tiles, tables, kv_lens, positions, q4, k_pool.reshape(pool_shape), v_pool.reshape(pool_shape),
               *(x.reshape(pool_shape[:3]) for x in scales), jnp.zeros_like(q4))
    return out.reshape(num_tokens + pad, num_heads, head_dim)[:num_tokens]


def fold_layer(block_tables: jax.Array, layer: jax.Array, num_blocks: int, multiple: int) -> jax.Array:
    """Block ids -> page ids of the ``[L * num_blocks, ...]`` pool view, width padded to ``multiple``.

    Padding columns point at the layer's null block 0; the kernels mask every key past kv_len.
    """
    width = block_tables.shape[1]
    tables = jnp.pad(block_tables, ((0, 0), (0, -width % multiple)))
    return (tables + layer * num_blocks).astype(jnp.int32)


def validate_ragged_inputs(q, k_pool, v_pool, block_tables, cu_q_lens, kv_lens, positions, sliding_window):
    """Raise ValueError unless the shapes and dtypes fit the ragged-attention contract."""
    if q.ndim != 3 or k_pool.ndim != 5:
        raise ValueError(f"want q [T, N, H] and pools [L, blocks, block_size, K, H]; got {q.shape=} {k_pool.shape=}")
    if k_pool.shape != v_pool.shape:
        raise ValueError(f"{k_pool.shape=} differs from {v_pool.shape=}")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[3]
    if head_dim != k_pool.shape[4] or num_heads % num_kv_heads:
        raise ValueError(f"q heads/dim {q.shape[1:]} do not fit kv heads/dim {k_pool.shape[3:]}")
    num_seqs = block_tables.shape[0]
    shapes = {"block_tables": (block_tables, 2), "cu_q_lens": (cu_q_lens, 1), "kv_lens": (kv_lens, 1),
              "positions": (positions, 1)}
    for name, (array, ndim) in shapes.items():
        if array.ndim != ndim or not jnp.issubdtype(array.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array of rank {ndim}; got {array.shape} {array.dtype}")
    if cu_q_lens.shape != (num_seqs + 1,) or kv_lens.shape != (num_seqs,) or positions.shape != (num_tokens,):
        raise ValueError(f"inconsistent {cu_q_lens.shape=} {kv_lens.shape=} {positions.shape=} for "
                         f"{num_seqs} sequences and {num_tokens} tokens")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{sliding_window=} must be positive or None")


def validate_scales(k_pool, k_scale, v_scale) -> tuple[jax.Array, ...]:
    """Raise ValueError unless the scales are both None or both ``k_pool.shape[:4]`` floats;
    return them as a tuple (empty for an unquantised pool)."""
    if k_scale is None and v_scale is None:
        return ()
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None or scale.shape != k_pool.shape[:4] or not jnp.issubdtype(scale.dtype, jnp.floating):
            shape = None if scale is None else (scale.shape, scale.dtype)
            raise ValueError(f"{name} must be a float array of shape {k_pool.shape[:4]}; got {shape}")
    return k_scale, v_scale


def ragged_paged_attention_reference(q, k_pool, v_pool, layer, block_tables, cu_q_lens, kv_lens, positions,
                                     *, sliding_window=None):
    """Plain jnp: every token gathers its whole sequence's context and takes a masked softmax."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[3]
    token = jnp.arange(num_tokens)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, token, side="right") - 1, 0, block_tables.shape[0] - 1)
    real = token < cu_q_lens[-1]
    keys = k_pool[layer][block_tables].reshape(block_tables.shape[0], -1, num_kv_heads, head_dim)  # [S, C, K, H]
    values = v_pool[layer][block_tables].reshape(keys.shape)
    key_pos = jnp.arange(keys.shape[1])
    visible = (key_pos[None] <= positions[:, None]) & (key_pos[None] < kv_lens[seq][:, None]) & real[:, None]
    if sliding_window is not None:
        visible &= key_pos[None] > positions[:, None] - sliding_window
    qg = q.reshape(num_tokens, num_kv_heads, -1, head_dim).astype(jnp.float32)
    s = jnp.einsum("tkgh,tckh->tkgc", qg, keys[seq].astype(jnp.float32)) * head_dim**-0.5
    s = jnp.where(visible[:, None, None], s, -jnp.inf)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True, initial=-1e30))
    p = p / jnp.maximum(p.sum(axis=-1, keepdims=True), 1e-30)
    v = jnp.where(visible[:, :, None, None], values[seq].astype(jnp.float32), 0)  # [T, C, K, H]
    out = jnp.einsum("tkgc,tckh->tkgh", p, v)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
