"""The C++ CPU matmul over packed weights (pallas_kernels/cpu_matmul.{cc,py}) and the model path
through it (``pack_params(..., cpu_matmul=True)``, ``scan_layers`` reading stacks in place).

References are float64 numpy products of the same float32 inputs; the kernel sums k in order in
float32, so the tolerance is float32 accumulation over K terms of O(1) products.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import make_tiny_checkpoint

import jaxllm
from jaxllm import LLM, SamplingParams
from jaxllm.models import model_module
from jaxllm.models.attention import xla_paged_attention
from jaxllm.models.layers import embed, head_logits, output_head, pack_params
from jaxllm.runner import kv_pool
from pallas_kernels.cpu_attention import cpu_paged_attention
from pallas_kernels.cpu_matmul import (
    PackedMatrix,
    amx_usable,
    gate_and_up,
    pack,
    pack_gated,
    packed_einsum,
    packed_matmul,
    unpack,
)
from pallas_kernels.testing import make_batch

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the C++ kernels run on the CPU only")

_matmul = jax.jit(packed_matmul)


def _reference(x, w):
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64)


# M: one row, a partial tile, whole tiles, chunked rows (> 48) with a remainder; N: under one
# vector, a partial panel, several panels; K: short and SmolLM2's width.
@pytest.mark.parametrize("M", [1, 5, 6, 13, 50, 64, 65, 131])
@pytest.mark.parametrize("K,N", [(8, 10), (576, 70), (37, 200), (64, 256)])
def test_matches_reference(M, K, N):
    rng = np.random.default_rng(M * 1000 + K + N)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((K, N)).astype(np.float32)
    out = np.asarray(_matmul(jnp.asarray(x), pack(w, 1)))
    assert out.shape == (M, N)
    np.testing.assert_allclose(out, _reference(x, w), rtol=1e-5, atol=1e-5 * np.sqrt(K))


@pytest.mark.parametrize("rows", [0, 1, 7, 13, 50])
def test_padding_rows_are_zeros_not_computed(rows):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((50, 40)).astype(np.float32)
    w = rng.standard_normal((40, 100)).astype(np.float32)
    out = np.asarray(jax.jit(packed_matmul)(jnp.asarray(x), pack(w, 1), jnp.int32(rows)))
    np.testing.assert_allclose(out[:rows], _reference(x[:rows], w), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(out[rows:], 0)


def _silu(x):
    return x / (1.0 + np.exp(-x))


@pytest.mark.parametrize("M,rows", [(3, 3), (20, 20), (70, 61)])
def test_gated_weights_give_silu_gate_times_up(M, rows):
    rng = np.random.default_rng(M)
    x = rng.standard_normal((M, 24)).astype(np.float32)
    gate = (10 * rng.standard_normal((2, 24, 100))).astype(np.float32)  # |x @ gate| up to ~200
    up = rng.standard_normal((2, 24, 100)).astype(np.float32)
    pw = pack_gated(gate, up, stacked=True)
    assert pw.gated and pw.data.shape == (2, 4, 24, 64) and pw.shape == (2, 24, 100)
    g, u = unpack(pw)
    np.testing.assert_array_equal(np.asarray(g), gate)
    np.testing.assert_array_equal(np.asarray(u), up)
    out = np.asarray(jax.jit(packed_matmul)(jnp.asarray(x), pw.at_layer(1), jnp.int32(rows)))
    xg, xu = _reference(x, gate[1]), _reference(x, up[1])
    assert np.abs(xg).max() > 80  # the sigmoid's far tails are exercised
    np.testing.assert_allclose(out[:rows], (_silu(xg) * xu)[:rows], rtol=2e-5, atol=2e-4)
    np.testing.assert_array_equal(out[rows:], 0)
    with pytest.raises(ValueError, match="gated weight is used through packed_matmul"):
        packed_einsum("td,df->tf", jnp.asarray(x), pw.at_layer(0))
    with pytest.raises(ValueError, match="differ in shape"):
        pack_gated(gate, up[:, :, :50], stacked=True)


@pytest.mark.parametrize("bf16", [False, True])
def test_a_gated_weight_gives_gate_and_up_apart(bf16):
    """What LoRA needs from the fused SwiGLU weight: x @ gate and x @ up before the activation,
    from the same panels (F = 100: the last panel of each is padded)."""
    rng = np.random.default_rng(7)
    cast = _bf16 if bf16 else (lambda a: np.asarray(a, np.float32))
    x = cast(rng.standard_normal((9, 25)))
    gate, up = cast(rng.standard_normal((2, 25, 100))), cast(rng.standard_normal((2, 25, 100)))
    pw = pack_gated(gate, up, stacked=True)
    with pytest.raises(ValueError, match="not gated"):
        pack(up, 1).ungated()
    reference = _bf16_reference if bf16 else _reference
    xf = x.astype(np.float32)
    g, u = jax.jit(gate_and_up)(jnp.asarray(xf), pw.at_layer(1), jnp.int32(7))
    assert g.shape == u.shape == (9, 100)
    for got, w in ((g, gate[1]), (u, up[1])):
        np.testing.assert_allclose(np.asarray(got)[:7], reference(xf, w)[:7], rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(got)[7:], 0)


def test_stacked_weights_are_read_at_the_layer():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 24, 40)).astype(np.float32)
    x = rng.standard_normal((7, 24)).astype(np.float32)
    pw = pack(w, 1, stacked=True)
    assert pw.data.shape == (3, 1, 24, 64) and pw.shape == (3, 24, 40)
    for layer in range(3):
        out = np.asarray(_matmul(jnp.asarray(x), pw.at_layer(layer)))
        np.testing.assert_allclose(out, _reference(x, w[layer]), rtol=1e-5, atol=1e-5)

    # Inside lax.scan the body gets the whole stack and the loop index.
    def body(carry, i):
        return carry, packed_matmul(jnp.asarray(x), pw.at_layer(i))

    _, outs = jax.jit(lambda: jax.lax.scan(body, 0, jnp.arange(3)))()
    np.testing.assert_allclose(np.asarray(outs), np.einsum("mk,lkn->lmn", x, w), rtol=1e-5, atol=1e-5)


def test_head_axes_and_einsums():
    # wq [D, N, H] against "td,dnh->tnh" and wo [N, H, D] against "tnh,nhd->td", stacked.
    rng = np.random.default_rng(1)
    wq = rng.standard_normal((2, 16, 3, 8)).astype(np.float32)
    wo = rng.standard_normal((2, 3, 8, 16)).astype(np.float32)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    pq, po = pack(wq, 1, stacked=True), pack(wo, 2, stacked=True)
    np.testing.assert_array_equal(np.asarray(unpack(pq)), wq)
    np.testing.assert_array_equal(np.asarray(unpack(po)), wo)
    q = packed_einsum("td,dnh->tnh", jnp.asarray(x), pq.at_layer(1))
    np.testing.assert_allclose(np.asarray(q), np.einsum("td,dnh->tnh", x, wq[1]), rtol=1e-5, atol=1e-5)
    out = packed_einsum("tnh,nhd->td", q, po.at_layer(1))
    np.testing.assert_allclose(np.asarray(out), np.einsum("tnh,nhd->td", np.asarray(q), wo[1]), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="not x's trailing axes"):
        packed_einsum("td,dnh->thn", jnp.asarray(x), pq.at_layer(0))


def test_bad_input_raises():
    w = pack(np.ones((2, 8, 16), np.float32), 1, stacked=True)
    with pytest.raises(ValueError, match="float32 or bfloat16 weights, not float16"):
        pack(jnp.ones((8, 16), jnp.float16), 1)
    with pytest.raises(ValueError, match="no input or no output axis"):
        pack(np.ones((8,), np.float32), 1)
    with pytest.raises(ValueError, match="do not match the weight's input axes"):
        packed_matmul(jnp.ones((4, 9)), w.at_layer(0))
    with pytest.raises(ValueError, match="needs a layer"):
        packed_matmul(jnp.ones((4, 8)), w)
    with pytest.raises(ValueError, match="has no layer axis"):
        pack(np.ones((8, 16), np.float32), 1).at_layer(0)
    with pytest.raises(Exception, match="layer index outside the stacked weights"):
        jax.block_until_ready(_matmul(jnp.ones((4, 8)), w.at_layer(2)))


# The AMX path (calls of 64 rows or more where the CPU has AMX tiles): float32 products as six
# bfloat16 ones, summed in float32.
needs_amx = pytest.mark.skipif(not amx_usable(), reason="no AMX tiles on this CPU (or Linux refuses them)")
_by_path = jax.jit(packed_matmul, static_argnames="amx")


def _relative_error(out, x, w):
    # |out - x @ w| in units of |x| @ |w|: float32 accumulation over K terms stays below ~K * 2^-24.
    bound = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64))
    return float(np.max(np.abs(out - _reference(x, w)) / bound))


@needs_amx
@pytest.mark.parametrize("M", [64, 65, 131, 300])
@pytest.mark.parametrize("K,N", [(8, 10), (576, 70), (37, 200), (1536, 130)])
def test_amx_path_matches_reference(M, K, N):
    rng = np.random.default_rng(M * 7 + K + N)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((K, N)).astype(np.float32)
    amx = np.asarray(_by_path(jnp.asarray(x), pack(w, 1), amx=True))
    fma = np.asarray(_by_path(jnp.asarray(x), pack(w, 1), amx=False))
    np.testing.assert_allclose(amx, _reference(x, w), rtol=1e-5, atol=1e-5 * np.sqrt(K))
    # As accurate as the in-order float32 sum (the dropped bfloat16 cross terms are below 2^-22).
    assert _relative_error(amx, x, w) <= max(2 * _relative_error(fma, x, w), 2**-22)
    if K >= 576:
        assert not np.array_equal(amx, fma)  # the other path ran: their roundings differ


@needs_amx
def test_amx_path_is_float32_accurate_on_real_shapes():
    # SmolLM2's down projection at a prefill step's rows, values of a hidden state's magnitudes.
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((337, 1536)) * rng.uniform(0.01, 10, (337, 1))).astype(np.float32)
    w = (0.02 * rng.standard_normal((1536, 576))).astype(np.float32)
    amx = np.asarray(_by_path(jnp.asarray(x), pack(w, 1), amx=True))
    fma = np.asarray(_by_path(jnp.asarray(x), pack(w, 1), amx=False))
    assert _relative_error(amx, x, w) < 2**-22 and _relative_error(fma, x, w) < 2**-21


@needs_amx
def test_amx_below_64_rows_is_the_fma_path():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((100, 576)).astype(np.float32)
    pw = pack(rng.standard_normal((576, 200)).astype(np.float32), 1)
    for rows in (1, 17, 63):
        amx = np.asarray(_by_path(jnp.asarray(x), pw, jnp.int32(rows), amx=True))
        np.testing.assert_array_equal(amx, np.asarray(_by_path(jnp.asarray(x), pw, jnp.int32(rows), amx=False)))
    # From 64 real rows on (the padded shape does not matter), the AMX path.
    amx = np.asarray(_by_path(jnp.asarray(x), pw, jnp.int32(64), amx=True))
    assert not np.array_equal(amx, np.asarray(_by_path(jnp.asarray(x), pw, jnp.int32(64), amx=False)))


@needs_amx
@pytest.mark.parametrize("M,rows", [(64, 64), (150, 131), (300, 255)])
def test_amx_gated_stacked_and_padding_rows(M, rows):
    rng = np.random.default_rng(M)
    x = rng.standard_normal((M, 40)).astype(np.float32)
    gate = (10 * rng.standard_normal((3, 40, 100))).astype(np.float32)
    up = rng.standard_normal((3, 40, 100)).astype(np.float32)
    for layer in (0, 2):
        out = np.asarray(_by_path(jnp.asarray(x), pack_gated(gate, up, stacked=True).at_layer(layer),
                                  jnp.int32(rows), amx=True))
        xg, xu = _reference(x, gate[layer]), _reference(x, up[layer])
        np.testing.assert_allclose(out[:rows], (_silu(xg) * xu)[:rows], rtol=2e-5, atol=2e-4)
        np.testing.assert_array_equal(out[rows:], 0)
        plain = np.asarray(_by_path(jnp.asarray(x), pack(up, 1, stacked=True).at_layer(layer), jnp.int32(rows),
                                    amx=True))
        np.testing.assert_allclose(plain[:rows], xu[:rows], rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(plain[rows:], 0)


def test_amx_switch_reaches_the_kernel(monkeypatch):
    # amx=None follows JAXLLM_CPU_MATMUL_AMX at trace time; the choice is the custom call's attribute.
    pw = pack(np.ones((8, 16), np.float32), 1)

    def attributes(**kwargs):
        text = jax.jit(lambda x: packed_matmul(x, pw, **kwargs)).lower(jnp.ones((4, 8))).as_text()
        return re.search(r"mhlo.backend_config = \{([^}]*)\}", text).group(1)

    assert attributes() == "amx = true, gated = false"
    assert attributes(amx=False) == "amx = false, gated = false"
    monkeypatch.setenv("JAXLLM_CPU_MATMUL_AMX", "0")
    assert attributes() == "amx = false, gated = false"
    assert attributes(amx=True) == "amx = true, gated = false"
    assert isinstance(amx_usable(), bool)


# bfloat16 weights: panels of row pairs, AVX512-BF16 pair dot products (or FMAs on widened pairs
# where the CPU lacks them). x is rounded to bfloat16; the products are exact in float32 and summed
# in float32, so the reference is the float64 product of the rounded operands.
def _bf16(a):
    return np.asarray(jnp.asarray(a, jnp.bfloat16))


def _bf16_reference(x, w):
    return _reference(_bf16(x).astype(np.float32), _bf16(w).astype(np.float32))


@pytest.mark.parametrize("M", [1, 5, 13, 64, 131])
@pytest.mark.parametrize("K,N", [(8, 10), (576, 70), (37, 200), (1536, 130)])
def test_bfloat16_weights_match_reference(M, K, N):
    rng = np.random.default_rng(M * 1000 + K + N)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = _bf16(rng.standard_normal((K, N)))
    pw = pack(w, 1)
    assert pw.bf16 and pw.data.dtype == jnp.uint16 and pw.data.shape == (-(-N // 64), -(-K // 2), 128)
    np.testing.assert_array_equal(np.asarray(unpack(pw)).view(np.uint16), w.view(np.uint16))
    out = np.asarray(_matmul(jnp.asarray(x), pw))  # float32 x: rounded to bfloat16, result in float32
    assert out.dtype == np.float32 and out.shape == (M, N)
    np.testing.assert_allclose(out, _bf16_reference(x, w), rtol=1e-5, atol=1e-5 * np.sqrt(K))
    assert _relative_error(out, _bf16(x).astype(np.float32), w.astype(np.float32)) < K * 2**-24
    # A bfloat16 x gets a bfloat16 result: the float32 one rounded.
    half = np.asarray(_matmul(jnp.asarray(x, jnp.bfloat16), pw))
    assert half.dtype == jnp.bfloat16
    np.testing.assert_array_equal(half.view(np.uint16), _bf16(out).view(np.uint16))


@pytest.mark.parametrize("M,rows", [(3, 3), (20, 13), (70, 61)])
def test_bfloat16_gated_stacked_and_padding_rows(M, rows):
    rng = np.random.default_rng(M)
    x = _bf16(rng.standard_normal((M, 25)))  # odd K: the last pair is padded
    gate, up = _bf16(10 * rng.standard_normal((3, 25, 100))), _bf16(rng.standard_normal((3, 25, 100)))
    pw = pack_gated(gate, up, stacked=True)
    assert pw.gated and pw.bf16 and pw.data.shape == (3, 4, 13, 128) and pw.shape == (3, 25, 100)
    g, u = unpack(pw)
    np.testing.assert_array_equal(np.asarray(g).view(np.uint16), gate.view(np.uint16))
    np.testing.assert_array_equal(np.asarray(u).view(np.uint16), up.view(np.uint16))
    xf = x.astype(np.float32)
    for layer in (0, 2):
        out = np.asarray(jax.jit(packed_matmul)(jnp.asarray(xf), pw.at_layer(layer), jnp.int32(rows)))
        xg, xu = _bf16_reference(xf, gate[layer]), _bf16_reference(xf, up[layer])
        assert np.abs(xg).max() > 50
        np.testing.assert_allclose(out[:rows], (_silu(xg) * xu)[:rows], rtol=2e-5, atol=2e-4)
        np.testing.assert_array_equal(out[rows:], 0)
        plain = np.asarray(jax.jit(packed_matmul)(jnp.asarray(xf), pack(up, 1, stacked=True).at_layer(layer),
                                                  jnp.int32(rows)))
        np.testing.assert_allclose(plain[:rows], xu[:rows], rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(plain[rows:], 0)


def test_bfloat16_head_axes_and_rows_independent_of_the_batch():
    rng = np.random.default_rng(5)
    wo = _bf16(rng.standard_normal((3, 8, 16)))
    q = _bf16(rng.standard_normal((40, 3, 8)))
    po = pack(wo, 2)
    np.testing.assert_array_equal(np.asarray(unpack(po)).view(np.uint16), wo.view(np.uint16))
    out = np.asarray(packed_einsum("tnh,nhd->td", jnp.asarray(q, jnp.float32), po))
    ref = np.einsum("tnh,nhd->td", q.astype(np.float64), wo.astype(np.float64))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
    # A row's result does not depend on the other rows (here: on how many there are).
    for rows in (1, 7, 39):
        part = np.asarray(packed_einsum("tnh,nhd->td", jnp.asarray(q[:rows], jnp.float32), po))
        np.testing.assert_array_equal(part, out[:rows])


_FALLBACK = """
import sys
import jax, jax.numpy as jnp, numpy as np
import pallas_kernels.cpu_kernels as ck
ck._FLAGS = ck._FLAGS + ("-mno-avx512bf16",)
from pallas_kernels.cpu_matmul import pack_gated, packed_matmul
rng = np.random.default_rng(0)
x = rng.standard_normal((19, 300)).astype(np.float32)
gate, up = (jnp.asarray(rng.standard_normal((300, 130)), jnp.bfloat16) for _ in range(2))
out = np.asarray(jax.jit(packed_matmul)(jnp.asarray(x), pack_gated(gate, up)))
np.save(sys.argv[1], out)
print(ck._library().name)
"""


def test_bfloat16_without_avx512_bf16_instructions(tmp_path):
    # The widening fallback, built with AVX512-BF16 turned off (in a subprocess, its own cache).
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAXLLM_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", _FALLBACK, str(tmp_path / "out.npy")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    library = tmp_path / "cache" / result.stdout.split()[-1]
    assert library.exists() and b"vdpbf16ps" not in subprocess.run(["objdump", "-d", str(library)],
                                                                   capture_output=True).stdout
    rng = np.random.default_rng(0)
    x = rng.standard_normal((19, 300)).astype(np.float32)
    gate, up = (_bf16(rng.standard_normal((300, 130))) for _ in range(2))
    expected = _silu(_bf16_reference(x, gate)) * _bf16_reference(x, up)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=2e-5, atol=2e-4)


def _tiny(tmp_path, family="llama", dtype="float32"):
    return jaxllm.load_model(str(make_tiny_checkpoint(family, tmp_path)), dtype=dtype)


@pytest.mark.parametrize("family", ["llama", "smollm2"])
def test_pack_params_packs_float32_matmul_weights_and_the_head(tmp_path, family):
    model = _tiny(tmp_path, family)
    params, tied = model.params, model.config.tie_word_embeddings
    assert tied == (family == "smollm2")
    packed = pack_params(params, tied, "cpu", cpu_matmul=True, hidden_act=model.config.hidden_act)
    for name in ("wq", "wk", "wv", "wo", "w_down"):
        assert isinstance(packed["layers"][name], PackedMatrix), name
        np.testing.assert_array_equal(np.asarray(unpack(packed["layers"][name])), np.asarray(params["layers"][name]))
    # SwiGLU: gate and up become one gated weight.
    assert "w_gate" not in packed["layers"] and "w_up" not in packed["layers"]
    gate, up = unpack(packed["layers"]["w_gate_up"])
    np.testing.assert_array_equal(np.asarray(gate), np.asarray(params["layers"]["w_gate"]))
    np.testing.assert_array_equal(np.asarray(up), np.asarray(params["layers"]["w_up"]))
    other = pack_params(params, tied, "cpu", cpu_matmul=True, hidden_act="gelu")
    assert isinstance(other["layers"]["w_gate"], PackedMatrix) and "w_gate_up" not in other["layers"]
    assert not isinstance(packed["layers"]["attn_norm"], PackedMatrix)
    head = output_head(packed, tied)
    assert isinstance(head, PackedMatrix)
    np.testing.assert_array_equal(np.asarray(unpack(head)), np.asarray(output_head(params, tied)))
    # A tied model keeps one copy: the packed head is its embedding too, read a column per token.
    assert (packed["embed"] is head) == tied
    ids = jnp.asarray([0, 1, 63, 64, model.config.vocab_size - 1, 1], jnp.int32)
    np.testing.assert_array_equal(np.asarray(jax.jit(embed)(packed, ids)), np.asarray(params["embed"])[np.asarray(ids)])
    # Not asked, another platform, or 16-bit weights: unchanged layout.
    assert pack_params(params, tied, "cpu")["layers"]["wq"] is params["layers"]["wq"]
    assert pack_params(params, tied, "gpu", cpu_matmul=True)["layers"]["wq"] is params["layers"]["wq"]
    # bfloat16 weights are packed as row pairs, their other layer weights kept as bits; float16
    # ones are not packed.
    bf16 = _tiny(tmp_path / "bf16", family, dtype="bfloat16").params
    packed16 = pack_params(bf16, tied, "cpu", cpu_matmul=True, hidden_act=model.config.hidden_act)
    assert packed16["layers"]["wq"].bf16 and output_head(packed16, tied).bf16
    np.testing.assert_array_equal(np.asarray(embed(packed16, ids)).view(np.uint16),
                                  np.asarray(bf16["embed"])[np.asarray(ids)].view(np.uint16))
    np.testing.assert_array_equal(np.asarray(unpack(packed16["layers"]["w_down"])).view(np.uint16),
                                  np.asarray(bf16["layers"]["w_down"]).view(np.uint16))
    assert packed16["layers"]["attn_norm"].dtype == jnp.uint16
    fp16 = _tiny(tmp_path / "fp16", family, dtype="float16").params
    assert not isinstance(pack_params(fp16, tied, "cpu", cpu_matmul=True)["layers"]["wq"], PackedMatrix)


def _step_logits(model, weights, packed: bool) -> np.ndarray:
    """Logits (float64) of one mixed step of ``model`` on ``weights`` (3 sequences: a prompt, a
    decode, a chunk), the weights packed for the kernel or not; the real tokens' rows only."""
    cfg = model.config
    batch = make_batch(8, [5, 1, 9], [5, 8, 12], block_size=16, num_kv_heads=cfg.num_kv_heads,
                       group=cfg.num_heads // cfg.num_kv_heads, head_dim=cfg.head_dim)
    md = batch.metadata()
    assert md.positions.shape[0] > batch.num_real_tokens  # padding tokens' rows are zeros through the kernel
    forward = jax.jit(functools.partial(model_module(cfg).forward, cfg=cfg, attend=xla_paged_attention))
    token_ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, md.positions.shape[0]), jnp.int32)
    p = pack_params(weights, cfg.tie_word_embeddings, "cpu", cpu_matmul=packed, hidden_act=cfg.hidden_act)
    assert isinstance(output_head(p, cfg.tie_word_embeddings), PackedMatrix) == packed
    kv = kv_pool.allocate(cfg, batch.k_pool.shape[1], 16, jnp.float32)
    hidden, _ = forward(p, kv=kv, token_ids=token_ids, md=md)
    logits = head_logits(hidden, output_head(p, cfg.tie_word_embeddings))
    return np.asarray(logits, np.float64)[: batch.num_real_tokens]


