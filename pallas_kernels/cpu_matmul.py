"""Float32 and bfloat16 matmuls on the CPU over packed weights: a C++ kernel called through XLA's
FFI.

A weight is packed once, outside ``jit`` (:func:`pack`), into 64-column panels
(``cpu_matmul.cc`` says why; a bfloat16 weight's panels hold pairs of rows, for AVX512-BF16's
pair dot products); :class:`PackedMatrix` carries the panels and the weight's original input and
output axes, and :func:`packed_einsum` / :func:`packed_matmul` compute what ``jnp.einsum`` /
``x @ w`` computed on the unpacked weight, to float32 rounding (a bfloat16 weight: x rounded to
bfloat16, the exact products summed in float32). A stacked weight
(a leading layer axis) is read in place at ``layer``: ``jaxllm.models.layers.scan_layers`` hands
the loop body the whole stack and the loop index instead of a sliced copy.

The engine packs a float32 or bfloat16 model's matmul weights when its attention backend asks for it
(``cpu_matmul = True`` on the "cpu" backend): see ``jaxllm.models.layers.pack_params``.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu_kernels import MATMUL_BF16_TARGET, MATMUL_TARGET, amx_usable, cpu_kernels_unavailable_reason

PANEL = 64

__all__ = ["PANEL", "PackedMatrix", "amx_usable", "gate_and_up", "pack", "pack_gated", "packed_einsum", "packed_matmul",
           "unpack"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedMatrix:
    """A float32 weight ``[*stack, *in_shape, *out_shape]`` as panels ``[*stack, P, K, 64]``, or
    a bfloat16 one as uint16 bits ``[*stack, P, ceil(K / 2), 128]``: panel row pair q holds
    ``w[2q, j]`` then ``w[2q + 1, j]`` for its 64 columns j (an odd K's last pair padded with 0).

    K = prod(in_shape), P = ceil(prod(out_shape) / 64), the last panel zero-padded. ``stack`` is
    () or (L,); for a stacked weight ``layer`` (an int32 scalar) picks the matrix to use.

    ``gated`` (:func:`pack_gated`): two weights of the same shape, a gate and an up projection,
    their panels interleaved (``[*stack, 2P, K, 64]``); the product is ``silu(x @ gate) * (x @ up)``.
    """

    data: jax.Array
    layer: jax.Array | None = None
    in_shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    out_shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    gated: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def stacked(self) -> bool:
        return self.data.ndim == 4

    @property
    def bf16(self) -> bool:
        """Whether this is a bfloat16 weight (its panels hold row pairs)."""
        return self.data.dtype == jnp.uint16

    def columns(self, index: jax.Array) -> jax.Array:
        """``w[:, index].T``: [len(index), K] in the weight's dtype, gathered from the panels (a
        column is K values 64 apart). How a tied model packed for the kernel looks up its token
        embeddings in the packed output head instead of keeping a second copy of them."""
        if self.stacked or self.gated or len(self.in_shape) != 1 or len(self.out_shape) != 1:
            raise ValueError("PackedMatrix.columns: needs one unstacked, ungated [K, N] weight")
        panel, col = index // PANEL, index % PANEL
        if not self.bf16:
            return self.data[panel, :, col]  # [T, K]
        pairs = jnp.stack([self.data[panel, :, 2 * col], self.data[panel, :, 2 * col + 1]], axis=-1)  # [T, K/2, 2]
        rows = pairs.reshape(index.shape[0], -1)[:, : self.in_shape[0]]
        return jax.lax.bitcast_convert_type(rows, jnp.bfloat16)

    def at_layer(self, layer) -> PackedMatrix:
        """The stack read at ``layer`` (traced or not): no copy, the kernel indexes it."""
        if not self.stacked:
            raise ValueError("at_layer: this PackedMatrix has no layer axis")
        return dataclasses.replace(self, layer=jnp.asarray(layer, jnp.int32))

    def ungated(self) -> PackedMatrix:
        """A gated weight's panels as one plain weight of ``2 * P * 64`` columns: its product is
        ``x @ gate`` and ``x @ up`` side by side, 64 columns of each in turn (see
        :func:`gate_and_up`), for callers that must change them before the activation."""
        if not self.gated:
            raise ValueError("PackedMatrix.ungated: the weight is not gated")
        return dataclasses.replace(self, out_shape=(self.data.shape[-3] * PANEL,), gated=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """The unpacked weight's shape."""
        return (*self.data.shape[:-3], *self.in_shape, *self.out_shape)


