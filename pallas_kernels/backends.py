"""The kernels as engine attention backends: ``(q [T, N, H], kv, layer, md, sliding_window) -> [T, N, H]``.

Same contract as ``jaxllm.models.attention.xla_paged_attention`` for every token of a real
sequence; the batch's padding tokens (past ``cu_q_lens[-1]``) get zeros, where the xla backend
attends them to sequence row 0's first key. Their rows are never sampled.

The KV write stays the xla scatter of ``write_kv`` (in place under donation): fusing it into the
kernel would save one pass over ``[T, K, H]`` new rows, small next to the context the kernel
reads, and would tie every backend to one write layout.

Quantised pools (``kv_cache_dtype`` "fp8"/"int8"): the Pallas kernels load the scales with the
pages and dequantise inside. The Triton and Mosaic GPU kernels do not take scales; for them the
layer is dequantised to q's dtype before the call, which materialises one layer of the pool per
layer and step (correct, but it gives back the bandwidth fp8/int8 saves: use "pallas" with them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.models.attention import AttentionMetadata, KVPool
from jaxllm.models.kv_quant import BF16_BITS, QuantizedKVPool, dequantize, from_pool
from pallas_kernels.paged_decode_attention import paged_decode_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _pool_args(kv: KVPool) -> tuple[tuple[jax.Array, jax.Array], dict]:
    """((k_pool, v_pool), scale keyword arguments of the Pallas kernels)."""
    if isinstance(kv, QuantizedKVPool):
        return (kv.k, kv.v), {"k_scale": kv.k_scale, "v_scale": kv.v_scale}
    return tuple(map(_interpretable, kv)), {}


def _interpretable(pool: jax.Array) -> jax.Array:
    # A CPU pool of bfloat16 bits (kv_quant.BF16_BITS: only on CPU, so only in interpret mode) as
    # the float32 numbers it holds: what the kernels read before that pool existed, a copy per call.
    return from_pool(pool).astype(jnp.float32) if pool.dtype == BF16_BITS else pool


def _dequantized_layer(kv: KVPool, layer, dtype) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """((k, v) of ``layer`` as a one-layer pool in ``dtype``, the layer index into it)."""
    if not isinstance(kv, QuantizedKVPool):
        return tuple(kv), layer
    pools = tuple(dequantize(x[layer], s[layer], dtype)[None] for x, s in ((kv.k, kv.k_scale), (kv.v, kv.v_scale)))
    return pools, jnp.int32(0)


def _decode_rows(q, kv: KVPool, layer, md: AttentionMetadata, sliding_window, interpret):
    # Every sequence brings at most one token: run the split-K kernel and scatter rows back.
    num_tokens = q.shape[0]
    starts = md.cu_q_lens[:-1]
    has_token = md.cu_q_lens[1:] > starts
    kv_lens = jnp.where(has_token, md.kv_lens, 0)
    pools, scales = _pool_args(kv)
    rows = paged_decode_attention(q[jnp.minimum(starts, num_tokens - 1)], *pools, layer, md.block_tables, kv_lens,
                                  **scales, sliding_window=sliding_window, interpret=interpret)
    return jnp.zeros_like(q).at[jnp.where(has_token, starts, num_tokens)].set(rows, mode="drop")


def pallas_paged_attention(q, kv: KVPool, layer, md: AttentionMetadata, sliding_window=None):
    """Pallas (Triton lowering; interpreted off GPU): split-K decode kernel when every sequence has at
    most one new token, else the ragged kernel.

    The choice is a ``lax.cond`` on device because the batch's mix is data, not shape. XLA:GPU runs
    a conditional by reading its predicate on the host (one small sync per layer) unless it is
    captured in a CUDA graph; a static "all decode" flag from the runner would remove it.
    """
    interpret = not _on_gpu()
    all_decode = jnp.all(md.cu_q_lens[1:] - md.cu_q_lens[:-1] <= 1)
    pools, scales = _pool_args(kv)
    return jax.lax.cond(
        all_decode,
        lambda: _decode_rows(q, kv, layer, md, sliding_window, interpret),
        lambda: ragged_paged_attention(q, *pools, layer, md.block_tables, md.cu_q_lens, md.kv_lens, md.positions,
                                       **scales, sliding_window=sliding_window, interpret=interpret),
    )


def triton_paged_attention(q, kv: KVPool, layer, md: AttentionMetadata, sliding_window=None):
    """Raw Triton kernel through jax-triton (GPU only); raises RuntimeError without jax-triton or a GPU."""
    from pallas_kernels.triton_paged_attention import triton_ragged_paged_attention

    pools, layer = _dequantized_layer(kv, layer, q.dtype)
    return triton_ragged_paged_attention(q, *pools, layer, md.block_tables, md.cu_q_lens, md.kv_lens, md.positions,
                                         sliding_window=sliding_window)


def mosaic_paged_attention(q, kv: KVPool, layer, md: AttentionMetadata, sliding_window=None):
    """Hopper kernel on Pallas Mosaic GPU (H100/H200 only; no interpret path)."""
    from pallas_kernels.ragged_paged_attention_mgpu import ragged_paged_attention_mgpu

    pools, layer = _dequantized_layer(kv, layer, q.dtype)
    return ragged_paged_attention_mgpu(q, *pools, layer, md.block_tables, md.cu_q_lens, md.kv_lens, md.positions,
                                       sliding_window=sliding_window)
