"""LLM: the offline batch API, with vLLM's names and defaults."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from tqdm.auto import tqdm

from converters.checkpoint import Checkpoint
from jaxllm.beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from jaxllm.engine_args import EngineArgs, create_engine
from jaxllm.entrypoints.chat_utils import render_chat
from jaxllm.inputs import PromptType, prompt_cache_salt, prompt_input
from jaxllm.loader import Model
from jaxllm.lora.request import LoRARequest
from jaxllm.outputs import (
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from jaxllm.pooling_params import POOLING_TASKS, PoolingParams
from jaxllm.profiler import PROFILER
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.scoring import plan_scores


def _prompt_list(prompts) -> list:
    """One prompt (text or a prompt dict) or a sequence of them, as a list."""
    return [prompts] if isinstance(prompts, str | dict) else list(prompts)


def _dtype_name(dtype: Any) -> str | None:
    try:
        return jnp.dtype(dtype).name
    except TypeError:
        return None


class LLM:
    """Generate from a model for a batch of prompts, continuously batched over a paged KV pool.

    Args:
      model: None or "SmolLM2-135M-Instruct" (the embedded model), a HF checkpoint directory,
        a .gguf file, a repo id in the local Hugging Face cache, or a ``Model`` from
        ``jaxllm.load_model`` (its weights are reused as they are: a ``dtype`` other than "auto"
        or the model's own raises ValueError).
      **kwargs: any :class:`jaxllm.engine_args.EngineArgs` field (dtype, block_size,
        max_model_len, max_num_seqs, max_num_batched_tokens, gpu_memory_utilization,
        kv_cache_memory_bytes, num_kv_blocks, enable_prefix_caching, attention_backend, seed, ...).
    """

    def __init__(self, model: str | Model | None = None, **kwargs: Any):
        kwargs.setdefault("disable_log_stats", True)  # as vLLM's LLM: no periodic stats line offline
        if isinstance(model, Model):  # already loaded in a notebook: reuse its weights
            loaded, asked = model.params["embed"].dtype, kwargs.get("dtype", "auto")
            if asked != "auto" and _dtype_name(asked) != loaded.name:
                raise ValueError(f"dtype={asked!r}: the model was loaded in {loaded.name} and is used as it "
                                 f"is; load it with jaxllm.load_model(..., dtype={asked!r}) or leave dtype out")
            self.engine_args = EngineArgs.from_kwargs(None, kwargs)
            checkpoint = Checkpoint(model.config, model.params, model.tokenizer, "loaded")
        else:
            self.engine_args = EngineArgs.from_kwargs(model, kwargs)
            checkpoint = None
        # A loaded Model has no checkpoint directory for "auto" to read.
        auto_without_source = checkpoint is not None and self.engine_args.generation_config == "auto"
        self._sampling_defaults = {} if auto_without_source else self.engine_args.sampling_defaults()
        SamplingParams(**self._sampling_defaults)  # a generation config SamplingParams refuses fails here
        self.llm_engine = create_engine(self.engine_args, checkpoint)
        self._counter = itertools.count()

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` and ``chat`` use without ``sampling_params``: SamplingParams' defaults,
        overridden by the model's generation_config.json (``generation_config="auto"``, as vLLM)."""
        return SamplingParams(**self._sampling_defaults)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block, so the next requests compute their prompts afresh
        (benchmarks; vLLM's name). False, with a warning, while requests hold blocks."""
        return self.llm_engine.reset_prefix_cache()

    def get_metrics(self) -> list:
        """vLLM's: the engine's counters and gauges now (``jaxllm.metrics_reader``: Counter, Gauge,
        Vector), named as the server's ``/metrics`` names them (``jaxllm:`` prefix). The latency
        histograms are the server's."""
        from converters.resolve import DEFAULT_MODEL
        from jaxllm.metrics_reader import read_metrics

        return read_metrics(self.llm_engine.stats, self.engine_args.model or DEFAULT_MODEL)

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def sleep(self, level: int = 1) -> None:
        """vLLM's sleep mode, e.g. between rollouts of a reinforcement-learning loop: free the
        device memory of the KV pool and the weights (level 1 keeps the weights on the host, level 2
        discards them, for :meth:`update_weights` to replace). Only while the engine is idle."""
        self.llm_engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Bring back what :meth:`sleep` freed: "weights", "kv_cache", or both (None)."""
        self.llm_engine.wake_up(tags)

    def update_weights(self, params: dict) -> None:
        """Replace the model's weights with ``params`` in its layout (as ``jaxllm.load_model().params``),
        e.g. a trained policy's, without rebuilding the engine or recompiling. Only while the engine
        is idle (awake, or after ``sleep(level=2)``); the prefix cache is forgotten."""
        self.llm_engine.update_weights(params)

    def start_profile(self, profile_dir: str | None = None) -> None:
        """Record a JAX profiler trace of everything until :meth:`stop_profile` (vLLM's names), into
        ``profile_dir`` or ``$JAXLLM_PROFILER_DIR`` (see :mod:`jaxllm.profiler`)."""
        PROFILER.start(profile_dir)

    def stop_profile(self) -> None:
        """Write the trace :meth:`start_profile` began."""
        PROFILER.stop()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt; returns one RequestOutput per prompt, in input order.

        Args:
          prompts: a string, a list of strings, or dicts ``{"prompt_token_ids": [...]}``
            (``{"prompt": "..."}`` also works).
          sampling_params: one SamplingParams for all prompts, or one per prompt.
          use_tqdm: show a progress bar with requests done and tokens/s.
          priority: one integer per prompt, lower first (needs ``scheduling_policy="priority"``).
          lora_request: a LoRA adapter for all prompts, or one (or None) per prompt (needs
            ``enable_lora=True``).
        """
        prompts = _prompt_list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"got {len(priorities)} priority values for {len(prompts)} prompts; pass one per prompt")
        ids = self._add_all(prompts, params, priorities, self._loras_per_prompt(lora_request, len(prompts)))
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them through the chat template.

        Messages are read as the server reads them (``ChatMessage``): text content parts joined,
        an assistant's ``tool_calls`` with their JSON ``arguments`` parsed, a tool message's
        ``tool_call_id`` kept; a malformed message raises ValueError. ``tools`` reach the
        template (nothing parses tool calls out of the reply). ``continue_final_message``
        (with ``add_generation_prompt=False``) continues the last, assistant, message;
        ``chat_template_kwargs`` are extra template variables (see ``render_chat``)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.get_tokenizer()
        prompts = [
            {"prompt_token_ids": render_chat(
                tokenizer, conv, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, chat_template=chat_template, tools=tools,
                chat_template_kwargs=chat_template_kwargs,
            )}
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request=lora_request)

    def encode(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
        pooling_task: str | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[PoolingRequestOutput]:
        """Pool each prompt's final hidden states into one vector (the engine's ``pooler_config``:
        the last token's by default), or one per prompt token for the token tasks; returns one
        PoolingRequestOutput per prompt, in input order, its numpy array in ``.outputs.data``.
        Prompts are batched with any other requests, through the same paged KV pool and prefix
        cache (the token tasks compute every prompt token, so they skip the cache).

        ``pooling_task``: "embed" (the vector [hidden_size], L2-normalised by default),
        "classify" (a sequence classifier's label probabilities [num_labels]), "token_embed"
        (each prompt token's final hidden state [num_tokens, hidden_size], each row
        L2-normalised by default) or "token_classify" (a classifier's head on each prompt token
        [num_tokens, num_labels], with its activation by default); None: the model's own (see
        ``LLMEngine.supported_tasks``).
        """
        supported = [t for t in self.llm_engine.supported_tasks if t in POOLING_TASKS]
        task = pooling_task or self.llm_engine.pooling_task
        if task not in supported:
            hint = {"classify": " (classify needs a *ForSequenceClassification model)",
                    "token_classify": " (token_classify needs a *ForSequenceClassification or "
                                      "*ForTokenClassification model)"}.get(task, "")
            raise ValueError(f"pooling_task={pooling_task!r} is not supported by this model; supported: {supported}"
                             + hint)
        prompts = _prompt_list(prompts)
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            params = [pooling_params or PoolingParams()] * len(prompts)
        else:
            params = list(pooling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} pooling_params for {len(prompts)} prompts; pass one or one per prompt")
        if not all(isinstance(p, PoolingParams) for p in params):
            raise ValueError("pooling_params must be PoolingParams")
        for p in params:
            if p.task is not None and p.task != task:
                raise ValueError(f"pooling_params task={p.task!r} disagrees with pooling_task={task!r}")
        params = [dataclasses.replace(p, task=task) for p in params]
        loras = self._loras_per_prompt(lora_request, len(prompts))
        return self._run(self._add_all(prompts, params, [0] * len(prompts), loras), use_tqdm)

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (``.outputs.embedding``, a list of floats): see :meth:`encode`."""
        outputs = self.encode(prompts, pooling_params, use_tqdm, "embed", lora_request=lora_request)
        return [EmbeddingRequestOutput.from_base(out) for out in outputs]

    def classify(
        self,
        prompts: PromptType | Sequence[PromptType],
        *,
        use_tqdm: bool = True,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[ClassificationRequestOutput]:
        """Class probabilities of each prompt (``.outputs.probs``; the label names are the model
        config's ``id2label``) from a sequence-classification model (``*ForSequenceClassification``):
        its head on the last token's final hidden state, then softmax (a sigmoid for one label, or
        as the model's ``problem_type`` says). ``PoolingParams(use_activation=False)`` gives the
        logits. See :meth:`encode`."""
        outputs = self.encode(prompts, pooling_params, use_tqdm, "classify", lora_request=lora_request)
        return [ClassificationRequestOutput.from_base(out) for out in outputs]

    def reward(
        self,
        prompts: PromptType | Sequence[PromptType],
        *,
        use_tqdm: bool = True,
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[PoolingRequestOutput]:
        """A reward for each prompt token (vLLM's: token and process reward models): the
        classifier's head on every token, ``encode(..., pooling_task="token_classify")``;
        ``.outputs.data`` is float32 [num_tokens, num_labels]."""
        return self.encode(prompts, pooling_params, use_tqdm, "token_classify", lora_request=lora_request)

    def score(
        self,
        data_1: PromptType | Sequence[PromptType],
        data_2: PromptType | Sequence[PromptType],
        /,
        *,
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
        pooling_params: PoolingParams | None = None,
        lora_request: LoRARequest | None = None,
    ) -> list[ScoringRequestOutput]:
        """Similarity scores of text pairs: ``data_1`` (one text, or one per ``data_2`` text)
        against ``data_2``; one ScoringRequestOutput per pair, in ``data_2``'s order, its score in
        ``.outputs.score``.

        A cross-encoder (a sequence classifier with one label) reads each pair as one input (the
        tokenizer's pair encoding) and scores it with its head and a sigmoid; any other model
        embeds the texts and scores the cosine similarity of their embeddings, as vLLM does.
        ``truncate_prompt_tokens`` keeps the last k tokens of each input.
        """
        data_1, data_2 = _prompt_list(data_1), _prompt_list(data_2)
        plan = plan_scores(self.llm_engine.classifier, self.get_tokenizer(), data_1, data_2)
        if pooling_params is not None and not isinstance(pooling_params, PoolingParams):
            raise ValueError("pooling_params must be PoolingParams")
        params = pooling_params or PoolingParams()
        if truncate_prompt_tokens is not None:
            params = dataclasses.replace(params, truncate_prompt_tokens=truncate_prompt_tokens)
        prompts = [{"prompt_token_ids": p} if plan.task == "classify" else p for p in plan.prompts]
        outputs = self.encode(prompts, params, use_tqdm, plan.task, lora_request=lora_request)
        scores = plan.scores([out.outputs.data for out in outputs])
        results = []
        for index, score in enumerate(scores):
            runs = [outputs[r] for r in plan.runs_of(index)]
            results.append(ScoringRequestOutput("_".join(r.request_id for r in runs), ScoringOutput(score),
                                                [t for r in runs for t in r.prompt_token_ids]))
        return results

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    lora_request: LoRARequest | None = None) -> list[BeamSearchOutput]:
        """Beam search for each prompt (vLLM's semantics; see :mod:`jaxllm.beam_search`).

        Returns one BeamSearchOutput per prompt, its ``.sequences`` best first, each with
        ``.tokens`` (prompt + generated ids), ``.text`` and ``.cum_logprob``.
        """
        prompts = _prompt_list(prompts)
        return beam_search(self.llm_engine, [self._token_ids(p) for p in prompts], params, lora_request)

    def _token_ids(self, prompt: PromptType) -> list[int]:
        if prompt_cache_salt(prompt) is not None:
            raise ValueError("cache_salt is not supported by beam_search")
        value = prompt_input(prompt)
        return value if isinstance(value, list) else list(self.get_tokenizer().encode(value))

    # -- internals -------------------------------------------------------------------------------
    def _params_per_prompt(self, sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.get_default_sampling_params()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling_params for {n} prompts; pass one or one per prompt")
        return params

    @staticmethod
    def _loras_per_prompt(lora_request, n: int) -> list[LoRARequest | None]:
        if lora_request is None or isinstance(lora_request, LoRARequest):
            return [lora_request] * n
        loras = list(lora_request)
        if len(loras) != n:
            raise ValueError(f"got {len(loras)} lora_request values for {n} prompts; pass one or one per prompt")
        return loras

    def _add_all(self, prompts: list[PromptType], params: list[SamplingParams | PoolingParams],
                 priorities: list[int], loras: list[LoRARequest | None]) -> list[str]:
        engine, ids = self.llm_engine, []
        try:
            for prompt, p, priority, lora in zip(prompts, params, priorities, loras, strict=True):
                request_id = str(next(self._counter))
                if isinstance(p, SamplingParams) and p.output_kind is not RequestOutputKind.FINAL_ONLY:  # only final outputs are read
                    p = dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
                engine.add_request(request_id, prompt if isinstance(prompt, dict) else prompt_input(prompt), p,
                                   priority=priority, lora_request=lora)
                ids.append(request_id)
        except Exception:
            engine.abort_request(ids)  # a bad prompt leaves nothing half-queued behind
            raise
        return ids

    def _run(self, ids: list[str], use_tqdm: bool) -> list:
        engine, done = self.llm_engine, {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        start, generated = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
                    generated += sum(len(o.token_ids) for o in out.outputs) if isinstance(out, RequestOutput) else 0
                    bar.update(1)
                    bar.set_postfix_str(f"output {generated / (time.perf_counter() - start):.1f} toks/s")
        bar.close()
        return [done[i] for i in ids]
