"""Llama family: Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2 (RMSNorm, RoPE, GQA, SwiGLU).

A pure function over the parameter pytree of ``layout.param_shapes`` (axis letters there).
Layers run under ``lax.scan``; the KV pool travels through the scan carry so each layer's
write is an in-place update of the donated pool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.models import lora as lora_
from jaxllm.models.attention import AttentionFn, AttentionMetadata, KVPool, write_kv
from jaxllm.models.layers import (
    activation,
    apply_rope,
    einsum,
    embed,
    gate_and_up,
    head_logits,
    matmul,
    output_head,
    rms_norm,
    rope_inv_freq,
    scan_layers,
)


def _attention(cfg: ModelConfig, lp: dict, x, kv: KVPool, layer, md: AttentionMetadata, attend: AttentionFn,
               lora_mask=None):
    # x [T, D] -> ([T, D], kv); tokens past cu_q_lens[-1] are padding
    rows = md.cu_q_lens[-1]
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    hq, hk, hv = lora_.down(lp, "qkv", x, lora_mask)
    q = einsum("td,dnh->tnh", x, lp["wq"], rows) + lora_.up(lp, "wq", hq, (N, H), rows)
    k = einsum("td,dkh->tkh", x, lp["wk"], rows) + lora_.up(lp, "wk", hk, (K, H), rows)
    v = einsum("td,dkh->tkh", x, lp["wv"], rows) + lora_.up(lp, "wv", hv, (K, H), rows)
    if cfg.qkv_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.norm_eps)
    inv_freq = rope_inv_freq(cfg)
    q, k = apply_rope(q, md.positions, inv_freq), apply_rope(k, md.positions, inv_freq)
    kv = write_kv(kv, layer, k, v, md.slot_mapping)
    out = attend(q, kv, layer, md, cfg.sliding_window)
    (ho,) = lora_.down(lp, "wo", out, lora_mask)
    out = einsum("tnh,nhd->td", out, lp["wo"], rows) + lora_.up(lp, "wo", ho, (cfg.hidden_size,), rows)
    if cfg.o_bias:
        out = out + lp["bo"]
    return out, kv


def _mlp(cfg: ModelConfig, lp: dict, x, rows, lora_mask=None):
    F, D = cfg.intermediate_size, cfg.hidden_size
    if "w_gate_up" in lp and lora_mask is None:  # pack_params fused gate, activation and up (cpu kernel)
        h = matmul(x, lp["w_gate_up"], rows)
    else:
        if "w_gate_up" in lp:  # LoRA changes gate and up before the activation: the fused weight's halves
            gate, up = gate_and_up(x, lp["w_gate_up"], rows)
        else:
            gate, up = matmul(x, lp["w_gate"], rows), matmul(x, lp["w_up"], rows)
        h_gate, h_up = lora_.down(lp, "gate_up", x, lora_mask)
        gate, up = gate + lora_.up(lp, "w_gate", h_gate, (F,), rows), up + lora_.up(lp, "w_up", h_up, (F,), rows)
        if cfg.mlp_bias:
            gate, up = gate + lp["b_gate"], up + lp["b_up"]
        h = activation(cfg.hidden_act)(gate) * up
    (h_down,) = lora_.down(lp, "w_down", h, lora_mask)
    out = matmul(h, lp["w_down"], rows) + lora_.up(lp, "w_down", h_down, (D,), rows)
    return out + lp["b_down"] if cfg.mlp_bias else out


def forward(params: dict, cfg: ModelConfig, kv: KVPool, token_ids, md: AttentionMetadata, attend: AttentionFn,
            lora: tuple[dict, jax.Array] | None = None, input_embeds=None):
    """Run the decoder over the flat batch token_ids [T]; returns (hidden [T, D], kv pool).

    ``lora``: (the LoRA slot stacks, each token's mask [T, M * R]) when adapters are served (see
    jaxllm/models/lora.py); the fused gate-up weight of :func:`pack_params` is not used then.
    ``input_embeds``: (rows [T, D], whether each position takes its row [T] bool) for vLLM's
    prompt_embeds, in place of the embedding table's rows; None: the table's."""
    x = embed(params, token_ids, input_embeds)
    if cfg.embed_scale is not None:  # Gemma
        x = x * jnp.asarray(cfg.embed_scale, x.dtype)
    stacks, mask = lora if lora is not None else (None, None)

    def layer(carry, scanned):
        x, kv = carry
        lp, index = scanned
        with jax.named_scope("attention"):
            h, kv = _attention(cfg, lp, rms_norm(x, lp["attn_norm"], cfg.norm_eps), kv, index, md, attend, mask)
        x = x + h
        with jax.named_scope("mlp"):
            x = x + _mlp(cfg, lp, rms_norm(x, lp["mlp_norm"], cfg.norm_eps), md.cu_q_lens[-1], mask)
        return (x, kv), None

    (x, kv), _ = scan_layers(layer, (x, kv), lora_.with_stacks(params["layers"], stacks), x.dtype)
    return rms_norm(x, params["final_norm"], cfg.norm_eps), kv


def logits(params: dict, cfg: ModelConfig, hidden, rows=None):
    """hidden [S, D] -> float32 logits [S, V]; with ``rows``, rows past it are padding (see
    ``layers.head_logits``)."""
    return head_logits(hidden, output_head(params, cfg.tie_word_embeddings), rows)
