"""Llama family: Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2 (RMSNorm, RoPE, GQA, SwiGLU).

A pure function over the parameter pytree of ``layout.param_shapes`` (axis letters there).
Layers run under ``lax.scan``; the KV pool travels through the scan carry so each layer's
write is an in-place update of the donated pool.
"""

from __future__ import annotations

import jax

from jaxllm.config import ModelConfig
from jaxllm.models.attention import AttentionFn, AttentionMetadata, KVPool, write_kv
from jaxllm.models.layers import (
    activation,
    apply_rope,
    einsum,
    embed,
    head_logits,
    matmul,
    output_head,
    rms_norm,
    rope_inv_freq,
    scan_layers,
)


def _attention(cfg: ModelConfig, lp: dict, x, kv: KVPool, layer, md: AttentionMetadata, attend: AttentionFn):
    # x [T, D] -> ([T, D], kv); tokens past cu_q_lens[-1] are padding
    rows = md.cu_q_lens[-1]
    q = einsum("td,dnh->tnh", x, lp["wq"], rows)
    k = einsum("td,dkh->tkh", x, lp["wk"], rows)
    v = einsum("td,dkh->tkh", x, lp["wv"], rows)
    if cfg.qkv_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.norm_eps)
    inv_freq = rope_inv_freq(cfg)
    q, k = apply_rope(q, md.positions, inv_freq), apply_rope(k, md.positions, inv_freq)
    kv = write_kv(kv, layer, k, v, md.slot_mapping)
    out = attend(q, kv, layer, md, cfg.sliding_window)
    out = einsum("tnh,nhd->td", out, lp["wo"], rows)
    if cfg.o_bias:
        out = out + lp["bo"]
    return out, kv


def _mlp(cfg: ModelConfig, lp: dict, x, rows):
    if "w_gate_up" in lp:  # pack_params fused gate, activation and up for the cpu matmul kernel
        h = matmul(x, lp["w_gate_up"], rows)
    else:
        gate = matmul(x, lp["w_gate"], rows)
        up = matmul(x, lp["w_up"], rows)
        if cfg.mlp_bias:
            gate, up = gate + lp["b_gate"], up + lp["b_up"]
        h = activation(cfg.hidden_act)(gate) * up
    out = matmul(h, lp["w_down"], rows)
    return out + lp["b_down"] if cfg.mlp_bias else out


def forward(params: dict, cfg: ModelConfig, kv: KVPool, token_ids, md: AttentionMetadata, attend: AttentionFn):
    """Run the decoder over the flat batch token_ids [T]; returns (hidden [T, D], kv pool)."""
    x = embed(params, token_ids)

    def layer(carry, scanned):
        x, kv = carry
        lp, index = scanned
        with jax.named_scope("attention"):
            h, kv = _attention(cfg, lp, rms_norm(x, lp["attn_norm"], cfg.norm_eps), kv, index, md, attend)
        x = x + h
        with jax.named_scope("mlp"):
            x = x + _mlp(cfg, lp, rms_norm(x, lp["mlp_norm"], cfg.norm_eps), md.cu_q_lens[-1])
        return (x, kv), None

    (x, kv), _ = scan_layers(layer, (x, kv), params["layers"], x.dtype)
    return rms_norm(x, params["final_norm"], cfg.norm_eps), kv


def logits(params: dict, cfg: ModelConfig, hidden, rows=None):
    """hidden [S, D] -> float32 logits [S, V]; with ``rows``, rows past it are padding (see
    ``layers.head_logits``)."""
    return head_logits(hidden, output_head(params, cfg.tie_word_embeddings), rows)
