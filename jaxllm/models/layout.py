"""The parameter pytree of every model family, described once.

Axis alphabet used across the models (einsum letters):
  T tokens, D model width, N query heads, K kv heads, H head dim, F ffn width, V vocab,
  L layers, P learned positions, E embedding width (OPT-350m's word_embed_proj_dim).

Per-layer weights are stacked on a leading L axis so the layers run under ``lax.scan``.
Linear weights are stored input-major ([in, out]), heads split out: ``wq[L, D, N, H]``.
Converters assert every tensor against :func:`param_shapes` before writing it.
"""

from __future__ import annotations

import numpy as np

from jaxllm.config import ModelConfig

Shape = tuple[int, ...]


def _llama_layer_shapes(c: ModelConfig) -> dict[str, Shape]:
    D, N, K, H, F = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    shapes = {
        "attn_norm": (D,),
        "wq": (D, N, H), "wk": (D, K, H), "wv": (D, K, H), "wo": (N, H, D),
        "mlp_norm": (D,),
        "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D),
    }
    if c.qkv_bias:
        shapes.update(bq=(N, H), bk=(K, H), bv=(K, H))
    if c.o_bias:
        shapes["bo"] = (D,)
    if c.qk_norm:
        shapes.update(q_norm=(H,), k_norm=(H,))
    if c.mlp_bias:
        shapes.update(b_gate=(F,), b_up=(F,), b_down=(D,))
    return shapes


def _gpt_layer_shapes(c: ModelConfig) -> dict[str, Shape]:
    D, N, H, F = c.hidden_size, c.num_heads, c.head_dim, c.intermediate_size
    return {
        "attn_norm": (D,), "attn_norm_bias": (D,),
        "wq": (D, N, H), "wk": (D, N, H), "wv": (D, N, H), "wo": (N, H, D),
        "bq": (N, H), "bk": (N, H), "bv": (N, H), "bo": (D,),
        "mlp_norm": (D,), "mlp_norm_bias": (D,),
        "w_up": (D, F), "b_up": (F,), "w_down": (F, D), "b_down": (D,),
    }


def param_shapes(c: ModelConfig) -> dict:
    """Nested dict of shapes with the same structure as the model's parameter pytree."""
    D, V = c.hidden_size, c.vocab_size
    if c.family == "llama":
        layer = _llama_layer_shapes(c)
        top = {"embed": (V, D), "final_norm": (D,)}
    else:
        layer = _gpt_layer_shapes(c)
        E = c.word_embed_proj_dim or D
        top = {"embed": (V, E), "pos_embed": (c.max_position_embeddings + c.position_offset, D)}
        if c.final_norm:
            top.update(final_norm=(D,), final_norm_bias=(D,))
        if E != D:
            top.update(project_in=(E, D), project_out=(D, E))
    if not c.tie_word_embeddings:
        top["lm_head"] = (top["embed"][1], V)
    if c.num_labels:
        top["score"] = (D, c.num_labels)
        if c.classifies_tokens:  # transformers' token classifiers' head has a bias
            top["score_bias"] = (c.num_labels,)
    top["layers"] = {name: (c.num_layers, *shape) for name, shape in layer.items()}
    return top


# A classifier's head: the engine applies it on the host (``engine.classifier``); the step never
# sees these parameters.
HEAD_PARAMS = ("score", "score_bias")


def check_params(params: dict, shapes: dict, where: str = "params") -> dict:
    """``params`` with every leaf as a numpy array, after checking the keys and shapes against
    ``shapes`` (:func:`param_shapes`); ValueError names the first parameter that differs."""
    if params.keys() != shapes.keys():
        raise ValueError(f"{where} has keys {sorted(params)}, expected {sorted(shapes)}")
    out = {}
    for name, shape in shapes.items():
        if isinstance(shape, dict):
            out[name] = check_params(params[name], shape, f"{where}/{name}")
            continue
        value = np.asarray(params[name])
        if value.shape != shape:
            raise ValueError(f"{where}/{name} has shape {value.shape}, expected {shape}")
        out[name] = value
    return out


def random_params(c: ModelConfig, seed: int = 0, dtype=np.float32, scale: float = 0.02) -> dict:
    """Random parameters of the right shapes (norm scales near 1), for tests and benchmarks."""
    rng = np.random.default_rng(seed)

    def make(name: str, shape: Shape) -> np.ndarray:
        if name.endswith("norm") or name in ("final_norm",):
            return (1.0 + scale * rng.standard_normal(shape)).astype(dtype)
        return (scale * rng.standard_normal(shape)).astype(dtype)

    def walk(tree: dict) -> dict:
        return {k: walk(v) if isinstance(v, dict) else make(k, v) for k, v in tree.items()}

    return walk(param_shapes(c))