@pytest.mark.parametrize("family", ["llama", "opt350m"])
def test_forward_and_logits_match_unpacked(tmp_path, family):
    # The whole model on packed weights against the same weights through XLA's dots.
    model = _tiny(tmp_path, family)
    np.testing.assert_allclose(_step_logits(model, model.params, True), _step_logits(model, model.params, False),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "smollm2"])
def test_bfloat16_forward_is_as_close_to_float32_as_xla(tmp_path, family):
    # A bfloat16 model through the kernel against the same (rounded) weights in float32, and
    # beside it the bfloat16 model through XLA's dots: the kernel sums in float32 and rounds each
    # matmul's result once (the gated MLP's activation included), so it is no further off.
    model = _tiny(tmp_path, family, dtype="bfloat16")
    as_f32 = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, model.params)
    truth = _step_logits(model, as_f32, False)
    kernel, xla = (np.sqrt(np.mean((_step_logits(model, model.params, packed) - truth) ** 2)) for packed in (True, False))
    assert 0 < kernel <= 1.1 * xla and kernel < 0.05 * np.sqrt(np.mean(truth**2)), (kernel, xla)


def _weight_slices(hlo: str) -> list[str]:
    # Result shapes of the dynamic slices with 2+ axes: a layer's matrix cut from a stack (the
    # norms' slices are vectors).
    shapes = re.findall(r"= f32\[([\d,]+)\]\S* dynamic-slice\(", hlo)
    return [shape for shape in shapes if len([d for d in shape.split(",") if d != "1"]) >= 2]


