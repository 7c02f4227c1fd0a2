"""What the engine hands back for each request (vLLM's field names)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Logprob:
    """vLLM's Logprob: one token's log-probability, its rank (1 = most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One completion of a request, cumulative: all tokens and text generated so far."""

    index: int  # which of the request's n completions
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs, when logprobs is set
    logprobs: list | None = None  # per token: {token id: Logprob}, with the sampled token always in
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (``time.time()`` seconds) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """The state of one request after an engine step."""

    request_id: str
    prompt: str | None  # None when the prompt was given as token ids
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list | None = None
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    lora_request: object = None  # the request's jaxllm.lora.LoRARequest, None for the base model


@dataclass
class PoolingOutput:
    """vLLM's: the pooled vector of one prompt (one row per prompt token for the token tasks)."""

    data: object  # numpy float32 [hidden_size] or [num_labels]; [num_tokens, ...] for token tasks


@dataclass
class PoolingRequestOutput:
    """The result of a pooling request (``LLM.encode``; ``LLMEngine.add_request`` with PoolingParams).
    Its subclasses are the task-shaped forms ``LLM.embed``, ``classify`` and ``score`` return."""

    request_id: str
    outputs: Any  # PoolingOutput here; the subclasses' own output types
    prompt_token_ids: list[int]
    finished: bool = True

    @classmethod
    def from_base(cls, output: PoolingRequestOutput):
        """The task's form of a pooling output (vLLM's ``from_base``)."""
        return cls(output.request_id, cls._wrap([float(x) for x in output.outputs.data]), output.prompt_token_ids,
                   output.finished)

    @staticmethod
    def _wrap(values: list[float]):
        return PoolingOutput(values)


@dataclass
class EmbeddingOutput:
    """vLLM's: one prompt's embedding as a list of floats."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput(PoolingRequestOutput):
    """The result of ``LLM.embed`` for one prompt (``.outputs``: an EmbeddingOutput)."""

    _wrap = staticmethod(EmbeddingOutput)


@dataclass
class ClassificationOutput:
    """vLLM's: one prompt's class probabilities (the head's logits with ``use_activation=False``)."""

    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ClassificationRequestOutput(PoolingRequestOutput):
    """The result of ``LLM.classify`` for one prompt (``.outputs``: a ClassificationOutput)."""

    _wrap = staticmethod(ClassificationOutput)


@dataclass
class ScoringOutput:
    """vLLM's: the similarity score of one pair of texts."""

    score: float


@dataclass
class ScoringRequestOutput(PoolingRequestOutput):
    """The result of ``LLM.score`` for one pair (``.outputs``: a ScoringOutput). ``prompt_token_ids``:
    the cross-encoder's pair input, or an embedding model's two prompts joined."""


class WholeOutput:
    """Joins a request's consecutive DELTA outputs (``RequestOutputKind.DELTA``) into one output of
    all they carry, in time linear in its length."""

    def __init__(self):
        self._last: RequestOutput | None = None
        self._latest: dict[int, CompletionOutput] = {}  # completion index -> its latest delta
        self._text: dict[int, list[str]] = {}
        self._token_ids: dict[int, list[int]] = {}
        self._logprobs: dict[int, list] = {}
        self._prompt_logprobs: list = []

    def add(self, output: RequestOutput) -> None:
        self._last = output
        self._prompt_logprobs.extend(output.prompt_logprobs or ())
        for c in output.outputs:
            self._latest[c.index] = c
            self._text.setdefault(c.index, []).append(c.text)
            self._token_ids.setdefault(c.index, []).extend(c.token_ids)
            if c.logprobs is not None:
                self._logprobs.setdefault(c.index, []).extend(c.logprobs)

    def result(self) -> RequestOutput | None:
        """The output so far (None before the first): completions in index order, each with all
        of its text, tokens and logprobs, and the finish and cumulative logprob of its latest delta."""
        if self._last is None:
            return None
        outputs = [dataclasses.replace(c, text="".join(self._text[i]), token_ids=self._token_ids[i],
                                       logprobs=self._logprobs.get(i) if c.logprobs is not None else None)
                   for i, c in sorted(self._latest.items())]
        return dataclasses.replace(self._last, outputs=outputs, prompt_logprobs=self._prompt_logprobs or None)
