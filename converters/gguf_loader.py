"""Load a GGUF file: config from its metadata, dequantised weights, and its tokenizer.

The metadata is turned into a Hugging Face style config dict and the tensors are renamed to HF
names, so GGUF goes through the same registry and name map as safetensors. llama.cpp's converter
permutes the rows of Q and K (for the llama architecture) so that rotary pairs are interleaved;
:func:`unpermute_rows` undoes it so the params match the Hugging Face layout exactly.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from converters.checkpoint import Checkpoint
from converters.convert import convert
from converters.gguf_file import GGUFFile
from converters.gguf_tokenizer import load_gguf_tokenizer
from jaxllm.models.registry import config_from_hf

# general.architecture -> HF architecture; only these llama-family layouts are mapped.
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# GGUF metadata key (after "<arch>.") -> HF config key.
_CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}

_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_config_from_gguf(reader: GGUFFile) -> dict:
    """A Hugging Face ``config.json``-style dict from GGUF metadata."""
    arch = reader.field("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {sorted(_ARCHITECTURES)}")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError("GGUF tensor 'rope_freqs.weight' (llama3 rope scaling) is not supported yet")
    hf = {"architectures": [_ARCHITECTURES[arch]]}
    for gguf_key, hf_key in _CONFIG_KEYS.items():
        value = reader.field(f"{arch}.{gguf_key}")
        if value is not None:
            hf[hf_key] = value
    hf.setdefault("vocab_size", len(reader.fields["tokenizer.ggml.tokens"]))
    hf["bos_token_id"] = reader.field("tokenizer.ggml.bos_token_id")
    hf["eos_token_id"] = reader.field("tokenizer.ggml.eos_token_id")
    # llama.cpp drops output.weight when it is the embedding.
    hf["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    hf["attention_bias"] = any(t.name.endswith("attn_q.bias") for t in reader.tensors)
    return hf


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation.

    Per head, HF keeps the rotary halves as rows ``[x_0..x_{H/2-1} | y_0..y_{H/2-1}]``; llama.cpp
    interleaves them as ``[x_0, y_0, x_1, y_1, ...]``. Rows of ``w`` ([N*H, ...] or [N*H]) go
    back from (head, pair, 2) to (head, 2, pair) order.
    """
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> HF name; None for tensors the HF model has no place for."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


class GGUFSource:
    """GGUF tensors under HF names, dequantised to float32 one at a time."""

    def __init__(self, reader: GGUFFile, hf_config: dict):
        self._arch = reader.field("general.architecture")
        self._tensors = {hf_tensor_name(t.name): t for t in reader.tensors if hf_tensor_name(t.name)}
        heads = hf_config["num_attention_heads"]
        self._heads = {"q_proj": heads, "k_proj": hf_config.get("num_key_value_heads", heads)}

    def names(self) -> frozenset[str]:
        return frozenset(self._tensors)

    def get(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        tensor = self._tensors[name]
        w = dequantize(tensor.data, tensor.tensor_type)
        proj = name.split(".")[-2]
        if self._arch == "llama" and proj in self._heads:
            w = unpermute_rows(w, self._heads[proj])
        return w

    def source_dtype(self) -> str:
        matrices = [t.tensor_type.name for t in self._tensors.values() if len(t.shape) > 1]
        return Counter(matrices).most_common(1)[0][0]


def load_gguf(path: Path, dtype=np.float32) -> Checkpoint:
    """Convert a GGUF file alone to the layout's params (dequantised, cast to ``dtype``)."""
    reader = GGUFFile(path)
    hf = hf_config_from_gguf(reader)
    config = config_from_hf(hf)
    source = GGUFSource(reader, hf)
    params = convert(config, source, dtype)
    return Checkpoint(config, params, load_gguf_tokenizer(reader, path), source.source_dtype())
