"""Checkpoint converters: Hugging Face safetensors / .bin, GGUF, and an orbax cache.

``load_checkpoint`` is the one entry point: name or path in, :class:`Checkpoint` out, with the
parameters in the layout of :func:`jaxllm.models.layout.param_shapes`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from converters import orbax_cache
from converters.checkpoint import Checkpoint
from converters.gguf_loader import load_gguf
from converters.hf import generation_defaults, load_hf_directory
from converters.resolve import resolve_model
from jaxllm.models.registry import config_from_hf

__all__ = ["Checkpoint", "config_from_hf", "load_checkpoint", "model_generation_defaults", "resolve_model"]

_DTYPES = ("float32", "bfloat16", "float16")


def _param_dtype(dtype) -> np.dtype:
    resolved = np.dtype(dtype)  # ml_dtypes (imported by converters.sources) registers "bfloat16"
    if resolved.name not in _DTYPES:
        raise ValueError(f"dtype={resolved.name!r} is not a parameter dtype; choose from {_DTYPES}")
    return resolved


def _convert(path: Path, dtype) -> Checkpoint:
    if path.is_file():
        return load_gguf(path, dtype)
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").is_file() and len(ggufs) == 1:  # a GGUF-only Hub repo
        return load_gguf(ggufs[0], dtype)
    return load_hf_directory(path, dtype)


def cache_key(path: Path, dtype) -> str:
    """Directory name of ``path`` converted to ``dtype``; changes when the source files change."""
    path = path.resolve()
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file())
    stamp = [str(path)] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    digest = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:12]
    return f"{path.stem}-{np.dtype(dtype).name}-{digest}"


def model_generation_defaults(name_or_path: str | Path | None) -> dict:
    """The sampling defaults a checkpoint directory's generation_config.json sets (vLLM's
    ``generation_config="auto"``); {} for GGUF files and directories without one."""
    path = resolve_model(name_or_path)
    return {} if path.is_file() else generation_defaults(path)


def load_checkpoint(
    name_or_path: str | Path | None = None, dtype=np.float32, cache_dir: str | Path | None = None
) -> Checkpoint:
    """Load and convert a model checkpoint.

    Args:
        name_or_path: see :func:`resolve_model`; None loads the embedded SmolLM2-135M-Instruct GGUF.
        dtype: numpy dtype of the parameters (np.float32, ml_dtypes.bfloat16, np.float16, or their
            names).
        cache_dir: when set, the converted checkpoint is saved under it with orbax the first time
            and reloaded from there afterwards, skipping conversion.

    Returns:
        The checkpoint: config, params (nested dict of numpy arrays), tokenizer, source dtype.
    """
    dtype = _param_dtype(dtype)
    path = resolve_model(name_or_path)
    if cache_dir is None:
        return _convert(path, dtype)
    saved = Path(cache_dir) / cache_key(path, dtype)
    if orbax_cache.is_saved(saved):
        return orbax_cache.load(saved)
    checkpoint = _convert(path, dtype)
    orbax_cache.save(checkpoint, saved)
    return checkpoint
