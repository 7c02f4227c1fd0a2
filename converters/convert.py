"""Apply a family's name map to a tensor source: HF tensors -> the layout's parameter pytree."""

from __future__ import annotations

import numpy as np

from converters.name_maps import FamilyMap, TensorRule, axis_size, axis_sizes, expected_shape, family_map
from converters.sources import TensorSource
from jaxllm.config import ModelConfig
from jaxllm.models.layout import param_shapes


class _Reader:
    """Looks tensors up by HF name (with or without the base-model prefix), remembering which."""

    def __init__(self, source: TensorSource, fmap: FamilyMap):
        self._source = source
        self._names = source.names()
        self._prefix = fmap.base_prefix
        self.used: set[str] = set()

    def resolve(self, hf_name: str) -> str | None:
        bare = hf_name.removeprefix(self._prefix)
        for candidate in (hf_name, bare):
            if candidate in self._names:
                return candidate
        return None

    def get(self, hf_name: str) -> np.ndarray:
        found = self.resolve(hf_name)
        if found is None:
            raise ValueError(f"checkpoint is missing tensor {hf_name!r}")
        self.used.add(found)
        return self._source.get(found)


def _convert_one(rule: TensorRule, hf: np.ndarray, hf_name: str, sizes: dict[str, int], shape) -> np.ndarray:
    want = expected_shape(rule.hf_shape, sizes)
    if hf.shape != want:
        raise ValueError(f"tensor {hf_name!r} has shape {hf.shape}, expected {want} ({' x '.join(rule.hf_shape)})")
    if rule.split is not None:
        part, parts = rule.split
        hf = np.split(hf, parts, axis=-1)[part]
    if rule.rows is not None:
        before, size = rule.rows
        start = sum(axis_size(entry, sizes) for entry in before)
        hf = hf[start : start + axis_size(size, sizes)]
    if rule.transpose:
        hf = hf.T
    return hf.reshape(shape)


def _param(rule: TensorRule, reader: _Reader, c: ModelConfig, shape, layer: int | None, dtype) -> np.ndarray:
    if rule.zeros_unless is not None and not getattr(c, rule.zeros_unless):
        return np.zeros(shape, dtype)
    hf_name = rule.hf_name.format(i=layer)
    value = _convert_one(rule, reader.get(hf_name), hf_name, axis_sizes(c), shape)
    if rule.offset:
        value = value.astype(np.float32) + np.float32(rule.offset)  # before the cast, as Gemma adds in float32
    return value.astype(dtype, copy=False)


def _stacked(rule: TensorRule, reader: _Reader, c: ModelConfig, shape, dtype) -> np.ndarray:
    """One parameter of every layer, each written straight into its slice of the stack."""
    out = np.empty(shape, dtype)
    for i in range(c.num_layers):
        out[i] = _param(rule, reader, c, shape[1:], i, dtype)
    return out


def _check_leftovers(reader: _Reader, source: TensorSource, fmap: FamilyMap, params: dict, c: ModelConfig) -> None:
    """Unknown tensors mean the config and the checkpoint disagree (e.g. biases the config lacks)."""
    head = reader.resolve("lm_head.weight")
    if c.tie_word_embeddings and head is not None and head not in reader.used:
        # .bin checkpoints of tied models store the shared tensor twice.
        if not np.array_equal(source.get(head).astype(params["embed"].dtype), params["embed"]):
            raise ValueError(f"tie_word_embeddings is set but tensor {head!r} differs from the embedding")
        reader.used.add(head)
    extra = sorted(n for n in source.names() - reader.used if not fmap.is_ignored(n))
    if extra:
        raise ValueError(f"checkpoint has tensors the {c.architecture} config does not use: {extra[:8]}")


def convert(c: ModelConfig, source: TensorSource, dtype=np.float32) -> dict:
    """Build the parameter pytree of ``c`` from HF-named tensors.

    Args:
        c: the model config; ``param_shapes(c)`` fixes which parameters are produced.
        source: HF-named tensors.
        dtype: numpy dtype of every parameter.

    Returns:
        Nested dict of numpy arrays with exactly the structure and shapes of ``param_shapes(c)``.

    Raises:
        ValueError: a tensor is missing, has the wrong shape, or is not used by the config.
    """
    fmap, shapes = family_map(c), param_shapes(c)
    reader = _Reader(source, fmap)
    params = {
        name: _param(fmap.rule(name, per_layer=False), reader, c, shape, None, dtype)
        for name, shape in shapes.items()
        if name != "layers"
    }
    params["layers"] = {name: _stacked(fmap.rule(name, per_layer=True), reader, c, shape, dtype)
                        for name, shape in shapes["layers"].items()}
    _check_leftovers(reader, source, fmap, params, c)
    return params
