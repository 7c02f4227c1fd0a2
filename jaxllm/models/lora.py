"""LoRA on the device: every slot's adapters in one stack per weight, applied to a mixed batch.

The stacks hold ``max_loras`` slots of rank ``R`` side by side: ``a.<w> [L, in, M * R]`` and
``b.<w> [L, M * R, out]`` for each adaptable weight ``w`` (slot s is columns / rows
``s * R .. s * R + R - 1``; the scale is folded into ``b``). A token of an adapted request has
its slot's R columns on in ``token_mask [T, M * R]``, every other token none, so

    delta = ((x @ a) * token_mask) @ b

gives each token its own adapter's ``x @ A @ B`` (and 0 without one) in two dense matmuls over
the whole batch, whatever mix of adapters it holds: no gather, fixed shapes, no recompiles when
adapters change. The extra work is ``2 * M * R`` columns per adapted weight, small next to the
weight itself for a few slots of rank 16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PREFIX = "lora."  # the stacks' keys among a layer's parameters (``lora.a.wq``)


def token_mask(slots: jax.Array, max_loras: int, rank: int, dtype) -> jax.Array:
    """slots [T] int32 (-1: no adapter) -> [T, max_loras * rank], 1 on the token's slot's columns."""
    onehot = slots[:, None] == jnp.arange(max_loras, dtype=slots.dtype)[None, :]
    return jnp.repeat(onehot, rank, axis=1).astype(dtype)


def with_stacks(layers: dict, stacks: dict | None) -> dict:
    """The per-layer parameters with the LoRA stacks added (scanned along with them)."""
    if stacks is None:
        return layers
    return {**layers, **{PREFIX + name: w for name, w in stacks.items()}}


def delta(lp: dict, weight: str, x: jax.Array, mask: jax.Array | None, out_shape: tuple[int, ...]) -> jax.Array | int:
    """This layer's LoRA term for ``weight`` applied to x [T, ...] (its input, flattened after T),
    shaped [T, *out_shape]; 0 when the engine serves no adapters."""
    if mask is None or PREFIX + "a." + weight not in lp:
        return 0
    x2 = x.reshape(x.shape[0], -1)
    h = jnp.dot(x2, lp[PREFIX + "a." + weight], preferred_element_type=jnp.float32)
    h = (h * mask).astype(x.dtype)
    d = jnp.dot(h, lp[PREFIX + "b." + weight], preferred_element_type=jnp.float32).astype(x.dtype)
    return d.reshape(x.shape[0], *out_shape)


def set_slot(stacks: dict, slot: jax.Array, adapter: dict) -> dict:
    """``stacks`` with slot ``slot`` replaced by ``adapter`` (``a.<w> [L, in, R]``,
    ``b.<w> [L, R, out]`` for every weight; zeros where it adapts nothing)."""
    out = {}
    for name, stack in stacks.items():
        piece = adapter[name].astype(stack.dtype)
        if name.startswith("a."):
            start = (0, 0, slot * piece.shape[2])
        else:
            start = (0, slot * piece.shape[1], 0)
        out[name] = jax.lax.dynamic_update_slice(stack, piece, start)
    return out
