"""Building blocks shared by the model families: norms, RoPE, activations."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig, RopeScaling
from pallas_kernels.cpu_matmul import PackedMatrix, pack, pack_gated, packed_einsum, packed_matmul
from pallas_kernels.cpu_matmul import gate_and_up as packed_gate_and_up


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32 (as transformers does)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32.astype(x.dtype) * scale).astype(x.dtype)


def einsum(spec: str, x: jax.Array, w: jax.Array | PackedMatrix, rows=None) -> jax.Array:
    """``jnp.einsum`` accumulated in float32 and returned in ``x``'s dtype (what a bfloat16 matmul
    does anyway). Asked for float32 explicitly, XLA:CPU takes its fast bfloat16 dot; with a
    bfloat16 result it took a path ~2x slower at 512 rows. A weight :func:`pack_params` packed
    goes through the C++ CPU kernel, which computes only the first ``rows`` tokens (the flat
    batch's real ones; padding rows come back as zeros); XLA's dot computes every row."""
    if isinstance(w, PackedMatrix):
        return packed_einsum(spec, x, w, rows)
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def matmul(x: jax.Array, w: jax.Array | PackedMatrix, rows=None) -> jax.Array:
    """``x @ w`` as :func:`einsum` computes it; for :func:`pack_params`' gated ``w_gate_up``,
    ``silu(x @ w_gate) * (x @ w_up)``."""
    if isinstance(w, PackedMatrix):
        return packed_matmul(x, w, rows)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def gate_and_up(x: jax.Array, w: PackedMatrix, rows=None) -> tuple[jax.Array, jax.Array]:
    """``x @ w_gate`` and ``x @ w_up`` from :func:`pack_params`' fused ``w_gate_up`` (LoRA
    adds to each before the activation), in x's dtype."""
    return packed_gate_and_up(x, w, rows)


def head_logits(hidden: jax.Array, head: jax.Array | PackedMatrix, rows=None) -> jax.Array:
    """hidden [S, D] @ the output head (:func:`output_head`) -> float32 logits [S, V]. A packed
    head computes the first ``rows`` rows only (zeros after), as in :func:`einsum`."""
    if isinstance(head, PackedMatrix):
        return packed_matmul(hidden.astype(jnp.float32), head, rows)
    return jnp.dot(hidden, head, preferred_element_type=jnp.float32)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def activation(name: str):
    return {
        "silu": jax.nn.silu,
        "relu": jax.nn.relu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    }[name]


def _llama3_inv_freq(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    out = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return np.where(middle, blended, out)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H // 2] (float32), with the config's rope scaling applied."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    s = cfg.rope_scaling
    if s is None or s.rope_type == "default":
        return inv_freq.astype(np.float32)
    if s.rope_type == "linear":
        return (inv_freq / s.factor).astype(np.float32)
    return _llama3_inv_freq(inv_freq, s).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate x [T, heads, H] by its positions [T], Hugging Face's rotate-half layout."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def _is_half(a) -> bool:
    return a.dtype in (jnp.bfloat16, jnp.float16)


def _as_bits(layers: dict) -> dict:
    # 16-bit float leaves -> their uint16 bits; everything else unchanged.
    return jax.tree.map(lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16) if _is_half(a) else a, layers)


# Per-layer matmul weights of both families and how many leading axes each contracts.
_MATMUL_INPUT_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}


