"""Token-budget scheduler: continuous batching, chunked prefill, preemption by recompute.

Every step each scheduled request advances ``num_computed_tokens`` towards ``num_tokens`` by some
tokens within one budget: a whole prompt, a chunk of one, or one decode token. Running requests go
first, in order; then waiting ones, first come first served. When the pool runs out for a running
request, the most recently arrived running request is preempted: its blocks are freed and it goes
back to the front of the queue, to be recomputed from prompt + outputs later.

``scheduling_policy="priority"`` (vLLM's): each request has an integer ``priority``, lower first.
Waiting requests are admitted by (priority, arrival); running ones are scheduled in that order and
the victim of a preemption is the running request with the largest key. As in vLLM, a waiting
request never preempts running ones to get in: priority decides who goes next, not who leaves. With
``preemption_mode="swap"`` its computed blocks are first saved to host memory instead and copied
back into fresh blocks when it is next at the head of the queue and they fit; when the swap space
is full it falls back to recompute.

A step's effect is applied in two halves so the engine can schedule step k+1 while the device
still runs step k: ``advance`` (right after dispatch) counts the step's tokens as computed and
appends a ``PLACEHOLDER`` for each token it will sample; ``resolve`` (once the tokens are on the
host) writes the real tokens over the placeholders and stops requests. A placeholder is only ever
a request's last token, which is never hashed for the prefix cache; the runner feeds the device's
copy of it to the next step. ``update`` is both halves at once.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from jaxllm.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from jaxllm.engine.kv_cache_manager import NO_COMPUTED_BLOCKS, KVCacheManager
from jaxllm.engine.messages import DraftJob, RunnerOutput, ScheduledSequence, SchedulerOutput, draft_sample_id
from jaxllm.engine.ngram_proposer import propose_ngram
from jaxllm.engine.request import Request, RequestStatus
from jaxllm.engine.request_queue import RequestQueue
from jaxllm.engine.swap_space import SwapSpace
from jaxllm.engine.token_history import TokenHistories

PLACEHOLDER = -1  # an output token a dispatched step samples, not yet copied to the host


@dataclass(frozen=True)
class RequestUpdate:
    """What one step did to one request that sampled a token or finished."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str | None  # "stop" or "length" once finished
    stop_reason: int | str | None  # the stop token id that ended it; None for eos or length
    request: Request | None = None  # the request itself (a fork child's carries its parent's id)


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    kv_blocks_shared: int = 0  # blocks held by more than one request
    kv_blocks_saved: int = 0  # blocks sharing saves now: references to blocks - blocks held
    kv_waste: float = 0.0  # allocated but unfilled slots / allocated slots, mean over steps
    num_swaps: int = 0  # preemptions that saved the request's blocks to host memory (swap-outs)
    spec_decode: SpecDecodeStats | None = None  # with speculative decoding


@dataclass
class SpecDecodeStats:
    """Speculative decoding's counters, as vLLM reports them."""

    num_drafts: int = 0  # sequence-steps that verified proposed tokens
    num_draft_tokens: int = 0  # proposed tokens verified
    num_accepted_tokens: int = 0  # of them, those the target model agreed with
    accepted_per_position: list[int] = field(default_factory=list)  # accepted drafts, by position

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a verifying step gains per sequence: its own sample plus the accepted drafts."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def record(self, num_drafted: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        grow = num_drafted - len(self.accepted_per_position)
        self.accepted_per_position.extend([0] * max(grow, 0))
        for position in range(num_accepted):
            self.accepted_per_position[position] += 1


