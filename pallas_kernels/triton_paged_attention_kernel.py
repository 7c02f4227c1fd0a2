"""The raw Triton body of ragged paged attention (needs the ``triton`` package; see
triton_paged_attention.py for the JAX wrapper and the design, which is the Pallas kernel's).

Pointers are computed by hand over the pool view ``[pages, block_size, K, H]`` (pages =
L * num_blocks, layer folded into the page ids); page offsets are widened to int64 because a
real pool exceeds 2**31 elements. Unwritten slots are never loaded (masked loads return 0), so
NaN in unused pages cannot leak.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def ragged_paged_attention_kernel(
    tiles_ptr,  # [num_tiles, 4] int32: sequence, first token, valid rows, first loaded token
    tables_ptr,  # [S, Bp] int32 page ids
    kv_lens_ptr,  # [S] int32
    positions_ptr,  # [T] int32
    q_ptr,  # [T, K, G, H]
    k_ptr,  # [pages, block_size, K, H]
    v_ptr,  # [pages, block_size, K, H]
    tables_stride,  # Bp
    sm_scale,  # float: head_dim ** -0.5
    window,  # int: sliding window, 0 for none
    o_ptr,  # [T, K, G, H] output (jax-triton passes outputs after inputs and scalars)
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    PAGES_PER_STEP: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(tiles_ptr + tile * 4)
    first = tl.load(tiles_ptr + tile * 4 + 1)
    valid = tl.load(tiles_ptr + tile * 4 + 2)
    load_at = tl.load(tiles_ptr + tile * 4 + 3)
    kv_len = tl.load(kv_lens_ptr + seq)

    rows = tl.arange(0, BLOCK_Q * GROUP)
    token = load_at + rows // GROUP
    row_ok = (token >= first) & (token < first + valid)
    pos = tl.load(positions_ptr + token, mask=row_ok, other=-1)
    dims = tl.arange(0, HEAD_DIM)
    q_rows = (token.to(tl.int64) * NUM_KV_HEADS + head) * GROUP + rows % GROUP
    q_offsets = q_rows[:, None] * HEAD_DIM + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None], other=0.0)

    last_pos = tl.load(positions_ptr + tl.maximum(first + valid - 1, 0))
    hi = tl.where(valid > 0, tl.minimum(kv_len, last_pos + 1), 0)
    lo = 0
    if window > 0:
        lo = tl.maximum(tl.load(positions_ptr + first) - window + 1, 0)

    BLOCK_K: tl.constexpr = PAGES_PER_STEP * PAGE_SIZE
    keys = tl.arange(0, BLOCK_K)
    scale = sm_scale * 1.4426950408889634  # log2(e): exp2 below
    acc = tl.zeros([BLOCK_Q * GROUP, HEAD_DIM], dtype=tl.float32)
    m = tl.full([BLOCK_Q * GROUP], -1e30, dtype=tl.float32)
    l = tl.zeros([BLOCK_Q * GROUP], dtype=tl.float32)
    for step in range(lo // BLOCK_K, tl.cdiv(hi, BLOCK_K)):
        key_pos = step * BLOCK_K + keys
        written = key_pos < kv_len
        page = tl.load(tables_ptr + seq * tables_stride + key_pos // PAGE_SIZE, mask=written, other=0)
        slot = page.to(tl.int64) * PAGE_SIZE + key_pos % PAGE_SIZE
        kv_offsets = ((slot * NUM_KV_HEADS + head) * HEAD_DIM)[:, None] + dims[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=written[:, None], other=0.0)
        v = tl.load(v_ptr + kv_offsets, mask=written[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        visible = (key_pos[None, :] <= pos[:, None]) & written[None, :]
        if window > 0:
            visible = visible & (key_pos[None, :] > pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_next = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_next[:, None])
        alpha = tl.exp2(m - m_next)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_next
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    tl.store(o_ptr + q_offsets, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
