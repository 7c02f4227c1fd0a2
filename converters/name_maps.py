"""One declarative map per model family: Hugging Face tensor name -> layout parameter.

A rule names the HF tensor (``{i}`` marks a per-layer tensor), the layout parameter it becomes
(see :func:`jaxllm.models.layout.param_shapes`), the HF tensor's expected shape in axis letters,
and how to bring it into the layout:

- ``transpose``: torch ``nn.Linear`` stores ``[out, in]``; the layout is input-major ``[in, out]``.
  GPT-2's ``Conv1D`` already stores ``[in, out]``, so its rules do not transpose.
- ``split``: ``(part, parts)`` of the last HF axis, for GPT-2's fused ``c_attn`` (q | k | v).
- ``rows``: ``(before, size)``: the rows ``[sum(before), sum(before) + size)`` of the HF axis 0,
  in axis letters, for Phi-3's fused ``qkv_proj`` (q | k | v, kv narrower under GQA) and
  ``gate_up_proj`` (gate | up).
- then a reshape to the layout shape splits heads out: ``[D, N*H] -> [D, N, H]``.

Axis letters (as in ``layout.py``): D model, N q heads, K kv heads, H head dim, F ffn, V vocab,
E OPT's word_embed_proj_dim (D when absent), P learned positions (incl. OPT's offset of 2),
L a classifier's labels.
A shape entry is a product of letters with an optional integer factor: ``"NH"``, ``"3D"``, or a
sum of such products: ``"NH+2KH"``.

Only rules whose parameter exists in ``param_shapes(config)`` are applied, so the layout decides
which tensors a checkpoint must contain (biases, qk-norm, an untied lm_head, ...).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from jaxllm.config import ModelConfig


@dataclass(frozen=True)
class TensorRule:
    """Where one layout parameter comes from."""

    param: str  # layout name, e.g. "wq"; per-layer when hf_name contains "{i}"
    hf_name: str  # e.g. "model.layers.{i}.self_attn.q_proj.weight"
    hf_shape: tuple[str, ...]  # expected HF shape in axis letters, checked before any transform
    transpose: bool = False  # [out, in] -> [in, out]
    split: tuple[int, int] | None = None  # (part, parts) of the last HF axis
    rows: tuple[tuple[str, ...], str] | None = None  # (entries before, size) of rows of HF axis 0
    # Config flag that, when False, means the checkpoint has no such tensor and the layout
    # still wants one (OPT with enable_bias=False): the parameter is zeros.
    zeros_unless: str | None = None
    offset: float = 0.0  # added to the tensor: Gemma's RMSNorm scales by (1 + weight)

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name


@dataclass(frozen=True)
class FamilyMap:
    """All rules of one family, plus what a checkpoint may carry that we do not need."""

    rules: tuple[TensorRule, ...]
    # Checkpoints saved from the base model (e.g. the original "gpt2") lack this prefix.
    base_prefix: str
    ignored: tuple[str, ...]  # regexes of tensors that are dropped without a word

    def rule(self, param: str, per_layer: bool) -> TensorRule:
        for r in self.rules:
            if r.param == param and r.per_layer == per_layer:
                return r
        raise ValueError(f"no name-map rule produces parameter {param!r} (per_layer={per_layer})")

    def is_ignored(self, hf_name: str) -> bool:
        return any(re.search(pattern, hf_name) for pattern in self.ignored)


def axis_sizes(c: ModelConfig) -> dict[str, int]:
    """Sizes of the axis letters used in ``hf_shape``."""
    return {
        "D": c.hidden_size, "N": c.num_heads, "K": c.num_kv_heads, "H": c.head_dim,
        "F": c.intermediate_size, "V": c.vocab_size, "E": c.word_embed_proj_dim or c.hidden_size,
        "P": c.max_position_embeddings + c.position_offset, "L": c.num_labels,
    }


def expected_shape(spec: tuple[str, ...], sizes: dict[str, int]) -> tuple[int, ...]:
    """``("NH", "D")`` -> ``(N*H, D)``; a leading integer multiplies: ``"3D"`` -> ``3*D``."""

    return tuple(axis_size(entry, sizes) for entry in spec)


def axis_size(entry: str, sizes: dict[str, int]) -> int:
    """``"NH+2KH"`` -> ``N*H + 2*K*H``."""
    total = 0
    for term in entry.split("+"):
        match = re.fullmatch(r"(\d*)([A-Z]+)", term)
        if match is None:
            raise ValueError(f"bad axis spec {entry!r}")
        product = int(match.group(1) or 1)
        for letter in match.group(2):
            product *= sizes[letter]
        total += product
    return total


def _linear(param: str, name: str, out: str, inp: str, **kw) -> TensorRule:
    return TensorRule(param, name + ".weight", (out, inp), transpose=True, **kw)


def _vector(param: str, name: str, size: str, **kw) -> TensorRule:
    return TensorRule(param, name, (size,), **kw)


_LLAMA_LAYER = "model.layers.{i}."
LLAMA = FamilyMap(
    rules=(
        TensorRule("embed", "model.embed_tokens.weight", ("V", "D")),
        _vector("final_norm", "model.norm.weight", "D"),
        _linear("lm_head", "lm_head", "V", "D"),
        _vector("attn_norm", _LLAMA_LAYER + "input_layernorm.weight", "D"),
        _linear("wq", _LLAMA_LAYER + "self_attn.q_proj", "NH", "D"),
        _linear("wk", _LLAMA_LAYER + "self_attn.k_proj", "KH", "D"),
        _linear("wv", _LLAMA_LAYER + "self_attn.v_proj", "KH", "D"),
        _linear("wo", _LLAMA_LAYER + "self_attn.o_proj", "D", "NH"),
        _vector("bq", _LLAMA_LAYER + "self_attn.q_proj.bias", "NH"),
        _vector("bk", _LLAMA_LAYER + "self_attn.k_proj.bias", "KH"),
        _vector("bv", _LLAMA_LAYER + "self_attn.v_proj.bias", "KH"),
        _vector("bo", _LLAMA_LAYER + "self_attn.o_proj.bias", "D"),
        _vector("q_norm", _LLAMA_LAYER + "self_attn.q_norm.weight", "H"),
        _vector("k_norm", _LLAMA_LAYER + "self_attn.k_norm.weight", "H"),
        _vector("mlp_norm", _LLAMA_LAYER + "post_attention_layernorm.weight", "D"),
        _linear("w_gate", _LLAMA_LAYER + "mlp.gate_proj", "F", "D"),
        _linear("w_up", _LLAMA_LAYER + "mlp.up_proj", "F", "D"),
        _linear("w_down", _LLAMA_LAYER + "mlp.down_proj", "D", "F"),
        _vector("b_gate", _LLAMA_LAYER + "mlp.gate_proj.bias", "F"),
        _vector("b_up", _LLAMA_LAYER + "mlp.up_proj.bias", "F"),
        _vector("b_down", _LLAMA_LAYER + "mlp.down_proj.bias", "D"),
    ),
    base_prefix="model.",
    ignored=(r"rotary_emb\.inv_freq$",),
)

_GPT2_LAYER = "transformer.h.{i}."
GPT2 = FamilyMap(
    rules=(
        TensorRule("embed", "transformer.wte.weight", ("V", "D")),
        TensorRule("pos_embed", "transformer.wpe.weight", ("P", "D")),
        _vector("final_norm", "transformer.ln_f.weight", "D"),
        _vector("final_norm_bias", "transformer.ln_f.bias", "D"),
        _linear("lm_head", "lm_head", "V", "D"),
        _vector("attn_norm", _GPT2_LAYER + "ln_1.weight", "D"),
        _vector("attn_norm_bias", _GPT2_LAYER + "ln_1.bias", "D"),
        *(
            TensorRule(p, _GPT2_LAYER + "attn.c_attn.weight", ("D", "3D"), split=(part, 3))
            for part, p in enumerate(("wq", "wk", "wv"))
        ),
        *(
            TensorRule(p, _GPT2_LAYER + "attn.c_attn.bias", ("3D",), split=(part, 3))
            for part, p in enumerate(("bq", "bk", "bv"))
        ),
        TensorRule("wo", _GPT2_LAYER + "attn.c_proj.weight", ("NH", "D")),
        _vector("bo", _GPT2_LAYER + "attn.c_proj.bias", "D"),
        _vector("mlp_norm", _GPT2_LAYER + "ln_2.weight", "D"),
        _vector("mlp_norm_bias", _GPT2_LAYER + "ln_2.bias", "D"),
        TensorRule("w_up", _GPT2_LAYER + "mlp.c_fc.weight", ("D", "F")),
        _vector("b_up", _GPT2_LAYER + "mlp.c_fc.bias", "F"),
        TensorRule("w_down", _GPT2_LAYER + "mlp.c_proj.weight", ("F", "D")),
        _vector("b_down", _GPT2_LAYER + "mlp.c_proj.bias", "D"),
    ),
    base_prefix="transformer.",
    ignored=(r"\.attn\.(masked_)?bias$",),  # causal-mask buffers of old GPT-2 checkpoints
)

# OPT-350m (pre_norm False) applies the same two layer norms after attention and MLP instead of
# before; their names do not change, so one map serves both.
_OPT = "model.decoder."
_OPT_LAYER = _OPT + "layers.{i}."
OPT = FamilyMap(
    rules=(
        TensorRule("embed", _OPT + "embed_tokens.weight", ("V", "E")),
        TensorRule("pos_embed", _OPT + "embed_positions.weight", ("P", "D")),
        _vector("final_norm", _OPT + "final_layer_norm.weight", "D"),
        _vector("final_norm_bias", _OPT + "final_layer_norm.bias", "D"),
        _linear("project_in", _OPT + "project_in", "D", "E"),
        _linear("project_out", _OPT + "project_out", "E", "D"),
        _linear("lm_head", "lm_head", "V", "E"),
        _vector("attn_norm", _OPT_LAYER + "self_attn_layer_norm.weight", "D"),
        _vector("attn_norm_bias", _OPT_LAYER + "self_attn_layer_norm.bias", "D"),
        _linear("wq", _OPT_LAYER + "self_attn.q_proj", "NH", "D"),
        _linear("wk", _OPT_LAYER + "self_attn.k_proj", "NH", "D"),
        _linear("wv", _OPT_LAYER + "self_attn.v_proj", "NH", "D"),
        _linear("wo", _OPT_LAYER + "self_attn.out_proj", "D", "NH"),
        _vector("bq", _OPT_LAYER + "self_attn.q_proj.bias", "NH", zeros_unless="qkv_bias"),
        _vector("bk", _OPT_LAYER + "self_attn.k_proj.bias", "NH", zeros_unless="qkv_bias"),
        _vector("bv", _OPT_LAYER + "self_attn.v_proj.bias", "NH", zeros_unless="qkv_bias"),
        _vector("bo", _OPT_LAYER + "self_attn.out_proj.bias", "D", zeros_unless="o_bias"),
        _vector("mlp_norm", _OPT_LAYER + "final_layer_norm.weight", "D"),
        _vector("mlp_norm_bias", _OPT_LAYER + "final_layer_norm.bias", "D"),
        _linear("w_up", _OPT_LAYER + "fc1", "F", "D"),
        _vector("b_up", _OPT_LAYER + "fc1.bias", "F", zeros_unless="mlp_bias"),
        _linear("w_down", _OPT_LAYER + "fc2", "D", "F"),
        _vector("b_down", _OPT_LAYER + "fc2.bias", "D", zeros_unless="mlp_bias"),
    ),
    base_prefix="model.",
    ignored=(),
)

# Gemma: Llama's names; its norms scale by (1 + weight), stored here as the scale itself.
GEMMA = FamilyMap(
    rules=tuple(dataclasses.replace(r, offset=1.0) if r.param in ("attn_norm", "mlp_norm", "final_norm") else r
                for r in LLAMA.rules),
    base_prefix=LLAMA.base_prefix,
    ignored=LLAMA.ignored,
)

# Phi-3: Llama's decoder with q, k, v fused into qkv_proj and gate, up into gate_up_proj.
_PHI3_FUSED = {
    "wq": ("self_attn.qkv_proj", ((), "NH")), "wk": ("self_attn.qkv_proj", (("NH",), "KH")),
    "wv": ("self_attn.qkv_proj", (("NH", "KH"), "KH")),
    "w_gate": ("mlp.gate_up_proj", ((), "F")), "w_up": ("mlp.gate_up_proj", (("F",), "F")),
}
PHI3 = FamilyMap(
    rules=tuple(
        TensorRule(r.param, _LLAMA_LAYER + _PHI3_FUSED[r.param][0] + ".weight",
                   ("NH+2KH" if "qkv" in _PHI3_FUSED[r.param][0] else "2F", "D"), transpose=True,
                   rows=_PHI3_FUSED[r.param][1])
        if r.param in _PHI3_FUSED and r.per_layer and not r.hf_name.endswith(".bias") else r
        for r in LLAMA.rules
    ),
    base_prefix=LLAMA.base_prefix,
    ignored=LLAMA.ignored,
)

# A sequence classifier: the same decoder and a score head [num_labels, D] on its last token
# (a token classifier: on every token).
LLAMA_CLASSIFIER = FamilyMap(
    rules=(*LLAMA.rules, _linear("score", "score", "L", "D")),
    base_prefix=LLAMA.base_prefix,
    ignored=LLAMA.ignored,
)

# A token classifier: the same head, with a bias, on every token.
LLAMA_TOKEN_CLASSIFIER = FamilyMap(
    rules=(*LLAMA_CLASSIFIER.rules, _vector("score_bias", "score.bias", "L")),
    base_prefix=LLAMA.base_prefix,
    ignored=LLAMA.ignored,
)

_BY_ARCHITECTURE = {
    "LlamaForSequenceClassification": LLAMA_CLASSIFIER,
    "MistralForSequenceClassification": LLAMA_CLASSIFIER,
    "Qwen2ForSequenceClassification": LLAMA_CLASSIFIER,
    "Qwen3ForSequenceClassification": LLAMA_CLASSIFIER,
    "LlamaForTokenClassification": LLAMA_TOKEN_CLASSIFIER,
    "MistralForTokenClassification": LLAMA_TOKEN_CLASSIFIER,
    "Qwen2ForTokenClassification": LLAMA_TOKEN_CLASSIFIER,
    "Qwen3ForTokenClassification": LLAMA_TOKEN_CLASSIFIER,
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": LLAMA,
    "Qwen3ForCausalLM": LLAMA,
    "GPT2LMHeadModel": GPT2,
    "OPTForCausalLM": OPT,
    "Phi3ForCausalLM": PHI3,
    "GemmaForCausalLM": GEMMA,
}


def family_map(c: ModelConfig) -> FamilyMap:
    """The name map of ``c.architecture``."""
    found = _BY_ARCHITECTURE.get(c.architecture)
    if found is None:
        raise ValueError(f"no name map for architecture {c.architecture!r}; supported: {sorted(_BY_ARCHITECTURE)}")
    return found
