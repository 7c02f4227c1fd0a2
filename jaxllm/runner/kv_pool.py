"""Allocate and size the paged KV pool."""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import CacheConfig, ModelConfig
from jaxllm.models.attention import KVPool
from jaxllm.models.kv_quant import SCALE_DTYPE, QuantizedKVPool, is_quantized

logger = logging.getLogger("jaxllm")

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB: ~23k tokens of SmolLM2-135M in float32


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype) -> int:
    """K and V of one block across all layers, stored in ``dtype`` (fp8/int8 count their scales)."""
    values = cfg.head_dim * np.dtype(dtype).itemsize
    scales = SCALE_DTYPE.itemsize if is_quantized(dtype) else 0
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * (values + scales)


def kv_budget_bytes(cache: CacheConfig, device: jax.Device, weights_bytes: int, activation_peak: int) -> int:
    """Bytes the pool may take: a share of GPU memory, or an explicit budget on CPU."""
    if cache.kv_cache_memory_bytes is not None:
        return cache.kv_cache_memory_bytes
    if device.platform != "gpu":
        return DEFAULT_CPU_KV_CACHE_BYTES
    stats = device.memory_stats() or {}
    total = stats.get("bytes_limit", 0)
    budget = int(total * cache.gpu_memory_utilization) - weights_bytes - activation_peak
    if budget <= 0:
        raise ValueError(
            f"no memory left for the KV cache: {total=} * gpu_memory_utilization={cache.gpu_memory_utilization} "
            f"- weights {weights_bytes} - activation peak {activation_peak} <= 0; raise gpu_memory_utilization"
        )
    return budget


def num_blocks_for(cache: CacheConfig, cfg: ModelConfig, dtype, budget_bytes: int, extra_bytes_per_block: int = 0,
                   shards: int = 1) -> int:
    """Blocks that fit ``budget_bytes``; ``extra_bytes_per_block``: another pool indexed by the same
    block ids (a draft model's) shares the budget. ``shards``: the pool is split by kv heads over
    that many devices (tensor parallelism); the budget and the extra bytes are one device's."""
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    blocks = budget_bytes // (bytes_per_block(cfg, cache.block_size, dtype) // shards + extra_bytes_per_block)
    if blocks < 2:
        raise ValueError(f"kv cache budget of {budget_bytes} bytes holds fewer than 2 blocks")
    return int(blocks)


def log_capacity(num_blocks: int, block_size: int, max_model_len: int) -> int:
    """Log and return how many max-length requests fit at once (block 0 is the null block)."""
    tokens = (num_blocks - 1) * block_size
    concurrency = tokens // (math.ceil(max_model_len / block_size) * block_size)
    logger.info(
        "KV cache: %d blocks of %d tokens (%d tokens); max concurrency for %d-token requests: %.2fx",
        num_blocks, block_size, tokens, max_model_len, tokens / max_model_len,
    )
    return concurrency


def allocate(cfg: ModelConfig, num_blocks: int, block_size: int, dtype) -> KVPool:
    """A zeroed pool stored in ``dtype``: ``(k, v)``, or a QuantizedKVPool for fp8/int8."""
    shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    if is_quantized(dtype):
        scales = jnp.zeros(shape[:-1], SCALE_DTYPE)
        return QuantizedKVPool(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), scales, jnp.zeros_like(scales))
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def copy_blocks(kv: KVPool, src: jax.Array, dst: jax.Array) -> KVPool:
    """Copy whole blocks src[i] -> dst[i] in every layer (copy-on-write); pad with 0 -> 0.

    Every array of the pool (values and scales) is ``[L, num_blocks, ...]``, so one rule fits all.
    """
    return jax.tree.map(lambda x: x.at[:, dst].set(x[:, src]), kv)
