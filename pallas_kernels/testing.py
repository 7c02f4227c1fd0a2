"""Random ragged batches over a NaN-poisoned paged pool, for the kernel tests and benchmarks/attention.py."""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from jaxllm.models.attention import AttentionMetadata


@dataclass(frozen=True)
class PagedBatch:
    q: jnp.ndarray  # [T, N, H]
    k_pool: jnp.ndarray  # [L, num_blocks, block_size, K, H]; NaN in every unwritten slot
    v_pool: jnp.ndarray
    layer: jnp.ndarray  # [] int32
    block_tables: jnp.ndarray  # [S, B] int32, a random permutation of blocks, 0 past the end
    cu_q_lens: jnp.ndarray  # [S + 1] int32
    kv_lens: jnp.ndarray  # [S] int32
    positions: jnp.ndarray  # [T] int32; padding tokens at position 0
    seq_ids: jnp.ndarray  # [T] int32; padding tokens in row 0, like the runner's batches

    @property
    def num_real_tokens(self) -> int:
        return int(self.cu_q_lens[-1])

    def kernel_args(self):
        return (self.q, self.k_pool, self.v_pool, self.layer, self.block_tables, self.cu_q_lens, self.kv_lens,
                self.positions)

    def metadata(self) -> AttentionMetadata:
        slots = jnp.zeros_like(self.positions)  # unused by attention itself
        return AttentionMetadata(self.positions, slots, self.seq_ids, self.block_tables, self.cu_q_lens,
                                 self.kv_lens)


def make_batch(
    seed: int,
    q_lens: list[int],
    kv_lens: list[int],
    *,
    block_size: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    dtype=jnp.float32,
    num_layers: int = 2,
    layer: int = 1,
    extra_tokens: int = 3,
    extra_blocks: int = 1,
    spare_blocks: int = 3,
    nan: bool = True,
) -> PagedBatch:
    """Sequence i brings q_lens[i] new tokens, the last of its kv_lens[i] positions.

    ``extra_tokens`` padding tokens follow the real ones; block tables get ``extra_blocks`` spare
    columns; the pool has ``spare_blocks`` blocks no sequence owns. Every slot no sequence wrote
    holds NaN (also in the null block 0 and in other layers), so any read of it poisons a result.
    """
    rng = np.random.default_rng(seed)
    blocks_needed = [-(-n // block_size) for n in kv_lens]
    num_blocks = 1 + sum(blocks_needed) + spare_blocks
    width = max(blocks_needed + [1]) + extra_blocks
    owned = rng.permutation(np.arange(1, num_blocks))
    num_seqs, num_tokens = len(q_lens), sum(q_lens) + extra_tokens
    tables = np.zeros((num_seqs, width), np.int32)
    cu = np.zeros(num_seqs + 1, np.int32)
    positions, seq_ids = np.zeros(num_tokens, np.int32), np.zeros(num_tokens, np.int32)
    shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
    k = np.full(shape, np.nan if nan else 0.0, np.float32)
    v = k.copy()
    used = 0
    for i, (n, kv_len) in enumerate(zip(q_lens, kv_lens, strict=True)):
        if n > kv_len:
            raise ValueError(f"sequence {i}: {n} new tokens exceed kv_len {kv_len}")
        tables[i, : blocks_needed[i]] = owned[used : used + blocks_needed[i]]
        used += blocks_needed[i]
        pos = np.arange(kv_len)
        rows = tables[i, pos // block_size], pos % block_size
        k[layer][rows] = rng.normal(size=(kv_len, num_kv_heads, head_dim))
        v[layer][rows] = rng.normal(size=(kv_len, num_kv_heads, head_dim))
        positions[cu[i] : cu[i] + n] = np.arange(kv_len - n, kv_len)
        seq_ids[cu[i] : cu[i] + n] = i
        cu[i + 1] = cu[i] + n
    q = rng.normal(size=(num_tokens, num_kv_heads * group, head_dim))
    arrays = (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype))
    ints = (tables, cu, np.asarray(kv_lens, np.int32), positions, seq_ids)
    return PagedBatch(*arrays, jnp.int32(layer), *map(jnp.asarray, ints))
