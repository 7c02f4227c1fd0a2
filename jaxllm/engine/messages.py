"""The only data that crosses between the host scheduler and the device runner.

Plain Python, no jax: the scheduler builds a :class:`SchedulerOutput`, the runner answers
with a :class:`RunnerOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingOptions:
    """Per-request sampling knobs the device sampler needs (a subset of SamplingParams)."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None  # None: drawn from the engine's generator
    # While num_generated < min_tokens these ids (eos unless ignore_eos, plus stop_token_ids)
    # must get -inf logits, so a request cannot stop before its min_tokens.
    min_tokens: int = 0
    min_tokens_masked_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ScheduledSequence:
    """One request's share of a step: ``token_ids`` are computed at positions
    ``start_pos .. start_pos + len(token_ids) - 1`` and written into the pool through
    ``block_ids`` (the request's whole block table, logical block i -> physical block id)."""

    request_id: str
    token_ids: tuple[int, ...]  # the new tokens of this step (a prompt chunk or one decode token)
    start_pos: int  # num_computed_tokens before this step
    block_ids: tuple[int, ...]
    sample: bool  # True when the last new token is the end of the known sequence: sample after it
    sampling: SamplingOptions
    num_generated: int  # output tokens so far; with ``seed`` it makes sampling reproducible


@dataclass(frozen=True)
class SchedulerOutput:
    """What one engine step computes."""

    sequences: tuple[ScheduledSequence, ...]
    # Block copies to perform before the step (copy-on-write of a shared partial block).
    block_copies: tuple[tuple[int, int], ...] = ()  # (src block id, dst block id)
    preempted_ids: tuple[str, ...] = ()
    finished_ids: tuple[str, ...] = ()  # freed since the last step (aborted or finished)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)

    @property
    def is_empty(self) -> bool:
        return not self.sequences


@dataclass(frozen=True)
class RunnerOutput:
    """Sampled tokens of the sequences whose ``sample`` flag was set, keyed by request id."""

    sampled: dict[str, int] = field(default_factory=dict)
