"""Ragged paged attention as a raw Triton kernel called through jax-triton (NVIDIA GPU only).

For people who experiment in Triton rather than Pallas: the body
(triton_paged_attention_kernel.py) is the Pallas ragged kernel's design written by hand: grid
``(query tile, kv head)``, the tile map from ``query_tiles``, pages gathered through the block table
with int64 pointer arithmetic, online softmax, masked loads instead of selects. It has no split-K
decode path; use the "pallas" backend for that.

jax-triton compiles the kernel to PTX while JAX lowers the program, which needs the CUDA jaxlib
plugin (``jax._src.lib.gpu_triton``) and a visible GPU; jax_triton refuses to import on a CPU-only
jaxlib. The Triton body itself runs under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU,
which is how the test suite checks it.
"""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention import (
    RaggedAttentionConfig,
    fold_layer,
    query_tiles,
    ragged_paged_attention_reference,
    validate_ragged_inputs,
)

triton_ragged_paged_attention_reference = ragged_paged_attention_reference
_DEFAULT_CONFIG = RaggedAttentionConfig()


def triton_unavailable_reason() -> str | None:
    """Why the jax-triton path cannot run in this process, or None when it can."""
    for package in ("triton", "jax_triton"):
        if importlib.util.find_spec(package) is None:
            return f"the {package!r} package is not installed (pip install 'jaxllm[triton]')"
    if jax.default_backend() != "gpu":
        return f"it needs an NVIDIA GPU; JAX's default backend is {jax.default_backend()!r}"
    try:
        import jax_triton  # noqa: F401
    except ImportError as error:
        return f"jax_triton failed to import: {error}"
    return None


@functools.partial(jax.jit, static_argnames=("sliding_window", "config"))
def triton_ragged_paged_attention(
    q: jax.Array,  # [T, N, H]
    k_pool: jax.Array,  # [L, num_blocks, block_size, K, H]
    v_pool: jax.Array,  # [L, num_blocks, block_size, K, H]
    layer: jax.Array,  # [] int32
    block_tables: jax.Array,  # [S, B] int32
    cu_q_lens: jax.Array,  # [S + 1] int32
    kv_lens: jax.Array,  # [S] int32
    positions: jax.Array,  # [T] int32
    *,
    sliding_window: int | None = None,
    config: RaggedAttentionConfig = _DEFAULT_CONFIG,
) -> jax.Array:
    """Same contract and arguments as ``ragged_paged_attention`` (no ``interpret``: GPU only).

    Raises:
      ValueError: on inputs that do not fit the contract.
      RuntimeError: when jax-triton or a GPU is missing (see ``triton_unavailable_reason``).
    """
    validate_ragged_inputs(q, k_pool, v_pool, block_tables, cu_q_lens, kv_lens, positions, sliding_window)
    reason = triton_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the Triton attention kernel cannot run: {reason}")
    import jax_triton as jt

    from pallas_kernels.triton_paged_attention_kernel import ragged_paged_attention_kernel

    num_tokens, num_heads, head_dim = q.shape
    num_layers, num_blocks, page_size, num_kv_heads, _ = k_pool.shape
    group = num_heads // num_kv_heads
    block_q = config.block_q(group)
    pad = max(0, block_q - num_tokens)
    q4 = jnp.pad(q, ((0, pad), (0, 0), (0, 0))).reshape(num_tokens + pad, num_kv_heads, group, head_dim)
    tables = fold_layer(block_tables, layer, num_blocks, config.pages_per_compute_block)
    tiles = query_tiles(cu_q_lens, num_tokens + pad, block_q)
    out = jt.triton_call(
        tiles, tables, kv_lens.astype(jnp.int32), jnp.pad(positions, (0, pad)).astype(jnp.int32), q4,
        k_pool, v_pool,  # contiguous: the kernel reads them as [L * num_blocks, block_size, K, H]
        tables.shape[1], head_dim**-0.5, sliding_window or 0,
        kernel=ragged_paged_attention_kernel,
        out_shape=jax.ShapeDtypeStruct(q4.shape, q.dtype),
        grid=(tiles.shape[0], num_kv_heads),
        zeroed_outputs=(0,),  # padding rows no tile writes stay zero
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size,
        BLOCK_Q=block_q, PAGES_PER_STEP=config.pages_per_compute_block,
    )
    return out.reshape(num_tokens + pad, num_heads, head_dim)[:num_tokens]
