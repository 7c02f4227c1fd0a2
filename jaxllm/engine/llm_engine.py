"""LLMEngine: the host loop. ``step()`` = schedule -> execute -> update -> detokenize."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from jaxllm.config import CacheConfig, LoRAConfig, PoolerConfig, SchedulerConfig, SpeculativeConfig
from jaxllm.engine.classifier import ClassifierHead
from jaxllm.engine.detokenizer import IncrementalDetokenizer
from jaxllm.engine.messages import RunnerOutput, SchedulerOutput
from jaxllm.engine.request import PoolingSpec, Request, RequestStatus
from jaxllm.engine.scheduler import RequestUpdate, Scheduler, SpecDecodeStats
from jaxllm.inputs import PromptType, embeds_cache_salt, prompt_cache_salt, prompt_embeds_of, prompt_input
from jaxllm.lora.request import LoRARequest
from jaxllm.models.layout import HEAD_PARAMS, check_params, param_shapes
from jaxllm.outputs import (
    CompletionOutput,
    Logprob,
    PoolingOutput,
    PoolingRequestOutput,
    RequestMetrics,
    RequestOutput,
    WholeOutput,
)
from jaxllm.pooling_params import PoolingParams
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.structured.token_masks import TokenDFACache, TokenMatcher

if TYPE_CHECKING:
    from jaxllm.engine_args import EngineArgs
    from jaxllm.logits_processor import LogitsProcessor

logger = logging.getLogger("jaxllm")


class Runner(Protocol):
    """Anything that computes a scheduled step: the jitted model runner, or a fake in tests.

    A runner that also has ``dispatch(scheduler_output, prev) -> handle`` and
    ``fetch(handle) -> RunnerOutput`` (start a step without waiting; wait for it) lets the engine
    schedule the next step while the device runs this one.
    """

    num_compiles: int

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput: ...


WAKE_UP_TAGS = ("weights", "kv_cache")


@dataclass(frozen=True)
class LoRAStats:
    """vLLM's ``lora_requests_info``: the adapters (names, sorted) of running and waiting requests."""

    max_loras: int
    running: tuple[str, ...]
    waiting: tuple[str, ...]


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int  # usable blocks, without the null block
    prefix_cache_queries: int  # tokens looked up at admission
    prefix_cache_hits: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    num_compiles: int  # reported by the runner; growth after warm-up is a bug
    num_steps: int
    num_prompt_tokens: int  # of all requests added
    num_generated_tokens: int
    kv_waste: float = 0.0  # allocated but unfilled KV slots / allocated slots, mean over steps
    num_swaps: int = 0  # preemptions that swapped the request's KV to host memory
    kv_blocks_shared: int = 0  # blocks held by more than one request (prefix, n > 1, beams)
    kv_blocks_saved: int = 0  # blocks the requests would need without sharing, minus those held
    num_overlapped_steps: int = 0  # steps dispatched while the previous one still ran (async scheduling)
    spec_decode: SpecDecodeStats | None = None  # speculative decoding's counters, when it is on
    lora: LoRAStats | None = None  # with enable_lora


@dataclass
class _Completion:
    """One of a request's n completions: its scheduler request and its detokenizer."""

    request: Request
    detokenizer: IncrementalDetokenizer
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprob_dicts: list = field(default_factory=list)  # built once per token, not every step
    # What earlier outputs carried (RequestOutputKind.DELTA): tokens, characters of text, finished.
    sent_tokens: int = 0
    sent_text: int = 0
    sent_finish: bool = False


@dataclass
class _Tracked:
    """Engine-side state of one live request: what its RequestOutput needs besides tokens."""

    request: Request
    prompt: str | None
    metrics: RequestMetrics
    completions: dict[int, _Completion]  # by completion index; children appear when forked
    prompt_logprob_dicts: list = field(default_factory=list)
    sent_prompt_logprobs: int = 0  # entries earlier DELTA outputs carried
    # The prompt's ids as every output of the request carries them: one list, not a copy per step.
    prompt_token_ids: list[int] | None = None

    @property
    def finished(self) -> bool:
        n = self.request.sampling_params.n
        return len(self.completions) == n and all(c.finish_reason for c in self.completions.values())


