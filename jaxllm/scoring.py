"""Scoring pairs of texts (vLLM's ``LLM.score``, ``/score`` and ``/rerank``), host side.

Two kinds of model score a pair:

- a cross-encoder, a sequence classifier with one label: the pair is tokenized together (the
  tokenizer's ``text_pair`` encoding, as vLLM does) and classified; the score is its one
  probability (the sigmoid of the head's logit, or the logit without the activation);
- any embedding model: both texts are embedded, the score is the cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def score_pairs(data_1: Sequence, data_2: Sequence) -> list[tuple[int, int]]:
    """Which (data_1, data_2) indices are scored: one against each of data_2 (1:N), or item by
    item (N:N), as in vLLM. Raises ValueError for empty inputs or lengths that pair neither way."""
    if not data_1:
        raise ValueError("data_1 (text_1, query) is empty: give at least one text")
    if not data_2:
        raise ValueError("data_2 (text_2, documents) is empty: give at least one text")
    if len(data_1) == 1:
        return [(0, j) for j in range(len(data_2))]
    if len(data_1) != len(data_2):
        raise ValueError(f"data_1 has {len(data_1)} texts and data_2 {len(data_2)}: give one data_1 text, "
                         "or as many as data_2")
    return [(i, i) for i in range(len(data_1))]


def cross_encoder_token_ids(tokenizer, text_1: str, text_2: str) -> list[int]:
    """The token ids a cross-encoder scores the pair with: the tokenizer's pair encoding."""
    if tokenizer is None:
        raise ValueError("scoring text pairs with a cross-encoder needs a tokenizer; this model has none")
    for name, text in (("data_1", text_1), ("data_2", text_2)):
        if not isinstance(text, str):
            raise ValueError(f"{name} must hold texts for a cross-encoder, got {type(text).__name__}")
    return list(tokenizer(text=text_1, text_pair=text_2)["input_ids"])


def cosine_similarity(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


@dataclass(frozen=True)
class ScorePlan:
    """The pooling requests that score ``pairs`` of (data_1, data_2) indices, and how their
    outputs become scores."""

    pairs: list[tuple[int, int]]
    task: str  # "classify": one cross-encoder request per pair; "embed": data_1 then data_2, embedded
    prompts: list  # what to run, in order: pair token ids, or the data_1 and data_2 prompts
    num_first: int  # len(data_1)

    def runs_of(self, pair_index: int) -> tuple[int, ...]:
        """Which of ``prompts`` the pair's score reads: its own, or its two texts'."""
        if self.task == "classify":
            return (pair_index,)
        i, j = self.pairs[pair_index]
        return i, self.num_first + j

    def scores(self, vectors: Sequence) -> list[float]:
        """Each pair's score from the runs' output vectors (in ``prompts`` order)."""
        if self.task == "classify":
            return [float(np.asarray(v).reshape(-1)[0]) for v in vectors]
        return [cosine_similarity(vectors[a], vectors[b]) for a, b in map(self.runs_of, range(len(self.pairs)))]


def plan_scores(classifier, tokenizer, data_1: Sequence, data_2: Sequence) -> ScorePlan:
    """How an engine with ``classifier`` (a ``ClassifierHead`` or None) scores the pairs: see the
    module docstring. Raises ValueError for inputs that do not pair, or a classifier of several
    labels."""
    pairs = score_pairs(data_1, data_2)
    if classifier is None:
        return ScorePlan(pairs, "embed", [*data_1, *data_2], len(data_1))
    if classifier.per_token:
        raise ValueError("score needs a cross-encoder (a sequence classifier of one label); this model is a "
                         "token classifier: use token_classify")
    if classifier.num_labels != 1:
        raise ValueError(f"score needs a cross-encoder (a classifier of one label); this model has "
                         f"{classifier.num_labels} labels: use classify")
    prompts = [cross_encoder_token_ids(tokenizer, data_1[i], data_2[j]) for i, j in pairs]
    return ScorePlan(pairs, "classify", prompts, len(data_1))
