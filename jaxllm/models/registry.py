"""Hugging Face architecture name -> :class:`ModelConfig`.

Each supported architecture has one small function that reads the HF ``config.json`` dict.
Both the legacy keys (``rope_theta`` + ``rope_scaling``) and transformers 5's
``rope_parameters`` are accepted, since checkpoints on the Hub carry either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jaxllm.config import ModelConfig, RopeScaling


def _required(hf: dict, *keys: str):
    """The first of ``keys`` present in ``hf``; several spellings exist across HF versions."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    raise ValueError(f"HF config is missing {' / '.join(keys)}")


def _eos_token_ids(hf: dict) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list | tuple) else (int(eos),)


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta") or params.get("rope_theta") or 10000.0
    rope_type = params.get("rope_type", params.get("type", "default"))
    scaling = None if rope_type == "default" else RopeScaling.from_hf(params)
    return float(theta), scaling


def _sliding_window(hf: dict, num_layers: int) -> int | None:
    """One window for all layers; a model that mixes windowed and full layers is refused."""
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        kinds = set(layer_types)
    elif "use_sliding_window" in hf:  # Qwen2/3 before layer_types: layers >= max_window_layers slide
        first = hf.get("max_window_layers", num_layers) if hf["use_sliding_window"] else num_layers
        kinds = {"full_attention" if i < first else "sliding_attention" for i in range(num_layers)}
    else:
        kinds = {"sliding_attention" if window else "full_attention"}
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"} and window:
        return int(window)
    raise ValueError(f"sliding_window={window} with layer kinds {sorted(kinds)}: only all-or-none is supported")


def _common(hf: dict) -> dict:
    return {
        "architecture": hf["architectures"][0],
        "vocab_size": int(_required(hf, "vocab_size")),
        "bos_token_id": hf.get("bos_token_id"),
        "eos_token_ids": _eos_token_ids(hf),
        "is_matryoshka": bool(hf.get("is_matryoshka", False)),
        "matryoshka_dimensions": tuple(int(d) for d in hf.get("matryoshka_dimensions") or ()),
    }


def _llama_like(hf: dict, **overrides) -> ModelConfig:
    hidden, heads = int(_required(hf, "hidden_size")), int(_required(hf, "num_attention_heads"))
    num_layers = int(_required(hf, "num_hidden_layers"))
    theta, scaling = _rope(hf)
    fields = dict(
        _common(hf),
        family="llama",
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        intermediate_size=int(_required(hf, "intermediate_size")),
        max_position_embeddings=int(_required(hf, "max_position_embeddings")),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        hidden_act=hf.get("hidden_act", "silu"),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=_sliding_window(hf, num_layers),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def _llama(hf: dict) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return _llama_like(hf, qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))


def _mistral(hf: dict) -> ModelConfig:
    return _llama_like(hf)


def _qwen2(hf: dict) -> ModelConfig:
    return _llama_like(hf, qkv_bias=True)


def _qwen3(hf: dict) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return _llama_like(hf, qkv_bias=bias, o_bias=bias, qk_norm=True)


def _phi3(hf: dict) -> ModelConfig:
    """Phi-3 (and Phi-3.5 / Phi-4 without longrope): Llama's layers with fused projections (the
    converter splits them) and one sliding window, when set, on every layer."""
    partial = float(hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial}: RoPE on part of each head is not supported "
                         f"({hf['architectures'][0]})")
    return _llama_like(hf)


def _gemma(hf: dict) -> ModelConfig:
    """Gemma (1): Llama's layers with a GeGLU MLP, RMSNorm scaled by (1 + weight) (the converter
    adds the 1), embeddings multiplied by sqrt(hidden_size), tied embeddings."""
    hidden = int(_required(hf, "hidden_size"))
    return _llama_like(hf, hidden_act=hf.get("hidden_activation") or "gelu_pytorch_tanh", embed_scale=hidden ** 0.5,
                       tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)))


