"""A classifier's head, applied on the host to each classify request's pooled state.

``*ForSequenceClassification`` checkpoints are a decoder plus ``score``, one linear map
[hidden_size -> num_labels] of the last token's final hidden state; ``*ForTokenClassification``
ones apply the same map to every token's. The decoder runs in the step like any model's; the
head is tiny (num_labels x hidden_size) and needed once per request, so the engine keeps it in
numpy and applies it to the pooled vector (or the per-token states) the runner returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.models.layout import HEAD_PARAMS


@dataclass(frozen=True)
class ClassifierHead:
    weight: np.ndarray  # [hidden_size, num_labels] float32
    labels: tuple[str, ...]  # id2label, by label index
    activation: str  # "softmax", "sigmoid" or "identity" (ModelConfig.classifier_activation)
    per_token: bool = False  # a token classifier (ModelConfig.classifies_tokens)
    bias: np.ndarray | None = None  # [num_labels] float32: a token classifier's head has one

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @classmethod
    def split_from(cls, cfg: ModelConfig, params: dict) -> tuple[ClassifierHead | None, dict]:
        """The head of a classifier's ``params`` (None for other models), and the params without it."""
        if not cfg.is_classifier:
            return None, params
        rest = {name: value for name, value in params.items() if name not in HEAD_PARAMS}
        bias = params.get("score_bias")
        head = cls(np.asarray(params["score"], np.float32), cfg.id2label, cfg.classifier_activation,
                   cfg.classifies_tokens, None if bias is None else np.asarray(bias, np.float32))
        return head, rest

    @property
    def kind(self) -> str:
        return "token" if self.per_token else "sequence"

    @property
    def tasks(self) -> tuple[str, ...]:
        """The pooling tasks it serves, its own first: a sequence classifier's head also classifies
        each token (vLLM's token_classify); a token classifier's only does that."""
        return ("token_classify",) if self.per_token else ("classify", "token_classify")

    def __call__(self, hidden: np.ndarray, use_activation: bool = True) -> np.ndarray:
        """hidden [..., hidden_size] -> float32 [..., num_labels]: probabilities, or the logits
        without the activation (a vector per token for [num_tokens, hidden_size])."""
        logits = np.asarray(hidden, np.float32) @ self.weight
        if self.bias is not None:
            logits = logits + self.bias
        if not use_activation or self.activation == "identity":
            return logits
        if self.activation == "sigmoid":
            return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
        shifted = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
        return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)
