"""Checkpoint converters: Hugging Face safetensors / .bin, GGUF, and an orbax cache.

``load_checkpoint`` is the one entry point: name or path in, :class:`Checkpoint` out, with the
parameters in the layout of :func:`jaxllm.models.layout.param_shapes`.
"""

from __future__ import annotations

import hashlib
import json
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


LOAD_FORMATS = ("auto", "safetensors", "pt", "gguf", "dummy")  # vLLM's names


def _gguf_file(path: Path) -> Path | None:
    """The GGUF file ``path`` is, or the one of a GGUF-only directory (a Hub repo); else None."""
    if path.is_file():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    return ggufs[0] if not (path / "config.json").is_file() and len(ggufs) == 1 else None


def _convert(path: Path, dtype, load_format: str = "auto", hf_overrides: dict | None = None) -> Checkpoint:
    gguf = _gguf_file(path)
    if gguf is not None:
        if load_format not in ("auto", "gguf"):
            raise ValueError(f"load_format={load_format!r}: {path} is a GGUF checkpoint")
        if hf_overrides:
            raise ValueError("hf_overrides apply to a Hugging Face checkpoint's config.json; this is a GGUF file")
        return load_gguf(gguf, dtype)
    if load_format == "gguf":
        raise ValueError(f"load_format='gguf': {path} holds no single .gguf file")
    return load_hf_directory(path, dtype, load_format, hf_overrides)


def cache_key(path: Path, dtype, hf_overrides: dict | None = None) -> str:
    """Directory name of ``path`` converted to ``dtype`` (with ``hf_overrides``); changes when the
    source files change."""
    path = path.resolve()
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file())
    stamp = [str(path)] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    if hf_overrides:
        stamp.append(json.dumps(hf_overrides, sort_keys=True, default=str))
    digest = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:12]
    return f"{path.stem}-{np.dtype(dtype).name}-{digest}"


def model_generation_defaults(name_or_path: str | Path | None, revision: str | None = None) -> dict:
    """The sampling defaults a checkpoint directory's generation_config.json sets (vLLM's
    ``generation_config="auto"``); {} for GGUF files and directories without one."""
    path = resolve_model(name_or_path, revision=revision)
    return {} if path.is_file() else generation_defaults(path)


def load_checkpoint(
    name_or_path: str | Path | None = None, dtype=np.float32, cache_dir: str | Path | None = None, *,
    load_format: str = "auto", hf_overrides: dict | None = None, revision: str | None = None,
) -> Checkpoint:
    """Load and convert a model checkpoint.

    Args:
        name_or_path: see :func:`resolve_model`; None loads the embedded SmolLM2-135M-Instruct GGUF.
        dtype: numpy dtype of the parameters (np.float32, ml_dtypes.bfloat16, np.float16, or their
            names).
        cache_dir: when set, the converted checkpoint is saved under it with orbax the first time
            and reloaded from there afterwards, skipping conversion.
        load_format: vLLM's: "auto", "safetensors", "pt", "gguf" (what to read), or "dummy"
            (random weights of the config's shapes, never cached).
        hf_overrides: config.json fields to replace (a Hugging Face checkpoint only).
        revision: the branch, tag or commit of a cached Hub repo.

    Returns:
        The checkpoint: config, params (nested dict of numpy arrays), tokenizer, source dtype.
    """
    dtype = _param_dtype(dtype)
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r} must be one of {LOAD_FORMATS}")
    if hf_overrides is not None and not isinstance(hf_overrides, dict):
        raise ValueError(f"hf_overrides must be a dict of config.json fields, got {type(hf_overrides).__name__}")
    path = resolve_model(name_or_path, revision=revision)
    if cache_dir is None or load_format == "dummy":
        return _convert(path, dtype, load_format, hf_overrides)
    saved = Path(cache_dir) / cache_key(path, dtype, hf_overrides)
    if orbax_cache.is_saved(saved):
        return orbax_cache.load(saved)
    checkpoint = _convert(path, dtype, load_format, hf_overrides)
    orbax_cache.save(checkpoint, saved)
    return checkpoint
