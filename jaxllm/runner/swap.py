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
    """Blocks stored in ``dtype`` that fit in ``swap_space`` GiB; 0 unless ``preemption_mode="swap"``."""
    if cache.preemption_mode != "swap":
        return 0
    return int(cache.swap_space * (1 << 30)) // kv_pool.bytes_per_block(cfg, cache.block_size, dtype)


def gather_blocks(kv: KVPool, block_ids: jax.Array) -> KVPool:
    """block_ids [SWAP_CHUNK] -> the pool's arrays cut to those blocks: [L, SWAP_CHUNK, ...] each."""
    return jax.tree.map(lambda x: x[:, block_ids], kv)


def scatter_blocks(kv: KVPool, block_ids: jax.Array, blocks: KVPool) -> KVPool:
    """Write ``blocks`` (shaped as ``gather_blocks`` returns) into ``block_ids`` of the pool."""
    return jax.tree.map(lambda x, b: x.at[:, block_ids].set(b), kv, blocks)


class HostSwapSpace:
    """``num_slots`` blocks of every pool array (K, V and, when quantised, their scales) in host
    memory (numpy; pages are touched only when used)."""

    def __init__(self, kv: KVPool, num_slots: int):
        """``kv``: the device pool (or its ``jax.eval_shape``), whose arrays' layouts are copied."""
        self._treedef = jax.tree.structure(kv)
        self.blocks = [np.zeros((x.shape[0], num_slots, *x.shape[2:]), x.dtype) for x in jax.tree.leaves(kv)]
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
            gathered = jax.tree.leaves(self._gather(kv, blocks))
            for host, device in zip(self.blocks, gathered, strict=True):
                host[:, slots] = np.asarray(device)[:, : len(slots)]

    def swap_in(self, kv: KVPool, pairs) -> KVPool:
        """Copy host slots into device blocks: ``pairs`` of (host slot, device block id)."""
        pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
        for blocks, slots in _chunks(pairs[:, 1], pairs[:, 0]):
            chunk = []
            for host in self.blocks:
                padded = np.zeros((host.shape[0], SWAP_CHUNK, *host.shape[2:]), host.dtype)
                padded[:, : len(slots)] = host[:, slots]
                chunk.append(padded)
            kv = self._scatter(kv, blocks, jax.tree.unflatten(self._treedef, chunk))
        return kv


def _chunks(block_ids: np.ndarray, slots: np.ndarray):
    """Per chunk: device block ids [SWAP_CHUNK] int32 padded with the null block, host slots [n]."""
    for i in range(0, len(block_ids), SWAP_CHUNK):
        padded = np.zeros(SWAP_CHUNK, np.int32)
        chunk = block_ids[i : i + SWAP_CHUNK]
        padded[: len(chunk)] = chunk
        yield padded, slots[i : i + SWAP_CHUNK]
