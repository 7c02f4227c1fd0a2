"""Every engine argument in one place, and the factory that builds an LLMEngine from them.

``LLM(**kwargs)`` and ``jaxllm serve`` flags map one to one onto :class:`EngineArgs` fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from converters.checkpoint import Checkpoint
from jaxllm.config import SCHEDULING_POLICIES, CacheConfig, LoRAConfig, PoolerConfig, SchedulerConfig, SpeculativeConfig
from jaxllm.engine.classifier import ClassifierHead
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.loader import load_checkpoint_as
from jaxllm.logits_processor import load_logits_processors
from jaxllm.logits_processor import resolve as resolve_logits_processor
from jaxllm.models.attention import get_attention_backend
from jaxllm.models.kv_quant import kv_storage_dtype
from jaxllm.runner import kv_pool, parallel
from jaxllm.runner.draft import DraftModelRunner
from jaxllm.runner.logprobs import LOGPROBS_MODES, MAX_LOGPROBS
from jaxllm.runner.model_runner import ModelRunner

logger = logging.getLogger("jaxllm")

RUNNERS = ("auto", "generate", "pooling")

# Defaults of the step limits when not given: GPUs take big batches, a CPU small ones.
_PLATFORM_LIMITS = {"gpu": (256, 8192), "cpu": (64, 512)}  # (max_num_seqs, max_num_batched_tokens)


@dataclass(frozen=True)
class EngineArgs:
    """Arguments of ``LLM`` / ``jaxllm serve``, with vLLM's names and defaults."""

    model: str | None = None  # None or "SmolLM2-135M-Instruct": the embedded default model
    tokenizer: str | None = None  # a directory or cached repo id whose tokenizer replaces the model's
    # Accepted for vLLM scripts: only built-in architectures load, so no checkpoint code ever runs.
    trust_remote_code: bool = False
    # Accepted for vLLM scripts: LLM.sleep / wake_up work on any engine here (JAX frees device
    # buffers itself; vLLM needs its own allocator for them).
    enable_sleep_mode: bool = False
    # Devices the model is split over (Megatron-style, by heads and FFN width: jaxllm/runner/parallel.py).
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    dtype: str = "auto"
    block_size: int = 16
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    kv_cache_dtype: str = "auto"  # "fp8" or "int8": quantised pool, see jaxllm/models/kv_quant.py
    swap_space: float = 4.0  # GiB of host memory for preemption_mode="swap"
    preemption_mode: str = "recompute"  # or "swap": preempted requests' KV goes to host memory
    scheduling_policy: str = "fcfs"  # or "priority": requests' priority values order the queue
    seed: int = 0
    # Schedule step k+1 on the host while the device runs step k (outputs are the same).
    async_scheduling: bool = True
    download_dir: str | None = None  # where converted weights are cached with orbax
    warmup: bool = True  # compile every bucket at start-up
    # vLLM's speculative decoding, e.g. {"method": "ngram", "num_speculative_tokens": 4,
    # "prompt_lookup_max": 4} or {"model": "<draft checkpoint>", "num_speculative_tokens": 4}:
    # see jaxllm.config.SpeculativeConfig. On the command line, JSON.
    speculative_config: dict | None = None
    # vLLM's runner: "auto", "generate" or "pooling". A causal LM's engine serves both generation
    # and pooling (LLM.embed, /v1/embeddings), so there the value only documents the intent; a
    # sequence classifier serves pooling only, and refuses "generate".
    runner: str = "auto"
    # How pooling requests pool: {"pooling_type": "LAST" | "MEAN" | "CLS", "normalize": bool};
    # None: LAST, normalised (vLLM's default for a causal LM used for embeddings).
    pooler_config: dict | None = None
    # JAX's persistent compilation cache: a second start loads compiled programs from disk.
    compilation_cache_dir: str | None = "~/.cache/jaxllm/xla"
    # Default sampling parameters: "auto" takes the model's generation_config.json (as vLLM),
    # "vllm" leaves SamplingParams' own, a directory reads its generation_config.json.
    generation_config: str = "auto"
    # vLLM's LoRA arguments: requests may name an adapter (LoRARequest); up to max_loras run in one
    # step, each of rank <= max_lora_rank; max_cpu_loras stay loaded in host memory (None: max_loras).
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # vLLM's custom logits processors: jaxllm.LogitsProcessor subclasses, or their names as
    # "package.module:Class" (see jaxllm.logits_processor); compiled into every step.
    logits_processors: list | None = None
    # vLLM's: prompts may be input embeddings ({"prompt_embeds": [num_tokens, hidden_size]}); each
    # bucket is then compiled twice (with and without embedding inputs).
    enable_prompt_embeds: bool = False
    # vLLM's: what logprobs are: "raw_logprobs" (the model's distribution), "processed_logprobs"
    # (what the token was chosen from: after penalties, processors, temperature, top-k/p, min-p),
    # or the logits of either ("raw_logits", "processed_logits").
    logprobs_mode: str = "raw_logprobs"
    # -- vLLM's loading and compatibility arguments, so its scripts run unchanged --
    # vLLM: no CUDA graphs. Here, the nearest thing: no warm-up; each bucket is compiled when a
    # step first needs it (a faster start, slower first steps).
    enforce_eager: bool = False
    # None / True: long prompts are split to fit the token budget (always, as vLLM V1). False: a
    # prompt is only scheduled whole (max_num_batched_tokens defaults to max_model_len then).
    enable_chunked_prefill: bool | None = None
    max_logprobs: int = 20  # the most logprobs / prompt_logprobs a request may ask for (at most 20 here)
    quantization: str | None = None  # None only: weights load as float32 / bfloat16 / float16
    skip_tokenizer_init: bool = False  # no tokenizer: prompts are token ids, outputs carry no text
    hf_overrides: dict | None = None  # config.json fields replaced before the model is built
    load_format: str = "auto"  # "auto", "safetensors", "pt", "gguf", or "dummy" (random weights)
    revision: str | None = None  # a cached Hub repo's branch, tag or commit
    tokenizer_revision: str | None = None  # the same, for ``tokenizer``
    tokenizer_mode: str = "auto"  # "auto" (or vLLM's "hf"): the checkpoint's Hugging Face tokenizer
    # vLLM's: no periodic stats line (throughput, requests, KV use) while there is work. LLM sets it
    # True unless given, as vLLM's LLM does; the server logs every JAXLLM_LOG_STATS_INTERVAL (or
    # VLLM_LOG_STATS_INTERVAL) seconds, 10 by default.
    disable_log_stats: bool = False

    def sampling_defaults(self) -> dict:
        """SamplingParams fields that requests without their own take from the generation config."""
        from converters import model_generation_defaults
        from converters.hf import generation_defaults

        if self.generation_config == "vllm":
            return {}
        if self.generation_config == "auto":
            defaults = model_generation_defaults(self.model, self.revision)
        else:
            directory = Path(self.generation_config).expanduser()
            if not directory.is_dir():
                raise ValueError(f"generation_config={self.generation_config!r} must be 'auto', 'vllm' or a directory")
            defaults = generation_defaults(directory)
        if defaults:
            logger.warning("default sampling parameters %s come from the model's generation config; "
                           "generation_config='vllm' leaves SamplingParams' own", defaults)
        return defaults

    def scheduler_config(self, max_position_embeddings: int) -> SchedulerConfig:
        platform = "gpu" if jax.devices()[0].platform == "gpu" else "cpu"
        seqs, tokens = _PLATFORM_LIMITS[platform]
        max_model_len = self.max_model_len or max_position_embeddings
        if max_model_len > max_position_embeddings:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's {max_position_embeddings} positions")
        max_num_seqs = self.max_num_seqs or seqs
        chunked = self.enable_chunked_prefill is not False
        default_tokens = max(tokens, max_num_seqs) if chunked else max(max_model_len, max_num_seqs)
        return SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens or default_tokens,
            max_model_len=max_model_len,
            scheduling_policy=self.scheduling_policy,
            chunked_prefill=chunked,
        )

    def cache_config(self) -> CacheConfig:
        return CacheConfig(
            block_size=self.block_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            num_kv_blocks=self.num_kv_blocks,
            enable_prefix_caching=self.enable_prefix_caching,
            kv_cache_dtype=self.kv_cache_dtype,
            swap_space=self.swap_space,
            preemption_mode=self.preemption_mode,
        )

    def speculative(self) -> SpeculativeConfig | None:
        return SpeculativeConfig.from_dict(self.speculative_config)

    def pooler(self) -> PoolerConfig:
        return PoolerConfig.from_dict(self.pooler_config)

    def lora(self) -> LoRAConfig | None:
        if not self.enable_lora:
            return None
        return LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras)

    def __post_init__(self):
        self.speculative()  # a bad speculative_config fails before the model loads
        self.pooler()
        self.lora()
        if self.logits_processors is not None:  # names that do not import fail before the model loads
            if isinstance(self.logits_processors, (str, type)):
                raise ValueError("logits_processors must be a list of classes or class names")
            for spec in self.logits_processors:
                resolve_logits_processor(spec)
        if self.quantization is not None:
            raise ValueError(f"quantization={self.quantization!r} is not supported: weights load as float "
                             "(float32 / bfloat16 / float16); leave it None")
        if not isinstance(self.max_logprobs, int) or not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"max_logprobs={self.max_logprobs!r} must be an integer in [0, {MAX_LOGPROBS}] "
                             "(the engine returns at most 20 top logprobs per token)")
        if self.tokenizer_mode not in ("auto", "hf"):
            raise ValueError(f"tokenizer_mode={self.tokenizer_mode!r} is not supported: 'auto' (or 'hf') reads the "
                             "checkpoint's Hugging Face tokenizer; slow, mistral and custom tokenizers are not read")
        if self.skip_tokenizer_init and self.tokenizer is not None:
            raise ValueError("skip_tokenizer_init=True and tokenizer= disagree: give one")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode={self.logprobs_mode!r} must be one of {LOGPROBS_MODES}")
        if self.runner not in RUNNERS:
            raise ValueError(f"runner={self.runner!r} must be one of {RUNNERS}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:  # before the model loads
            raise ValueError(f"scheduling_policy={self.scheduling_policy!r} must be one of {SCHEDULING_POLICIES}")
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"tensor_parallel_size={tp!r} must be a positive integer")
        if self.pipeline_parallel_size != 1:
            raise ValueError(f"pipeline_parallel_size={self.pipeline_parallel_size!r}: pipeline parallelism is not "
                             "supported; split a model over devices with tensor_parallel_size")
        speculative = self.speculative()
        if speculative is not None and speculative.draft_tensor_parallel_size not in (None, tp):
            raise ValueError(f"speculative_config draft_tensor_parallel_size={speculative.draft_tensor_parallel_size!r}"
                             f" must equal tensor_parallel_size={tp} (or be left unset): the draft model runs split "
                             "over the target's devices")

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add one ``--kebab-case`` flag per field, with the field's default (vLLM's name); returns
        ``parser``. Booleans get ``--flag`` / ``--no-flag``."""
        group = parser.add_argument_group("engine")
        hints = typing.get_type_hints(EngineArgs)
        for field in dataclasses.fields(EngineArgs):
            flag = "--" + field.name.replace("_", "-")
            kind, nullable = _flag_type(hints[field.name])
            help_default = f"default: {field.default}"
            if kind is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default,
                                   help=help_default)
            elif kind is dict:
                group.add_argument(flag, type=_json_object, default=field.default, help=help_default + " (JSON)")
            elif kind is list:  # names, e.g. --logits-processors pkg.mod:Class other.mod:Class
                group.add_argument(flag, nargs="+", default=field.default, help=help_default)
            else:
                null_note = " (none: engine decides)" if nullable else ""
                group.add_argument(flag, type=kind, default=field.default, help=help_default + null_note)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        """The EngineArgs of a namespace parsed with :meth:`add_cli_args` (other attributes are
        ignored, so the parser may hold flags of its own)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})

    @classmethod
    def from_kwargs(cls, model: str | None, kwargs: dict[str, Any]) -> EngineArgs:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine argument(s) {unknown}; known: {sorted(known)}")
        return cls(model=model, **kwargs)


