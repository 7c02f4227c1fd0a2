"""LoRA on the device: every slot's adapters in stacks by weight, applied to a mixed batch.

The stacks hold ``max_loras`` slots of rank ``R`` side by side (M * R columns). Weights that read
the same input share one ``a`` stack, so each layer makes one "down" product per input:

    a.qkv [L, D, 3 * M * R]  (wq, wk, wv)    a.wo [L, N * H, M * R]
    a.gate_up [L, D, 2 * M * R]  (w_gate, w_up)    a.w_down [L, F, M * R]

and each weight has its own ``b.<w> [L, M * R, out]`` (the scale folded in; on CPU packed for the
matmul kernel, see ``jaxllm/runner/lora_slots.py``). Slot s of weight j of a group is columns
``j * M * R + s * R ..`` of its ``a`` stack and rows ``s * R ..`` of its ``b``. A token of an
adapted request has its slot's R columns on in ``token_mask [T, M * R]``, every other token none, so

    delta_w = ((x @ a_w) * token_mask) @ b_w

gives each token its own adapter's ``x @ A @ B`` (and 0 without one), for any mix of adapters in
the batch: no gather, fixed shapes, no recompiles when adapters change. The extra work is
``2 * M * R`` columns per adapted weight, small next to the weight itself for a few slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.models.layers import matmul

PREFIX = "lora."  # the stacks' keys among a layer's parameters (``lora.a.qkv``, ``lora.b.wq``)
# The down-projection groups: weights reading the same input, in their column order.
GROUPS = {"qkv": ("wq", "wk", "wv"), "wo": ("wo",), "gate_up": ("w_gate", "w_up"), "w_down": ("w_down",)}


def token_mask(slots: jax.Array, max_loras: int, rank: int, dtype) -> jax.Array:
    """slots [T] int32 (-1: no adapter) -> [T, max_loras * rank], 1 on the token's slot's columns."""
    onehot = slots[:, None] == jnp.arange(max_loras, dtype=slots.dtype)[None, :]
    return jnp.repeat(onehot, rank, axis=1).astype(dtype)


def with_stacks(layers: dict, stacks: dict | None) -> dict:
    """The per-layer parameters with the LoRA stacks added (scanned along with them)."""
    if stacks is None:
        return layers
    return {**layers, **{PREFIX + name: w for name, w in stacks.items()}}


def down(lp: dict, group: str, x: jax.Array, mask: jax.Array | None) -> tuple:
    """The group's ``(x @ a_w) * token_mask`` [T, M * R] for each of its weights, from one product
    (x [T, ...] flattened after T); Nones when the step runs no adapters."""
    if mask is None:
        return (None,) * len(GROUPS[group])
    h = jnp.dot(x.reshape(x.shape[0], -1), lp[PREFIX + "a." + group], preferred_element_type=jnp.float32)
    h = h.reshape(x.shape[0], len(GROUPS[group]), -1) * mask[:, None, :]
    return tuple(h[:, j].astype(x.dtype) for j in range(len(GROUPS[group])))


def up(lp: dict, weight: str, h: jax.Array | None, out_shape: tuple[int, ...], rows=None) -> jax.Array | int:
    """``h @ b_weight`` shaped [T, *out_shape] (0 for ``h`` None); ``rows`` as in ``layers.matmul``."""
    if h is None:
        return 0
    return matmul(h, lp[PREFIX + "b." + weight], rows).reshape(h.shape[0], *out_shape)