def test_engine_step_reads_packed_weights_in_place(tmp_path):
    # The cpu backend's engine packs the weights: its compiled step calls the matmul kernel for
    # every projection and the head, and slices no weight stack.
    model = _tiny(tmp_path)
    llm = LLM(model, attention_backend="cpu", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16)
    runner = llm.llm_engine.runner
    assert isinstance(runner.params["layers"]["w_gate_up"], PackedMatrix)
    assert not model.config.tie_word_embeddings and runner.params["embed"] is model.params["embed"]
    hlo = runner._lower(16, runner.buckets.block_buckets[0]).compile().as_text()
    # q, k, v, o, gate with up, down in the loop; the head for sampling and for prompt logprobs.
    assert hlo.count('custom_call_target="jaxllm_cpu_matmul"') == 8
    assert _weight_slices(hlo) == []
    xla = LLM(model, attention_backend="xla", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16)
    assert not isinstance(xla.llm_engine.runner.params["layers"]["w_up"], PackedMatrix)
    xla_runner = xla.llm_engine.runner
    assert len(_weight_slices(xla_runner._lower(16, xla_runner.buckets.block_buckets[0]).compile().as_text())) >= 7
    assert "w_gate_up" not in xla_runner.params["layers"]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 9, 23, 4, 77]}, {"prompt_token_ids": [8, 44]}]
    assert ([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in xla.generate(prompts, params, use_tqdm=False)])


def test_bfloat16_engine_step_reads_packed_pairs_and_rows_do_not_depend_on_the_batch(tmp_path):
    llm = LLM(str(make_tiny_checkpoint("llama", tmp_path)), dtype="bfloat16", attention_backend="cpu", max_model_len=64, max_num_seqs=4,
              max_num_batched_tokens=16)
    runner = llm.llm_engine.runner
    assert runner.params["layers"]["w_gate_up"].bf16
    hlo = runner._lower(16, runner.buckets.block_buckets[0]).compile().as_text()
    assert hlo.count('custom_call_target="jaxllm_cpu_matmul_bf16"') == 8
    assert 'custom_call_target="jaxllm_cpu_matmul"' not in hlo
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 9, 23, 4, 77]}, {"prompt_token_ids": [8, 44]},
               {"prompt_token_ids": list(range(3, 30))}]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert together == alone and all(len(t) == 8 for t in together)


def test_cpu_backend_asks_for_packed_matmuls():
    assert cpu_paged_attention.cpu_matmul is True
    assert getattr(xla_paged_attention, "cpu_matmul", False) is False
