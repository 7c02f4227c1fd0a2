"""One request's state on the host: its tokens, how many are in the KV pool, its status."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from jaxllm.engine.messages import TokenLogprobs
from jaxllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()  # waiting again, its KV freed; recomputed from scratch when rescheduled
    FINISHED_STOPPED = enum.auto()  # eos, a stop token id or a stop string
    FINISHED_LENGTH_CAPPED = enum.auto()  # max_tokens or max_model_len
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """vLLM's finish_reason string, None while not finished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class PoolingSpec(NamedTuple):
    """What a pooling request's output is: its hidden states pooled by ``type`` ("LAST", "MEAN",
    "CLS", or "ALL": each prompt token's, for the token tasks), then for "embed" / "token_embed"
    L2-normalised if ``normalize`` (after keeping their first ``dimensions`` values, when set), for
    "classify" / "token_classify" put through the classifier head (and its activation if
    ``use_activation``)."""

    type: str
    normalize: bool
    task: str = "embed"
    use_activation: bool = True
    dimensions: int | None = None


@dataclass(eq=False)
class Request:
    """Mutable state of one request, owned by the scheduler.

    ``num_computed_tokens`` counts the tokens whose K/V are in the pool; it catches up with
    ``num_tokens`` (prompt + outputs). The last output token is never computed before it is
    sampled, so a decoding request is always exactly one token behind.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens that came from the prefix cache on first schedule
    # Hash of each full block of all_token_ids, chained (block i's hash covers blocks 0..i).
    # Tokens are only ever appended, so these stay valid across preemption.
    block_hashes: list[bytes] = field(default_factory=list)
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # Parallel sampling: children are forked from the request when its prompt is done; each is a
    # request of its own ("<parent id>#<index>") that reports as completion ``index`` of the parent.
    parent_id: str | None = None
    completion_index: int = 0
    has_forked: bool = False
    # Beam search: keep the blocks after finishing, until the scheduler is told to release them.
    retain_blocks: bool = False
    # vLLM's cache_salt: mixed into the first block's hash, so that only requests with the same
    # salt share cached prefix blocks (tenants of one server cannot probe each other's prompts).
    cache_salt: str | None = None
    # vLLM's request priority: lower values are scheduled first (scheduling_policy="priority").
    priority: int = 0
    # Structured outputs: where the outputs so far stand in the request's pattern (a
    # jaxllm.structured.token_masks.TokenMatcher), advanced by each sampled token; None: free text.
    matcher: Any = None
    # Speculative decoding: tokens proposed to follow the sequence when it had ``spec_num_tokens``
    # tokens, verified by its next step (only if it has not grown since).
    spec_token_ids: tuple[int, ...] = ()
    spec_num_tokens: int = 0
    # Pooling (LLM.embed / classify, /v1/embeddings): how its vector is made, and what the
    # computed chunks gave so far (a sum of hidden states for MEAN); None: a generation request.
    pooling: PoolingSpec | None = None
    pooled: Any = None
    num_pooled_tokens: int = 0
    # vLLM's LoRARequest: the adapter the request runs with (None: the base model). Part of its
    # prefix blocks' hashes, so only requests with the same adapter share cached blocks.
    lora_request: Any = None
    # vLLM's prompt_embeds: float32 [num_prompt_tokens, hidden], the inputs of the prompt's
    # positions (prompt_token_ids are then placeholders); None: the token ids' embeddings.
    prompt_embeds: Any = None
    # Logprobs, when asked for: one entry per output token, and per prompt position (0 is None).
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)

    def __post_init__(self):
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: prompt_token_ids must not be empty")
        if self.sampling_params.prompt_logprobs is not None and not self.prompt_logprobs:
            self.prompt_logprobs.append(None)  # the first prompt token has no context (a 1-token prompt: all)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def group_id(self) -> str:
        """The id the user knows: the parent's for a parallel-sampling child."""
        return self.parent_id or self.request_id

    @property
    def num_pending_forks(self) -> int:
        """Children still to be forked: they count against max_num_seqs before they exist."""
        return 0 if self.has_forked else self.sampling_params.n - 1

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def token_ids_in(self, start: int, stop: int) -> tuple[int, ...]:
        """Tokens at positions ``start .. stop - 1`` of prompt + outputs."""
        n = self.num_prompt_tokens
        if stop <= n:
            return tuple(self.prompt_token_ids[start:stop])
        if start >= n:  # decode steps: avoid concatenating the whole sequence
            return tuple(self.output_token_ids[start - n:stop - n])
        return tuple(self.all_token_ids[start:stop])
