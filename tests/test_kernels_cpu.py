"""The "cpu" attention backend (C++ kernel through XLA's FFI) against the references.

Batches come from pallas_kernels.testing: random block permutations, NaN in every slot no
sequence wrote, empty rows, decode tokens on and off page edges, prefill chunks across pages, and
padding tokens after the real ones (the kernel gives them zero rows). Tolerance: both sides
accumulate float32 in different orders over convex combinations of N(0, 1) values (see
test_kernels.py), and the kernel's exp is a polynomial within about 1 ulp of the true one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import make_tiny_checkpoint

import jaxllm
from jaxllm import LLM, SamplingParams
from jaxllm.models import attention
from jaxllm.models.attention import AttentionMetadata, get_attention_backend, xla_paged_attention
from jaxllm.models.kv_quant import BF16_BITS, QuantizedKVPool, quantize
from jaxllm.runner.batch import Buckets
from pallas_kernels import cpu_kernels
from pallas_kernels.cpu_attention import cpu_paged_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from pallas_kernels.testing import make_batch

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the cpu backend runs on the CPU only")

_kernel = jax.jit(cpu_paged_attention, static_argnums=4)


def _check(batch, window, out, ref, atol=2e-5):
    n = batch.num_real_tokens
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out[:n], ref[:n], atol=atol, rtol=atol)
    np.testing.assert_array_equal(out[n:], 0)


# (group, head_dim, block_size): GQA 1..8; head dims 64 and 128 (unrolled paths) and 80 (generic).
@pytest.mark.parametrize("group,head_dim,block_size", [(1, 64, 16), (3, 64, 16), (4, 128, 32), (8, 80, 8)])
@pytest.mark.parametrize("window", [None, 9])
def test_matches_reference(group, head_dim, block_size, window):
    # Decode at contexts 1, a page edge and past it, a 19-token chunk continuing mid-page, a whole
    # prompt, an empty row, and a long decode whose key range spans many blocks.
    q_lens, kv_lens = [0, 1, 1, 1, 19, 5, 1], [0, 1, block_size, block_size + 1, 37, 5, 150]
    batch = make_batch(0, q_lens, kv_lens, block_size=block_size, num_kv_heads=2, group=group, head_dim=head_dim)
    ref = ragged_paged_attention_reference(*batch.kernel_args(), sliding_window=window)
    out = _kernel(batch.q, (batch.k_pool, batch.v_pool), batch.layer, batch.metadata(), window)
    _check(batch, window, out, ref)


def test_long_prefill_chunks_equal_xla_backend():
    # Several 8-token tiles per sequence, rows of a tile ending on different blocks.
    batch = make_batch(1, [64, 33, 1], [64, 90, 200], block_size=16, num_kv_heads=3, group=3, head_dim=64,
                       extra_tokens=31)
    kv, md = (batch.k_pool, batch.v_pool), batch.metadata()
    out = _kernel(batch.q, kv, batch.layer, md, None)
    _check(batch, None, out, xla_paged_attention(batch.q, kv, batch.layer, md, None))


@pytest.mark.parametrize("num_seqs", [2, 70])
def test_few_and_many_decodes_equal_xla_backend(num_seqs):
    # Few (sequence, tile) units: each kv head is its own unit; many (more than 4 per thread on up
    # to 16 threads): a unit reads all kv heads of its blocks.
    rng = np.random.default_rng(num_seqs)
    kv_lens = [int(n) for n in rng.integers(1, 120, num_seqs)]
    batch = make_batch(5, [1] * num_seqs, kv_lens, block_size=16, num_kv_heads=3, group=3, head_dim=64)
    kv, md = (batch.k_pool, batch.v_pool), batch.metadata()
    out = _kernel(batch.q, kv, batch.layer, md, 50)
    _check(batch, 50, out, xla_paged_attention(batch.q, kv, batch.layer, md, 50))


def test_bfloat16_q_and_pools():
    batch = make_batch(2, [1, 7, 1], [40, 7, 16], block_size=16, num_kv_heads=2, group=2, head_dim=64,
                       dtype=jnp.bfloat16)
    md = batch.metadata()
    for pool in ((batch.k_pool, batch.v_pool), (batch.k_pool.astype(jnp.float32), batch.v_pool.astype(jnp.float32))):
        out = _kernel(batch.q, pool, batch.layer, md, None)
        assert out.dtype == jnp.bfloat16
        ref = xla_paged_attention(batch.q, pool, batch.layer, md, None)  # float32 inside, bf16 out
        _check(batch, None, out, ref, atol=1e-2)  # both round the same float32 result to bf16
    # The engine's CPU pool of a bfloat16 model: uint16 bits, read as the bfloat16 values they
    # are (the same numbers as the float32 pool above, summed in the same order).
    bits = tuple(jax.lax.bitcast_convert_type(x, BF16_BITS) for x in (batch.k_pool, batch.v_pool))
    assert bits[0].dtype == jnp.uint16
    wide = (batch.k_pool.astype(jnp.float32), batch.v_pool.astype(jnp.float32))
    for window in (None, 9):
        np.testing.assert_array_equal(np.asarray(_kernel(batch.q, bits, batch.layer, md, window), np.float32),
                                      np.asarray(_kernel(batch.q, wide, batch.layer, md, window), np.float32))
        native = (batch.k_pool, batch.v_pool)  # the xla backend views the bits as bfloat16 when it reads them
        np.testing.assert_array_equal(np.asarray(xla_paged_attention(batch.q, bits, batch.layer, md, window), np.float32),
                                      np.asarray(xla_paged_attention(batch.q, native, batch.layer, md, window), np.float32))


@pytest.mark.parametrize("storage", [jnp.int8, jnp.uint8], ids=["int8", "fp8"])
def test_quantized_pool_equals_xla_backend(storage):
    batch = make_batch(3, [0, 1, 1, 19, 5], [0, 16, 41, 37, 5], block_size=16, num_kv_heads=2, group=4, head_dim=64)
    (k, k_scale), (v, v_scale) = quantize(batch.k_pool, storage), quantize(batch.v_pool, storage)
    pool, md = QuantizedKVPool(k, v, k_scale, v_scale), batch.metadata()
    for window in (None, 9):
        out = _kernel(batch.q, pool, batch.layer, md, window)
        _check(batch, window, out, xla_paged_attention(batch.q, pool, batch.layer, md, window))


def test_every_fp8_byte_decodes_like_jax():
    # One sequence per finite fp8 byte, its only key (V = K, scale 1) holding the byte in element
    # 0: a one-key context's output row is that value row, so element 0 is the decoded byte.
    values = np.arange(256, dtype=np.uint8)
    finite = ~np.isnan(np.asarray(jnp.asarray(values).view(jnp.float8_e4m3fn).astype(jnp.float32)))
    values = values[finite]
    n = len(values)
    head_dim = 16
    k = np.zeros((1, n + 1, 1, 1, head_dim), np.uint8)
    k[0, 1:, 0, 0, 0] = values  # block b + 1 holds byte values[b] in its first element
    scales = np.ones((1, n + 1, 1, 1), np.float32)
    q = np.zeros((n, 1, head_dim), np.float32)
    q[:, 0, 0] = 1.0
    md = AttentionMetadata(positions=jnp.zeros(n, jnp.int32), slot_mapping=jnp.zeros(n, jnp.int32),
                           seq_ids=jnp.arange(n, dtype=jnp.int32),
                           block_tables=jnp.arange(1, n + 1, dtype=jnp.int32)[:, None],
                           cu_q_lens=jnp.arange(n + 1, dtype=jnp.int32), kv_lens=jnp.ones(n, jnp.int32))
    pool = QuantizedKVPool(jnp.asarray(k), jnp.asarray(k), jnp.asarray(scales), jnp.asarray(scales))
    out = np.asarray(_kernel(jnp.asarray(q), pool, jnp.int32(0), md, None))
    expected = np.asarray(jnp.asarray(values).view(jnp.float8_e4m3fn).astype(jnp.float32))
    np.testing.assert_array_equal(out[:, 0, 0], expected)  # one key: the output is its value row


@pytest.mark.parametrize("bad", ["block id", "position past the table", "negative position"])
def test_bad_metadata_is_an_error_not_a_wild_read(bad):
    batch = make_batch(4, [1], [20], block_size=16, num_kv_heads=2, group=2, head_dim=64)
    md = batch.metadata()
    tables, positions = md.block_tables, md.positions
    if bad == "block id":
        tables = tables.at[0, 1].set(10_000)
    else:
        positions = positions.at[0].set(-1 if bad == "negative position" else 16 * tables.shape[1])
    bad = AttentionMetadata(positions, md.slot_mapping, md.seq_ids, tables, md.cu_q_lens, md.kv_lens)
    with pytest.raises(Exception, match="outside its block table or the pool"):
        jax.block_until_ready(_kernel(batch.q, (batch.k_pool, batch.v_pool), batch.layer, bad, None))


def test_auto_is_cpu_here_and_falls_back_to_xla_without_a_compiler(monkeypatch, caplog):
    assert cpu_kernels.cpu_kernels_unavailable_reason() is None
    assert get_attention_backend("auto") is cpu_paged_attention
    assert get_attention_backend("cpu") is cpu_paged_attention

    monkeypatch.setattr(attention, "_unavailable_reason", lambda name: "no C++ compiler: 'g++' is not on PATH")
    assert get_attention_backend("auto") is xla_paged_attention
    assert "the 'cpu' kernel is unavailable: no C++ compiler" in caplog.text


def test_build_without_compiler_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(tmp_path))
    cpu_kernels._library.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="no C\\+\\+ compiler: 'no-such-compiler-xyz' is not on PATH"):
            cpu_kernels._library()
    finally:
        cpu_kernels._library.cache_clear()
    assert list(tmp_path.iterdir()) == []


def test_a_failing_build_is_asked_once_per_process(monkeypatch):
    calls = []

    def failing_build():
        calls.append(1)
        raise RuntimeError("compiling cpu_paged_attention.cc failed")

    monkeypatch.setattr(cpu_kernels, "_register", failing_build)
    cpu_kernels.cpu_kernels_unavailable_reason.cache_clear()
    try:
        for _ in range(3):
            assert cpu_kernels.cpu_kernels_unavailable_reason() == "compiling cpu_paged_attention.cc failed"
        assert len(calls) == 1  # engines created later do not run the compiler again
    finally:
        cpu_kernels.cpu_kernels_unavailable_reason.cache_clear()


def test_build_is_cached_by_source(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(tmp_path))
    cpu_kernels._library.cache_clear()
    try:
        path = cpu_kernels._library()
        assert path.parent == tmp_path and path.name.startswith("libjaxllm_cpu_kernels_")
        mtime = path.stat().st_mtime_ns
        cpu_kernels._library.cache_clear()
        assert cpu_kernels._library() == path and path.stat().st_mtime_ns == mtime  # found, not rebuilt
    finally:
        cpu_kernels._library.cache_clear()


LIMITS = dict(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, block_size=16)
PROMPTS = [[5, 9, 23, 4, 77, 3, 18, 2, 40, 11, 6, 31, 8, 19, 52, 7, 21, 13, 90], [61, 2], [8, 44, 5, 3, 12, 9]]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_tiny_llama_cpu_equals_xla(tmp_path, kv_cache_dtype):
    # 19 + 2 + 6 prompt tokens over a 16-token budget: chunked prefill mixed with decode steps.
    model = jaxllm.load_model(str(make_tiny_checkpoint("llama", tmp_path)), dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    tokens = {}
    for backend in ("cpu", "xla"):
        llm = LLM(model, attention_backend=backend, kv_cache_dtype=kv_cache_dtype, **LIMITS)
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        tokens[backend] = [o.outputs[0].token_ids for o in outputs]
    assert tokens["cpu"] == tokens["xla"]
    assert [len(t) for t in tokens["cpu"]] == [12, 12, 12]


def test_one_block_bucket_compiles_one_program_per_token_bucket(tmp_path):
    assert Buckets.make(512, 64, 32, one_block_bucket=True) == Buckets(
        (8, 16, 24, 32, 40, 48, 56, 64, 128, 256, 512), (32,), 64)
    assert Buckets.make(512, 64, 32).token_buckets == (16, 32, 64, 128, 256, 512)
    assert Buckets.make(512, 64, 32).block_buckets == (4, 8, 16, 32)
    model = jaxllm.load_model(str(make_tiny_checkpoint("llama", tmp_path)), dtype="float32")
    limits = dict(LIMITS, max_model_len=128, max_num_batched_tokens=32)
    llm = LLM(model, attention_backend="cpu", **limits)
    runner = llm.llm_engine.runner
    assert runner.buckets.token_buckets == (8, 16, 24, 32) and runner.buckets.block_buckets == (8,)
    assert llm.llm_engine.stats.num_compiles == 4 + 2  # + the block copy and the mask-table write
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert llm.llm_engine.stats.num_compiles == 6
    xla = LLM(model, attention_backend="xla", **limits)
    assert xla.llm_engine.runner.buckets.block_buckets == (4, 8)
    expected = xla.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
