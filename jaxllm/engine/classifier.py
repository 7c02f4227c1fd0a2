"""A sequence classifier's head, applied on the host to each classify request's pooled state.

``*ForSequenceClassification`` checkpoints are a decoder plus ``score``, one linear map
[hidden_size -> num_labels] of the last token's final hidden state. The decoder runs in the
step like any model's; the head is tiny (num_labels x hidden_size) and needed once per request,
so the engine keeps it in numpy and applies it to the pooled vector the runner returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxllm.config import ModelConfig


@dataclass(frozen=True)
class ClassifierHead:
    weight: np.ndarray  # [hidden_size, num_labels] float32
    labels: tuple[str, ...]  # id2label, by label index
    activation: str  # "softmax", "sigmoid" or "identity" (ModelConfig.classifier_activation)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @classmethod
    def split_from(cls, cfg: ModelConfig, params: dict) -> tuple[ClassifierHead | None, dict]:
        """The head of a classifier's ``params`` (None for other models), and the params without it."""
        if not cfg.is_classifier:
            return None, params
        rest = {name: value for name, value in params.items() if name != "score"}
        head = cls(np.asarray(params["score"], np.float32), cfg.id2label, cfg.classifier_activation)
        return head, rest

    def __call__(self, hidden: np.ndarray, use_activation: bool = True) -> np.ndarray:
        """hidden [hidden_size] -> float32 [num_labels]: probabilities, or the logits without the activation."""
        logits = np.asarray(hidden, np.float32) @ self.weight
        if not use_activation or self.activation == "identity":
            return logits
        if self.activation == "sigmoid":
            return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
        shifted = np.exp(logits.astype(np.float64) - logits.max())
        return (shifted / shifted.sum()).astype(np.float32)
