"""LoRA adapters (vLLM's ``enable_lora``): requests name an adapter with a :class:`LoRARequest`;
PEFT adapter directories are read on the host (``adapter.py``) and served from slots of one set
of device stacks (``jaxllm/runner/lora_slots.py``, ``jaxllm/models/lora.py``)."""

from jaxllm.lora.request import LoRARequest

__all__ = ["LoRARequest"]
