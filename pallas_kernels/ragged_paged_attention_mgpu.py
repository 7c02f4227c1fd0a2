"""Ragged paged attention for Hopper (H100/H200) on Pallas Mosaic GPU: TMA page copies, wgmma.

Same contract as ragged_paged_attention.py (the Triton-lowered kernel, whose docstring has the pool
layout and block-size reasoning); Pallas's Triton backend is deprecated from JAX 0.11 and Mosaic
GPU is its successor on Hopper. This kernel cannot run off an H100/H200 (no interpret mode); the
test suite lowers it for CUDA on CPU and runs it only under ``-m gpu``. Not yet measured.

Design: grid ``(query tile, kv head)``, one warpgroup per program. A tile is 64 query rows (wgmma's
M): ``64 // G`` consecutive tokens of one sequence times the G heads of kv head k, taken from q
rearranged in the wrapper to ``[K, T * G, H]`` so the rows are one TMA box. The key loop steps
``pages_per_compute_block`` pages (``block_k`` keys) at a time: each page of the kv head is one TMA
copy ``k_pool[page, :, head, :]`` (block_size rows strided by ``K * H``) into a double-buffered
SMEM slot, the next step's pages are in flight while this step's QK^T and PV wgmmas run. Masks
come from iotas: rows hold consecutive positions of one sequence (the engine's batches put a
sequence's new tokens at its last positions), keys past kv_len and outside the window are -inf,
and on the step holding kv_len the slot's unwritten V rows are zeroed in SMEM (0 * NaN = NaN in
the MMA otherwise). Each program writes its whole 64-row tile to a per-tile buffer; the wrapper
gathers token rows from it (an extra [T, N, H] pass instead of a ladder of variable-size stores).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.ragged_paged_attention import (
    fold_layer,
    query_tiles,
    ragged_paged_attention_reference,
    validate_ragged_inputs,
)

ragged_paged_attention_mgpu_reference = ragged_paged_attention_reference

_ROWS = 64  # wgmma M for one warpgroup


@dataclasses.dataclass(frozen=True)
class MosaicAttentionConfig:
    """Tuning knobs of the Hopper kernel (reasoned defaults, not yet measured)."""

    block_k: int = 64  # keys per step: pages_per_compute_block * block_size

    def __post_init__(self):
        if self.block_k % 64 or self.block_k > 256:
            raise ValueError(f"block_k={self.block_k} must be a multiple of 64 and at most 256")


def _kernel(tiles_gmem, tables_gmem, kv_lens_gmem, positions_gmem, q_gmem, k_gmem, v_gmem, o_gmem,
            q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, *, group, pages_per_step, sm_scale, window):
    # tiles_gmem [tiles, 4] int32; tables_gmem [S, Bp] int32 page ids; kv_lens_gmem [S]; positions_gmem [T]
    # q_gmem [K, T * G + 64, H]; k_gmem, v_gmem [pages, block_size, K, H]; o_gmem [tiles, K, 64, H]
    # q_smem [64, H]; k_smem, v_smem [2, block_k, H]; q_bar [1]; k_bar, v_bar [2] barriers
    tile, head = lax.axis_index("tile"), lax.axis_index("head")
    seq, first, valid = tiles_gmem[tile, 0], tiles_gmem[tile, 1], tiles_gmem[tile, 2]
    kv_len = kv_lens_gmem[seq]
    page_size, head_dim = k_gmem.shape[1], k_gmem.shape[3]
    block_k = pages_per_step * page_size
    first_pos = positions_gmem[first]
    hi = jnp.where(valid > 0, jnp.minimum(kv_len, first_pos + valid), 0)
    lo = 0 if window is None else jnp.maximum(first_pos - window + 1, 0)
    lo_step, hi_step = lax.div(lo, block_k), lax.div(hi + block_k - 1, block_k)

    def fetch(step, slot):
        for i in range(pages_per_step):
            page = tables_gmem[seq, step * pages_per_step + i]
            rows = pl.ds(i * page_size, page_size)
            plgpu.copy_gmem_to_smem(k_gmem.at[page, :, head], k_smem.at[slot, rows], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(v_gmem.at[page, :, head], v_smem.at[slot, rows], v_bar.at[slot])

    plgpu.copy_gmem_to_smem(q_gmem.at[head, pl.ds(first * group, _ROWS)], q_smem, q_bar.at[0])

    @pl.when(lo_step < hi_step)
    def _():
        fetch(lo_step, 0)

    plgpu.barrier_wait(q_bar.at[0])
    row = plgpu.broadcasted_iota(jnp.int32, (_ROWS, block_k), 0, layout=plgpu.Layout.WGMMA)
    col = plgpu.broadcasted_iota(jnp.int32, (_ROWS, block_k), 1, layout=plgpu.Layout.WGMMA)
    token = lax.div(row, group)
    pos = jnp.where(token < valid, first_pos + token, -1)

    def step_body(step, carry):
        acc, m, l = carry
        slot = lax.rem(step - lo_step, 2)

        @pl.when(step + 1 < hi_step)
        def _():
            fetch(step + 1, 1 - slot)

        plgpu.barrier_wait(k_bar.at[slot])

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
            return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((_ROWS, block_k), jnp.float32)) * (sm_scale * math.log2(math.e))
        key = step * block_k + col
        visible = (key <= pos) & (key < kv_len)
        if window is not None:
            visible &= key > pos - window
        s = jnp.where(visible, s, -jnp.inf)
        m_next = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp2(s - lax.broadcast_in_dim(m_next, s.shape, [0]))
        alpha = jnp.exp2(m - m_next)
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        plgpu.barrier_wait(v_bar.at[slot])

        @pl.when((step + 1) * block_k > kv_len)
        def _():  # the step holding kv_len: unwritten V rows may hold NaN
            v_rows = plgpu.broadcasted_iota(jnp.int32, (block_k, head_dim), 0, layout=plgpu.Layout.WGMMA)
            v_slot = v_smem.at[slot]
            v_slot[...] = jnp.where(step * block_k + v_rows < kv_len, v_slot[...], 0).astype(v_slot.dtype)
            plgpu.commit_smem()

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p.astype(v_smem.dtype), v_smem.at[slot])

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        return acc, m_next, l

    acc = plgpu.layout_cast(jnp.zeros((_ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
    m = plgpu.layout_cast(jnp.full((_ROWS,), -1e30, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l = plgpu.layout_cast(jnp.zeros((_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc, m, l = lax.fori_loop(lo_step, hi_step, step_body, (acc, m, l))
    l = jnp.where(l == 0, 1.0, l)
    q_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(q_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_gmem.at[tile, head])
    plgpu.wait_smem_to_gmem(0)


def _token_rows(cu_q_lens, num_tokens, block_q, group):
    """For each token and head of its group: (tile, row) in the per-tile output buffer."""
    token = jnp.arange(num_tokens)
    num_seqs = cu_q_lens.shape[0] - 1
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, token, side="right") - 1, 0, num_seqs - 1)
    tiles_per_seq = pl.cdiv(cu_q_lens[1:] - cu_q_lens[:-1], block_q)
    tile_start = jnp.cumsum(tiles_per_seq) - tiles_per_seq
    offset = token - cu_q_lens[seq]
    tile = tile_start[seq] + offset // block_q
    return tile, (offset % block_q)[:, None] * group + jnp.arange(group)


@functools.partial(jax.jit, static_argnames=("sliding_window", "config"))
def ragged_paged_attention_mgpu(
    q: jax.Array,  # [T, N, H] bfloat16 or float16
    k_pool: jax.Array,  # [L, num_blocks, block_size, K, H]
    v_pool: jax.Array,  # [L, num_blocks, block_size, K, H]
    layer: jax.Array,  # [] int32
    block_tables: jax.Array,  # [S, B] int32
    cu_q_lens: jax.Array,  # [S + 1] int32
    kv_lens: jax.Array,  # [S] int32
    positions: jax.Array,  # [T] int32, consecutive within a sequence
    *,
    sliding_window: int | None = None,
    config: MosaicAttentionConfig = MosaicAttentionConfig(),
) -> jax.Array:
    """Same arguments and result as ``ragged_paged_attention``; Hopper only, 16-bit dtypes,
    head_dim a multiple of 64, G <= 64 query heads per kv head.

    Raises:
      ValueError: on inputs outside the contract or outside this kernel's limits.
    """
    validate_ragged_inputs(q, k_pool, v_pool, block_tables, cu_q_lens, kv_lens, positions, sliding_window)
    num_tokens, num_heads, head_dim = q.shape
    num_layers, num_blocks, page_size, num_kv_heads, _ = k_pool.shape
    group = num_heads // num_kv_heads
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k_pool.dtype != q.dtype:
        raise ValueError(f"wgmma needs 16-bit q and pools of one dtype; got {q.dtype=} {k_pool.dtype=}")
    if head_dim % 64 or _ROWS % group or config.block_k % page_size:
        raise ValueError(f"need head_dim % 64 == 0, G | 64, block_size | block_k; got {head_dim=} {group=} "
                         f"{page_size=} {config.block_k=}")
    block_q, pages_per_step = _ROWS // group, config.block_k // page_size
    tiles = query_tiles(cu_q_lens, max(num_tokens, block_q), block_q)
    tables = fold_layer(block_tables, layer, num_blocks, pages_per_step)
    q_rows = q.reshape(num_tokens, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    pad_rows = _ROWS + -(num_tokens * group) % _ROWS  # a whole 64-row box past the last token, TMA-tiled
    q_rows = jnp.pad(q_rows.reshape(num_kv_heads, num_tokens * group, head_dim), ((0, 0), (0, pad_rows), (0, 0)))
    pool_shape = (num_layers * num_blocks, page_size, num_kv_heads, head_dim)
    kernel = functools.partial(_kernel, group=group, pages_per_step=pages_per_step, sm_scale=head_dim**-0.5,
                               window=sliding_window)
    smem = functools.partial(plgpu.SMEM, dtype=q.dtype,
                             transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((tiles.shape[0], num_kv_heads, _ROWS, head_dim), q.dtype),
        scratch_types=[smem((_ROWS, head_dim)), smem((2, config.block_k, head_dim)),
                        smem((2, config.block_k, head_dim)), plgpu.Barrier(num_barriers=1),
                        plgpu.Barrier(num_arrivals=pages_per_step, num_barriers=2),
                        plgpu.Barrier(num_arrivals=pages_per_step, num_barriers=2)],
        grid=(tiles.shape[0], num_kv_heads),
        grid_names=("tile", "head"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )
    out = call(tiles, tables, kv_lens, jnp.pad(positions, (0, block_q)), q_rows, k_pool.reshape(pool_shape),
               v_pool.reshape(pool_shape))
    tile, row = _token_rows(cu_q_lens, num_tokens, block_q, group)
    gathered = out[tile[:, None, None], jnp.arange(num_kv_heads)[None, :, None], row[:, None, :]]
    real = (jnp.arange(num_tokens) < cu_q_lens[-1])[:, None, None, None]
    return jnp.where(real, gathered, 0).reshape(num_tokens, num_heads, head_dim)
