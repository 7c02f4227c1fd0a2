"""The result of loading a model: config, parameters, tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Only for the annotation: jaxllm's package __init__ imports this module, so a runtime import
    # of jaxllm here would be circular when `converters` is imported first.
    from jaxllm.config import ModelConfig


@dataclass(frozen=True)
class Checkpoint:
    """A converted model, ready for the model functions."""

    config: ModelConfig
    params: dict  # nested dict of numpy arrays, exactly the structure of param_shapes(config)
    tokenizer: Any | None  # a transformers tokenizer; None when the checkpoint ships none
    source_dtype: str  # how the weights were stored: "float32", "bfloat16", "Q4_1", ...
