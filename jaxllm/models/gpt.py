"""GPT family: GPT-2 and OPT (LayerNorm, learned positions, multi-head attention, GELU/ReLU MLP).

Same contract as ``llama.forward``. OPT-350m's variants are config flags: post-norm layers
(``pre_norm=False``), no final norm, and embeddings projected in and out of a narrower width.
"""

from __future__ import annotations

import jax

from jaxllm.config import ModelConfig
from jaxllm.models.attention import AttentionFn, AttentionMetadata, KVPool, write_kv
from jaxllm.models.layers import activation, einsum, embed, head_logits, layer_norm, matmul, output_head, scan_layers


def _attention(cfg: ModelConfig, lp: dict, x, kv: KVPool, layer, md: AttentionMetadata, attend: AttentionFn):
    rows = md.cu_q_lens[-1]  # tokens past it are padding
    q = einsum("td,dnh->tnh", x, lp["wq"], rows) + lp["bq"]
    k = einsum("td,dnh->tnh", x, lp["wk"], rows) + lp["bk"]
    v = einsum("td,dnh->tnh", x, lp["wv"], rows) + lp["bv"]
    kv = write_kv(kv, layer, k, v, md.slot_mapping)
    out = attend(q, kv, layer, md, None)
    return einsum("tnh,nhd->td", out, lp["wo"], rows) + lp["bo"], kv


def _mlp(cfg: ModelConfig, lp: dict, x, rows):
    h = activation(cfg.hidden_act)(matmul(x, lp["w_up"], rows) + lp["b_up"])
    return matmul(h, lp["w_down"], rows) + lp["b_down"]


def _norm(cfg: ModelConfig, lp: dict, name: str, x):
    return layer_norm(x, lp[name], lp[name + "_bias"], cfg.norm_eps)


def forward(params: dict, cfg: ModelConfig, kv: KVPool, token_ids, md: AttentionMetadata, attend: AttentionFn,
            lora=None, input_embeds=None):
    """Run the decoder over the flat batch token_ids [T]; returns (hidden [T, D], kv pool). No LoRA
    adapters for this family (``lora`` must be None). ``input_embeds``: as llama.forward's (the rows
    replace the token embeddings, before OPT's project_in and the position embeddings)."""
    if lora is not None:
        raise ValueError(f"LoRA adapters are not supported for {cfg.architecture}")
    x = embed(params, token_ids, input_embeds)
    if "project_in" in params:
        x = matmul(x, params["project_in"])
    x = x + params["pos_embed"][md.positions + cfg.position_offset]

    def layer(carry, scanned):
        x, kv = carry
        lp, index = scanned
        with jax.named_scope("attention"):
            h = _norm(cfg, lp, "attn_norm", x) if cfg.pre_norm else x
            h, kv = _attention(cfg, lp, h, kv, index, md, attend)
            x = x + h if cfg.pre_norm else _norm(cfg, lp, "attn_norm", x + h)
        with jax.named_scope("mlp"):
            h = _norm(cfg, lp, "mlp_norm", x) if cfg.pre_norm else x
            h = _mlp(cfg, lp, h, md.cu_q_lens[-1])
            x = x + h if cfg.pre_norm else _norm(cfg, lp, "mlp_norm", x + h)
        return (x, kv), None

    (x, kv), _ = scan_layers(layer, (x, kv), params["layers"], x.dtype)
    if cfg.final_norm:
        x = layer_norm(x, params["final_norm"], params["final_norm_bias"], cfg.norm_eps)
    if "project_out" in params:
        x = matmul(x, params["project_out"])
    return x, kv


def logits(params: dict, cfg: ModelConfig, hidden, rows=None):
    """hidden [S, D or E] -> float32 logits [S, V]; with ``rows``, rows past it are padding (see
    ``layers.head_logits``)."""
    return head_logits(hidden, output_head(params, cfg.tie_word_embeddings), rows)