def pack_params(params: dict, tie_word_embeddings: bool, platform: str, cpu_matmul: bool = False,
                hidden_act: str | None = None) -> dict:
    """``params`` laid out for the step: XLA's 16-bit float paths, or the C++ CPU matmul kernel.

    - Per-layer weights in bfloat16/float16 are stored as their uint16 bits. Scanned as floats,
      XLA:CPU rewrites each layer's slice as a float32 slice plus a convert and hoists the
      widening out of the loop: every step converted the whole weight stack to float32 and back
      (a bfloat16 decode step cost ~4x a float32 one). :func:`scan_layers` views them again.
    - On CPU a tied 16-bit embedding gets a transposed copy as ``lm_head`` [D, V]: XLA:CPU's
      bfloat16 dot wants the contracted axis first, and against ``embed.T`` it widened the whole
      embedding to float32 every step (20 ms for SmolLM2's 49152 x 576). Costs V x D more bytes.

    - With ``cpu_matmul`` (the "cpu" attention backend asks for it), on CPU, a float32 or
      bfloat16 model's per-layer matmul weights and its output head become :class:`PackedMatrix`
      panels for ``pallas_kernels/cpu_matmul.cc`` (a tied embedding becomes the packed head, kept
      once: ``embed`` and ``lm_head`` are the same :class:`PackedMatrix`, and :func:`embed`
      gathers a token's row from it). :func:`einsum`, :func:`matmul` and :func:`head_logits` send
      them to the kernel; :func:`scan_layers` hands the loop the whole stack and the layer index.
      A SwiGLU MLP (``hidden_act`` "silu", gate and up without biases) gets ``w_gate_up`` instead
      of ``w_gate`` and ``w_up``: one call computes ``silu(x @ w_gate) * (x @ w_up)``.
      A bfloat16 model's other per-layer weights become their bits, as below. Otherwise float32
      models are returned unchanged (and float16 ones take the path below).

    Pack once, outside ``jit``: a bitcast or transpose inside a jitted step is a copy.
    """
    if cpu_matmul and platform == "cpu" and params["embed"].dtype in (jnp.float32, jnp.bfloat16):
        raw = params["layers"]
        gated = hidden_act == "silu" and "w_gate" in raw and "b_gate" not in raw and "b_up" not in raw
        layers = {name: pack(w, _MATMUL_INPUT_AXES[name], stacked=True) if name in _MATMUL_INPUT_AXES else w
                  for name, w in raw.items() if not (gated and name in ("w_gate", "w_up"))}
        layers = _as_bits(layers)
        if gated:
            layers["w_gate_up"] = pack_gated(raw["w_gate"], raw["w_up"], stacked=True)
        if "lm_head" in params:
            return {**params, "layers": layers, "lm_head": pack(params["lm_head"], 1)}
        # Tied: one packed copy serves as the head and, read a column per token, as the embedding.
        head = pack(jnp.asarray(params["embed"]).T, 1)
        return {**params, "layers": layers, "embed": head, "lm_head": head}
    packed = {**params, "layers": _as_bits(params["layers"])}
    if platform == "cpu" and tie_word_embeddings and _is_half(params["embed"]) and "lm_head" not in params:
        packed["lm_head"] = jnp.asarray(params["embed"]).T.copy()
    return packed


def embed(params: dict, token_ids: jax.Array, input_embeds=None) -> jax.Array:
    """The token embedding's rows for ``token_ids`` [T] -> [T, D], in the model's dtype; from the
    packed output head when :func:`pack_params` made a tied model's ``embed`` that.
    ``input_embeds``: (rows [T, D], use [T] bool): positions with ``use`` take their row instead
    (vLLM's prompt_embeds)."""
    table = params["embed"]
    x = table.columns(token_ids) if isinstance(table, PackedMatrix) else table[token_ids]
    if input_embeds is not None:
        rows, use = input_embeds
        x = jnp.where(use[:, None], rows.astype(x.dtype), x)
    return x


def output_head(params: dict, tie_word_embeddings: bool) -> jax.Array:
    """The [D, V] matrix of the logits (packed or not): ``lm_head`` when there is one (see
    :func:`pack_params`)."""
    return params["lm_head"] if "lm_head" in params or not tie_word_embeddings else params["embed"].T


def scan_layers(body, carry, layers: dict, dtype):
    """``lax.scan`` of ``body(carry, (layer_params_i, i))`` over the stacked per-layer weights.

    uint16 leaves are :func:`pack_params`' bits of the model's 16-bit ``dtype`` and are viewed
    as floats again inside the loop, one layer's slice at a time; 16-bit float leaves not packed
    beforehand are packed here (a copy of the stack per call). :class:`PackedMatrix` stacks are
    not sliced: the body gets the whole stack read at the loop index (``at_layer``).
    """
    stacks = {name: w for name, w in layers.items() if isinstance(w, PackedMatrix)}
    layers = _as_bits({name: w for name, w in layers.items() if name not in stacks})
    num_layers = jax.tree.leaves((layers, stacks))[0].shape[0]

    def step(c, scanned):
        lp, index = scanned
        lp = jax.tree.map(lambda a: jax.lax.bitcast_convert_type(a, dtype) if a.dtype == jnp.uint16 else a, lp)
        lp.update({name: w.at_layer(index) for name, w in stacks.items()})
        return body(c, (lp, index))

    return jax.lax.scan(step, carry, (layers, jnp.arange(num_layers)))
