"""Research API: load a model and run a plain full-sequence forward pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.models import model_module
from jaxllm.models.attention import AttentionMetadata, get_attention_backend
from jaxllm.models.kv_quant import kv_storage_dtype
from jaxllm.runner import kv_pool

_DTYPES = {
    "float32": np.float32, "float": np.float32,
    "bfloat16": ml_dtypes.bfloat16,
    "float16": np.float16, "half": np.float16,
}


def resolve_dtype(dtype: Any, source_dtype: str, platform: str) -> np.dtype:
    """"auto" is float32 on CPU (transformers' float32 numbers; bfloat16, asked for, is faster
    through the cpu backend's kernels but rounds) and, on GPU, the checkpoint's 16-bit type, or
    bfloat16 for float32 and quantised checkpoints."""
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; choose from {['auto', *_DTYPES]}")
        return np.dtype(_DTYPES[dtype])
    if dtype != "auto":
        return np.dtype(dtype)
    if platform == "cpu":
        return np.dtype(np.float32)
    return np.dtype(np.float16 if source_dtype == "float16" else ml_dtypes.bfloat16)


def _forward_logits(params, token_ids, *, cfg: ModelConfig, block_size: int):
    # token_ids [T] -> logits [T, V] over a fresh pool holding just this sequence.
    T = token_ids.shape[0]
    num_blocks = -(-T // block_size) + 1
    pool_dtype = kv_storage_dtype("auto", params["embed"].dtype, jax.devices()[0].platform)
    kv = kv_pool.allocate(cfg, num_blocks, block_size, pool_dtype)
    positions = jnp.arange(T, dtype=jnp.int32)
    table = jnp.arange(1, num_blocks, dtype=jnp.int32)[None, :]  # block 0 stays the null block
    md = AttentionMetadata(
        positions=positions,
        slot_mapping=table[0, positions // block_size] * block_size + positions % block_size,
        seq_ids=jnp.zeros(T, jnp.int32),
        block_tables=table,
        cu_q_lens=jnp.array([0, T], jnp.int32),
        kv_lens=jnp.array([T], jnp.int32),
    )
    model = model_module(cfg)
    hidden, _ = model.forward(params, cfg, kv, token_ids, md, get_attention_backend("xla"))
    return model.logits(params, cfg, hidden)


@dataclass
class Model:
    """A loaded model: its config, parameters on device, and tokenizer."""

    config: ModelConfig
    params: dict
    tokenizer: Any

    def forward(self, token_ids) -> jax.Array:
        """Logits [T, V] (float32) of every position of one token sequence."""
        ids = jnp.asarray(token_ids, jnp.int32)
        if ids.ndim != 1 or ids.shape[0] == 0:
            raise ValueError(f"token_ids must be a non-empty 1-D sequence, got shape {ids.shape}")
        return _jit_forward(self.params, ids, cfg=self.config, block_size=16)


_jit_forward = jax.jit(_forward_logits, static_argnames=("cfg", "block_size"))


def load_checkpoint_as(name_or_path: str | None, dtype: Any = "auto", cache_dir=None, **options):
    """Convert a checkpoint at the dtype ``dtype`` resolves to on this platform (``options``:
    converters.load_checkpoint's load_format, hf_overrides, revision)."""
    from converters import load_checkpoint

    platform = jax.devices()[0].platform
    probe_dtype = np.float32 if dtype == "auto" else resolve_dtype(dtype, "", platform)
    ckpt = load_checkpoint(name_or_path, dtype=probe_dtype, cache_dir=cache_dir, **options)
    target = resolve_dtype(dtype, ckpt.source_dtype, platform)
    if target != probe_dtype:
        params = jax.tree.map(lambda x: x.astype(target), ckpt.params)
        ckpt = type(ckpt)(ckpt.config, params, ckpt.tokenizer, ckpt.source_dtype)
    return ckpt


def load_model(name_or_path: str | None = None, dtype: Any = "auto", cache_dir=None) -> Model:
    """Load a model for notebooks: ``load_model().forward(ids)`` gives logits [T, V].

    Args:
      name_or_path: None or "SmolLM2-135M-Instruct" for the embedded model, a local HF
        checkpoint directory or .gguf file, or a repo id present in the local HF cache.
      dtype: "auto", "float32", "bfloat16" or "float16".
      cache_dir: where converted parameters are saved with orbax for a faster second load.
    Returns:
      A Model with ``.config``, ``.params``, ``.tokenizer`` and ``.forward``.
    """
    ckpt = load_checkpoint_as(name_or_path, dtype, cache_dir)
    return Model(ckpt.config, jax.device_put(ckpt.params), ckpt.tokenizer)
