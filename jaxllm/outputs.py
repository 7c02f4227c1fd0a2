"""What the engine hands back for each request (vLLM's field names)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    """One completion of a request, cumulative: all tokens and text generated so far."""

    index: int  # which of the request's n completions (always 0 until n > 1 exists)
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None  # logprobs are not supported yet
    logprobs: list | None = None
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
