"""Paged attention over the flat ragged batch: the one place that picks a backend.

The KV pool holds every layer: ``k, v: [L, num_blocks, block_size, K, H]``. A token at
position p of a sequence lives in physical block ``block_table[p // block_size]`` at offset
``p % block_size``; ``slot_mapping`` is ``block * block_size + offset`` for each new token.

Every token attends causally over its own sequence: keys at positions ``<= position`` (and
``> position - sliding_window`` when set). New tokens' K/V are written into the pool first, so a
sequence's context (cached blocks, this step's earlier chunk tokens, itself) is read back from
the pool the same way, whatever mix of prefill chunks and decode tokens the batch holds.

With ``kv_cache_dtype`` "fp8" or "int8" the pool is a :class:`QuantizedKVPool` (values plus a
float32 scale per token and kv head, see kv_quant.py): ``write_kv`` quantises, readers dequantise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxllm.models.kv_quant import QuantizedKVPool, dequantize, from_pool, quantize, to_pool

logger = logging.getLogger(__name__)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class AttentionMetadata:
    """Where the flat batch's tokens sit in their sequences and in the KV pool.

    T is the padded number of tokens, S the padded number of sequences, B the padded number of
    blocks per sequence. Padding tokens belong to a padding sequence whose block table is all
    null block (0), and write their K/V into the null block.
    """

    positions: jax.Array  # [T] int32 position of each token in its sequence
    slot_mapping: jax.Array  # [T] int32 pool slot its K/V is written to
    seq_ids: jax.Array  # [T] int32 row of block_tables the token belongs to
    block_tables: jax.Array  # [S, B] int32 physical block ids, 0 past the end
    cu_q_lens: jax.Array  # [S + 1] int32 start of each sequence's tokens in the flat batch
    kv_lens: jax.Array  # [S] int32 tokens of each sequence in the pool after this step


# The model dtype's (k, v), each [L, num_blocks, block_size, K, H], or fp8/int8 values with scales.
KVPool = tuple[jax.Array, jax.Array] | QuantizedKVPool

# A backend maps (q [T, N, H], kv pool, layer index, metadata, sliding_window) -> [T, N, H].
AttentionFn = Callable[[jax.Array, KVPool, jax.Array, AttentionMetadata, "int | None"], jax.Array]


def write_kv(kv: KVPool, layer: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> KVPool:
    """Scatter the new tokens' k, v [T, K, H] into ``layer`` of the pool (in place under donation).

    A quantised pool gets each token's values and its per-kv-head scales (see kv_quant.py).
    """
    block_size = kv[0].shape[2]
    at = (layer, slot_mapping // block_size, slot_mapping % block_size)
    if isinstance(kv, QuantizedKVPool):
        (k_q, k_scale), (v_q, v_scale) = quantize(k, kv.k.dtype), quantize(v, kv.v.dtype)
        return QuantizedKVPool(kv.k.at[at].set(k_q), kv.v.at[at].set(v_q),
                               kv.k_scale.at[at].set(k_scale), kv.v_scale.at[at].set(v_scale))
    k_pool, v_pool = kv
    return k_pool.at[at].set(to_pool(k, k_pool.dtype)), v_pool.at[at].set(to_pool(v, v_pool.dtype))


def read_kv(kv: KVPool, layer: jax.Array, index: tuple, dtype) -> tuple[jax.Array, jax.Array]:
    """K and V at ``[layer, *index]`` of the pool: as stored (bfloat16 bits viewed as bfloat16), or
    dequantised to ``dtype``."""
    at = (layer, *index)
    if isinstance(kv, QuantizedKVPool):
        return dequantize(kv.k[at], kv.k_scale[at], dtype), dequantize(kv.v[at], kv.v_scale[at], dtype)
    return from_pool(kv[0][at]), from_pool(kv[1][at])


def _partial_softmax(scores, visible):
    """Unnormalised softmax pieces over the last axis of scores [R..., C], for merging.

    Returns (max [R...], sum of exp [R...], exp weights [R..., C]); rows with no visible key
    give (-inf, 0, zeros).
    """
    scores = jnp.where(visible, scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1)
    weights = jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, 0.0)[..., None])
    return peak, jnp.sum(weights, axis=-1), weights


def _new_tokens_part(q, k_new, v_new, md: AttentionMetadata, window, scale):
    # q [T, K, G, H] against this step's own keys k_new/v_new [T, K, H]: causal within a sequence.
    # Query tiles (at most 8, unrolled) see only the keys up to their last token, which skips the
    # upper triangle: about half the [T, T] scores of a big prefill bucket.
    T = q.shape[0]
    tile = max(min(T, 64), T // 8)
    index = jnp.arange(T)
    parts = []
    for lo in range(0, T, tile):
        hi = lo + tile
        scores = jnp.einsum("tkgh,skh->tkgs", q[lo:hi], k_new[:hi], preferred_element_type=jnp.float32) * scale
        visible = (md.seq_ids[None, :hi] == md.seq_ids[lo:hi, None]) & (index[None, :hi] <= index[lo:hi, None])
        if window is not None:
            visible &= md.positions[None, :hi] > md.positions[lo:hi, None] - window
        peak, total, weights = _partial_softmax(scores, visible[:, None, None, :])
        parts.append((peak, total, jnp.einsum("tkgs,skh->tkgh", weights, v_new[:hi].astype(jnp.float32))))
    return tuple(jnp.concatenate(x) for x in zip(*parts, strict=True))


_CHUNK_SLOTS = 64  # key slots one work item of the cached part reads (whole blocks)
_ITEMS_PER_ITER = 16  # work items gathered and scored together per loop iteration


def _cached_part(q, kv: KVPool, layer, md: AttentionMetadata, window, scale, step_start):
    # q [T, K, G, H] against each sequence's K/V cached before this step (positions < step_start).
    # The work is a list of (token, chunk of _CHUNK_SLOTS cached keys) items, built on device:
    # token t has ceil(step_start[t] / chunk) items, so a step costs what its real contexts hold,
    # not tokens x the block bucket (padding tokens and short contexts read nothing). A loop with
    # a data-dependent trip count takes _ITEMS_PER_ITER items at a time: one gather of their
    # blocks, small enough to stay in cache while it is scored, then per-item softmax partials
    # land in a [T, J] table that is merged per token at the end.
    T, K, G, H = q.shape
    B = md.block_tables.shape[1]
    block_size = kv[0].shape[2]
    per_chunk = max(1, min(B, _CHUNK_SLOTS // block_size))  # blocks per item
    J = -(-B // per_chunk)  # items a token may have
    n = _ITEMS_PER_ITER
    tables = jnp.pad(md.block_tables, ((0, 0), (0, J * per_chunk - B)))  # pads with the null block
    chunks = jnp.clip(-(-step_start // (per_chunk * block_size)), 0, J)  # [T] items per token
    ends = jnp.cumsum(chunks)
    num_items = ends[-1]

    def locate(w):  # item ids -> (token, chunk index, live)
        tok = jnp.minimum(jnp.searchsorted(ends, w, side="right"), T - 1)
        return tok, w - (ends[tok] - chunks[tok]), w < num_items

    def body(i, acc):
        tok, j, live = locate(i * n + jnp.arange(n))
        blocks = jax.vmap(lambda row, c: jax.lax.dynamic_slice(row, (c * per_chunk,), (per_chunk,)))(
            tables[md.seq_ids[tok]], j
        )  # [n, per_chunk]
        keys, values = read_kv(kv, layer, (blocks,), q.dtype)  # [n, per_chunk, block_size, K, H]
        keys = keys.reshape(n, -1, K, H).astype(jnp.float32)
        values = values.reshape(n, -1, K, H).astype(jnp.float32)
        key_pos = j[:, None] * per_chunk * block_size + jnp.arange(keys.shape[1])[None, :]  # [n, C]
        visible = (key_pos < step_start[tok][:, None]) & live[:, None]
        if window is not None:
            visible &= key_pos > md.positions[tok][:, None] - window
        # Multiply-and-sum over H: these [n, K] batches of tiny products are vector work, not matmuls.
        qf = q[tok].astype(jnp.float32) * scale  # [n, K, G, H]
        scores = jnp.moveaxis(jnp.sum(qf[:, None] * keys[:, :, :, None, :], axis=-1), 1, -1)  # [n, K, G, C]
        peak, total, weights = _partial_softmax(scores, visible[:, None, None, :])
        values = jnp.where(visible[:, :, None, None], values, 0.0)  # unwritten slots may hold NaN
        out = jnp.sum(jnp.moveaxis(weights, -1, 1)[..., None] * values[:, :, :, None, :], axis=1)  # [n, K, G, H]
        return tuple(jax.lax.dynamic_update_slice_in_dim(a, x, i * n, 0) for a, x in zip(acc, (peak, total, out), strict=True))

    W = -(-T * J // n) * n  # item slots: every token with every chunk, rounded to whole iterations
    init = (jnp.full((W, K, G), -jnp.inf), jnp.zeros((W, K, G)), jnp.zeros((W, K, G, H)))
    items = jax.lax.fori_loop(0, -(-num_items // n), body, init)
    # Scatter the items' partials into a [T, J] table (empty entries: -inf, 0, 0), merge per token.
    tok, j, live = locate(jnp.arange(W))
    at = (jnp.where(live, tok, T), j)
    m, l, o = (jnp.full((T, J, *x.shape[1:]), fill).at[at].set(x, mode="drop")
               for x, fill in zip(items, (-jnp.inf, 0.0, 0.0), strict=True))
    peak = jnp.max(m, axis=1)  # [T, K, G]
    factor = jnp.exp(m - jnp.where(jnp.isfinite(peak), peak, 0.0)[:, None])  # 0 for empty items
    return peak, jnp.sum(l * factor, axis=1), jnp.sum(o * factor[..., None], axis=1)


def xla_paged_attention(q, kv: KVPool, layer, md: AttentionMetadata, sliding_window=None):
    """Reference backend in plain jnp, in two parts merged by log-sum-exp.

    The step's own tokens attend to each other densely (causal within a sequence: matmuls over
    query tiles, not a gather), and to what their sequence had cached before the step through a
    loop over (token, 64-slot chunk) work items, so a step reads the cached context its tokens
    really have: fresh prompt chunks and padding read nothing, and a decode at context 100 in a
    32-block bucket reads 2 chunks, not 32 blocks.

    On GPU the loop's data-dependent trip count costs a host round trip per iteration; the
    kernel backends ("pallas", the default there) have no such loop. ``benchmarks/step_profile.py``
    measures this backend's share of each step bucket on the CPU.
    """
    T, N, H = q.shape
    block_size, K = kv[0].shape[2:4]
    qg = q.reshape(T, K, N // K, H)
    scale = H**-0.5
    # The step's own K/V, read back through the block tables like every other key.
    blocks = md.block_tables[md.seq_ids, md.positions // block_size]
    k_new, v_new = read_kv(kv, layer, (blocks, md.positions % block_size), q.dtype)  # [T, K, H]
    # Padding tokens (after the last sequence) may point at unwritten slots: a zero weight times a
    # NaN value would still poison the matmul, so their values are zeroed.
    real = jnp.arange(T) < md.cu_q_lens[-1]
    v_new = jnp.where(real[:, None, None], v_new, 0)
    step_start = md.positions - (jnp.arange(T) - md.cu_q_lens[md.seq_ids])
    m_a, l_a, o_a = _new_tokens_part(qg, k_new, v_new, md, sliding_window, scale)
    m_b, l_b, o_b = _cached_part(qg, kv, layer, md, sliding_window, scale, step_start)
    peak = jnp.maximum(m_a, m_b)  # finite: every token sees itself
    a, b = jnp.exp(m_a - peak), jnp.exp(m_b - peak)
    out = (o_a * a[..., None] + o_b * b[..., None]) / (l_a * a + l_b * b)[..., None]
    return out.reshape(T, N, H).astype(q.dtype)


_BACKENDS: dict[str, AttentionFn] = {"xla": xla_paged_attention}


def register_attention_backend(name: str, fn: AttentionFn) -> None:
    """Make ``fn`` selectable as ``attention_backend=name`` in ``LLM`` and ``EngineArgs``.

    Register before the engine is created; a name already taken is replaced. The model calls
    ``fn(q, kv, layer, md, sliding_window)`` positionally, once per layer, inside the jitted step
    (layers run under ``lax.scan``), so ``fn`` must be traceable: no host syncs, no Python branching
    on array values. Its signature and semantics are those of :func:`xla_paged_attention`.

    Args:
      name: the backend's name.
      fn: the backend, called with
        q: ``[T, N, H]`` queries of every token of the flat batch, RoPE already applied, in the
          model's dtype. T is padded up to a bucket; N query heads, H head dim.
        kv: the pool ``(k, v)``, each ``[L, num_blocks, block_size, K, H]``; K kv heads with
          ``N % K == 0``, query head n reading kv head ``n // (N // K)``. This step's new K/V are
          already written at ``md.slot_mapping`` (see :func:`write_kv`); ``fn`` only reads. On
          CPU a bfloat16 model's pool is uint16, the values' bits (``kv_quant.BF16_BITS``;
          :func:`read_kv` views them as bfloat16). With ``kv_cache_dtype`` "fp8"/"int8" it is a
          :class:`QuantizedKVPool` instead: int8 or uint8 (fp8 e4m3 bits) values with float32 scales ``[L, num_blocks, block_size, K]``
          (:func:`read_kv` gathers and dequantises); a backend that does not handle it may raise
          ValueError when traced, which the engine reports at start-up.
        layer: int32 scalar, traced (the scan index): the layer of the pool to read.
        md: :class:`AttentionMetadata`, a pytree of int32 arrays (S sequences, B blocks each,
          both padded): ``positions [T]``, ``seq_ids [T]`` (each token's row of
          ``block_tables``), ``block_tables [S, B]`` (physical block ids, 0 = the null block past
          a sequence's end), ``cu_q_lens [S + 1]`` (sequence s owns tokens
          ``cu_q_lens[s]:cu_q_lens[s + 1]``), ``kv_lens [S]`` (tokens in the pool after this
          step), ``slot_mapping [T]`` (``block * block_size + offset`` of each new token).
        sliding_window: a static Python int or None. When set, only keys at positions
          ``> position - sliding_window`` are visible.
      ``fn`` returns ``[T, N, H]`` in q's dtype: for token t of sequence ``s = seq_ids[t]``,
      ``softmax(q_t . k / sqrt(H)) @ v`` over the keys of s at positions ``0..positions[t]``
      (within the window), key position p living in block ``block_tables[s, p // block_size]`` at
      offset ``p % block_size``. Slots a token cannot see may hold anything, NaN included, so
      masked values must be excluded, not multiplied by zero. Rows of padding tokens (past
      ``cu_q_lens[-1]``) are never sampled; they should be finite (zeros are fine), since they
      flow on through the model and the next layer writes their K/V into the null block.

      A backend whose cost does not grow with the block table's padded width B (it reads each
      sequence's blocks only up to its own position) may set ``fn.one_block_bucket = True``: the
      runner then always passes the full width and compiles one program per token bucket
      instead of one per (tokens, power-of-two width) pair, with finer token buckets below 64
      (multiples of 8: see ``Buckets.make``). A CPU backend may set ``fn.cpu_matmul = True``:
      the runner then packs a float32 model's matmul weights for the C++ CPU matmul kernel
      (``pallas_kernels/cpu_matmul.py``; see ``jaxllm.models.layers.pack_params``).

    Raises:
      ValueError: if ``fn`` is not callable.
    """
    if not callable(fn):
        raise ValueError(f"attention backend {name!r} must be callable")
    _BACKENDS[name] = fn


# Kernel backends live in pallas_kernels and are imported on first request, so importing the
# engine never pulls in Pallas or Triton. name -> (module, attribute).
_KERNEL_BACKENDS = {
    "pallas": ("pallas_kernels.backends", "pallas_paged_attention"),
    "pallas_mgpu": ("pallas_kernels.backends", "mosaic_paged_attention"),
    "triton": ("pallas_kernels.backends", "triton_paged_attention"),
    "cpu": ("pallas_kernels.cpu_attention", "cpu_paged_attention"),
}


def available_backends() -> tuple[str, ...]:
    return (*_BACKENDS, *(n for n in _KERNEL_BACKENDS if n not in _BACKENDS), "auto")


def _unavailable_reason(name: str) -> str | None:
    if name == "triton":
        from pallas_kernels.triton_paged_attention import triton_unavailable_reason

        return triton_unavailable_reason()
    if name == "cpu":
        from pallas_kernels.cpu_kernels import cpu_kernels_unavailable_reason

        return cpu_kernels_unavailable_reason()
    return None


def _cpu_auto_backend() -> str:
    """"cpu" (the C++ kernel) where it builds, else "xla", with a warning saying why."""
    reason = _unavailable_reason("cpu")
    if reason is None:
        return "cpu"
    logger.warning("attention_backend='auto' uses 'xla': the 'cpu' kernel is unavailable: %s", reason)
    return "xla"


def get_attention_backend(name: str) -> AttentionFn:
    """Resolve a backend name.

    "xla" is the plain-jnp reference; "cpu" a C++ kernel through XLA's FFI (CPU only, built with
    the system compiler on first use: pallas_kernels/cpu_attention.py); "pallas" the Pallas
    kernels (interpreted on CPU); "triton" a raw Triton kernel through jax-triton (NVIDIA GPU
    only); "pallas_mgpu" the Hopper kernel on Pallas Mosaic GPU (H100/H200 only).

    "auto" is "cpu" on CPU (measured: benchmarks/throughput.py --attention-backends auto,xla), or
    "xla" with a warning where the kernel cannot be built. On GPU it is "pallas", chosen by
    reasoning (a fused paged kernel reads each page once, the xla backend materialises gathered
    context), not yet by a measurement, since no GPU was available when this was written;
    benchmarks/attention.py is the sweep that should decide it.
    """
    if name == "auto":
        name = "pallas" if jax.default_backend() == "gpu" else _cpu_auto_backend()
    if name not in _BACKENDS and name in _KERNEL_BACKENDS:
        import importlib

        module, attribute = _KERNEL_BACKENDS[name]
        reason = _unavailable_reason(name)
        if reason is not None:
            raise ValueError(f"attention_backend={name!r} is not usable here: {reason}")
        register_attention_backend(name, getattr(importlib.import_module(module), attribute))
    if name not in _BACKENDS:
        raise ValueError(f"attention_backend={name!r} is not available; available: {available_backends()}")
    return _BACKENDS[name]
