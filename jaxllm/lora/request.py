"""vLLM's ``LoRARequest``: which adapter a request runs with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter to apply to one request (``LLM.generate(..., lora_request=...)``).

    Args:
        lora_name: a name for it (the server's model name for it).
        lora_int_id: its identity, a positive integer: requests with the same id share the loaded
            adapter and each other's cached prefix blocks.
        lora_path: a PEFT adapter directory (``adapter_config.json`` and ``adapter_model.safetensors``
            or ``.bin``), or a Hub repo id in the local Hugging Face cache.
        base_model_name: the model it was trained on (informational, as in vLLM).
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name={self.lora_name!r} must be a non-empty string")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id={self.lora_int_id!r} must be a positive integer")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"lora_path={self.lora_path!r} must name an adapter directory")
