"""The "cpu" attention backend: a C++ paged-attention kernel called through XLA's FFI.

The kernel (``cpu_paged_attention.cc``, next to this file) reads the pool in place, block by
block, with an online softmax, on XLA's intra-op threads; it has the semantics of
``jaxllm.models.attention.xla_paged_attention`` and takes float32/bfloat16 pools (uint16 ones as
bfloat16 bits: how the engine stores a bfloat16 model's pool on CPU) and the int8/fp8 pools of
``kv_cache_dtype``, scales included.

The library is built on first use and cached: see ``cpu_kernels.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models.attention import AttentionMetadata, KVPool
from jaxllm.models.kv_quant import QuantizedKVPool
from pallas_kernels.cpu_kernels import ATTENTION_TARGET, cpu_kernels_unavailable_reason


def cpu_paged_attention(q, kv: KVPool, layer, md: AttentionMetadata, sliding_window=None):
    """Engine attention backend (see ``register_attention_backend``) running the C++ kernel.

    q is scored in float32 (as the xla backend does) and the result cast back to q's dtype.
    Padding tokens (past ``cu_q_lens[-1]``) get zero rows.

    Raises:
      ValueError: when traced for a non-CPU device, or when the kernel cannot be built here.
    """
    reason = cpu_kernels_unavailable_reason()
    if reason is not None:
        raise ValueError(f"attention_backend='cpu' is not usable here: {reason}")
    if isinstance(kv, QuantizedKVPool):
        pools, scales = (kv.k, kv.v), (kv.k_scale, kv.v_scale)
    else:
        pools, scales = tuple(kv), (jnp.zeros((0,), jnp.float32),) * 2
    call = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    out = call(q.astype(jnp.float32), *pools, *scales, jnp.asarray(layer, jnp.int32).reshape(()),
               md.positions, md.block_tables, md.cu_q_lens,
               sliding_window=np.int64(sliding_window or 0), scale=np.float32(q.shape[-1] ** -0.5))
    return out.astype(q.dtype)


# Its cost follows each sequence's own context, not the block table's padded width: the runner
# compiles one width; and a float32 model's matmuls go through the C++ matmul kernel too (see
# ``register_attention_backend``; measured: benchmarks/throughput.py).
cpu_paged_attention.one_block_bucket = True
cpu_paged_attention.cpu_matmul = True
