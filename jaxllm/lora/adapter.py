"""Read a PEFT LoRA adapter into per-layer numpy stacks laid out like the model's weights.

A PEFT adapter directory holds ``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``,
``rank_pattern`` / ``alpha_pattern``, ...) and ``adapter_model.safetensors`` (or ``.bin``) with,
per adapted linear layer, ``...layers.{i}.self_attn.q_proj.lora_A.weight`` [r, in] and
``...lora_B.weight`` [out, r]. The layer's output gains ``scale * x @ A.T @ B.T``, with
``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).

Here each adapted weight becomes ``a [L, in, r]`` and ``b [L, r, out]`` with the scale folded into
``b``; layers the adapter leaves alone are zeros. Only the Llama family's seven projections can be
adapted; anything else an adapter carries (embeddings, the output head, biases, DoRA magnitudes,
``modules_to_save``) is refused by name rather than silently dropped.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.lora.request import LoRARequest

# Hugging Face module name -> the model's weight name (jaxllm/models/layout.py).
TARGET_MODULES = {
    "q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
    "gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down",
}

_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def target_dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(input width, output width) of each adaptable weight, by the model's weight name."""
    D, F, H = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * H, cfg.num_kv_heads * H
    return {"wq": (D, q), "wk": (D, kv), "wv": (D, kv), "wo": (q, D), "w_gate": (D, F), "w_up": (D, F),
            "w_down": (F, D)}


def check_lora_support(cfg: ModelConfig) -> None:
    """ValueError unless ``cfg``'s family can take adapters (``enable_lora``)."""
    if cfg.family != "llama":
        raise ValueError(f"enable_lora: LoRA adapters are supported for the Llama family (Llama, Mistral, Qwen2, "
                         f"Qwen3, SmolLM2), not {cfg.architecture}")


@dataclass(frozen=True)
class LoRAAdapter:
    """One adapter's weights: ``weights[name] = (a [L, in, r], b [L, r, out])`` in float32, the
    scale folded into ``b``; only the weights it adapts."""

    request: LoRARequest
    rank: int
    weights: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def _resolve(lora_path: str) -> Path:
    path = Path(lora_path).expanduser()
    if path.is_dir():
        return path
    from converters import resolve_model

    try:
        path = resolve_model(lora_path)
    except FileNotFoundError as exc:
        raise ValueError(f"lora_path={lora_path!r} is not an adapter directory: {exc}") from None
    if not path.is_dir():
        raise ValueError(f"lora_path={lora_path!r} is not an adapter directory")
    return path


def adapter_rank(lora_path: str) -> int:
    """The largest rank of an adapter's modules (``r`` and ``rank_pattern``), to size max_lora_rank."""
    config = _read_config(_resolve(lora_path))
    return max([int(config.get("r", 8)), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def _read_config(directory: Path) -> dict:
    file = directory / "adapter_config.json"
    if not file.is_file():
        raise ValueError(f"lora_path={str(directory)!r} has no adapter_config.json (a PEFT LoRA adapter directory)")
    config = json.loads(file.read_text())
    refused = [
        ("peft_type", config.get("peft_type", "LORA") not in ("LORA", None), "only LoRA adapters"),
        ("use_dora", bool(config.get("use_dora")), "DoRA is not supported"),
        ("bias", config.get("bias", "none") not in ("none", None), "adapter biases are not supported"),
        ("modules_to_save", bool(config.get("modules_to_save")), "fully trained extra modules are not supported"),
        ("fan_in_fan_out", bool(config.get("fan_in_fan_out")), "Conv1D (GPT-2) adapters are not supported"),
    ]
    for key, bad, why in refused:
        if bad:
            raise ValueError(f"adapter_config.json {key}={config[key]!r}: {why}")
    return config


def _open(directory: Path):
    from converters.sources import SafetensorsSource, TorchBinSource

    if (directory / "adapter_model.safetensors").is_file():
        return SafetensorsSource([directory / "adapter_model.safetensors"])
    if (directory / "adapter_model.bin").is_file():
        return TorchBinSource([directory / "adapter_model.bin"])
    raise ValueError(f"lora_path={str(directory)!r} has no adapter_model.safetensors or adapter_model.bin")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that ends ``module``'s
    dotted name (``q_proj``, ``layers.0.self_attn.q_proj``, or a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(request: LoRARequest, cfg: ModelConfig, max_lora_rank: int) -> LoRAAdapter:
    """Read ``request``'s adapter for a model of ``cfg``; ValueError naming what does not fit
    (a missing file, a module that cannot be adapted, a rank above ``max_lora_rank``, a shape that
    is not this model's)."""
    check_lora_support(cfg)
    directory = _resolve(request.lora_path)
    config = _read_config(directory)
    source = _open(directory)
    rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    dims = target_dims(cfg)
    L = cfg.num_layers
    pieces: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for name in sorted(source.names()):
        m = _KEY.search(name)
        if m is None:
            raise ValueError(f"adapter tensor {name!r} in {directory}: only the projections "
                             f"{sorted(TARGET_MODULES)} of each layer can be adapted")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if module not in TARGET_MODULES:
            raise ValueError(f"adapter tensor {name!r}: module {module!r} cannot be adapted; supported: "
                             f"{sorted(TARGET_MODULES)}")
        if layer >= L:
            raise ValueError(f"adapter tensor {name!r}: layer {layer} but the model has {L} layers")
        pieces.setdefault((module, layer), {})[which] = np.asarray(source.get(name), np.float32)
    if not pieces:
        raise ValueError(f"lora_path={request.lora_path!r}: the adapter has no LoRA weights")
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    top_rank = 0
    for (module, layer), ab in sorted(pieces.items()):
        target = TARGET_MODULES[module]
        d_in, d_out = dims[target]
        full = f"model.layers.{layer}.{'mlp' if module in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{module}"
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter {full}: lora_A and lora_B must both be present")
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if a.shape != (r, d_in) or b.shape != (d_out, r):
            raise ValueError(f"adapter {full}: lora_A {a.shape} / lora_B {b.shape} do not fit this model's "
                             f"{d_in} -> {d_out} weight (expected [r, {d_in}] and [{d_out}, r])")
        if r > max_lora_rank:
            raise ValueError(f"lora_path={request.lora_path!r}: rank {r} ({full}) exceeds max_lora_rank={max_lora_rank}")
        r_cfg = int(_pattern_value(config.get("rank_pattern"), full, rank))
        if r_cfg != r:
            raise ValueError(f"adapter {full}: lora_A has rank {r} but adapter_config.json says r={r_cfg}")
        alpha_m = float(_pattern_value(config.get("alpha_pattern"), full, alpha))
        scale = alpha_m / (math.sqrt(r) if config.get("use_rslora") else r)
        top_rank = max(top_rank, r)
        if target not in weights:
            weights[target] = (np.zeros((L, d_in, max_lora_rank), np.float32),
                               np.zeros((L, max_lora_rank, d_out), np.float32))
        weights[target][0][layer, :, :r] = a.T
        weights[target][1][layer, :r, :] = scale * b.T
    # Trimmed to the adapter's largest rank; slots pad to max_lora_rank.
    weights = {t: (a[:, :, :top_rank].copy(), b[:, :top_rank, :].copy()) for t, (a, b) in weights.items()}
    return LoRAAdapter(request, top_rank, weights)
