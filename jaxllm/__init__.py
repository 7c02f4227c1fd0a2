"""jaxllm: vLLM's engine rebuilt in JAX and Pallas.

Public API with vLLM's names: ``LLM``, ``SamplingParams``, ``RequestOutput``,
``CompletionOutput``, ``LLMEngine``, ``EngineArgs``; and ``load_model`` for notebooks.
"""

from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.engine_args import EngineArgs, create_engine
from jaxllm.llm import LLM
from jaxllm.loader import Model, load_model
from jaxllm.models.attention import register_attention_backend
from jaxllm.outputs import CompletionOutput, RequestOutput
from jaxllm.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineArgs",
    "LLMEngine",
    "Model",
    "RequestOutput",
    "SamplingParams",
    "create_engine",
    "load_model",
    "register_attention_backend",
]