def _gpt2(hf: dict) -> ModelConfig:
    hidden, heads = int(_required(hf, "n_embd", "hidden_size")), int(_required(hf, "n_head", "num_attention_heads"))
    return ModelConfig(
        **_common(hf),
        family="gpt",
        hidden_size=hidden,
        num_layers=int(_required(hf, "n_layer", "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(hf.get("n_inner") or 4 * hidden),
        max_position_embeddings=int(_required(hf, "n_positions", "max_position_embeddings")),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        hidden_act=hf.get("activation_function", "gelu_new"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
    )


def _opt(hf: dict) -> ModelConfig:
    hidden, heads = int(_required(hf, "hidden_size")), int(_required(hf, "num_attention_heads"))
    pre_norm = bool(hf.get("do_layer_norm_before", True))
    proj_dim = int(hf.get("word_embed_proj_dim") or hidden)
    bias = bool(hf.get("enable_bias", True))
    return ModelConfig(
        **_common(hf),
        family="gpt",
        hidden_size=hidden,
        num_layers=int(_required(hf, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(_required(hf, "ffn_dim")),
        max_position_embeddings=int(_required(hf, "max_position_embeddings")),
        norm_eps=1e-5,  # OPT uses nn.LayerNorm's default and has no config key for it
        hidden_act=hf.get("activation_function", "relu"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        position_offset=2,
        pre_norm=pre_norm,
        # HF OPT builds the decoder's final LayerNorm only for pre-norm models not marked otherwise.
        final_norm=pre_norm and not hf.get("_remove_final_layer_norm", False),
        word_embed_proj_dim=proj_dim if proj_dim != hidden else None,
    )


def _classifier(build: Callable[[dict], ModelConfig], tokens: bool = False) -> Callable[[dict], ModelConfig]:
    """A ``*ForSequenceClassification`` model: the decoder of ``build`` plus a ``score`` head of
    ``num_labels`` outputs on the last token (the head is the engine's, not the step's). With
    ``tokens``, a ``*ForTokenClassification`` model: the same head on every token. It has no
    LM head: the one token the engine samples for a pooling request is drawn against the
    embedding (so the config says tied), and is never returned."""

    def classifier(hf: dict) -> ModelConfig:
        id2label = hf.get("id2label")
        if id2label:
            labels = tuple(str(id2label[key]) for key in sorted(id2label, key=int))
        else:
            labels = tuple(f"LABEL_{i}" for i in range(int(hf.get("num_labels", 2))))
        return dataclasses.replace(build(hf), num_labels=len(labels), id2label=labels, tie_word_embeddings=True,
                                   classifier_activation=_classifier_activation(hf, len(labels)),
                                   classifies_tokens=tokens)

    return classifier


def _classifier_activation(hf: dict, num_labels: int) -> str:
    """transformers' ``problem_type`` decides, as in vLLM: regression is the raw logits, multi-label
    classification a sigmoid per label; otherwise one label is a sigmoid (a cross-encoder's score)
    and several a softmax."""
    problem_type = hf.get("problem_type")
    if problem_type == "regression":
        return "identity"
    if problem_type == "multi_label_classification" or (problem_type is None and num_labels == 1):
        return "sigmoid"
    return "softmax"


ARCHITECTURES: dict[str, Callable[[dict], ModelConfig]] = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _mistral,
    "Qwen2ForCausalLM": _qwen2,
    "Qwen3ForCausalLM": _qwen3,
    "GPT2LMHeadModel": _gpt2,
    "OPTForCausalLM": _opt,
    "Phi3ForCausalLM": _phi3,
    "GemmaForCausalLM": _gemma,
    "LlamaForSequenceClassification": _classifier(_llama),
    "MistralForSequenceClassification": _classifier(_mistral),
    "Qwen2ForSequenceClassification": _classifier(_qwen2),
    "Qwen3ForSequenceClassification": _classifier(_qwen3),
    "LlamaForTokenClassification": _classifier(_llama, tokens=True),
    "MistralForTokenClassification": _classifier(_mistral, tokens=True),
    "Qwen2ForTokenClassification": _classifier(_qwen2, tokens=True),
    "Qwen3ForTokenClassification": _classifier(_qwen3, tokens=True),
}


def config_from_hf(hf_config: dict) -> ModelConfig:
    """Build a :class:`ModelConfig` from a Hugging Face ``config.json`` dict.

    Args:
        hf_config: the parsed ``config.json``; ``architectures[0]`` picks the mapping.

    Returns:
        The validated model config.

    Raises:
        ValueError: the architecture is missing or unsupported, or a required key is missing.
    """
    architectures = hf_config.get("architectures") or []
    if not architectures:
        raise ValueError(f"HF config has no 'architectures'; supported: {sorted(ARCHITECTURES)}")
    build = ARCHITECTURES.get(architectures[0])
    if build is None:
        raise ValueError(f"architecture {architectures[0]!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    return build(hf_config)