class Scheduler:
    """Decides what each engine step computes.

    Args:
        scheduler_config: step limits and ``max_model_len``.
        cache_config: ``block_size`` and ``enable_prefix_caching``.
        num_kv_blocks: blocks in the pool, including the null block.
        eos_token_ids: the model's end-of-sequence ids.
        speculative_config: propose tokens after each sampled one (see ``_propose``) and verify
            them in the request's next step.
        max_loras: LoRA adapters that may run at once (None: no adapters). A waiting request whose
            adapter would be one too many waits, and requests behind it may go first (as vLLM).
    """

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_kv_blocks: int,
        eos_token_ids: tuple[int, ...] = (),
        num_swap_blocks: int = 0,
        speculative_config: SpeculativeConfig | None = None,
        max_loras: int | None = None,
    ):
        self.config = scheduler_config
        self.max_loras = max_loras
        self.speculative_config = speculative_config
        self.spec_stats = SpecDecodeStats() if speculative_config is not None else None
        # method "draft_model": the runner's ``propose(jobs, block_copies)`` (set by the engine).
        self.draft_proposer: Callable[[list[DraftJob], tuple], list[tuple[int, ...]]] | None = None
        self.eos_token_ids = frozenset(eos_token_ids)
        self._eos_tuple = tuple(eos_token_ids)
        self.kv = KVCacheManager(num_kv_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._finished_ids: list[str] = []
        self._arrival_order: dict[str, int] = {}
        self.waiting = RequestQueue(scheduler_config.scheduling_policy == "priority", self._priority_key)
        self._num_added = 0
        self._retained: dict[str, Request] = {}  # finished, blocks kept for forking (beam search)
        self._kv_waste_sum = 0.0  # per-step waste ratios, summed over steps that held blocks
        self._kv_waste_steps = 0
        self._step_holdings: deque = deque()  # (step, its running requests, their Holdings), advanced not resolved
        swapping = cache_config.preemption_mode == "swap"
        self.swap_space = SwapSpace(num_swap_blocks if swapping else 0)
        self.num_swaps = 0
        self._histories = TokenHistories()

    # -- requests ----------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request; raises ValueError (and queues nothing) if it can never complete."""
        self._validate(request)
        self.requests[request.request_id] = request
        self._arrival_order[request.request_id] = self._num_added
        self._num_added += 1
        self.waiting.push(request)

    def _priority_key(self, request: Request) -> tuple[int, int]:
        return request.priority, self._arrival_order[request.request_id]

    def _validate(self, request: Request) -> None:
        rid, params = request.request_id, request.sampling_params
        if rid in self.requests:
            raise ValueError(f"request_id={rid!r} is already in use")
        if request.num_prompt_tokens == 0:
            raise ValueError(f"request {rid!r}: the prompt is empty")
        if not isinstance(request.priority, int) or isinstance(request.priority, bool):
            raise ValueError(f"request {rid!r}: priority={request.priority!r} must be an integer")
        if request.priority != 0 and not self.waiting.by_priority:
            raise ValueError(f"request {rid!r}: priority={request.priority} needs scheduling_policy='priority' "
                             f"(this engine's is {self.config.scheduling_policy!r})")
        if request.lora_request is not None and self.max_loras is None:
            raise ValueError(f"request {rid!r}: a lora_request needs LoRA enabled (enable_lora=True)")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"request {rid!r}: n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
        total = request.num_prompt_tokens + params.max_tokens
        if request.pooling is not None:  # its one sampled token is no output and takes no position
            if request.num_prompt_tokens > self.config.max_model_len:
                raise ValueError(f"request {rid!r}: the prompt ({request.num_prompt_tokens} tokens) exceeds "
                                 f"max_model_len={self.config.max_model_len}")
        elif total > self.config.max_model_len:
            raise ValueError(
                f"request {rid!r}: prompt ({request.num_prompt_tokens} tokens) + max_tokens ({params.max_tokens})"
                f" = {total} exceeds max_model_len={self.config.max_model_len}"
            )
        # The last sampled token is never fed back, so the pool holds at most total - 1 tokens.
        needed = self.kv.num_blocks_for(total - 1)
        if needed > self.kv.num_usable_blocks:
            raise ValueError(
                f"request {rid!r}: needs {needed} KV blocks for {total - 1} tokens but the whole pool has "
                f"{self.kv.num_usable_blocks}"
            )

    def finish_request(self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None) -> bool:
        """End a request now (abort, stop string) and free its blocks; False if it was not live."""
        if not status.is_finished:
            raise ValueError(f"status={status} is not a finished status")
        request = self.requests.get(request_id)
        if request is None:
            return False
        self._end(request, status, stop_reason)
        return True

    def _end(self, request: Request, status: RequestStatus, stop_reason: int | str | None) -> None:
        del self.requests[request.request_id]
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:  # preempted while its last sample was still on the device
            self.waiting.remove(request)
        self._finish(request, status, stop_reason)

    def _finish(self, request: Request, status: RequestStatus, stop_reason: int | str | None) -> None:
        request.status = status
        request.stop_reason = stop_reason
        if request.retain_blocks and status is not RequestStatus.FINISHED_ABORTED:
            self._retained[request.request_id] = request  # beam search forks from it next
        else:
            self.kv.free(request)
        self.swap_space.release(request.request_id)
        self._histories.drop(request.request_id)
        self._arrival_order.pop(request.request_id, None)
        self._finished_ids.append(request.request_id)

    def add_forked_request(self, child: Request, parent_id: str) -> None:
        """Queue ``child``, whose tokens extend a retained finished request's computed tokens,
        sharing that request's blocks (beam search); it computes only what the parent did not."""
        parent = self._retained.get(parent_id)
        if parent is None:
            raise ValueError(f"request {parent_id!r} is not a finished request that kept its blocks")
        if child.all_token_ids[: parent.num_computed_tokens] != parent.all_token_ids[: parent.num_computed_tokens]:
            raise ValueError(f"request {child.request_id!r} does not extend the tokens of {parent_id!r}")
        self._validate(child)
        child.cache_salt = parent.cache_salt  # its blocks extend the parent's hash chain
        child.lora_request = parent.lora_request
        child.priority = parent.priority
        self.kv.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        self.requests[child.request_id] = child
        self._arrival_order[child.request_id] = self._num_added
        self._num_added += 1
        self.waiting.push(child)

    def release(self, request_id: str) -> None:
        """Free the blocks of a finished request that kept them (``retain_blocks``)."""
        request = self._retained.pop(request_id, None)
        if request is not None:
            self.kv.free(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    @property
    def stats(self) -> SchedulerStats:
        cache = self.kv.prefix_cache_stats
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_blocks_used=self.kv.num_used_blocks,
            kv_blocks_shared=self.kv.num_shared_blocks,
            kv_blocks_saved=self.kv.num_block_references - self.kv.num_held_blocks,
            kv_blocks_total=self.kv.num_usable_blocks,
            prefix_cache_queries=cache.queries,
            prefix_cache_hits=cache.hits,
            prefix_cache_hit_rate=cache.hit_rate,
            num_preemptions=self.num_preemptions,
            kv_waste=self._kv_waste_sum / self._kv_waste_steps if self._kv_waste_steps else 0.0,
            num_swaps=self.num_swaps,
            spec_decode=None if self.spec_stats is None else dataclasses.replace(
                self.spec_stats, accepted_per_position=list(self.spec_stats.accepted_per_position)),
        )

    # -- schedule ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens and blocks."""
        step = _StepBuilder(self.config.max_num_batched_tokens)
        self._schedule_running(step)
        if not step.preempted_ids:
            self._schedule_waiting(step)
        finished, self._finished_ids = tuple(self._finished_ids), []
        return SchedulerOutput(
            sequences=tuple(step.sequences),
            block_copies=tuple(step.copies),
            preempted_ids=tuple(step.preempted_ids),
            finished_ids=finished,
            swap_out=tuple(step.swap_out),
            swap_in=tuple(step.swap_in),
        )

    def _schedule_running(self, step: _StepBuilder) -> None:
        if self.waiting.by_priority:  # the budget and the pool go to the highest priority first
            self.running.sort(key=self._priority_key)
        speculate = self._speculating()
        index = 0
        while index < len(self.running) and step.budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, step.budget)
            if num_new == 0:  # its last token is being sampled by the step in flight; it ends there
                index += 1
                continue
            drafts = self._drafts_to_verify(request, step.budget, speculate)
            allocation = self.kv.allocate_slots(request, num_new + len(drafts))
            if allocation is None and drafts:  # proposals never preempt anyone: drop them first
                drafts = ()
                allocation = self.kv.allocate_slots(request, num_new)
            while allocation is None:
                victim = self._pick_victim(index)
                self._preempt(victim, step)
                if victim is request:
                    break
                allocation = self.kv.allocate_slots(request, num_new)
            if allocation is None:
                continue  # the request preempted itself; running[index] is now the next one
            step.add(self._sequence(request, num_new, drafts), allocation)
            index += 1

    def _speculating(self) -> bool:
        """Whether proposals are made and verified now (``disable_by_batch_size``)."""
        config = self.speculative_config
        if config is None:
            return False
        return config.disable_by_batch_size is None or len(self.running) < config.disable_by_batch_size

    def _drafts_to_verify(self, request: Request, budget: int, speculate: bool) -> tuple[int, ...]:
        """The proposals a decoding request verifies this step, within the budget (one token of
        which is its own), and consumed: a step verifies a proposal once."""
        drafts, request.spec_token_ids = request.spec_token_ids, ()
        # Not while recomputing after a preemption (more than the last token to compute), nor when
        # the sequence grew after the proposal (a step dispatched before its tokens were known).
        if not speculate or request.num_tokens - request.num_computed_tokens != 1:
            return ()
        if request.spec_num_tokens != request.num_tokens or request.output_token_ids[-1] == PLACEHOLDER:
            return ()
        return drafts[: max(budget - 1, 0)]

    def _pick_victim(self, index: int) -> Request:
        # Requests before ``index`` are already in this step's batch and stay.
        if self.waiting.by_priority:
            return max(self.running[index:], key=self._priority_key)
        return max(self.running[index:], key=lambda r: (r.arrival_time, self._arrival_order[r.request_id]))

    def _preempt(self, request: Request, step: _StepBuilder) -> None:
        self.running.remove(request)
        request.spec_token_ids = ()
        if not self._swap_out(request, step):
            self.kv.free(request)
            request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.push_front(request)
        step.preempted_ids.append(request.request_id)

    def _swap_out(self, request: Request, step: _StepBuilder) -> bool:
        """Save a preempted request's computed blocks to host memory; False if it must recompute."""
        num_blocks = self.kv.num_blocks_for(request.num_computed_tokens)
        slots = self.swap_space.store(request.request_id, num_blocks) if num_blocks else None
        if slots is None:
            return False
        step.swap_out.extend(zip(self.kv.swap_out(request), slots, strict=True))
        self.num_swaps += 1
        return True

    def _swap_in(self, request: Request, step: _StepBuilder) -> bool:
        """Copy the saved blocks of the swapped-out head of the queue back and schedule it."""
        num_new = min(request.num_tokens - request.num_computed_tokens, step.budget)
        if num_new < request.num_tokens - request.num_computed_tokens and not self.config.chunked_prefill:
            return False  # without chunked prefill it waits for a step with room for all of it
        if self.kv.num_blocks_for(request.num_computed_tokens + num_new) > self.kv.num_free_blocks:
            return False
        slots = self.swap_space.release(request.request_id)
        step.swap_in.extend(zip(slots, self.kv.swap_in(request, len(slots)), strict=True))
        allocation = self.kv.allocate_slots(request, num_new)  # fits: checked above, nothing shared
        self.waiting.pop()
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        step.add(self._sequence(request, num_new), allocation)
        return True

    def _schedule_waiting(self, step: _StepBuilder) -> None:
        skipped: list[Request] = []  # waiting for an adapter slot; back in their places afterwards
        try:
            self._admit_waiting(step, skipped)
        finally:
            for request in reversed(skipped):
                self.waiting.push_front(request)

    def _lora_fits(self, request: Request) -> bool:
        """Whether ``request``'s adapter can run beside the running requests' (``max_loras``)."""
        if request.lora_request is None:
            return True
        active = {r.lora_request.lora_int_id for r in self.running if r.lora_request is not None}
        return request.lora_request.lora_int_id in active or len(active) < self.max_loras

    def _admit_waiting(self, step: _StepBuilder, skipped: list[Request]) -> None:
        while self.waiting and step.budget > 0 and self._has_room_for(self.waiting.peek()):
            request = self.waiting.peek()
            if not self._lora_fits(request):
                skipped.append(self.waiting.pop())
                continue
            if self.swap_space.holds(request.request_id):
                if not self._swap_in(request, step):
                    return  # first come first served, as below
                continue
            # A forked beam arrives holding its parent's blocks: it resumes where the parent stopped.
            held = request.num_computed_tokens if self.kv.block_ids(request.request_id) else 0
            # Prompt logprobs need every prompt position computed, so such requests skip the cache.
            wants_prompt_lp = request.sampling_params.prompt_logprobs is not None
            # So do pooling requests that need more than the last token's hidden state.
            pools_all = request.pooling is not None and request.pooling[0] != "LAST"
            skip_cache = wants_prompt_lp or pools_all or held
            computed = NO_COMPUTED_BLOCKS if skip_cache else self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - held - computed.num_tokens, step.budget)
            if num_new < request.num_tokens - held - computed.num_tokens and not self.config.chunked_prefill:
                return  # without chunked prefill a prompt goes whole, in a later step; nobody overtakes it
            allocation = self.kv.allocate_slots(request, num_new, computed)
            if allocation is None:
                # First come first served: nobody overtakes the head of the queue. If nothing runs,
                # no block will come back by itself: waiting forks give up their shared blocks.
                holder = None if self.running or step.sequences else self._last_waiting_holder()
                if holder is None:
                    return
                self.kv.free(holder)
                holder.num_computed_tokens = 0  # recomputed from its tokens like a preempted request
                continue
            self.waiting.pop()
            if request.status is RequestStatus.WAITING:
                request.num_cached_tokens = computed.num_tokens
            request.num_computed_tokens = held + computed.num_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            step.add(self._sequence(request, num_new), allocation)

    def _last_waiting_holder(self) -> Request | None:
        return next((r for r in reversed(self.waiting) if self.kv.block_ids(r.request_id)), None)

    def _has_room_for(self, request: Request) -> bool:
        # Children of parallel sampling count before they are forked, so forking never overflows.
        seqs = sum(1 + r.num_pending_forks for r in self.running)
        return seqs + 1 + request.num_pending_forks <= self.config.max_num_seqs

    def _sequence(self, request: Request, num_new: int, drafts: tuple[int, ...] = ()) -> ScheduledSequence:
        start, stop = request.num_computed_tokens, request.num_computed_tokens + num_new
        params = request.sampling_params
        sample = stop == request.num_tokens
        options = params.sampling_options(self._eos_tuple)
        return ScheduledSequence(
            request_id=request.request_id,
            token_ids=request.token_ids_in(start, stop) + drafts,
            start_pos=start,
            block_ids=self.kv.block_ids(request.request_id),
            sample=sample,
            sampling=options,
            num_generated=request.num_output_tokens,
            logprobs=params.logprobs,
            prompt_logprobs=params.prompt_logprobs,
            num_prompt_tokens=request.num_prompt_tokens,
            following_token_id=request.token_ids_in(stop, stop + 1)[0] if stop < request.num_tokens else None,
            fork_ids=self._fork_ids(request) if sample else (),
            token_history=self._histories.view(request) if sample and options.needs_token_history else None,
            token_mask_key=request.matcher.key if sample and request.matcher is not None else None,
            request=request,
            num_draft_tokens=len(drafts),
            draft_mask_keys=self._draft_mask_keys(request, drafts),
            pooling=None if request.pooling is None else request.pooling[0],
            lora_request=request.lora_request,
            logits_states=params._logits_states,
            prompt_embeds=request.prompt_embeds if start < request.num_prompt_tokens else None,
        )

    @staticmethod
    def _draft_mask_keys(request: Request, drafts: tuple[int, ...]) -> tuple:
        if request.matcher is None or not drafts:
            return ()
        matcher, keys = request.matcher.copy(), []
        for token in drafts:
            matcher.advance(token)
            keys.append(matcher.key)
        return tuple(keys)

    @staticmethod
    def _fork_ids(request: Request) -> tuple[str, ...]:
        return tuple(f"{request.request_id}#{i}" for i in range(1, request.num_pending_forks + 1))

    # -- update ------------------------------------------------------------------------------

    def update(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> list[RequestUpdate]:
        """Apply a finished step: advance computed tokens, append samples, stop, free finished."""
        self.advance(scheduler_output)
        return self.resolve(scheduler_output, runner_output)

    def advance(self, scheduler_output: SchedulerOutput) -> None:
        """Count a dispatched step's tokens as computed; each token it samples, unless it is sure
        to be the request's last (length), is held by a PLACEHOLDER so the next step decodes it."""
        for seq in scheduler_output.sequences:
            request = seq.request
            if self.requests.get(seq.request_id) is not request:  # ended since it was scheduled
                continue
            # Drafts count once verified (resolve), and only those the samples agree with.
            request.num_computed_tokens += len(seq.token_ids) - seq.num_draft_tokens
            if seq.sample and not seq.fork_ids and not self._at_length_limit(request, pending=1):
                request.output_token_ids.append(PLACEHOLDER)
        # What the pool holds while this step runs; resolve() turns it into the step's KV waste.
        running = list(self.running)
        self._step_holdings.append((scheduler_output, running, self.kv.holdings(running)))

    def can_overlap(self, scheduler_output: SchedulerOutput) -> bool:
        """Whether the next step may be scheduled before this one's sampled tokens are known:
        not when they are needed on the host first (token histories for penalties, forking
        parallel samples, beam search's retained requests, structured outputs' next masks)."""
        # The next proposals start from this step's tokens, and a verifying step's number of new
        # tokens is only known once they are (the batch may have grown past disable_by_batch_size
        # since it was scheduled, so look at the step itself too).
        if self._speculating() or any(seq.num_draft_tokens for seq in scheduler_output.sequences):
            return False
        for seq in scheduler_output.sequences:
            needs_host = seq.sampling.needs_token_history or seq.token_mask_key is not None
            if seq.sample and (seq.fork_ids or needs_host or seq.request.retain_blocks):
                return False
        return True

    def resolve(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> list[RequestUpdate]:
        """Apply an advanced step's results: the sampled tokens, forks, stops and frees."""
        updates = []
        for seq in scheduler_output.sequences:
            request = seq.request
            if self.requests.get(seq.request_id) is not request:  # aborted or stopped since
                continue
            self._record_prompt_logprobs(request, runner_output)
            if seq.pooling is not None:
                self._record_pooled(request, seq, runner_output)
            # Children fork before the parent's sample is appended: that may finish and free it.
            family = [request, *(self._fork(request, cid, i) for i, cid in enumerate(seq.fork_ids, 1))]
            if seq.sample:
                updates += [self._append_sample(r, runner_output) for r in family]
            if seq.num_draft_tokens and updates and updates[-1].request is request:
                updates[-1] = self._verify_drafts(seq, updates[-1], runner_output)
        self._record_kv_waste(scheduler_output)
        if self._speculating():
            unfinished = list({id(u.request): u.request for u in updates if not u.finished}.values())
            if self.speculative_config.method == "draft_model":
                self._propose_with_draft_model(unfinished)
            else:
                for request in unfinished:
                    self._propose(request)
        return updates

    def _at_length_limit(self, request: Request, pending: int = 0) -> bool:
        """Whether ``request`` is at max_tokens or max_model_len once ``pending`` more tokens are in."""
        return (request.num_output_tokens + pending >= request.sampling_params.max_tokens
                or request.num_tokens + pending >= self.config.max_model_len)

    def _fork(self, parent: Request, child_id: str, index: int) -> Request:
        """A parallel-sampling child sharing all of ``parent``'s blocks (copy on write later)."""
        params = parent.sampling_params
        child_params = dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + index)
        child = Request(child_id, parent.prompt_token_ids, child_params, parent.arrival_time,
                        parent_id=parent.request_id, completion_index=index, has_forked=True,
                        cache_salt=parent.cache_salt, priority=parent.priority, lora_request=parent.lora_request,
                        matcher=None if parent.matcher is None else parent.matcher.copy(),
                        prompt_embeds=parent.prompt_embeds)
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = RequestStatus.RUNNING
        self.kv.fork(parent, child)
        parent.has_forked = True
        self.requests[child_id] = child
        self._arrival_order[child_id] = self._arrival_order[parent.request_id]
        self.running.append(child)
        return child

    @staticmethod
    def _record_prompt_logprobs(request: Request, runner_output: RunnerOutput) -> None:
        chunk = runner_output.prompt_logprobs.get(request.request_id)
        if chunk is None:
            return
        first, entries = chunk
        if first == len(request.prompt_logprobs):  # a recompute after preemption adds nothing
            request.prompt_logprobs.extend(entries)

    @staticmethod
    def _record_pooled(request: Request, seq: ScheduledSequence, runner_output: RunnerOutput) -> None:
        chunk = runner_output.pooled.get(request.request_id)
        if chunk is None:
            return
        start, vector = chunk
        if start == 0:  # the first chunk, or a recompute after a preemption: start over
            request.pooled, request.num_pooled_tokens = None, 0
        if seq.pooling not in ("MEAN", "ALL"):
            request.pooled = vector
        elif start == request.num_pooled_tokens:  # MEAN sums the chunks' sums, ALL lists their rows
            if seq.pooling == "ALL":
                request.pooled = [*(request.pooled or ()), vector]
            else:
                request.pooled = vector if request.pooled is None else request.pooled + vector
            request.num_pooled_tokens += len(seq.token_ids)

    def _record_kv_waste(self, scheduler_output: SchedulerOutput) -> None:
        """One waste sample per step: the blocks running requests held while it ran, less those
        of requests it finished (they gave them back). Only running requests hold blocks."""
        while self._step_holdings and self._step_holdings[0][0] is not scheduler_output:
            self._step_holdings.popleft()  # a step dropped in flight, its requests all aborted
        if not self._step_holdings:
            return
        _, running, holdings = self._step_holdings.popleft()
        usage = self.kv.usage_of(holdings, [self.requests.get(r.request_id) is r for r in running])
        if usage.allocated:
            self._kv_waste_sum += (usage.allocated - usage.filled) / usage.allocated
            self._kv_waste_steps += 1

    def _append_sample(self, request: Request, runner_output: RunnerOutput) -> RequestUpdate:
        token = runner_output.sampled.get(request.request_id)
        if token is None:
            raise ValueError(f"the runner returned no sampled token for request {request.request_id!r}")
        outputs = request.output_token_ids
        if outputs and outputs[-1] == PLACEHOLDER:
            outputs.pop()
        self._append_token(request, int(token), runner_output.logprobs.get(request.request_id))
        status, stop_reason = self._check_stop(request, int(token))
        if status is not None:
            self._end(request, status, stop_reason)
        return RequestUpdate(request.request_id, (int(token),), status is not None,
                             status.finish_reason if status else None, stop_reason, request)

    def _verify_drafts(self, seq: ScheduledSequence, update: RequestUpdate,
                       runner_output: RunnerOutput) -> RequestUpdate:
        """Keep the drafts the samples agree with. The token sampled after a draft's position is
        kept when the draft equals the token sampled before it (the draft then was the request's
        token there, so the K/V computed from it stand); the first disagreement ends it. Every kept
        token was sampled as it would have been without proposals: same logits, same key."""
        request, tokens, accepted = update.request, list(update.new_token_ids), 0
        for index, draft in enumerate(seq.draft_token_ids, 1):
            if update.finished or draft != tokens[-1]:
                break
            sample_id = draft_sample_id(request.request_id, index)
            accepted += 1
            request.num_computed_tokens += 1
            token = int(runner_output.sampled[sample_id])
            self._append_token(request, token, runner_output.logprobs.get(sample_id))
            tokens.append(token)
            status, stop_reason = self._check_stop(request, token)
            if status is not None:
                self._end(request, status, stop_reason)
                update = RequestUpdate(request.request_id, (), True, status.finish_reason, stop_reason, request)
        self.spec_stats.record(seq.num_draft_tokens, accepted)
        return dataclasses.replace(update, new_token_ids=tuple(tokens))

    def _proposal_room(self, request: Request) -> int:
        """How many tokens may be proposed for a request's next step: none for beam search (each
        beam takes one token at a time), nor past max_tokens or max_model_len."""
        if request.retain_blocks:
            return 0
        params, config = request.sampling_params, self.speculative_config
        room = min(params.max_tokens - request.num_output_tokens, self.config.max_model_len - request.num_tokens) - 1
        if config.method == "draft_model" and config.max_model_len is not None:
            # The draft model writes its K/V at the next k positions, all below its max_model_len.
            room = min(room, config.max_model_len - request.num_tokens + 1)
        return min(config.num_speculative_tokens, room)

    @staticmethod
    def _allowed_prefix(request: Request, drafts: tuple[int, ...]) -> tuple[int, ...]:
        """Under structured outputs a proposal ends before the first token the pattern does not
        allow (the sample there could never equal it)."""
        if request.matcher is not None:
            token_dfa, state = request.matcher.key
            for i, token in enumerate(drafts):
                state = token_dfa.next_state(state, token)
                if state == token_dfa.dfa.dead:
                    return drafts[:i]
        return drafts

    def _propose(self, request: Request) -> None:
        """Proposals for a request's next step: n-gram lookup over its prompt and outputs."""
        config = self.speculative_config
        request.spec_token_ids = ()
        k = self._proposal_room(request)
        if k <= 0:
            return
        drafts = propose_ngram(self._histories.view(request), config.prompt_lookup_min, config.prompt_lookup_max, k)
        request.spec_token_ids, request.spec_num_tokens = self._allowed_prefix(request, drafts), request.num_tokens

    def _propose_with_draft_model(self, requests: list[Request]) -> None:
        """Proposals for the requests' next steps from the draft model (``draft_proposer``; see
        jaxllm/runner/draft.py). Each request's next k positions take their slots now, since the
        draft model writes its K/V there while proposing; when the pool is short the request gets
        no proposal (nobody is preempted for one)."""
        jobs, requests_of_jobs, copies = [], [], []
        for request in requests:
            request.spec_token_ids = ()
            k = self._proposal_room(request)
            position = request.num_computed_tokens
            last = request.output_token_ids[-1] if request.output_token_ids else None
            if k <= 0 or request.num_tokens - position != 1 or last == PLACEHOLDER:
                continue
            allocation = self.kv.allocate_slots(request, k)
            if allocation is None:
                continue
            copies += allocation.block_copies
            jobs.append(DraftJob(request.request_id, request.token_ids_in(position, position + 1)[0], position,
                                 tuple(self.kv.block_ids(request.request_id)), k))
            requests_of_jobs.append(request)
        if not jobs:
            return
        for request, drafts in zip(requests_of_jobs, self.draft_proposer(jobs, tuple(copies)), strict=True):
            request.spec_token_ids, request.spec_num_tokens = self._allowed_prefix(request, drafts), request.num_tokens

    @staticmethod
    def _append_token(request: Request, token: int, token_logprobs) -> None:
        request.output_token_ids.append(token)
        if request.matcher is not None:
            request.matcher.advance(token)
        if token_logprobs is not None:
            request.output_logprobs.append(token_logprobs)

    def _check_stop(self, request: Request, token: int) -> tuple[RequestStatus | None, int | None]:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, token
            if not params.ignore_eos and token in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED, None
        if self._at_length_limit(request):
            return RequestStatus.FINISHED_LENGTH_CAPPED, None
        return None, None


class _StepBuilder:
    """The sequences, copies and preemptions of the step being scheduled, and the budget left."""

    def __init__(self, budget: int):
        self.budget = budget
        self.sequences: list[ScheduledSequence] = []
        self.copies: list[tuple[int, int]] = []
        self.preempted_ids: list[str] = []
        self.swap_out: list[tuple[int, int]] = []  # (device block, host slot)
        self.swap_in: list[tuple[int, int]] = []  # (host slot, device block)

    def add(self, sequence: ScheduledSequence, allocation) -> None:
        self.sequences.append(sequence)
        self.copies.extend(allocation.block_copies)
        self.budget -= len(sequence.token_ids)
