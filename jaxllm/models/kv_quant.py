"""Quantised KV cache: fp8 (e4m3) or int8 values with one float32 scale per token and kv head.

Design. A quantised pool is :class:`QuantizedKVPool` ``(k, v, k_scale, v_scale)``: the values keep
the engine's layout ``[L, num_blocks, block_size, K, H]`` in a one-byte dtype, and the scales are
``[L, num_blocks, block_size, K]`` float32, one per (layer, block, slot, kv head). The default
("auto") pool stays the plain ``(k, v)`` tuple, so backends written for it are untouched.

- Per-token-per-head scales are computed from the row's own absmax when it is written, so
  ``write_kv`` stays one in-place scatter per array. Per-block scales would need a
  read-modify-write of the whole block (requantising earlier tokens whenever a later one raises
  the block's absmax) and would make a token's stored value depend on its neighbours.
- float32 scales cost 4 bytes per H values (6% at H = 64, 3% at H = 128), and a float32 scale is
  exactly the number the values were divided by; a bf16 scale would save 2 of those bytes but
  round the divisor, so ``x / scale`` could overshoot the format's max and need a second clip.
- Symmetric, no zero point: K and V rows after RoPE are roughly centred on zero.
- fp8 is ``float8_e4m3fn`` (max 448; 3 mantissa bits: relative error <= 2**-4 for scaled values
  above its smallest normal 2**-6, absolute 2**-10 below); int8 is symmetric with max 127
  (absolute error <= scale / 2). Values are clipped before the cast: e4m3fn has no infinity and
  an overflowing cast would give NaN.
- fp8 values are stored as their uint8 bit patterns (as vLLM stores its fp8 cache) and viewed as
  e4m3 only once gathered (:func:`unpack`). XLA:CPU has no fp8 scatter: it converts the whole
  operand to f16 and back around it, so a float8 pool cost 0.14 s per write of one token batch
  into a 184 MB pool (uint8: 16 us), and a bitcast of the donated pool around the scatter still
  copies it. uint8 is used for nothing else, so a pool's dtype still names its format.
- Readers dequantise what they gather (``values * scale`` in float32); the Pallas kernels load the
  scales with the pages and multiply them into the scores (keys) and the values.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SCALE_DTYPE = np.dtype(np.float32)  # of the per-token-per-head scales
BF16_BITS = np.dtype(np.uint16)  # a CPU pool of bfloat16 values, stored as their bits (kv_storage_dtype)
# kv_cache_dtype name -> (storage dtype, dtype the stored bits mean, largest magnitude it takes)
_FORMATS = {"fp8": (np.dtype(np.uint8), jnp.float8_e4m3fn, 448.0), "int8": (np.dtype(np.int8), jnp.int8, 127.0)}


class QuantizedKVPool(NamedTuple):
    """The KV pool of a quantised cache (a pytree, carried through the layer scan like ``(k, v)``)."""

    k: jax.Array  # [L, num_blocks, block_size, K, H] int8, or uint8 bits of float8_e4m3fn values
    v: jax.Array  # [L, num_blocks, block_size, K, H] same dtype as k
    k_scale: jax.Array  # [L, num_blocks, block_size, K] float32: unpack(k) * k_scale[..., None] ~= K
    v_scale: jax.Array  # [L, num_blocks, block_size, K] float32


def kv_storage_dtype(kv_cache_dtype: str, model_dtype, platform: str) -> np.dtype:
    """The dtype pool values are stored in: the model's for "auto", uint8 for fp8, int8 for int8.

    XLA:CPU has no bfloat16/float16 scatter (the same widening as fp8's, above: every layer's
    write into a bf16 pool converted the whole pool to float32 and back, ~0.5 s per step for a
    256 MB pool). So on CPU a bfloat16 model's "auto" pool holds the values' uint16 bits
    (:data:`BF16_BITS`; the uint16 scatter is in place, and the cpu attention kernel reads them
    as bfloat16), and a float16 model's is float32, which holds its values exactly (twice the
    bytes; the CPU budget is host memory). Either way attention sees the model's own numbers.
    """
    if kv_cache_dtype == "auto":
        dtype = np.dtype(model_dtype)
        if platform == "cpu" and dtype.itemsize == 2:
            return BF16_BITS if dtype == jnp.bfloat16 else np.dtype(np.float32)
        return dtype
    return _FORMATS[kv_cache_dtype][0]


def to_pool(values: jax.Array, pool_dtype) -> jax.Array:
    """New K or V values as a plain (not quantised) pool of ``pool_dtype`` stores them."""
    if np.dtype(pool_dtype) == BF16_BITS:
        return jax.lax.bitcast_convert_type(values.astype(jnp.bfloat16), BF16_BITS)
    return values.astype(pool_dtype)


def from_pool(values: jax.Array) -> jax.Array:
    """Values read from a plain pool as numbers: :data:`BF16_BITS` -> bfloat16, others as they are."""
    return jax.lax.bitcast_convert_type(values, jnp.bfloat16) if values.dtype == BF16_BITS else values


def is_quantized(dtype) -> bool:
    """Whether a pool stored in ``dtype`` is quantised and carries scales (uint8 and int8 pools)."""
    return any(np.dtype(dtype) == storage for storage, _, _ in _FORMATS.values())


def _format(storage_dtype) -> tuple[np.dtype, float]:
    return next((fmt, limit) for storage, fmt, limit in _FORMATS.values() if np.dtype(storage_dtype) == storage)


def unpack(values: jax.Array) -> jax.Array:
    """Stored values as the numbers they encode: uint8 bits -> float8_e4m3fn; int8 unchanged."""
    fmt, _ = _format(values.dtype)
    return values if values.dtype == fmt else jax.lax.bitcast_convert_type(values, fmt)


def quantize(x: jax.Array, storage_dtype) -> tuple[jax.Array, jax.Array]:
    """Symmetric absmax quantisation over the last axis.

    Args:
      x: ``[..., H]`` values (any float dtype).
      storage_dtype: a quantised pool's dtype (``kv_storage_dtype("fp8" or "int8", ...)``).

    Returns:
      ``(values [..., H] in storage_dtype, scale [...] float32)`` with ``unpack(values) * scale ~=
      x``; an all-zero row gets scale 0.
    """
    fmt, limit = _format(storage_dtype)
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / limit
    scaled = x32 / jnp.where(scale > 0, scale, 1.0)[..., None]
    if jnp.issubdtype(fmt, jnp.integer):
        scaled = jnp.round(scaled)
    values = jnp.clip(scaled, -limit, limit).astype(fmt)
    return jax.lax.bitcast_convert_type(values, storage_dtype), scale


def dequantize(values: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """Stored values ``[..., H]`` times scale ``[...]`` (in float32), cast to ``dtype``."""
    return (unpack(values).astype(jnp.float32) * scale[..., None]).astype(dtype)
