"""Load a Hugging Face checkpoint directory: config.json, weights, tokenizer.

Weights are taken from safetensors when present (``model.safetensors``, or shards listed in
``model.safetensors.index.json``), else from ``pytorch_model.bin`` (or its sharded index) through
torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from converters.checkpoint import Checkpoint
from converters.convert import convert
from converters.sources import SafetensorsSource, TensorSource, TorchBinSource
from jaxllm.models.registry import config_from_hf

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def read_hf_config(directory: Path) -> dict:
    """The parsed ``config.json`` of ``directory``."""
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}: not a Hugging Face checkpoint directory")
    return json.loads(path.read_text())


def _index_files(index: Path) -> list[Path]:
    weight_map = json.loads(index.read_text())["weight_map"]
    return [index.parent / name for name in sorted(set(weight_map.values()))]


def open_weights(directory: Path) -> TensorSource:
    """The weights of ``directory``: safetensors first, torch ``.bin`` otherwise."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return SafetensorsSource(_index_files(index), index)
    if (directory / "model.safetensors").is_file():
        return SafetensorsSource([directory / "model.safetensors"])
    # Mistral's repos add consolidated.safetensors, the same weights under mistral-native names.
    safetensors = sorted(f for f in directory.glob("*.safetensors") if not f.name.startswith("consolidated"))
    if safetensors:
        return SafetensorsSource(safetensors)
    bin_index = directory / "pytorch_model.bin.index.json"
    if bin_index.is_file():
        return TorchBinSource(_index_files(bin_index))
    if (directory / "pytorch_model.bin").is_file():
        return TorchBinSource([directory / "pytorch_model.bin"])
    raise FileNotFoundError(
        f"no weights in {directory}: looked for model.safetensors(.index.json), *.safetensors "
        "and pytorch_model.bin(.index.json)"
    )


def load_tokenizer(directory: Path) -> Any | None:
    """``AutoTokenizer.from_pretrained(directory)``, or None when the directory has no tokenizer."""
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _generation_config(directory: Path) -> dict:
    """``directory/generation_config.json``, or {} without one."""
    path = directory / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _with_generation_eos(directory: Path, hf: dict) -> dict:
    """Chat models list their end-of-turn ids in generation_config.json (Llama 3's <|eot_id|>),
    as vLLM reads them: the union with config.json's eos ids ends generation."""
    extra = _generation_config(directory).get("eos_token_id")
    if extra is None:
        return hf
    ids = []
    for value in (hf.get("eos_token_id"), extra):
        ids += value if isinstance(value, list) else [] if value is None else [value]
    return {**hf, "eos_token_id": list(dict.fromkeys(ids))}


# Sampling fields vLLM takes from generation_config.json, with transformers' GenerationConfig
# defaults: only values that differ from those count (vLLM reads the config's diff).
_GENERATION_SAMPLING_DEFAULTS = {"repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                                 "min_p": None, "max_new_tokens": None}


def generation_defaults(directory: Path) -> dict:
    """The model creator's sampling defaults in ``directory/generation_config.json``, as
    SamplingParams fields (``max_new_tokens`` becomes ``max_tokens``); {} when there are none."""
    config = _generation_config(directory)
    found = {key: config[key] for key, default in _GENERATION_SAMPLING_DEFAULTS.items()
             if config.get(key) is not None and config[key] != default}
    if "max_new_tokens" in found:
        found["max_tokens"] = found.pop("max_new_tokens")
    return found


def load_hf_directory(directory: Path, dtype=np.float32, load_format: str = "auto",
                      hf_overrides: dict | None = None) -> Checkpoint:
    """Convert the checkpoint in ``directory`` to the layout's params, cast to ``dtype``.

    ``load_format`` (vLLM's): "auto" (safetensors, else torch .bin), "safetensors", "pt", or
    "dummy" (random weights of the config's shapes; no weight files read). ``hf_overrides``:
    config.json fields replaced before the model's config is built."""
    config = config_from_hf(_with_generation_eos(directory, {**read_hf_config(directory), **(hf_overrides or {})}))
    if load_format == "dummy":
        return Checkpoint(config, dummy_params(config, dtype), load_tokenizer(directory), np.dtype(dtype).name)
    source = open_weights(directory)
    kind = "safetensors" if isinstance(source, SafetensorsSource) else "pt"
    if load_format not in ("auto", kind):
        raise ValueError(f"load_format={load_format!r}: {directory} holds {kind} weights")
    params = convert(config, source, dtype)
    return Checkpoint(config, params, load_tokenizer(directory), source.source_dtype())


def dummy_params(config, dtype, seed: int = 0) -> dict:
    """vLLM's load_format="dummy": every parameter uniform in [-1e-3, 1e-3] (a fixed seed), in the
    layout's shapes; for timing a model's shapes without its weights."""
    from jaxllm.models.layout import param_shapes

    rng = np.random.default_rng(seed)

    def fill(shapes):
        if isinstance(shapes, dict):
            return {name: fill(shape) for name, shape in shapes.items()}
        return (rng.random(shapes, dtype=np.float32) * 2e-3 - 1e-3).astype(dtype)

    return fill(param_shapes(config))
