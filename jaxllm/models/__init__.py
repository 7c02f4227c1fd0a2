"""Model families as pure functions: ``forward(params, cfg, kv, token_ids, md, attend)`` and
``logits(params, cfg, hidden, rows=None)``."""

from __future__ import annotations

from types import ModuleType

from jaxllm.config import ModelConfig
from jaxllm.models import gpt, llama


def model_module(cfg: ModelConfig) -> ModuleType:
    """The module implementing ``cfg.family``."""
    return {"llama": llama, "gpt": gpt}[cfg.family]
