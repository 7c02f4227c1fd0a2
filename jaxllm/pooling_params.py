"""PoolingParams: vLLM's per-request parameters of a pooling request (``LLM.embed`` / ``LLM.encode``,
the server's ``/v1/embeddings``)."""

from __future__ import annotations

from dataclasses import dataclass

from jaxllm.sampling_params import _check_truncate_prompt_tokens, truncate_prompt


@dataclass
class PoolingParams:
    """How one prompt's hidden states become its output vector.

    Args:
        dimensions: vLLM's Matryoshka truncation. None only: no model here is trained for it.
        normalize: L2-normalise the vector; None: the engine's ``pooler_config`` decides.
        truncate_prompt_tokens: keep the prompt's last k tokens (-1: the last max_model_len).
    """

    dimensions: int | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None

    def __post_init__(self):
        if self.dimensions is not None:
            raise ValueError(f"dimensions={self.dimensions!r} is not supported: the model is not a Matryoshka "
                             "model; leave it None")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize={self.normalize!r} must be a bool or None")
        _check_truncate_prompt_tokens(self.truncate_prompt_tokens)

    def truncated_prompt(self, token_ids: list[int], max_model_len: int) -> list[int]:
        return truncate_prompt(token_ids, self.truncate_prompt_tokens, max_model_len)