def _flag_type(annotation) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) of a field annotation such as ``int | None``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        scalars = [a for a in args if a is not type(None)]
        if len(scalars) != 1:
            raise TypeError(f"cannot derive a flag from {annotation}")
        return scalars[0], True
    return annotation, False


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


LOG_STATS_INTERVAL = ("JAXLLM_LOG_STATS_INTERVAL", "VLLM_LOG_STATS_INTERVAL")


def log_stats_interval() -> float:
    """Seconds between stats lines: the environment's (jaxllm's variable first, then vLLM's), else 10."""
    for name in LOG_STATS_INTERVAL:
        value = os.environ.get(name)
        if value:
            try:
                seconds = float(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} must be a number of seconds") from None
            if seconds < 0:
                raise ValueError(f"{name}={value!r} must be >= 0")
            return seconds
    return 10.0


def _load_tokenizer(name_or_path: str, revision: str | None = None):
    """The tokenizer of a local directory or cached Hub repo (``tokenizer=``)."""
    from converters import resolve_model
    from converters.hf import load_tokenizer

    path = resolve_model(name_or_path, revision=revision)
    tokenizer = load_tokenizer(path) if path.is_dir() else None
    if tokenizer is None:
        raise ValueError(f"tokenizer={name_or_path!r}: {path} holds no Hugging Face tokenizer files")
    return tokenizer


