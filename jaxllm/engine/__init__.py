"""Host side of the engine: plain Python and numpy, never jax.

Names are imported lazily: ``jaxllm.sampling_params`` imports ``jaxllm.engine.messages``, so an
eager import of the engine here would be circular.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLMEngine": "jaxllm.engine.llm_engine",
    "EngineStats": "jaxllm.engine.llm_engine",
    "Scheduler": "jaxllm.engine.scheduler",
    "RequestUpdate": "jaxllm.engine.scheduler",
    "KVCacheManager": "jaxllm.engine.kv_cache_manager",
    "Request": "jaxllm.engine.request",
    "RequestStatus": "jaxllm.engine.request",
    "IncrementalDetokenizer": "jaxllm.engine.detokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxllm.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