def pack(w, in_ndim: int, stacked: bool = False) -> PackedMatrix:
    """Pack float32 or bfloat16 ``w`` of shape ``[*stack, *in, *out]`` (``len(in) == in_ndim``;
    ``stack`` is one leading layer axis when ``stacked``). It copies the weight: call it outside
    ``jit`` where possible (a concrete weight is laid out by numpy, ~30x faster than XLA:CPU's
    transposes; a traced one, as LoRA's slot write has, by jnp)."""
    traced = isinstance(w, jax.core.Tracer)
    data = _panels(w, in_ndim, stacked, jnp if traced else np)
    return PackedMatrix(data if traced else jnp.asarray(data), None, *_in_out(jnp.shape(w), in_ndim, stacked))


def _in_out(shape, in_ndim: int, stacked: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    lead = 1 if stacked else 0
    return tuple(shape[lead:lead + in_ndim]), tuple(shape[lead + in_ndim:])


def _panels(w, in_ndim: int, stacked: bool, xp):
    """:func:`pack`'s panels of ``w``, computed with ``xp`` (numpy or jax.numpy)."""
    w = xp.asarray(w)
    if w.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"pack: the cpu matmul kernel takes float32 or bfloat16 weights, not {w.dtype}")
    lead = w.shape[:1] if stacked else ()
    in_shape, out_shape = _in_out(w.shape, in_ndim, stacked)
    if not in_shape or not out_shape:
        raise ValueError(f"pack: a weight of shape {w.shape} has no input or no output axis (in_ndim={in_ndim})")
    K, N = math.prod(in_shape), math.prod(out_shape)
    P = -(-N // PANEL)
    if w.dtype == jnp.bfloat16:
        Kh = -(-K // 2)
        m = xp.pad(w.reshape(*lead, K, N), [(0, 0)] * len(lead) + [(0, 2 * Kh - K), (0, P * PANEL - N)])
        pairs = m.reshape(*lead, Kh, 2, P, PANEL)  # -> [*lead, P, Kh, PANEL, 2]
        n = len(lead)
        pairs = pairs.transpose(*range(n), n + 2, n, n + 3, n + 1).reshape(*lead, P, Kh, 2 * PANEL)
        return jax.lax.bitcast_convert_type(pairs, jnp.uint16) if xp is jnp else pairs.view(np.uint16)
    m = xp.pad(w.reshape(*lead, K, N), [(0, 0)] * (len(lead) + 1) + [(0, P * PANEL - N)])
    panels = xp.moveaxis(m.reshape(*lead, K, P, PANEL), -3, -2)
    return panels.copy() if xp is jnp else np.ascontiguousarray(panels)


def pack_gated(gate, up, stacked: bool = False) -> PackedMatrix:
    """Pack float32 or bfloat16 ``gate`` and ``up`` ``[*stack, D, F]`` as one gated weight: its product is
    ``silu(x @ gate) * (x @ up)``, a SwiGLU MLP's input to its down projection, in one kernel
    call (no [T, 2F] intermediate, no separate activation pass). Call outside ``jit``."""
    traced = isinstance(gate, jax.core.Tracer) or isinstance(up, jax.core.Tracer)
    xp = jnp if traced else np
    g, u = _panels(gate, 1, stacked, xp), _panels(up, 1, stacked, xp)
    if g.shape != u.shape:
        raise ValueError(f"pack_gated: gate {tuple(jnp.shape(gate))} and up {tuple(jnp.shape(up))} differ in shape")
    data = xp.stack([g, u], axis=-3).reshape(*g.shape[:-3], -1, *g.shape[-2:])
    return PackedMatrix(data if traced else jnp.asarray(data), None, *_in_out(jnp.shape(gate), 1, stacked), gated=True)


def unpack(pm: PackedMatrix):
    """The weight :func:`pack` was given, or (gate, up) of :func:`pack_gated` (for tests and
    inspection)."""
    if pm.gated:
        pair = pm.data.reshape(*pm.data.shape[:-3], -1, 2, *pm.data.shape[-2:])
        return tuple(unpack(PackedMatrix(pair[..., i, :, :], None, pm.in_shape, pm.out_shape)) for i in (0, 1))
    lead = pm.data.shape[:-3]
    K, N = math.prod(pm.in_shape), math.prod(pm.out_shape)
    if pm.bf16:
        P, Kh = pm.data.shape[-3:-1]
        n = len(lead)
        pairs = jax.lax.bitcast_convert_type(pm.data, jnp.bfloat16).reshape(*lead, P, Kh, PANEL, 2)
        m = pairs.transpose(*range(n), n + 1, n + 3, n, n + 2).reshape(*lead, 2 * Kh, P * PANEL)[..., :K, :N]
        return m.reshape(pm.shape)
    m = jnp.moveaxis(pm.data, -3, -2).reshape(*lead, K, -1)[..., :N]
    return m.reshape(pm.shape)


def packed_matmul(x: jax.Array, pm: PackedMatrix, rows=None, amx: bool | None = None) -> jax.Array:
    """``x [..., *in_shape] -> [..., *out_shape]`` through the kernel, in x's dtype (computed in
    float32; against a bfloat16 weight x is rounded to bfloat16 first); for a gated weight
    ``silu(x @ gate) * (x @ up)``. ``rows`` (an int or int32 scalar, traced or not): only the first
    ``rows`` rows of x (its leading axes flattened) are real, the rest padding: their results are
    zeros, not computed. ``amx``: let the kernel use Intel AMX tiles (float32 as six bfloat16
    products, see ``cpu_matmul.cc``) for calls of 64 real rows or more where :func:`amx_usable`;
    False keeps it on AVX-512/AVX2 FMAs. None (the default) means True unless the environment sets
    ``JAXLLM_CPU_MATMUL_AMX=0`` (read when the call is traced). A bfloat16 weight ignores ``amx``:
    it takes AVX512-BF16 pair dot products where the CPU has them, else FMAs on widened pairs.
    Raises ValueError when the kernel is not usable here or the shapes disagree."""
    reason = cpu_kernels_unavailable_reason()
    if reason is not None:
        raise ValueError(f"the cpu matmul kernel is not usable here: {reason}")
    c = len(pm.in_shape)
    if tuple(x.shape[x.ndim - c:]) != pm.in_shape:
        raise ValueError(f"packed matmul: x's trailing axes {x.shape} do not match the weight's input axes {pm.in_shape}")
    if pm.stacked and pm.layer is None:
        raise ValueError("packed matmul: a stacked weight needs a layer (PackedMatrix.at_layer)")
    lead = x.shape[: x.ndim - c]
    K, N = math.prod(pm.in_shape), math.prod(pm.out_shape)
    layer = pm.layer if pm.layer is not None else jnp.zeros((), jnp.int32)
    M = math.prod(lead)
    real = jnp.asarray(M if rows is None else rows, jnp.int32).reshape(())
    result = jax.ShapeDtypeStruct((M, N), jnp.float32)
    with jax.named_scope("packed_matmul"):  # profiles tell it from the attention kernel's call
        if pm.bf16:  # the pair layout reads x two columns at a time: an odd K gets a zero column
            x2 = x.reshape(-1, K).astype(jnp.bfloat16)
            if K % 2:
                x2 = jnp.pad(x2, [(0, 0), (0, 1)])
            out = jax.ffi.ffi_call(MATMUL_BF16_TARGET, result)(x2, pm.data, layer, real, gated=pm.gated)
        else:
            if amx is None:
                amx = os.environ.get("JAXLLM_CPU_MATMUL_AMX", "1") != "0"
            out = jax.ffi.ffi_call(MATMUL_TARGET, result)(x.reshape(-1, K).astype(jnp.float32), pm.data, layer, real,
                                                          gated=pm.gated, amx=bool(amx))
    return out.reshape(*lead, *pm.out_shape).astype(x.dtype)


def gate_and_up(x: jax.Array, pm: PackedMatrix, rows=None) -> tuple[jax.Array, jax.Array]:
    """``x @ gate`` and ``x @ up`` [..., F] of a gated weight (:func:`pack_gated`), apart, from
    one kernel call over the same panels (no second copy of the weights)."""
    F = pm.out_shape[0]
    both = packed_matmul(x, pm.ungated(), rows)  # [..., 2P * 64]: 64 gate columns, 64 up columns, ...
    pairs = both.reshape(*both.shape[:-1], -1, 2, PANEL)
    gate = pairs[..., 0, :].reshape(*both.shape[:-1], -1)[..., :F]
    up = pairs[..., 1, :].reshape(*both.shape[:-1], -1)[..., :F]
    return gate, up


def packed_einsum(spec: str, x: jax.Array, pm: PackedMatrix, rows=None, amx: bool | None = None) -> jax.Array:
    """``jnp.einsum(spec, x, w)`` for the einsums a packed weight can serve: x's trailing axes
    contracted with w's input axes in order, the result x's leading axes then w's output axes
    (``"td,dnh->tnh"``, ``"tnh,nhd->td"``). Anything else raises ValueError. ``rows`` and ``amx``:
    as in :func:`packed_matmul`."""
    inputs, out = spec.replace(" ", "").split("->")
    xs, ws = inputs.split(",")
    c = len(pm.in_shape)
    if pm.gated:
        raise ValueError("packed einsum: a gated weight is used through packed_matmul")
    if len(ws) != c + len(pm.out_shape) or xs[len(xs) - c:] != ws[:c] or out != xs[: len(xs) - c] + ws[c:]:
        raise ValueError(f"packed einsum: {spec!r} is not x's trailing axes against the weight's {c} input axes")
    return packed_matmul(x, pm, rows, amx)
