"""Quantised KV cache (fp8 e4m3, int8): round-trip bounds, attention against float32, the Pallas
kernels against the xla backend on the same quantised pool, pool sizes, SmolLM2 end to end.

Tolerances.
- Round trip, per element of a row with scale s = absmax / max: int8 rounds x / s to an integer,
  so |error| <= s / 2; e4m3 keeps 3 mantissa bits, so |error| <= 2**-4 |x| for scaled values in
  its normal range, and <= half its subnormal spacing 2**-9, i.e. 2**-10 s, below it. 1e-6 of
  slack covers the float32 division and multiply.
- Attention on a quantised pool vs the float32 reference over the DEQUANTISED pool: the same
  numbers in a different order, float32 accumulation: 2e-5 as in test_kernels.py. This is the
  test that catches a wrong page, mask or scale (they move outputs by O(1)).
- vs the float32 reference over the ORIGINAL pool: outputs are convex combinations of N(0, 1)
  values (H = 64, rows' absmax ~2.5-4). int8: value error <= s/2 ~ 0.016 passes straight
  through; key error perturbs scores by q . dk / 8 with dk uniform in +-s/2 (std ~ 0.005).
  e4m3 errors are ~8x larger (relative 2**-4 vs int8's 2**-8 at absmax). Bounds below are about
  1.8x the largest error measured over these (seeded) batches: int8 0.017, fp8 0.114.
- SmolLM2 end to end: int8 keeps its greedy tokens equal to the float32 cache's for the first
  24 of every prompt, the chosen tokens' logprobs within 0.15 (measured max 0.099) and 0.03 on
  average (measured 0.012). fp8 diverges sooner (after 5-64 greedy tokens on these prompts) and
  is not asserted end to end.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.config import CacheConfig, ModelConfig
from jaxllm.models.attention import get_attention_backend, read_kv, write_kv, xla_paged_attention
from jaxllm.models.kv_quant import QuantizedKVPool, dequantize, kv_storage_dtype, quantize, unpack
from jaxllm.runner import kv_pool
from jaxllm.runner.swap import HostSwapSpace
from pallas_kernels.paged_decode_attention import paged_decode_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.testing import make_batch

FORMATS = {"fp8": jnp.uint8, "int8": jnp.int8}  # storage dtypes: fp8 values as their uint8 bits
LIMITS = {"fp8": 448.0, "int8": 127.0}
TINY = ModelConfig(family="llama", architecture="LlamaForCausalLM", vocab_size=32, hidden_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=64)
FLOAT32_TOLERANCE = {"fp8": 0.2, "int8": 0.03}  # attention vs the unquantised pool, see above


def quantized_pool(k_pool, v_pool, dtype) -> QuantizedKVPool:
    (k, k_scale), (v, v_scale) = quantize(k_pool, dtype), quantize(v_pool, dtype)
    return QuantizedKVPool(k, v, k_scale, v_scale)


def dequantized(pool: QuantizedKVPool) -> tuple[jax.Array, jax.Array]:
    return dequantize(pool.k, pool.k_scale, jnp.float32), dequantize(pool.v, pool.v_scale, jnp.float32)


@pytest.mark.parametrize("name", FORMATS)
def test_round_trip_error_bounds(name):
    rng = np.random.default_rng(0)
    # Rows of 128 spanning magnitudes 1e-3..1e3, one all-zero row.
    x = rng.normal(size=(64, 4, 128)) * np.exp(rng.uniform(-7, 7, size=(64, 4, 1)))
    x[0, 0] = 0
    x = jnp.asarray(x, jnp.float32)
    values, scale = quantize(x, FORMATS[name])
    assert values.dtype == FORMATS[name] and scale.shape == (64, 4) and scale.dtype == jnp.float32
    np.testing.assert_array_equal(scale, jnp.max(jnp.abs(x), axis=-1) / LIMITS[name])
    err = np.abs(np.asarray(dequantize(values, scale, jnp.float32) - x))
    s = np.asarray(scale)[..., None]
    if name == "int8":
        bound = s / 2
    else:
        bound = 2**-4 * np.abs(np.asarray(x)) + 2**-10 * s
    assert (err <= bound * (1 + 1e-6) + 1e-6 * np.abs(np.asarray(x))).all()
    assert err[0, 0].max() == 0 and float(scale[0, 0]) == 0
    # Each row's absmax element lands on the format's largest value.
    np.testing.assert_array_equal(np.abs(np.asarray(unpack(values), np.float32)).max(-1)[1:], LIMITS[name])
    print(f"{name}: largest error is {np.max(err / np.maximum(bound, 1e-30)):.3f} of its bound")


@pytest.mark.parametrize("name", FORMATS)
def test_write_kv_then_read_kv_round_trips(name):
    pool = kv_pool.allocate(TINY, 4, 8, FORMATS[name])
    rng = np.random.default_rng(1)
    k, v = (jnp.asarray(rng.normal(size=(5, 2, 16)), jnp.float32) for _ in range(2))
    slots = jnp.array([8, 9, 17, 31, 0], jnp.int32)  # blocks 1, 1, 2, 3 and the null block
    pool = write_kv(pool, jnp.int32(1), k, v, slots)
    got_k, got_v = read_kv(pool, jnp.int32(1), (slots // 8, slots % 8), jnp.float32)
    for got, want in ((got_k, k), (got_v, v)):
        np.testing.assert_array_equal(got, dequantize(*quantize(want, FORMATS[name]), jnp.float32))
    assert not np.asarray(pool.k[0], np.float32).any()  # layer 0 untouched


@pytest.mark.parametrize("name", FORMATS)
def test_xla_attention_on_quantized_pool(name):
    batch = make_batch(10, [0, 1, 1, 19, 5], [0, 16, 41, 37, 5], block_size=16, num_kv_heads=2, group=4,
                       head_dim=64)
    pool = quantized_pool(batch.k_pool, batch.v_pool, FORMATS[name])
    n, md = batch.num_real_tokens, batch.metadata()
    for window in (None, 9):
        out = np.asarray(xla_paged_attention(batch.q, pool, batch.layer, md, window))[:n]
        args = (batch.q, *dequantized(pool), *batch.kernel_args()[3:])
        exact = np.asarray(ragged_paged_attention_reference(*args, sliding_window=window))[:n]
        np.testing.assert_allclose(out, exact, atol=2e-5, rtol=2e-5)
        full = np.asarray(ragged_paged_attention_reference(*batch.kernel_args(), sliding_window=window))[:n]
        err = np.abs(out - full).max()
        print(f"{name} window={window}: max |error| vs float32 pool {err:.4f}")
        assert 0 < err <= FLOAT32_TOLERANCE[name]


@pytest.mark.parametrize("name,mixed", [("fp8", True), ("int8", True), ("fp8", False), ("int8", False)])
def test_pallas_backend_equals_xla_on_quantized_pool(name, mixed):
    """Decode batches take the split-K kernel, mixed ones the ragged kernel; both read the scales."""
    q_lens, kv_lens = ([5, 1, 1], [21, 40, 16]) if mixed else ([1, 1, 0, 1], [21, 40, 0, 16])
    batch = make_batch(6, q_lens, kv_lens, block_size=16, num_kv_heads=2, group=4, head_dim=64)
    pool, md = quantized_pool(batch.k_pool, batch.v_pool, FORMATS[name]), batch.metadata()
    out = jax.jit(get_attention_backend("pallas"), static_argnums=4)(batch.q, pool, batch.layer, md, 12)
    ref = xla_paged_attention(batch.q, pool, batch.layer, md, 12)
    n = batch.num_real_tokens
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_allclose(np.asarray(out)[:n], np.asarray(ref)[:n], atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(out)[n:], 0)


def test_copy_and_swap_move_scales_with_values():
    rng = np.random.default_rng(2)
    k, v = (jnp.asarray(rng.normal(size=(2, 6, 8, 2, 16)), jnp.float32) for _ in range(2))
    pool = quantized_pool(k, v, jnp.int8)
    copied = kv_pool.copy_blocks(pool, jnp.array([1, 0]), jnp.array([4, 0]))
    for before, after in zip(pool, copied, strict=True):
        np.testing.assert_array_equal(after[:, 4], before[:, 1])
    swap = HostSwapSpace(pool, num_slots=3)
    swap.swap_out(pool, [(2, 0), (3, 2)])
    empty = kv_pool.allocate(TINY, 6, 8, jnp.int8)
    restored = swap.swap_in(empty, [(2, 5), (0, 1)])
    assert isinstance(restored, QuantizedKVPool)
    for before, after in zip(pool, restored, strict=True):
        np.testing.assert_array_equal(after[:, 5], before[:, 3])
        np.testing.assert_array_equal(after[:, 1], before[:, 2])


def test_kv_cache_dtype_names():
    assert kv_storage_dtype("auto", jnp.bfloat16, "gpu") == jnp.bfloat16
    assert kv_storage_dtype("fp8", jnp.float32, "gpu") == jnp.uint8 and unpack(jnp.uint8(0x7E)) == 448  # e4m3 max
    assert kv_storage_dtype("int8", jnp.bfloat16, "gpu") == jnp.int8
    with pytest.raises(ValueError, match="kv_cache_dtype='fp16' must be one of"):
        CacheConfig(kv_cache_dtype="fp16")


def test_bytes_per_block_counts_scales(smollm2_model):
    cfg = smollm2_model.config  # 30 layers, 3 kv heads, head_dim 64
    per_block = {name: kv_pool.bytes_per_block(cfg, 16, dtype)
                 for name, dtype in [("float32", jnp.float32), ("bfloat16", jnp.bfloat16), *FORMATS.items()]}
    values = 2 * 30 * 16 * 3 * 64  # K and V elements of one block
    assert per_block == {"float32": 4 * values, "bfloat16": 2 * values,
                         "fp8": values + 2 * 30 * 16 * 3 * 4, "int8": values + 2 * 30 * 16 * 3 * 4}
    assert per_block["int8"] == 195840 and per_block["int8"] / per_block["bfloat16"] == 68 / 128


MAX_TOKENS = 24
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 4,",
]
SAME_TOKENS = 24  # greedy tokens of every prompt that the int8 cache reproduces exactly (measured: 34-64)


def test_int8_cache_on_smollm2_matches_float32_cache(smollm2_model):
    # test_llm.py's limits and CPU pool budget: the float32 engine's programs are compiled once for both.
    limits = dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64, kv_cache_memory_bytes=1 << 30)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    runs, llms = {}, {}
    for name in ("auto", "int8"):
        llms[name] = LLM(smollm2_model, kv_cache_dtype=name, **limits)
        compiles = llms[name].llm_engine.stats.num_compiles
        runs[name] = [o.outputs[0] for o in llms[name].generate(PROMPTS, greedy, use_tqdm=False)]
        assert llms[name].llm_engine.stats.num_compiles == compiles  # warm-up covered every shape
    runner = llms["int8"].llm_engine.runner
    assert isinstance(runner.kv, QuantizedKVPool) and runner.kv.k.dtype == jnp.int8
    per_block = kv_pool.bytes_per_block(smollm2_model.config, 16, jnp.int8)
    assert runner.num_blocks == (1 << 30) // per_block == 5482  # float32: 1456 blocks
    errors = []
    for want, got in zip(runs["auto"], runs["int8"], strict=True):
        assert got.token_ids[:SAME_TOKENS] == want.token_ids[:SAME_TOKENS]
        for i, token in enumerate(got.token_ids[:SAME_TOKENS]):
            errors.append(abs(got.logprobs[i][token].logprob - want.logprobs[i][token].logprob))
    print(f"int8 vs float32 cache, chosen tokens' logprobs: max |diff| {max(errors):.4f}, mean {np.mean(errors):.4f}")
    assert max(errors) <= 0.15 and np.mean(errors) <= 0.03


@pytest.mark.parametrize("name", FORMATS)
def test_quantized_kernels_lower_for_cuda(name):
    """With no GPU at hand: one-byte page loads, the fp8 bitcast and the scale loads lower to Triton."""
    batch = make_batch(8, [0, 1, 19, 5], [0, 40, 37, 5], block_size=16, num_kv_heads=2, group=4, head_dim=128,
                       dtype=jnp.bfloat16)
    pool = quantized_pool(batch.k_pool, batch.v_pool, FORMATS[name])
    scales = dict(k_scale=pool.k_scale, v_scale=pool.v_scale)
    args = (batch.q, pool.k, pool.v, *batch.kernel_args()[3:])
    text = jax.jit(functools.partial(ragged_paged_attention, **scales)).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
    decode_args = (batch.q[:4], pool.k, pool.v, batch.layer, batch.block_tables, batch.kv_lens)
    text = jax.jit(functools.partial(paged_decode_attention, **scales)).trace(*decode_args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
