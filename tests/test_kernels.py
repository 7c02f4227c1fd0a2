"""Pallas paged-attention kernels against plain-jnp references.

Every pool slot no sequence wrote holds NaN, block tables are random permutations, and batches mix
empty rows, decode tokens on and off page edges, and prefill chunks spanning pages, with padding
tokens after the real ones. The same case classes run interpreted (CPU) and compiled (GPU) through
one-line subclasses.

Tolerances. float32: kernel and reference both accumulate in float32 in different orders; outputs
are convex combinations of N(0, 1) values, so errors sit near 1e-6 and 2e-5 leaves room for the
GPU's exp2. bfloat16: inputs are bf16 in both, but the kernel rounds the probabilities to bf16
before the PV product (relative 2**-8) and rounds its output to bf16 (2**-8 of |out| <= ~3), so
|error| <= ~2e-2 while a wrong mask or a wrong page moves outputs by O(1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models.attention import available_backends, get_attention_backend, xla_paged_attention
from pallas_kernels.paged_decode_attention import (
    DecodeAttentionConfig,
    paged_decode_attention,
    paged_decode_attention_reference,
)
from pallas_kernels.ragged_paged_attention import (
    RaggedAttentionConfig,
    ragged_paged_attention,
    ragged_paged_attention_reference,
)
from pallas_kernels.testing import make_batch

TOLERANCE = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=2e-2, rtol=1e-2)}


def mixed_lens(block_size: int) -> tuple[list[int], list[int]]:
    """(q_lens, kv_lens): empty row, decode at kv 1, on a page edge, just past one, a chunk
    continuing mid-page across pages, a whole short prompt."""
    return [0, 1, 1, 1, block_size + 3, 5], [0, 1, block_size, block_size + 1, 2 * block_size + 5, 5]


def assert_close(out, ref, num_real: int, dtype) -> None:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out[:num_real], ref[:num_real], **TOLERANCE[dtype])
    np.testing.assert_array_equal(out[num_real:], 0)  # padding tokens get zeros


# (group, head_dim, block_size, dtype): GQA 1/2/4/8, head dims 64/128, pages 16/32/64, both dtypes,
# without the full product (each interpreted shape compiles anew).
SHAPES = [(1, 64, 16, jnp.float32), (2, 128, 32, jnp.float32), (4, 64, 64, jnp.bfloat16),
          (8, 128, 16, jnp.bfloat16), (8, 64, 32, jnp.float32)]


class _RaggedCases:
    interpret: bool

    def run(self, batch, **kwargs):
        return ragged_paged_attention(*batch.kernel_args(), interpret=self.interpret, **kwargs)

    @pytest.mark.parametrize("group,head_dim,block_size,dtype", SHAPES)
    def test_mixed_batch_matches_reference(self, group, head_dim, block_size, dtype):
        q_lens, kv_lens = mixed_lens(block_size)
        batch = make_batch(0, q_lens, kv_lens, block_size=block_size, num_kv_heads=2, group=group,
                           head_dim=head_dim, dtype=dtype)
        ref = ragged_paged_attention_reference(*batch.kernel_args())
        assert_close(self.run(batch), ref, batch.num_real_tokens, dtype)

    def test_reference_equals_engine_xla_backend(self):
        batch = make_batch(1, *mixed_lens(16), block_size=16, num_kv_heads=2, group=2, head_dim=64)
        ref = ragged_paged_attention_reference(*batch.kernel_args(), sliding_window=7)
        xla = xla_paged_attention(batch.q, (batch.k_pool, batch.v_pool), batch.layer, batch.metadata(), 7)
        n = batch.num_real_tokens
        np.testing.assert_allclose(np.asarray(ref)[:n], np.asarray(xla)[:n], atol=2e-5, rtol=2e-5)

    @pytest.mark.parametrize("config", [RaggedAttentionConfig(), RaggedAttentionConfig(16, 1)])
    def test_sliding_window(self, config):
        batch = make_batch(2, [1, 20, 3], [40, 37, 3], block_size=16, num_kv_heads=1, group=4, head_dim=64)
        ref = ragged_paged_attention_reference(*batch.kernel_args(), sliding_window=9)
        assert_close(self.run(batch, sliding_window=9, config=config), ref, batch.num_real_tokens, jnp.float32)

    def test_small_tiles_and_single_page_steps(self):
        # block_q 16 tokens: the 37-token chunk spans 3 tiles, one of them partial.
        batch = make_batch(3, [37, 1, 2], [50, 9, 16], block_size=16, num_kv_heads=2, group=1, head_dim=64)
        ref = ragged_paged_attention_reference(*batch.kernel_args())
        out = self.run(batch, config=RaggedAttentionConfig(block_q_rows=16, pages_per_compute_block=1))
        assert_close(out, ref, batch.num_real_tokens, jnp.float32)


class _DecodeCases:
    interpret: bool

    @pytest.mark.parametrize("group,head_dim,block_size,dtype,config", [
        (*SHAPES[0], DecodeAttentionConfig()), (*SHAPES[1], DecodeAttentionConfig(1, 4)),
        (*SHAPES[3], DecodeAttentionConfig(2, 2))])
    def test_matches_reference(self, group, head_dim, block_size, dtype, config):
        kv_lens = [0, 1, block_size, block_size + 1, 9 * block_size + 2]
        batch = make_batch(4, [1] * 5, [max(n, 1) for n in kv_lens], block_size=block_size, num_kv_heads=2,
                           group=group, head_dim=head_dim, dtype=dtype, extra_tokens=0)
        kv = batch.kv_lens.at[0].set(0)  # row 0: an empty sequence, gets zeros
        args = (batch.q, batch.k_pool, batch.v_pool, batch.layer, batch.block_tables, kv)
        out = paged_decode_attention(*args, config=config, interpret=self.interpret)
        ref = paged_decode_attention_reference(*args)
        assert_close(out, ref, len(kv_lens), dtype)
        np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0)

    def test_sliding_window(self):
        batch = make_batch(5, [1, 1, 1], [70, 3, 33], block_size=16, num_kv_heads=2, group=2, head_dim=64,
                           extra_tokens=0)
        args = (batch.q, batch.k_pool, batch.v_pool, batch.layer, batch.block_tables, batch.kv_lens)
        out = paged_decode_attention(*args, sliding_window=20, config=DecodeAttentionConfig(1, 8),
                                     interpret=self.interpret)
        assert_close(out, paged_decode_attention_reference(*args, sliding_window=20), 3, jnp.float32)


class TestRaggedInterpret(_RaggedCases):
    interpret = True


class TestDecodeInterpret(_DecodeCases):
    interpret = True


@pytest.mark.gpu
class TestRaggedGPU(_RaggedCases):
    interpret = False


@pytest.mark.gpu
class TestDecodeGPU(_DecodeCases):
    interpret = False


@pytest.mark.parametrize("block_size,window", [(8, None), (16, 9), (32, None), (64, 70)])
def test_xla_backend_long_contexts_match_reference(block_size, window):
    """The xla backend's cached part walks (token, 64-slot chunk) items, 16 per loop iteration:
    contexts of several chunks, more items than one iteration holds, a multi-token continuation,
    a fresh prompt and an empty row, over a pool of NaN in every unwritten slot."""
    q_lens, kv_lens = [1, 1, 0, 6, 1, 9, 1], [200, 65, 0, 140, 1, 9, 130]
    batch = make_batch(7, q_lens, kv_lens, block_size=block_size, num_kv_heads=2, group=4, head_dim=64)
    ref = ragged_paged_attention_reference(*batch.kernel_args(), sliding_window=window)
    out = jax.jit(xla_paged_attention, static_argnums=4)(
        batch.q, (batch.k_pool, batch.v_pool), batch.layer, batch.metadata(), window)
    n = batch.num_real_tokens
    assert not np.isnan(np.asarray(out)[:n]).any()
    np.testing.assert_allclose(np.asarray(out)[:n], np.asarray(ref)[:n], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mixed", [False, True])
def test_pallas_backend_equals_xla_backend(mixed):
    """The engine-facing backend: decode batches take the split-K kernel, mixed ones the ragged one."""
    q_lens, kv_lens = ([5, 1, 1], [21, 40, 16]) if mixed else ([1, 1, 0, 1], [21, 40, 0, 16])
    batch = make_batch(6, q_lens, kv_lens, block_size=16, num_kv_heads=2, group=4, head_dim=64)
    kv, md = (batch.k_pool, batch.v_pool), batch.metadata()
    out = jax.jit(get_attention_backend("pallas"), static_argnums=4)(batch.q, kv, batch.layer, md, 12)
    ref = xla_paged_attention(batch.q, kv, batch.layer, md, 12)
    n = batch.num_real_tokens
    assert_close(out, np.concatenate([np.asarray(ref)[:n], np.zeros_like(ref[n:])]), n, jnp.float32)


def test_backend_names():
    assert {"xla", "pallas", "triton", "pallas_mgpu", "cpu", "auto"} <= set(available_backends())
    if jax.default_backend() == "cpu":
        from pallas_kernels.cpu_attention import cpu_paged_attention

        assert get_attention_backend("auto") is cpu_paged_attention  # the C++ kernel builds here
        with pytest.raises(ValueError, match="attention_backend='triton' is not usable here: .*"):
            get_attention_backend("triton")
    with pytest.raises(ValueError, match="not available"):
        get_attention_backend("flash")


def test_wrappers_reject_bad_inputs():
    batch = make_batch(7, [2], [2], block_size=16, num_kv_heads=2, group=2, head_dim=64)
    args = list(batch.kernel_args())
    with pytest.raises(ValueError, match="do not fit"):
        ragged_paged_attention(batch.q[:, :3], *args[1:], interpret=True)
    with pytest.raises(ValueError, match="inconsistent"):
        ragged_paged_attention(*args[:5], batch.cu_q_lens[:1], *args[6:], interpret=True)
    with pytest.raises(ValueError, match="sliding_window"):
        ragged_paged_attention(*args, sliding_window=0, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        RaggedAttentionConfig(block_q_rows=48)
    with pytest.raises(ValueError, match="power of two"):
        DecodeAttentionConfig(max_splits=3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_triton_lowering_cross_compiles_for_cuda(dtype):
    """Both kernels lower for CUDA on a CPU-only jaxlib (Pallas -> Triton IR inside a custom call;
    Triton IR -> PTX happens in XLA:GPU's compile, which needs the CUDA plugin)."""
    batch = make_batch(8, *mixed_lens(16), block_size=16, num_kv_heads=2, group=4, head_dim=128, dtype=dtype)
    ragged = functools.partial(ragged_paged_attention, sliding_window=32)
    text = jax.jit(ragged).trace(*batch.kernel_args()).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
    decode_args = (batch.q[: batch.kv_lens.shape[0]], batch.k_pool, batch.v_pool, batch.layer, batch.block_tables, batch.kv_lens)
    text = jax.jit(paged_decode_attention).trace(*decode_args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
