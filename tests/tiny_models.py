"""Tiny random Hugging Face checkpoints of every supported family, for tests (not a test file).

``make_tiny_checkpoint("qwen3", tmp_path)`` writes config.json + weights with transformers'
``save_pretrained`` and returns the directory. Every parameter is perturbed with seeded noise so
norm scales and biases are not their trivial ones/zeros init, and a wrong mapping shows up.

Families and what each one exercises:
  llama        Llama 2 style, GQA (4 q heads, 2 kv heads), untied
  llama3_rope  rope_scaling llama3 (factor 8, original_max_position_embeddings 32), mlp_bias
  mistral      sliding_window 16 (transformers' eager attention applies it)
  qwen2        q/k/v biases, no o bias
  qwen3        qk-norm, explicit head_dim 32 != hidden / heads, attention_bias (q/k/v and o)
  smollm2      Llama with tied embeddings, 3 q heads / 1 kv head
  phi3         fused qkv_proj (GQA: q wider than k, v) and gate_up_proj, sliding_window 16
  gemma        RMSNorm by (1 + weight), embeddings times sqrt(hidden), GeGLU, tied
  gpt2         Conv1D weights, fused c_attn, learned positions, tied
  opt          separate q/k/v, position offset 2, ReLU, tied
  opt350m      word_embed_proj_dim 32 (project_in/out), post-norm, no final norm
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("llama", "llama3_rope", "mistral", "qwen2", "qwen3", "smollm2", "phi3", "gemma", "gpt2", "opt", "opt350m")

_LLAMA_SIZES = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=96, vocab_size=160, max_position_embeddings=128, rms_norm_eps=1e-5,
    bos_token_id=1, eos_token_id=2,
)
_OPT_SIZES = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96, vocab_size=160,
    max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def _llama3_rope() -> dict:
    scaling = dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32,
    )
    return dict(_LLAMA_SIZES, rope_scaling=scaling, rope_theta=500000.0, mlp_bias=True)


def _config(name: str):
    import transformers as tf

    builders = {
        "llama": lambda: tf.LlamaConfig(**_LLAMA_SIZES),
        "llama3_rope": lambda: tf.LlamaConfig(**_llama3_rope()),
        "mistral": lambda: tf.MistralConfig(**_LLAMA_SIZES, sliding_window=16),
        "qwen2": lambda: tf.Qwen2Config(**_LLAMA_SIZES),
        "qwen3": lambda: tf.Qwen3Config(**dict(_LLAMA_SIZES, head_dim=32), attention_bias=True),
        "smollm2": lambda: tf.LlamaConfig(
            **dict(_LLAMA_SIZES, hidden_size=48, num_attention_heads=3, num_key_value_heads=1),
            tie_word_embeddings=True, rope_theta=100000.0,
        ),
        "gpt2": lambda: tf.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=160, bos_token_id=1, eos_token_id=2,
        ),
        "gemma": lambda: tf.GemmaConfig(**_LLAMA_SIZES, hidden_activation="gelu_pytorch_tanh"),
        "phi3": lambda: tf.Phi3Config(**_LLAMA_SIZES, sliding_window=16, pad_token_id=0),
        "opt": lambda: tf.OPTConfig(**_OPT_SIZES, word_embed_proj_dim=64),
        "opt350m": lambda: tf.OPTConfig(**_OPT_SIZES, word_embed_proj_dim=32, do_layer_norm_before=False),
    }
    if name not in builders:
        raise ValueError(f"unknown tiny family {name!r}; choose from {FAMILIES}")
    return builders[name]()


def _save_bin(model, path: Path, max_shard_size) -> None:
    """transformers 5 only writes safetensors, so .bin checkpoints are written by hand."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards

    for old in [*path.glob("*.safetensors"), path / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    state = model.state_dict()  # a tied model keeps lm_head.weight too, as real .bin files do
    if max_shard_size is None:
        torch.save(state, path / "pytorch_model.bin")
        return
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="pytorch_model{suffix}.bin", max_shard_size=max_shard_size
    )
    for file, names in split.filename_to_tensors.items():
        torch.save({n: state[n] for n in names}, path / file)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def make_tiny_checkpoint(
    name: str,
    path: Path,
    *,
    safe_serialization: bool = True,
    max_shard_size: int | str | None = None,
    seed: int = 0,
    dtype: str = "float32",
    num_labels: int | None = None,
    config_overrides: dict | None = None,
    token_classifier: bool = False,
) -> Path:
    """Write a tiny random checkpoint of family ``name`` to ``path`` and return ``path``.

    Args:
        name: one of :data:`FAMILIES`.
        path: target directory (created).
        safe_serialization: safetensors when True, else ``pytorch_model.bin``.
        max_shard_size: shard the weights (e.g. ``20_000`` bytes) and write an index.
        seed: torch seed for the init and the perturbation.
        dtype: torch dtype name the weights are stored in ("float32", "bfloat16", "float16").
        num_labels: write a ``*ForSequenceClassification`` model with this many labels instead.
        config_overrides: config attributes to set (``vocab_size``, ``problem_type``, ...).
        token_classifier: with ``num_labels``, a ``*ForTokenClassification`` model instead.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    torch.manual_seed(seed)
    config = _config(name)
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    if num_labels is None:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    else:
        config.num_labels = num_labels
        config.pad_token_id = 0  # transformers finds the last token of a padded batch by it
        auto = AutoModelForTokenClassification if token_classifier else AutoModelForSequenceClassification
        model = auto.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    if not safe_serialization:
        _save_bin(model, path, max_shard_size)
    return path


def make_tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a few sentences (vocab_size ids: 256 bytes, merges and
    <|eos|>), for tiny models that read text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["The capital of France is Paris.", "A paged KV cache stores keys and values in blocks.",
              "Rerankers score a query against each document.", "def add(a, b):\n    return a + b"] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")


# LoRA adapters in PEFT's file layout (adapter_config.json + adapter_model.safetensors), written by
# hand so that tests need no peft package.
LORA_MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def make_lora_adapter(
    base: Path | dict,
    path: Path,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    targets: tuple[str, ...] = tuple(LORA_MODULES),
    layers: tuple[int, ...] | None = None,
    seed: int = 0,
    std: float = 0.2,
    use_rslora: bool = False,
    extra_config: dict | None = None,
) -> Path:
    """A random LoRA adapter for the checkpoint at ``base`` (or a model of the HF config dict
    ``base``), lora_B random too, unlike PEFT's zero init, so that it changes the outputs; written
    to ``path``, which is returned."""
    import numpy as np
    from safetensors.numpy import save_file

    hf = base if isinstance(base, dict) else json.loads((Path(base) / "config.json").read_text())
    D, F = hf["hidden_size"], hf["intermediate_size"]
    H = hf.get("head_dim") or D // hf["num_attention_heads"]
    q, kv = hf["num_attention_heads"] * H, hf.get("num_key_value_heads", hf["num_attention_heads"]) * H
    dims = {"q_proj": (D, q), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (q, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(hf["num_hidden_layers"]) if layers is None else layers:
        for module in targets:
            d_in, d_out = dims[module]
            prefix = f"base_model.model.model.layers.{layer}.{LORA_MODULES[module]}.{module}"
            tensors[prefix + ".lora_A.weight"] = (std * rng.standard_normal((rank, d_in))).astype(np.float32)
            tensors[prefix + ".lora_B.weight"] = (std * rng.standard_normal((d_out, rank))).astype(np.float32)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = dict(peft_type="LORA", r=rank, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora,
                  bias="none", lora_dropout=0.0, fan_in_fan_out=False, base_model_name_or_path=str(base)[:200],
                  task_type="CAUSAL_LM")
    config.update(extra_config or {})
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def merge_lora(model, adapter: Path):
    """Add an adapter written by :func:`make_lora_adapter` into a transformers model's weights, in
    place: W += scale * B @ A, scale = alpha / r (alpha / sqrt(r) with rsLoRA), as PEFT's merge."""
    import math

    import torch
    from safetensors.numpy import load_file

    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    tensors = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, a in tensors.items():
            if ".lora_A." not in name:
                continue
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            module = modules[name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")]
            module.weight += scale * torch.from_numpy(b @ a).to(module.weight.dtype)
    return model
