"""The Hopper (Mosaic GPU) ragged kernel: lowers for CUDA on CPU; runs against the reference on H100/H200.

bfloat16 tolerance as in test_kernels.py (probabilities and output rounded to bf16: |error| <= ~2e-2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention_mgpu import MosaicAttentionConfig, ragged_paged_attention_mgpu
from pallas_kernels.testing import make_batch


def _batch(group=4, block_size=16, head_dim=128):
    q_lens, kv_lens = [0, 1, 1, 1, block_size + 3, 5], [0, 1, block_size, block_size + 1, 2 * block_size + 5, 5]
    return make_batch(0, q_lens, kv_lens, block_size=block_size, num_kv_heads=2, group=group, head_dim=head_dim,
                      dtype=jnp.bfloat16)


@pytest.mark.parametrize("window", [None, 9])
def test_lowers_for_cuda_on_cpu(window):
    """Pallas -> Mosaic GPU lowering runs here; Mosaic's own passes and PTX run in XLA:GPU's compile."""
    fn = functools.partial(ragged_paged_attention_mgpu, sliding_window=window)
    text = jax.jit(fn).trace(*_batch().kernel_args()).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_rejects_what_wgmma_cannot_do():
    batch = _batch()
    args = list(batch.kernel_args())
    with pytest.raises(ValueError, match="16-bit"):
        ragged_paged_attention_mgpu(args[0].astype(jnp.float32), *args[1:])
    with pytest.raises(ValueError, match="multiple of 64"):
        MosaicAttentionConfig(block_k=48)


def _is_hopper() -> bool:
    device = jax.devices()[0]
    return device.platform == "gpu" and getattr(device, "compute_capability", "0") in ("9.0", "9.0a")


@pytest.mark.gpu
@pytest.mark.skipif(not _is_hopper(), reason="needs an H100/H200")
@pytest.mark.parametrize("group,block_size,window", [(1, 16, None), (4, 32, None), (8, 64, 9), (2, 16, 40)])
def test_matches_reference_on_hopper(group, block_size, window):
    batch = _batch(group, block_size)
    out = np.asarray(ragged_paged_attention_mgpu(*batch.kernel_args(), sliding_window=window), np.float32)
    ref = np.asarray(ragged_paged_attention_reference(*batch.kernel_args(), sliding_window=window), np.float32)
    n = batch.num_real_tokens
    np.testing.assert_allclose(out[:n], ref[:n], atol=2e-2, rtol=1e-2)
    np.testing.assert_array_equal(out[n:], 0)
