"""Where tensors come from: safetensors files, torch ``.bin`` files, or an in-memory dict.

Every source hands out numpy arrays by Hugging Face tensor name. Safetensors are read through
their numpy API (no torch; bf16 arrives as ``ml_dtypes.bfloat16``), one tensor at a time, so a
conversion never holds the whole checkpoint twice.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import ml_dtypes
import numpy as np

_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


class TensorSource(Protocol):
    """Named tensors of one checkpoint."""

    def names(self) -> frozenset[str]: ...

    def get(self, name: str) -> np.ndarray: ...

    def source_dtype(self) -> str:
        """The checkpoint's storage dtype (the most common one), e.g. "bfloat16" or "Q4_1"."""
        ...


def _most_common(dtypes: Iterable[str]) -> str:
    counts = Counter(dtypes)
    return counts.most_common(1)[0][0] if counts else "unknown"


class DictSource:
    """Tensors already in memory (e.g. dequantised GGUF)."""

    def __init__(self, tensors: dict[str, np.ndarray], dtype_name: str):
        self._tensors = tensors
        self._dtype_name = dtype_name

    def names(self) -> frozenset[str]:
        return frozenset(self._tensors)

    def get(self, name: str) -> np.ndarray:
        return self._tensors[name]

    def source_dtype(self) -> str:
        return self._dtype_name


def _shard_map(files: list[Path], index: Path | None) -> dict[str, Path]:
    """Tensor name -> file; the index's ``weight_map`` when there is one."""
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: index.parent / file for name, file in weight_map.items()}
    from safetensors import safe_open

    mapping = {}
    for file in files:
        with safe_open(file, framework="numpy") as f:
            mapping.update((name, file) for name in f.keys())
    return mapping


class SafetensorsSource:
    """One or more ``.safetensors`` files, read lazily without torch."""

    def __init__(self, files: list[Path], index: Path | None = None):
        self._where = _shard_map(files, index)

    def names(self) -> frozenset[str]:
        return frozenset(self._where)

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(self._where[name], framework="numpy") as f:
            return f.get_tensor(name)

    def source_dtype(self) -> str:
        from safetensors import safe_open

        dtypes = []
        for file in sorted(set(self._where.values())):
            with safe_open(file, framework="numpy") as f:
                dtypes += [f.get_slice(name).get_dtype() for name in f.keys()]
        return _most_common(_SAFETENSORS_DTYPES.get(d, d.lower()) for d in dtypes)


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "reading pytorch_model.bin checkpoints needs torch: `pip install torch` "
            "(the CPU build is enough), or convert the checkpoint to safetensors"
        ) from e
    return torch


def _torch_to_numpy(tensor) -> np.ndarray:
    torch = _import_torch()
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class TorchBinSource:
    """``pytorch_model.bin`` files (a pickle; needs torch). Loaded whole, as torch must."""

    def __init__(self, files: list[Path]):
        torch = _import_torch()
        self._tensors = {}
        for file in files:
            state = torch.load(file, map_location="cpu", weights_only=True)
            self._tensors.update(state)

    def names(self) -> frozenset[str]:
        return frozenset(self._tensors)

    def get(self, name: str) -> np.ndarray:
        return _torch_to_numpy(self._tensors[name])

    def source_dtype(self) -> str:
        return _most_common(str(t.dtype).removeprefix("torch.") for t in self._tensors.values())
