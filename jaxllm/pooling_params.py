"""PoolingParams: vLLM's per-request parameters of a pooling request (``LLM.embed`` / ``classify`` /
``score`` / ``encode``, the server's ``/v1/embeddings``, ``/classify``, ``/score``, ``/rerank``)."""

from __future__ import annotations

from dataclasses import dataclass

from jaxllm.sampling_params import _check_truncate_prompt_tokens, truncate_prompt

# What a pooling request returns: a (normalised) hidden-state vector, or a classifier's label
# probabilities; for the token tasks, one of those per prompt token.
POOLING_TASKS = ("embed", "classify", "token_embed", "token_classify")


@dataclass
class PoolingParams:
    """How one prompt's hidden states become its output vector.

    Args:
        dimensions: vLLM's Matryoshka truncation: the embedding's first ``dimensions`` values
            (normalised after the cut), for "embed" and "token_embed" on a model trained for it
            (``ModelConfig.check_dimensions``); None: all of them.
        normalize: L2-normalise the vector (each token's, for token_embed); None: the engine's
            ``pooler_config`` decides.
        truncate_prompt_tokens: keep the prompt's last k tokens (-1: the last max_model_len).
        use_activation: classify and token_classify: apply the classifier's activation (softmax,
            or a sigmoid for one label) to the head's logits; None and True do, False returns the
            logits.
        activation: vLLM's earlier name of ``use_activation``.
        task: one of ``POOLING_TASKS``; None: the model's own ("classify" for a sequence
            classifier, "token_classify" for a token classifier, "embed" otherwise).
            ``LLM.encode`` sets it from ``pooling_task``.
    """

    dimensions: int | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None
    use_activation: bool | None = None
    activation: bool | None = None  # vLLM's earlier name of use_activation
    task: str | None = None

    def __post_init__(self):
        if self.activation is not None:
            if self.use_activation is not None and self.use_activation != self.activation:
                raise ValueError(f"activation={self.activation!r} and use_activation={self.use_activation!r} "
                                 "disagree; activation is the old name of use_activation: give one")
            self.use_activation = self.activation
        for name in ("normalize", "use_activation"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be a bool or None")
        if self.task is not None and self.task not in POOLING_TASKS:
            raise ValueError(f"task={self.task!r} must be one of {POOLING_TASKS} or None")
        d = self.dimensions
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 1):
            raise ValueError(f"dimensions={d!r} must be a positive integer (or None: all of them)")
        _check_truncate_prompt_tokens(self.truncate_prompt_tokens)

    def truncated_prompt(self, token_ids: list[int], max_model_len: int) -> list[int]:
        return truncate_prompt(token_ids, self.truncate_prompt_tokens, max_model_len)
