"""Frozen, validated configuration dataclasses.

Every config validates itself in ``__post_init__`` and raises ``ValueError`` naming the field.
The model config is hashable so it can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ROPE_TYPES = ("default", "linear", "llama3")
FAMILIES = ("llama", "gpt")
PREEMPTION_MODES = ("recompute", "swap")
SCHEDULING_POLICIES = ("fcfs", "priority")
# "auto": the model's dtype; "fp8" (e4m3) and "int8": quantised, with a scale per token and kv head.
KV_CACHE_DTYPES = ("auto", "fp8", "int8")
ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
SPECULATIVE_METHODS = ("ngram", "draft_model")
POOLING_TYPES = ("LAST", "MEAN", "CLS")
# What a classifier's head logits become (transformers' problem_type, as vLLM reads it).
CLASSIFIER_ACTIVATIONS = ("softmax", "sigmoid", "identity")


def _check_positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as in Hugging Face's ``rope_scaling`` dict."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {self.rope_type!r} is not supported; supported: {ROPE_TYPES}")
        if self.factor <= 0:
            raise ValueError(f"rope_scaling factor={self.factor} must be > 0")

    @classmethod
    def from_hf(cls, d: dict | None) -> RopeScaling | None:
        if not d:
            return None
        rope_type = d.get("rope_type", d.get("type", "default"))
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope_type"}
        return cls(rope_type=rope_type, **{k: v for k, v in d.items() if k in fields})


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder-only transformer.

    ``family`` picks the model module: "llama" (RMSNorm, RoPE, GQA, SwiGLU: Llama 2/3, Mistral,
    Qwen2, Qwen3, SmolLM2) or "gpt" (LayerNorm, learned positions, GELU/ReLU MLP: GPT-2, OPT).
    """

    family: str
    architecture: str  # Hugging Face architecture name, e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # "gpt" family only.
    position_offset: int = 0  # OPT's learned position table starts at index 2
    pre_norm: bool = True  # OPT-350m normalises after attention/MLP
    final_norm: bool = True
    word_embed_proj_dim: int | None = None  # OPT-350m projects embeddings in and out
    # "llama" family: Gemma multiplies the token embeddings by sqrt(hidden_size) (in the model's dtype).
    embed_scale: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # A classifier (``*ForSequenceClassification``, or ``*ForTokenClassification`` when
    # ``classifies_tokens``): its ``score`` head's labels and the activation that turns the head's
    # logits into the probabilities ``classify`` / ``token_classify`` return. 0 labels: a causal LM.
    num_labels: int = 0
    id2label: tuple[str, ...] = ()
    classifier_activation: str = "softmax"
    classifies_tokens: bool = False
    # An embedding model trained with Matryoshka representation learning (config.json's
    # ``is_matryoshka`` or ``matryoshka_dimensions``, as vLLM reads them): embed requests may ask
    # for fewer ``dimensions``, any or only those listed.
    is_matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] = ()

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} must be one of {FAMILIES}")
        if not isinstance(self.num_labels, int) or self.num_labels < 0:
            raise ValueError(f"num_labels={self.num_labels!r} must be a non-negative integer")
        if self.id2label and len(self.id2label) != self.num_labels:
            raise ValueError(f"id2label has {len(self.id2label)} labels for num_labels={self.num_labels}")
        if self.classifies_tokens and not self.num_labels:
            raise ValueError("classifies_tokens=True needs num_labels > 0 (a token classifier's head)")
        if self.classifier_activation not in CLASSIFIER_ACTIVATIONS:
            raise ValueError(f"classifier_activation={self.classifier_activation!r} must be one of "
                             f"{CLASSIFIER_ACTIVATIONS}")
        _check_positive(
            self, "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "intermediate_size", "max_position_embeddings",
        )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; supported: {ACTIVATIONS}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window={self.sliding_window} must be positive or None")

    @property
    def is_classifier(self) -> bool:
        return self.num_labels > 0

    def check_dimensions(self, dimensions: int) -> None:
        """ValueError unless an embedding of this model may be cut to ``dimensions`` (vLLM's
        Matryoshka rule: only a model trained for it, and to the sizes it lists when it lists some)."""
        if not (self.is_matryoshka or self.matryoshka_dimensions):
            raise ValueError(f"dimensions={dimensions}: {self.architecture} does not support matryoshka "
                             "representation; changing output dimensions would give poor results (a model trained "
                             "for it may say so with hf_overrides={'is_matryoshka': True})")
        if self.matryoshka_dimensions and dimensions not in self.matryoshka_dimensions:
            raise ValueError(f"dimensions={dimensions}: {self.architecture} supports only "
                             f"{list(self.matryoshka_dimensions)} matryoshka dimensions")
        width = self.word_embed_proj_dim or self.hidden_size
        if dimensions > width:
            raise ValueError(f"dimensions={dimensions} is more than the model's embedding size {width}")

    @property
    def dtype_bytes_per_token_kv(self) -> int:
        """Elements (not bytes) of K and V one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV pool."""

    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # or "fp8" / "int8": about half the bytes of bf16, scales included
    swap_space: float = 4.0  # GiB of host memory for swapped-out blocks (preemption_mode="swap")
    # What preemption does to a request's KV: "recompute" frees it (recomputed on resume),
    # "swap" saves it to host memory and copies it back (recompute when swap space is full).
    preemption_mode: str = "recompute"

    def __post_init__(self):
        _check_positive(self, "block_size")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size} must be a power of two")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.kv_cache_memory_bytes is not None:
            _check_positive(self, "kv_cache_memory_bytes")
        if self.num_kv_blocks is not None:
            if not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 2:
                raise ValueError(f"num_kv_blocks={self.num_kv_blocks!r} must be an integer >= 2")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} must be one of {KV_CACHE_DTYPES}")
        if self.swap_space < 0:
            raise ValueError(f"swap_space={self.swap_space} must be >= 0")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode={self.preemption_mode!r} must be one of {PREEMPTION_MODES}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine step."""

    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    scheduling_policy: str = "fcfs"  # or "priority": by each request's priority, lower first
    # vLLM's enable_chunked_prefill: False schedules a prompt only whole, in one step.
    chunked_prefill: bool = True

    def __post_init__(self):
        _check_positive(self, "max_num_seqs", "max_num_batched_tokens", "max_model_len")
        if not self.chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= max_model_len="
                             f"{self.max_model_len} without chunked prefill (a whole prompt goes in one step)")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy={self.scheduling_policy!r} must be one of {SCHEDULING_POLICIES}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                f"max_num_seqs={self.max_num_seqs} so every running request can decode each step"
            )


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's ``speculative_config``: propose up to ``num_speculative_tokens`` tokens after each
    request's last one and verify them all in the next step.

    ``method="ngram"`` (prompt lookup, jaxllm/engine/ngram_proposer.py): the proposal is what
    followed the latest earlier occurrence of the sequence's last n tokens, the longest n in
    ``prompt_lookup_min .. prompt_lookup_max`` that occurs; as in vLLM both default to 5, or to
    each other when only one is given.

    ``method="draft_model"`` (implied by ``model``, as in vLLM): a smaller model of the same
    vocabulary, loaded like the target (``model`` is a checkpoint directory, a .gguf file or a
    cached repo id), proposes greedily, one token at a time (jaxllm/runner/draft.py).

    ``disable_by_batch_size`` (vLLM's): no proposals while this many requests or more are running.
    Verifying k proposals makes a sequence's step k + 1 tokens; where the device is already busy
    with a large batch (compute-bound, as a CPU is from a few sequences on), that costs more than
    the accepted tokens save (``benchmarks/speculative.py``).
    """

    num_speculative_tokens: int
    method: str = "ngram"
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    disable_by_batch_size: int | None = None
    model: str | None = None
    # Draft models: no proposals past this many positions (default: the draft's own maximum).
    max_model_len: int | None = None
    # None: the target's tensor_parallel_size (the draft runs split over the same devices).
    draft_tensor_parallel_size: int | None = None

    def __post_init__(self):
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config method={self.method!r} is not supported; supported: "
                             f"{SPECULATIVE_METHODS} (EAGLE and MTP are not built)")
        _check_positive(self, "num_speculative_tokens")
        optional = ("prompt_lookup_min", "prompt_lookup_max", "disable_by_batch_size", "max_model_len")
        _check_positive(self, *(n for n in optional if getattr(self, n) is not None))
        dtp = self.draft_tensor_parallel_size
        if dtp is not None and (not isinstance(dtp, int) or isinstance(dtp, bool) or dtp < 1):
            raise ValueError(f"speculative_config draft_tensor_parallel_size={dtp!r} must be a positive integer")
        if self.method == "draft_model":
            if not isinstance(self.model, str) or not self.model:
                raise ValueError(f"speculative_config method='draft_model' needs model (the draft checkpoint), "
                                 f"got {self.model!r}")
            lookup = [n for n in ("prompt_lookup_min", "prompt_lookup_max") if getattr(self, n) is not None]
            if lookup:
                raise ValueError(f"speculative_config {lookup[0]} is for method='ngram', not 'draft_model'")
            return
        for name in ("model", "max_model_len"):
            if getattr(self, name) is not None:
                raise ValueError(f"speculative_config {name}={getattr(self, name)!r} is for method='draft_model'; "
                                 "method='ngram' needs no model")
        if self.prompt_lookup_max is None and self.prompt_lookup_min is None:
            object.__setattr__(self, "prompt_lookup_max", 5)
            object.__setattr__(self, "prompt_lookup_min", 5)
        elif self.prompt_lookup_min is None:
            object.__setattr__(self, "prompt_lookup_min", self.prompt_lookup_max)
        elif self.prompt_lookup_max is None:
            object.__setattr__(self, "prompt_lookup_max", self.prompt_lookup_min)
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min={self.prompt_lookup_min} must be <= "
                             f"prompt_lookup_max={self.prompt_lookup_max}")

    @classmethod
    def from_dict(cls, value: dict | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """The config of vLLM's dict form (``LLM(speculative_config={...})``, ``--speculative-config``)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        fields = _given_fields(cls, "speculative_config", value)
        if "num_speculative_tokens" not in fields:
            raise ValueError("speculative_config num_speculative_tokens is required (a positive integer)")
        if fields.get("model") is not None and "method" not in fields:
            fields["method"] = "draft_model"  # as vLLM: a model and no method is a draft model
        return cls(**fields)


@dataclass(frozen=True)
class PoolerConfig:
    """vLLM's ``pooler_config``: how ``LLM.embed`` / ``/v1/embeddings`` turn a prompt's final hidden
    states (after the model's last norm) into one vector. As vLLM's default for a causal LM used
    for embeddings: the last token's, L2-normalised. MEAN averages every prompt token's; CLS takes
    the first token's."""

    pooling_type: str = "LAST"
    normalize: bool = True

    def __post_init__(self):
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooler_config pooling_type={self.pooling_type!r} must be one of {POOLING_TYPES}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"pooler_config normalize={self.normalize!r} must be a bool")

    @classmethod
    def from_dict(cls, value: dict | PoolerConfig | None) -> PoolerConfig:
        if value is None:
            return cls()
        if isinstance(value, PoolerConfig):
            return value
        fields = _given_fields(cls, "pooler_config", value)
        if isinstance(fields.get("pooling_type"), str):
            fields["pooling_type"] = fields["pooling_type"].upper()
        return cls(**fields)


@dataclass(frozen=True)
class LoRAConfig:
    """vLLM's LoRA engine arguments (``enable_lora=True``): how many adapters one step can serve
    (``max_loras``, each a slot of the device's adapter stacks), the largest rank a slot holds
    (``max_lora_rank``; smaller adapters are zero-padded), and how many loaded adapters are kept
    in host memory (``max_cpu_loras``, default ``max_loras``; others are read again from disk)."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    def __post_init__(self):
        _check_positive(self, "max_loras", "max_lora_rank")
        if self.max_cpu_loras is None:
            object.__setattr__(self, "max_cpu_loras", self.max_loras)
        _check_positive(self, "max_cpu_loras")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras={self.max_cpu_loras} must be >= max_loras={self.max_loras}")


def _given_fields(cls, name: str, value, also_known: tuple[str, ...] = ()) -> dict:
    """The non-None entries of a config given as a dict (vLLM's form); unknown keys are refused."""
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict, got {type(value).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known - set(also_known))
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}; known: {sorted(known)}")
    return {k: v for k, v in value.items() if v is not None}
