"""Speculative decoding with a draft model (vLLM's ``method="draft_model"``).

Design. The draft model is a second :class:`ModelRunner` with its own KV pool of exactly as many
blocks as the target's, indexed by the same block tables: the scheduler's block manager (prefix
caching, copy-on-write, preemption by recompute) decides for both pools at once, with nothing of
its own to track.

- Lockstep: every step the target computes is also run by the draft model, on the same tokens,
  positions and slots, right after the target's (:meth:`DraftModelRunner.dispatch`). So the draft
  pool holds K/V for exactly the positions the target pool does, prompts and verified tokens
  alike, and a prefix-cache hit finds both. Its samples are never read.
- Proposing (:meth:`DraftModelRunner.propose`, called by the scheduler once a step's tokens are
  known): for each request to speculate for, the scheduler first takes the slots of its next k
  positions (the next step verifies there anyway), then the draft model decodes k tokens
  greedily, one step per token for all such requests at once. Each step feeds the previous step's
  samples on the device (placeholders, as in async scheduling), so the host waits once, at the end.
- Verifying is the engine's as for n-gram proposals: a proposal is kept only when it equals the
  token the target samples before it, so outputs are exactly those of decoding without proposals
  (greedy or seeded), whatever the draft model.

Draft K/V written at proposed positions that are not accepted is overwritten by the lockstep run of
the step that computes those positions, before anything reads it.
"""

from __future__ import annotations

from jaxllm.engine.messages import DraftJob, RunnerOutput, SamplingOptions, ScheduledSequence, SchedulerOutput
from jaxllm.engine.scheduler import PLACEHOLDER
from jaxllm.runner.model_runner import InFlightStep, ModelRunner

_GREEDY = SamplingOptions(temperature=0.0)


class DraftModelRunner:
    """The target runner with a draft model beside it (see the module docstring). Anything not
    defined here is the target runner's."""

    def __init__(self, target: ModelRunner, draft: ModelRunner):
        if draft.num_blocks != target.num_blocks:
            raise ValueError(f"the draft pool has {draft.num_blocks} blocks, the target's {target.num_blocks}: "
                             "they share block tables")
        self.target, self.draft = target, draft

    def __getattr__(self, name: str):
        return getattr(self.target, name)

    @property
    def num_compiles(self) -> int:
        return self.target.num_compiles + self.draft.num_compiles

    def warmup(self) -> None:
        self.target.warmup()
        self.draft.warmup()

    def sleep(self, level: int) -> None:
        self.target.sleep(level)
        self.draft.sleep(level)

    def wake_up(self, tags: tuple[str, ...]) -> None:
        self.target.wake_up(tags)
        self.draft.wake_up(tags)

    @property
    def is_sleeping(self) -> bool:
        return self.target.is_sleeping or self.draft.is_sleeping

    # -- steps ---------------------------------------------------------------------------------
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.fetch(self.dispatch(sched))

    def dispatch(self, sched: SchedulerOutput, prev: InFlightStep | None = None) -> InFlightStep:
        """The target's step, then the draft's run of it, which reads the same placeholders from the
        target's previous samples; the handle is the target's (the draft's samples are never read)."""
        step = self.target.dispatch(sched, prev)
        self.draft.dispatch(_lockstep(sched), prev)
        return step

    def fetch(self, step: InFlightStep) -> RunnerOutput:
        return self.target.fetch(step)

    # -- proposals -----------------------------------------------------------------------------
    def propose(self, jobs: list[DraftJob], block_copies: tuple[tuple[int, int], ...] = ()) -> list[tuple[int, ...]]:
        """Greedy proposals of the draft model, ``job.num_tokens`` for each job. ``block_copies``:
        the copy-on-write copies that taking the jobs' slots needed, made in both pools first."""
        if block_copies:
            copies = SchedulerOutput((), block_copies=tuple(block_copies))
            self.target.dispatch(copies)
            self.draft.dispatch(copies)
        steps, prev = [], None
        for i in range(max((job.num_tokens for job in jobs), default=0)):
            seqs = tuple(
                ScheduledSequence(job.request_id, (job.token_id if i == 0 else PLACEHOLDER,), job.position + i,
                                  job.block_ids, True, _GREEDY, 0)
                for job in jobs if job.num_tokens > i)
            prev = self.draft.dispatch(SchedulerOutput(seqs), prev)
            steps.append(prev)
        sampled = [self.draft.fetch(step).sampled for step in steps]
        return [tuple(sampled[i][job.request_id] for i in range(job.num_tokens)) for job in jobs]


def _lockstep(sched: SchedulerOutput) -> SchedulerOutput:
    """The target's step as the draft model runs it: the same tokens, positions, blocks and block
    copies, nothing sampled that anyone reads (no logprobs, masks, penalties, forks, pooling or
    LoRA). A draft token of the target's step is a plain token here."""
    seqs = tuple(
        ScheduledSequence(s.request_id, s.token_ids, s.start_pos, s.block_ids, False, _GREEDY, 0)
        for s in sched.sequences)
    return SchedulerOutput(seqs, block_copies=sched.block_copies)
