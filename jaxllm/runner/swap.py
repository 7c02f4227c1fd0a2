"""Swap space: host copies of preempted requests' KV blocks, and the programs that move them.

Blocks move in chunks of a fixed ``SWAP_CHUNK`` so each direction is one program compiled at
warm-up; a short chunk is padded with the null block 0 (read, or overwritten with zeros, which
only padding tokens ever write into anyway).
"""

from __future__ import annotations

import jax
import numpy as np

from jaxllm.config import CacheConfig, ModelConfig
from jaxllm.models.attention import KVPool
from jaxllm.runner import kv_pool

SWAP_CHUNK = 16  # blocks per device <-> host transfer


def num_swap_slots(cache: CacheConfig, cfg: ModelConfig, dtype) -> int:
    """Blocks that fit in ``swap_space`` GiB; 0 unless ``preemption_mode="swap"``."""
    if cache.preemption_mode != "swap":
        return 0
    return int(cache.swap_space * (1 << 30)) // kv_pool.bytes_per_block(cfg, cache.block_size, dtype)


def gather_blocks(kv: KVPool, block_ids: jax.Array) -> KVPool:
    """block_ids [SWAP_CHUNK] -> K and V [layers, SWAP_CHUNK, block_size, kv heads, head dim]."""
    k, v = kv
    return k[:, block_ids], v[:, block_ids]


def scatter_blocks(kv: KVPool, block_ids: jax.Array, k_blocks: jax.Array, v_blocks: jax.Array) -> KVPool:
    """Write K and V blocks (shaped as ``gather_blocks`` returns) into ``block_ids`` of the pool."""
    k, v = kv
    return k.at[:, block_ids].set(k_blocks), v.at[:, block_ids].set(v_blocks)


class HostSwapSpace:
    """``num_slots`` blocks of K and V in host memory (numpy; pages are touched only when used)."""

    def __init__(self, cfg: ModelConfig, num_slots: int, block_size: int, dtype):
        shape = (cfg.num_layers, num_slots, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k, self.v = np.zeros(shape, dtype), np.zeros(shape, dtype)
        self._gather = jax.jit(gather_blocks)
        self._scatter = jax.jit(scatter_blocks, donate_argnums=0)

    def warmup(self, kv: KVPool) -> KVPool:
        """Compile both programs (two compilations) by moving the null block out and back."""
        self.swap_out(kv, ((0, 0),))
        return self.swap_in(kv, ((0, 0),))

    def swap_out(self, kv: KVPool, pairs) -> None:
        """Copy device blocks into host slots: ``pairs`` of (device block id, host slot)."""
        pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
        for blocks, slots in _chunks(pairs[:, 0], pairs[:, 1]):
            k, v = self._gather(kv, blocks)
            n = len(slots)
            self.k[:, slots], self.v[:, slots] = np.asarray(k)[:, :n], np.asarray(v)[:, :n]

    def swap_in(self, kv: KVPool, pairs) -> KVPool:
        """Copy host slots into device blocks: ``pairs`` of (host slot, device block id)."""
        pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
        for blocks, slots in _chunks(pairs[:, 1], pairs[:, 0]):
            n = len(slots)
            k = np.zeros((self.k.shape[0], SWAP_CHUNK, *self.k.shape[2:]), self.k.dtype)
            v = np.zeros_like(k)
            k[:, :n], v[:, :n] = self.k[:, slots], self.v[:, slots]
            kv = self._scatter(kv, blocks, k, v)
        return kv


def _chunks(block_ids: np.ndarray, slots: np.ndarray):
    """Per chunk: device block ids [SWAP_CHUNK] int32 padded with the null block, host slots [n]."""
    for i in range(0, len(block_ids), SWAP_CHUNK):
        padded = np.zeros(SWAP_CHUNK, np.int32)
        chunk = block_ids[i : i + SWAP_CHUNK]
        padded[: len(chunk)] = chunk
        yield padded, slots[i : i + SWAP_CHUNK]
