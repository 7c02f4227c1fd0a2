"""jaxllm: vLLM's engine rebuilt in JAX and Pallas.

Public API with vLLM's names: ``LLM``, ``SamplingParams``, ``RequestOutput``,
``CompletionOutput``, ``LLMEngine``, ``EngineArgs``; and ``load_model`` for notebooks.
Names are imported on first use, so the host-side ``jaxllm.engine`` never pulls in jax.
"""

import importlib

from jaxllm import host_malloc

__version__ = "0.1.0"

# Before JAX starts its threads: XLA:CPU's per-step temporaries then reuse freed pages instead of
# faulting in fresh ones every step (see jaxllm/host_malloc.py; JAXLLM_MALLOC_TUNING=0 disables).
host_malloc.tune()

_EXPORTS = {
    "LLM": "jaxllm.llm",
    "BeamSearchParams": "jaxllm.beam_search",
    "BeamSearchOutput": "jaxllm.beam_search",
    "Logprob": "jaxllm.outputs",
    "CompletionOutput": "jaxllm.outputs",
    "RequestOutput": "jaxllm.outputs",
    "PoolingRequestOutput": "jaxllm.outputs",
    "EmbeddingRequestOutput": "jaxllm.outputs",
    "ClassificationRequestOutput": "jaxllm.outputs",
    "ScoringRequestOutput": "jaxllm.outputs",
    "PoolingParams": "jaxllm.pooling_params",
    "LogitsProcessor": "jaxllm.logits_processor",
    "SamplingParams": "jaxllm.sampling_params",
    "RequestOutputKind": "jaxllm.sampling_params",
    "StructuredOutputsParams": "jaxllm.sampling_params",
    "GuidedDecodingParams": "jaxllm.sampling_params",
    "TextPrompt": "jaxllm.inputs",
    "TokensPrompt": "jaxllm.inputs",
    "EmbedsPrompt": "jaxllm.inputs",
    "LLMEngine": "jaxllm.engine.llm_engine",
    "EngineArgs": "jaxllm.engine_args",
    "create_engine": "jaxllm.engine_args",
    "Model": "jaxllm.loader",
    "load_model": "jaxllm.loader",
    "register_attention_backend": "jaxllm.models.attention",
    "LoRARequest": "jaxllm.lora.request",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