def _enable_compilation_cache(path: str | None) -> None:
    if path is None or jax.config.jax_compilation_cache_dir:
        return  # off, or already chosen by the user
    jax.config.update("jax_compilation_cache_dir", str(Path(path).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _load_draft(name: str, args: EngineArgs, target: Checkpoint, cache: CacheConfig, sched: SchedulerConfig,
                classifier) -> Checkpoint:
    """speculative_config's draft model, checked against the target it proposes for."""
    if classifier is not None:
        raise ValueError(f"speculative_config: a {classifier.kind} classifier generates nothing to speculate on")
    if cache.preemption_mode == "swap":
        raise ValueError("speculative_config method='draft_model' works with preemption_mode='recompute' only "
                         "(swapping does not move the draft model's pool)")
    draft = load_checkpoint_as(name, args.dtype, args.download_dir, load_format=args.load_format)
    cfg = draft.config
    if cfg.is_classifier:
        raise ValueError(f"speculative_config model={name!r} is a classifier ({cfg.architecture}), not a "
                         "generative model")
    if cfg.vocab_size != target.config.vocab_size:
        raise ValueError(f"speculative_config model={name!r} has a vocabulary of {cfg.vocab_size} tokens, the "
                         f"target {target.config.vocab_size}: a draft model must share the target's vocabulary")
    return draft


def _pool_bytes(draft: Checkpoint, cache: CacheConfig, tp: int) -> tuple[int, int]:
    """(weight bytes, KV bytes per block) one device holds of a draft model split over ``tp``
    devices, for sizing the shared block pool."""
    dtype = np.dtype(draft.params["embed"].dtype)
    kv_dtype = kv_storage_dtype(cache.kv_cache_dtype, dtype, jax.devices()[0].platform)
    weights = parallel.bytes_per_device(draft.params, tp)
    return weights, kv_pool.bytes_per_block(draft.config, cache.block_size, kv_dtype) // tp


def create_engine(args: EngineArgs, checkpoint: Checkpoint | None = None,
                  engine_cls: type[LLMEngine] = LLMEngine) -> LLMEngine:
    """Load the model (unless ``checkpoint`` is given), size the KV pool, compile, return an engine
    (an ``engine_cls``)."""
    attend = get_attention_backend(args.attention_backend)  # fail fast on a bad name
    mesh = parallel.make_mesh(args.tensor_parallel_size)  # fails before loading when devices are missing
    cache = args.cache_config()
    _enable_compilation_cache(args.compilation_cache_dir)
    ckpt = checkpoint or load_checkpoint_as(args.model, args.dtype, args.download_dir, load_format=args.load_format,
                                            hf_overrides=args.hf_overrides, revision=args.revision)
    if args.tokenizer is not None:
        ckpt = dataclasses.replace(ckpt, tokenizer=_load_tokenizer(args.tokenizer, args.tokenizer_revision))
    if args.skip_tokenizer_init:
        ckpt = dataclasses.replace(ckpt, tokenizer=None)
    sched = args.scheduler_config(ckpt.config.max_position_embeddings)
    speculative, lora = args.speculative(), args.lora()
    classifier, params = ClassifierHead.split_from(ckpt.config, ckpt.params)
    if classifier is not None and args.runner == "generate":
        raise ValueError(f"runner='generate': {ckpt.config.architecture} is a {classifier.kind} classifier, which "
                         f"serves pooling requests ({', '.join(classifier.tasks)}) only")
    num_speculative_tokens = 0 if speculative is None else speculative.num_speculative_tokens
    draft = None
    if speculative is not None and speculative.method == "draft_model":
        draft = _load_draft(speculative.model, args, ckpt, cache, sched, classifier)
    parallel.check_model(ckpt.config, mesh)
    if draft is not None:
        parallel.check_model(draft.config, mesh, "the draft model")
    processors = load_logits_processors(args.logits_processors, ckpt.config)
    if args.enable_prompt_embeds and draft is not None:
        raise ValueError("enable_prompt_embeds: the draft model of speculative_config cannot read the target's "
                         "prompt embeddings")
    if processors and classifier is not None:
        raise ValueError(f"logits_processors: {ckpt.config.architecture} is a classifier; it samples no tokens")
    runner = ModelRunner(ckpt.config, params, cache, sched, attend, seed=args.seed,
                         num_speculative_tokens=num_speculative_tokens, lora_config=lora,
                         shared_pool_bytes=(0, 0) if draft is None else _pool_bytes(draft, cache, args.tensor_parallel_size),
                         logits_processors=processors, enable_prompt_embeds=args.enable_prompt_embeds,
                         logprobs_mode=args.logprobs_mode, mesh=mesh)
    if draft is not None:  # the same block ids, the same buckets
        # As vLLM: no proposals past the draft's positions (it still runs every step in lockstep:
        # what it computes there only ever feeds proposals, which the target verifies).
        draft_len = min(draft.config.max_position_embeddings, speculative.max_model_len or sched.max_model_len)
        speculative = dataclasses.replace(speculative, max_model_len=draft_len)
        draft_runner = ModelRunner(draft.config, draft.params, dataclasses.replace(cache, num_kv_blocks=runner.num_blocks),
                                   sched, attend, seed=args.seed, num_speculative_tokens=num_speculative_tokens,
                                   mesh=mesh)
        runner = DraftModelRunner(runner, draft_runner)
    if args.warmup and not args.enforce_eager:
        runner.warmup()
    eos = set(ckpt.config.eos_token_ids)
    if ckpt.tokenizer is not None and ckpt.tokenizer.eos_token_id is not None:
        eos.add(ckpt.tokenizer.eos_token_id)
    return engine_cls(ckpt.tokenizer, runner, sched, cache, runner.num_blocks, tuple(sorted(eos)),
                     num_swap_blocks=runner.num_swap_blocks, async_scheduling=args.async_scheduling,
                     vocab_size=ckpt.config.vocab_size, speculative_config=speculative,
                     pooler_config=args.pooler(), lora_config=lora, classifier=classifier,
                     logits_processors=processors,
                     prompt_embeds_dim=runner.embeds_dim if args.enable_prompt_embeds else None,
                     logprobs_mode=args.logprobs_mode, max_logprobs=args.max_logprobs,
                     log_stats_interval=None if args.disable_log_stats else log_stats_interval())