class LLMEngine:
    """Host side of the engine over already-built pieces.

    Args:
        tokenizer: a transformers tokenizer, or None to take and return token ids only.
        runner: computes each step (see :class:`Runner`).
        scheduler_config: step limits and ``max_model_len``.
        cache_config: block size and prefix caching.
        num_kv_blocks: blocks in the runner's KV pool, including the null block 0.
        eos_token_ids: ids that end a request unless ``ignore_eos``.
        num_swap_blocks: host slots for swapped-out blocks (``preemption_mode="swap"``).
        async_scheduling: schedule and dispatch step k+1 before waiting for step k's tokens
            (when the runner can, and no request of step k needs its token on the host first);
            its input tokens are read on the device. Outputs are the same either way.
        vocab_size: the model's vocabulary (embedding rows): prompt token ids must lie below it.
            None leaves them unchecked.
        pooler_config: how pooling requests (``PoolingParams``) turn hidden states into a vector.
        speculative_config: propose tokens by n-gram lookup and verify them in each request's
            next step (vLLM's ``speculative_config``); steps then run one at a time, except while
            its ``disable_by_batch_size`` turns proposals off.
        lora_config: serve LoRA adapters (``add_request(..., lora_request=)``); the runner needs
            ``add_lora``, ``remove_lora`` and ``list_loras`` (the model runner built with it has).
        classifier: a classifier's head: the engine then serves its pooling tasks ("classify"
            and "token_classify", or a token classifier's "token_classify"), and neither
            generation nor the embedding tasks.
        logits_processors: custom logits processors (jaxllm.logits_processor), the same objects
            the runner compiled into its steps: each validates and gives its state of every
            generation request.
        prompt_embeds_dim: with vLLM's ``enable_prompt_embeds``, the width of the input
            embeddings prompts may give instead of token ids (``EmbedsPrompt``); None: refused.
        logprobs_mode: what the runner's logprobs are (vLLM's; see jaxllm.runner.logprobs); beam
            search needs "raw_logprobs".
        max_logprobs: the most logprobs / prompt_logprobs a request may ask for (vLLM's).
        log_stats_interval: log throughput and the pool's use every this many seconds while
            there is work (vLLM's stats log); None: never (``disable_log_stats``).
    """

    def __init__(
        self,
        tokenizer,
        runner: Runner,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_kv_blocks: int,
        eos_token_ids: Iterable[int] = (),
        num_swap_blocks: int = 0,
        async_scheduling: bool = True,
        vocab_size: int | None = None,
        speculative_config: SpeculativeConfig | None = None,
        pooler_config: PoolerConfig | None = None,
        lora_config: LoRAConfig | None = None,
        classifier: ClassifierHead | None = None,
        logits_processors: tuple[LogitsProcessor, ...] = (),
        prompt_embeds_dim: int | None = None,
        logprobs_mode: str = "raw_logprobs",
        max_logprobs: int = 20,
        log_stats_interval: float | None = None,
    ):
        self.tokenizer = tokenizer
        self.log_stats_interval = log_stats_interval
        self._last_stats_log: tuple[float, int, int] | None = None  # (time, prompt tokens, generated tokens)
        self.max_logprobs = max_logprobs
        self.logprobs_mode = logprobs_mode
        self.prompt_embeds_dim = prompt_embeds_dim
        self.classifier = classifier
        self.logits_processors = tuple(logits_processors)
        self.lora_config = lora_config
        self.pooler_config = pooler_config or PoolerConfig()
        self.vocab_size = vocab_size
        self.runner = runner
        self.scheduler = Scheduler(
            scheduler_config, cache_config, num_kv_blocks, tuple(eos_token_ids), num_swap_blocks=num_swap_blocks,
            speculative_config=speculative_config, max_loras=None if lora_config is None else lora_config.max_loras,
        )
        self._tracked: dict[str, _Tracked] = {}
        self._num_steps = 0
        self._num_prompt_tokens = 0
        self._num_generated_tokens = 0
        self.async_scheduling = async_scheduling and hasattr(runner, "dispatch")
        self._in_flight: tuple[SchedulerOutput, object] | None = None  # dispatched, not yet resolved
        self.num_overlapped_steps = 0  # steps dispatched while the previous one was in flight
        self._token_dfas: TokenDFACache | None = None  # structured outputs' compiled patterns
        if speculative_config is not None and speculative_config.method == "draft_model":
            if not hasattr(runner, "propose"):
                raise ValueError("speculative_config method='draft_model' needs a runner with a draft model "
                                 "(jaxllm.runner.draft.DraftModelRunner)")
            self.scheduler.draft_proposer = runner.propose

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> LLMEngine:
        """Load the model, size the KV pool and compile: vLLM's way to build an engine."""
        from jaxllm.engine_args import create_engine

        return create_engine(engine_args, engine_cls=cls)

    def get_tokenizer(self):
        """The Hugging Face tokenizer the engine detokenizes with (None for a model without one)."""
        return self.tokenizer

    def add_request(
        self,
        request_id: str,
        prompt: PromptType | list[int],
        params: SamplingParams | PoolingParams | None = None,
        arrival_time: float | None = None,
        *,
        priority: int = 0,
        retain_blocks: bool = False,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Tokenize and queue a request; raises ValueError, queueing nothing, if it is invalid.

        ``prompt`` is text, token ids, or vLLM's ``TextPrompt`` / ``TokensPrompt`` dict (with an
        optional ``cache_salt``: only requests with the same salt share cached prefix blocks).

        ``priority`` (``scheduling_policy="priority"`` only; lower is sooner) orders the waiting
        queue and decides which running request is preempted first.

        ``retain_blocks`` keeps its KV blocks after it finishes, for :meth:`fork_request`, until
        :meth:`release_request` (beam search).

        With ``PoolingParams`` the request returns a ``PoolingRequestOutput`` (see ``_as_pooling``).

        ``lora_request`` runs it with that LoRA adapter (read now if it is not loaded yet).
        """
        if self.is_sleeping():
            raise ValueError("the engine is sleeping: wake_up() first")
        pooling = None
        if isinstance(params, PoolingParams):
            params, pooling = self._as_pooling(params)
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams or PoolingParams, got {type(params).__name__}")
        if pooling is None and "generate" not in self.supported_tasks:
            tasks = " and ".join(self.supported_tasks) + ("" if self.classifier.per_token else " (and score)")
            raise ValueError(f"this model is a {self.classifier.kind} classifier: it serves {tasks} (PoolingParams), "
                             "not generation (SamplingParams)")
        params.update_from_tokenizer(self.tokenizer)  # bad_words -> token ids, logit_bias ids checked
        self._check_limits(params)
        if self.logits_processors and pooling is None:
            params = self._with_logits_states(params)
        if self.vocab_size is not None:
            params.check_vocabulary(self.vocab_size)
        if lora_request is not None:
            self.add_lora(lora_request)
        cache_salt = prompt_cache_salt(prompt)
        if cache_salt is not None and not self.scheduler.kv.enable_prefix_caching:
            raise ValueError("cache_salt is only supported with prefix caching enabled")
        embeds = prompt_embeds_of(prompt)
        if embeds is None:
            prompt_text, token_ids = self._tokenize(prompt)
        else:  # the ids are placeholders: the step reads each position's input from the embeddings
            self._check_prompt_embeds(embeds, params)
            prompt_text, token_ids = None, [0] * len(embeds)
        max_model_len = self.scheduler.config.max_model_len
        token_ids = params.truncated_prompt(token_ids, max_model_len)
        if embeds is not None:
            embeds = embeds[len(embeds) - len(token_ids):]  # truncation keeps the last rows
            cache_salt = embeds_cache_salt(cache_salt, embeds)
        if params.max_tokens is None:  # as many as fit (at least one: a full prompt is refused below)
            params = dataclasses.replace(params, max_tokens=max(1, max_model_len - len(token_ids)))
        arrival = time.time() if arrival_time is None else arrival_time
        request = Request(str(request_id), token_ids, params, arrival, retain_blocks=retain_blocks,
                          cache_salt=cache_salt, priority=priority, matcher=self._matcher(params), pooling=pooling,
                          lora_request=lora_request, prompt_embeds=embeds)
        self.scheduler.add_request(request)
        detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params)
        completions = {0: _Completion(request, detokenizer)}
        self._tracked[request.request_id] = _Tracked(request, prompt_text, RequestMetrics(arrival), completions)
        self._num_prompt_tokens += len(token_ids)

    @property
    def pooling_task(self) -> str:
        """The pooling task a request that names none gets: the model's own."""
        return self.classifier.tasks[0] if self.classifier is not None else "embed"

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        """vLLM's: what requests this engine's model serves: a causal LM "generate", "embed" and
        "token_embed"; a classifier its head's ("classify", "token_classify")."""
        return self.classifier.tasks if self.classifier is not None else ("generate", "embed", "token_embed")

    def check_pooling_params(self, params: PoolingParams) -> None:
        """ValueError (naming the field) when this engine's model cannot serve ``params``: its
        task, or Matryoshka ``dimensions`` it was not trained for."""
        self._as_pooling(params)

    def _as_pooling(self, params: PoolingParams) -> tuple[SamplingParams, PoolingSpec]:
        """A pooling request (vLLM's: the prompt's final hidden states pooled into one vector) runs
        as a request of one output token, which is not returned: its SamplingParams, and what
        ``Request.pooling`` holds."""
        sampling = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False,
                                  truncate_prompt_tokens=params.truncate_prompt_tokens,
                                  output_kind=RequestOutputKind.FINAL_ONLY)
        task = params.task or self.pooling_task
        if task not in self.supported_tasks:
            raise ValueError(f"task={task!r} is not supported by this model, which serves {self.supported_tasks}"
                             + (" (a classifier)" if self.classifier is not None else
                                "; classify needs a *ForSequenceClassification model, token_classify a "
                                "*ForSequenceClassification or *ForTokenClassification one"))
        if params.dimensions is not None:
            if task not in ("embed", "token_embed"):
                raise ValueError(f"dimensions={params.dimensions}: only embeddings (task 'embed' or 'token_embed') "
                                 f"can be cut, not task={task!r}")
            self.runner.cfg.check_dimensions(params.dimensions)
        normalize = self.pooler_config.normalize if params.normalize is None else params.normalize
        use_activation = params.use_activation is not False
        pooling_type = "ALL" if task.startswith("token_") else self.pooler_config.pooling_type
        return sampling, PoolingSpec(pooling_type, normalize, task, use_activation, params.dimensions)

    def _check_limits(self, params: SamplingParams) -> None:
        """What this engine's settings refuse in a request that SamplingParams allows."""
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.max_logprobs:
                raise ValueError(f"{name}={value} is more than this engine's max_logprobs={self.max_logprobs}")
        if self.tokenizer is None and params.stop:
            raise ValueError(f"stop={params.stop!r}: stop strings are matched on text, and this engine has no "
                             "tokenizer (skip_tokenizer_init); use stop_token_ids")

    def check_beam_search(self) -> None:
        """Beam search ranks beams by the model's log-probabilities: refused under another logprobs_mode."""
        if self.logprobs_mode != "raw_logprobs":
            raise ValueError(f"beam search ranks by the model's logprobs; this engine's logprobs_mode is "
                             f"{self.logprobs_mode!r} (it needs 'raw_logprobs')")

    def _check_prompt_embeds(self, embeds, params: SamplingParams) -> None:
        if self.prompt_embeds_dim is None:
            raise ValueError("prompt_embeds need an engine built with enable_prompt_embeds=True")
        if embeds.shape[1] != self.prompt_embeds_dim:
            raise ValueError(f"prompt_embeds have shape {embeds.shape}: this model's input embeddings are "
                             f"{self.prompt_embeds_dim} wide")
        if params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs need the prompt's token ids; a prompt_embeds prompt has none")
        if params.repetition_penalty != 1.0:
            raise ValueError("repetition_penalty counts the prompt's tokens; a prompt_embeds prompt has none "
                             "(presence_penalty and frequency_penalty, over the outputs, work)")

    def _with_logits_states(self, params: SamplingParams) -> SamplingParams:
        """A copy of ``params`` holding each custom logits processor's state of the request
        (a ValueError from a processor's validate_params refuses it)."""
        for processor in self.logits_processors:
            processor.validate_params(params)
        return dataclasses.replace(params, _logits_states=tuple(p.state_of(params) for p in self.logits_processors))

    def _matcher(self, params: SamplingParams) -> TokenMatcher | None:
        """The start of a structured-output request's pattern (compiled once per pattern)."""
        wanted = params.structured_outputs
        if wanted is None:
            return None
        if self._token_dfas is None:
            if self.tokenizer is None:
                raise ValueError("structured_outputs need a tokenizer; this engine takes token ids only")
            vocab_size = self.vocab_size or len(self.tokenizer)
            eos = tuple(sorted(self.scheduler.eos_token_ids))
            self._token_dfas = TokenDFACache(self.tokenizer, vocab_size, eos)
        try:
            return TokenMatcher(self._token_dfas.get(wanted.pattern()))
        except ValueError as exc:
            raise ValueError(f"structured_outputs ({wanted.kind}): {exc}") from exc

    def fork_request(self, parent_id: str, request_id: str, token_ids: list[int], params: SamplingParams) -> None:
        """Queue ``token_ids``, which extend the retained request ``parent_id``'s computed tokens,
        sharing its KV blocks (the new request keeps its blocks too when it finishes)."""
        params.update_from_tokenizer(self.tokenizer)
        request = Request(str(request_id), list(token_ids), params, time.time(), retain_blocks=True)
        self.scheduler.add_forked_request(request, parent_id)
        detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params)
        self._tracked[request.request_id] = _Tracked(
            request, None, RequestMetrics(request.arrival_time), {0: _Completion(request, detokenizer)}
        )
        self._num_prompt_tokens += len(token_ids)

    def release_request(self, request_id: str) -> None:
        """Free the blocks a finished ``retain_blocks`` request kept."""
        self.scheduler.release(request_id)

    def _tokenize(self, prompt: PromptType | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):  # vLLM's TextPrompt / TokensPrompt
            prompt = prompt_input(prompt)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is a string but the engine has no tokenizer; pass token ids")
            token_ids = list(self.tokenizer.encode(prompt))
            if not token_ids:
                raise ValueError(f"prompt={prompt!r} tokenizes to no tokens")
            return prompt, token_ids
        token_ids = list(prompt)
        if not token_ids:
            raise ValueError("prompt must not be empty")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in token_ids):
            raise ValueError("prompt token ids must be non-negative integers")
        if self.vocab_size is not None and max(token_ids) >= self.vocab_size:
            outside = sorted({t for t in token_ids if t >= self.vocab_size})
            raise ValueError(f"prompt token ids {outside[:8]} are outside the vocabulary of {self.vocab_size}")
        return None, token_ids

    def step(self) -> list[RequestOutput]:
        """Run one step; returns an output for every request that advanced or finished: the whole
        output so far, only what is new, or nothing until it finishes, by its params' ``output_kind``.

        With async scheduling a step's tokens are returned by the next call, which first
        dispatches the following step, so the device never waits for the host in between.
        """
        in_flight, self._in_flight = self._in_flight, None
        if not self.scheduler.has_unfinished_requests():
            return []  # a step still in flight computed only for requests aborted since
        if self.log_stats_interval is not None:
            self._log_stats()
        scheduled = self.scheduler.schedule()
        if not self.async_scheduling:
            updates = self.scheduler.update(scheduled, self.runner.execute(scheduled))
            self._count_step(scheduled)
            return _merged(self._outputs(updates))
        handle = self.runner.dispatch(scheduled, None if in_flight is None else in_flight[1])
        self.num_overlapped_steps += in_flight is not None and not scheduled.is_empty
        outputs = [] if in_flight is None else self._resolve(*in_flight)
        self.scheduler.advance(scheduled)
        self._count_step(scheduled)
        if scheduled.is_empty or not self.scheduler.can_overlap(scheduled):
            outputs += self._resolve(scheduled, handle)
        else:
            self._in_flight = (scheduled, handle)
        return _merged(outputs)

    def _log_stats(self) -> None:
        """vLLM's periodic line: prompt and generation throughput since the last one, requests
        running and waiting, the KV pool's use and the prefix cache's hit rate."""
        now = time.monotonic()
        if self._last_stats_log is None:
            self._last_stats_log = (now, self._num_prompt_tokens, self._num_generated_tokens)
            return
        then, prompt, generated = self._last_stats_log
        if now - then < self.log_stats_interval:
            return
        stats, elapsed = self.stats, max(now - then, 1e-9)
        self._last_stats_log = (now, stats.num_prompt_tokens, stats.num_generated_tokens)
        logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, Running: %d reqs, "
                    "Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
                    (stats.num_prompt_tokens - prompt) / elapsed, (stats.num_generated_tokens - generated) / elapsed,
                    stats.num_running, stats.num_waiting, 100 * stats.kv_blocks_used / max(stats.kv_blocks_total, 1),
                    100 * stats.prefix_cache_hit_rate)

    def _resolve(self, scheduled: SchedulerOutput, handle) -> list[tuple[bool, RequestOutput]]:
        return self._outputs(self.scheduler.resolve(scheduled, self.runner.fetch(handle)))

    def _outputs(self, updates: list[RequestUpdate]) -> list[tuple[bool, RequestOutput]]:
        """Applies a step's updates, then (is a delta, output) for each request they touched, as
        its ``output_kind`` asks. Built before anything else changes the requests: under async
        scheduling the next step's placeholders come after."""
        touched = {id(t): t for t in (self._process(update) for update in updates)}.values()
        outputs = ((t.request.sampling_params.output_kind, self._output(t)) for t in touched)
        return [(kind is RequestOutputKind.DELTA, out) for kind, out in outputs if out is not None]

    def _count_step(self, scheduled: SchedulerOutput) -> None:
        if scheduled.is_empty:
            return
        self._num_steps += 1
        self._mark_scheduled(scheduled)

    def _mark_scheduled(self, scheduled: SchedulerOutput) -> None:
        now = time.time()
        for seq in scheduled.sequences:
            tracked = self._tracked.get(seq.request_id)
            if tracked is not None and tracked.metrics.first_scheduled_time is None:
                tracked.metrics.first_scheduled_time = now

    def _process(self, update: RequestUpdate) -> _Tracked:
        """Applies one update (of one completion) to its request's engine-side state."""
        request = update.request
        tracked = self._tracked[request.group_id]
        completion = self._completion(tracked, request)
        if request.pooling is None:  # a pooling request's one sampled token is not an output
            self._num_generated_tokens += len(update.new_token_ids)
        self._record_token_times(tracked.metrics)
        finish_reason, stop_reason = update.finish_reason, update.stop_reason
        new_token_ids = update.new_token_ids
        if update.finish_reason == "stop" and new_token_ids and not request.sampling_params.include_stop_str_in_output:
            # As in vLLM, the token that stopped the request (eos or one of stop_token_ids, always
            # the last one given) stays in token_ids but adds no text.
            new_token_ids = new_token_ids[:-1]
        match = completion.detokenizer.update(new_token_ids)
        if match is not None:
            # A stop string wins over a length cap reached by the same token, as in vLLM.
            finish_reason, stop_reason = "stop", match.stop
            self.scheduler.finish_request(update.request_id, RequestStatus.FINISHED_STOPPED, match.stop)
            # Accepted drafts after the one that completed it are not part of the output.
            dropped = len(update.new_token_ids) - 1 - match.token_index
            if dropped:
                del request.output_token_ids[-dropped:]
                del request.output_logprobs[len(request.output_token_ids):]
                self._num_generated_tokens -= dropped
        completion.finish_reason, completion.stop_reason = finish_reason, stop_reason
        if tracked.finished:
            tracked.metrics.finished_time = time.time()
            del self._tracked[request.group_id]
        return tracked

    def _completion(self, tracked: _Tracked, request: Request) -> _Completion:
        index = request.completion_index
        if index not in tracked.completions:  # a parallel-sampling child, forked this step
            detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, request.sampling_params)
            tracked.completions[index] = _Completion(request, detokenizer)
        return tracked.completions[index]

    @staticmethod
    def _record_token_times(metrics: RequestMetrics) -> None:
        now = time.time()
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now

    def _output(self, tracked: _Tracked) -> RequestOutput | PoolingRequestOutput | None:
        request = tracked.request
        finished = tracked.finished
        if request.pooling is not None:
            return self._pooling_output(request) if finished else None
        kind = request.sampling_params.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind is RequestOutputKind.DELTA
        completions = sorted(tracked.completions.items())
        if delta:  # only the completions that moved, each with only its new part
            completions = [(i, c) for i, c in completions if self._moved(c)]
        prompt_logprobs = self._extend(tracked.prompt_logprob_dicts, request.prompt_logprobs)
        if delta:
            prompt_logprobs, tracked.sent_prompt_logprobs = (prompt_logprobs[tracked.sent_prompt_logprobs:],
                                                             len(prompt_logprobs))
        if tracked.prompt_token_ids is None:
            tracked.prompt_token_ids = list(request.prompt_token_ids)
        return RequestOutput(
            request_id=request.request_id,
            prompt=tracked.prompt,
            prompt_token_ids=tracked.prompt_token_ids,
            outputs=[self._completion_output(i, c, delta) for i, c in completions],
            finished=finished,
            prompt_logprobs=list(prompt_logprobs) or None,
            metrics=tracked.metrics,
            num_cached_tokens=request.num_cached_tokens,
            lora_request=request.lora_request,
        )

    def _pooling_output(self, request: Request) -> PoolingRequestOutput:
        if request.pooled is None:
            raise RuntimeError(f"pooling request {request.request_id!r} finished without its hidden states")
        spec = request.pooling
        pooled = np.concatenate(request.pooled) if spec.type == "ALL" else request.pooled  # ALL: chunks' rows
        vector = np.asarray(pooled, np.float32)  # [hidden], or [num_prompt_tokens, hidden] for ALL
        if spec.type == "MEAN":
            vector = vector / request.num_pooled_tokens
        if spec.task in ("classify", "token_classify"):
            vector = self.classifier(vector, spec.use_activation)
        elif spec.dimensions is not None:  # Matryoshka: the first values, normalised after the cut
            vector = vector[..., : spec.dimensions]
        if spec.task in ("embed", "token_embed") and spec.normalize:
            norms = np.linalg.norm(vector, axis=-1, keepdims=True)
            vector = vector / np.maximum(norms, 1e-12)
        return PoolingRequestOutput(request.request_id, PoolingOutput(vector), list(request.prompt_token_ids), True)

    @staticmethod
    def _moved(c: _Completion) -> bool:
        return len(c.request.output_token_ids) > c.sent_tokens or (c.finish_reason is not None and not c.sent_finish)

    def _completion_output(self, index: int, c: _Completion, delta: bool = False) -> CompletionOutput:
        wants_logprobs = c.request.sampling_params.logprobs is not None
        text = c.detokenizer.output_text(c.finish_reason is not None)
        token_ids = c.request.output_token_ids
        logprobs = self._extend(c.logprob_dicts, c.request.output_logprobs) if wants_logprobs else None
        if delta:  # text never shrinks: the detokenizer holds back what a stop string may remove
            first_token, first_char = c.sent_tokens, c.sent_text
            c.sent_tokens, c.sent_text, c.sent_finish = len(token_ids), len(text), c.finish_reason is not None
            text, token_ids = text[first_char:], token_ids[first_token:]
            logprobs = None if logprobs is None else logprobs[first_token:]
        return CompletionOutput(
            index=index,
            text=text,
            token_ids=list(token_ids),
            cumulative_logprob=sum(e.logprob for e in c.request.output_logprobs) if wants_logprobs else None,
            logprobs=None if logprobs is None else list(logprobs),
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )

    def _extend(self, dicts: list, entries: list) -> list:
        """vLLM's shape, per position: token id -> Logprob, always including the chosen token.
        ``dicts`` caches the converted prefix of ``entries``; only new entries are decoded."""
        dicts.extend(None if e is None else self._logprob_dict(e) for e in entries[len(dicts):])
        return dicts

    def _logprob_dict(self, e) -> dict[int, Logprob]:
        out = {tid: Logprob(lp, rank, self._decode_one(tid)) for rank, (tid, lp) in enumerate(e.top, 1)}
        if e.token_id not in out:
            out[e.token_id] = Logprob(e.logprob, e.rank, self._decode_one(e.token_id))
        return out

    def _decode_one(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Stop requests now and free their blocks; unknown or finished ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            tracked = self._tracked.pop(rid, None)
            members = [c.request.request_id for c in tracked.completions.values()] if tracked else [rid]
            for member in members:
                self.scheduler.finish_request(member, RequestStatus.FINISHED_ABORTED)

    # -- LoRA adapters (vLLM's names) ----------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Read an adapter now, so the first request naming it does not wait for the disk;
        ValueError if it does not fit the model or LoRA is off. False if it was loaded already."""
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        if self.lora_config is None:
            raise ValueError(f"lora_request {lora_request.lora_name!r}: LoRA is not enabled (enable_lora=True)")
        return self.runner.add_lora(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        """Drop a loaded adapter (requests still naming it read it again); False if not loaded."""
        return self.lora_config is not None and self.runner.remove_lora(lora_id)

    def list_loras(self) -> set[int]:
        """The lora_int_ids of the adapters loaded now."""
        return set() if self.lora_config is None else self.runner.list_loras()

    # -- sleep mode and weight updates (reinforcement-learning loops) ---------------------------
    def sleep(self, level: int = 1) -> None:
        """vLLM's sleep mode: free the device memory of the KV pool and the weights (level 1 keeps
        the weights on the host, level 2 discards them) until :meth:`wake_up`. Only while no
        request is unfinished; the prefix cache is forgotten (its blocks are gone)."""
        self._check_idle("sleep")
        self.runner.sleep(level)
        self.scheduler.kv.reset_prefix_cache()

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Bring back what :meth:`sleep` freed: ``tags`` "weights" and / or "kv_cache" (None: both)."""
        tags = tuple(tags or WAKE_UP_TAGS)
        unknown = [t for t in tags if t not in WAKE_UP_TAGS]
        if unknown:
            raise ValueError(f"tags={list(tags)!r}: unknown {unknown}; known {list(WAKE_UP_TAGS)}")
        self.runner.wake_up(tags)

    def is_sleeping(self) -> bool:
        return bool(getattr(self.runner, "is_sleeping", False))

    def update_weights(self, params: dict) -> None:
        """Replace the model's weights (the layout ``load_model`` gives; a classifier's ``score`` head
        included), e.g. with a policy's after a training step. Only while no request is unfinished;
        the prefix cache is forgotten, since its K/V came from the old weights."""
        self._check_idle("update_weights")
        if not hasattr(self.runner, "update_weights"):
            raise ValueError("update_weights needs the model runner (this engine's runner has no weights)")
        if self.classifier is not None:  # the head's parameters, which the runner does not check
            shapes = {name: shape for name, shape in param_shapes(self.runner.cfg).items() if name in HEAD_PARAMS}
            missing = sorted(shapes.keys() - params.keys())
            if missing:
                raise ValueError(f"update_weights: a classifier's params need its head {sorted(shapes)}; "
                                 f"missing {missing}")
            check_params({name: params[name] for name in shapes}, shapes, "update_weights params")
            classifier, params = ClassifierHead.split_from(self.runner.cfg, params)
        self.runner.update_weights(params)
        if self.classifier is not None:
            self.classifier = classifier
        self.scheduler.kv.reset_prefix_cache()

    def _check_idle(self, what: str) -> None:
        if self.has_unfinished_requests():
            raise ValueError(f"{what} needs an idle engine: {self.get_num_unfinished_requests()} requests are "
                             "unfinished (let them finish, or abort them)")
        if self.scheduler.kv.num_used_blocks:  # finished requests that kept their blocks (beam search)
            raise ValueError(f"{what} needs an idle engine: {self.scheduler.kv.num_used_blocks} KV blocks are still "
                             "held by retained requests (release_request them)")

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block (vLLM's name), so no later request reuses KV computed
        before. Only possible while no request holds blocks: False, with a warning, otherwise."""
        done = self.scheduler.kv.reset_prefix_cache()
        if not done:
            logger.warning("prefix cache not reset: %d KV blocks are still held by requests",
                           self.scheduler.kv.num_used_blocks)
        return done

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.get_num_unfinished_requests()

    @property
    def stats(self) -> EngineStats:
        s = self.scheduler.stats
        return EngineStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_blocks_used=s.kv_blocks_used,
            kv_blocks_total=s.kv_blocks_total,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            prefix_cache_hit_rate=s.prefix_cache_hit_rate,
            num_preemptions=s.num_preemptions,
            num_compiles=int(self.runner.num_compiles),
            num_steps=self._num_steps,
            num_prompt_tokens=self._num_prompt_tokens,
            num_generated_tokens=self._num_generated_tokens,
            kv_waste=s.kv_waste,
            num_swaps=s.num_swaps,
            kv_blocks_shared=s.kv_blocks_shared,
            kv_blocks_saved=s.kv_blocks_saved,
            num_overlapped_steps=self.num_overlapped_steps,
            spec_decode=s.spec_decode,
            lora=self._lora_stats(),
        )

    def _lora_stats(self) -> LoRAStats | None:
        if self.lora_config is None:
            return None

        def names(requests) -> tuple[str, ...]:
            return tuple(sorted({r.lora_request.lora_name for r in requests if r.lora_request is not None}))

        return LoRAStats(self.lora_config.max_loras, names(self.scheduler.running), names(self.scheduler.waiting))


def _merged(outputs: list[tuple[bool, RequestOutput]]) -> list[RequestOutput]:
    """One output per request: a step may resolve a request twice (the previous step's token and
    its own). The later cumulative output covers the earlier; two deltas are joined."""
    merged: dict[str, RequestOutput] = {}
    for delta, out in outputs:
        earlier = merged.get(out.request_id)
        if delta and earlier is not None:
            joined = WholeOutput()
            joined.add(earlier)
            joined.add(out)
            out = joined.result()
        merged[out.request_id] = out
    return list(merged.values())
