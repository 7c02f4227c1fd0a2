"""The raw Triton kernel's body under Triton's CPU interpreter, and the jax-triton backend's errors.

jax-triton itself needs the CUDA jaxlib plugin, so on CPU the Triton body is launched directly by
Triton's interpreter on torch CPU tensors. ``TRITON_INTERPRET=1`` must be set before triton is
imported (it decides what ``@triton.jit`` builds), so the check runs in a fresh interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from pallas_kernels.triton_paged_attention import triton_ragged_paged_attention, triton_unavailable_reason

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None,
    reason="needs the triton and torch packages",
)


def interpreted_max_error(group: int, head_dim: int, block_size: int, window: int) -> float:
    """Run the Triton body interpreted on a NaN-poisoned mixed batch; max |kernel - reference|."""
    import torch

    from pallas_kernels.ragged_paged_attention import fold_layer, query_tiles, ragged_paged_attention_reference
    from pallas_kernels.testing import make_batch
    from pallas_kernels.triton_paged_attention_kernel import ragged_paged_attention_kernel

    b = make_batch(0, [0, 1, 1, block_size + 3, 5], [0, block_size, block_size + 1, 2 * block_size + 5, 5],
                   block_size=block_size, num_kv_heads=2, group=group, head_dim=head_dim)
    num_tokens, num_kv_heads, num_blocks = b.q.shape[0], b.k_pool.shape[3], b.k_pool.shape[1]
    block_q, pages_per_step = max(1, 32 // group), 2
    tiles = query_tiles(b.cu_q_lens, num_tokens, block_q)
    tables = fold_layer(b.block_tables, b.layer, num_blocks, pages_per_step)
    t = lambda x: torch.from_numpy(np.array(x))  # noqa: E731
    out = torch.zeros(num_tokens, num_kv_heads, group, head_dim)
    ragged_paged_attention_kernel[(tiles.shape[0], num_kv_heads)](
        t(tiles), t(tables), t(b.kv_lens), t(b.positions), t(b.q).reshape(out.shape),
        t(b.k_pool).flatten(0, 1), t(b.v_pool).flatten(0, 1), tables.shape[1], head_dim**-0.5, window, out,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=block_size,
        BLOCK_Q=block_q, PAGES_PER_STEP=pages_per_step,
    )
    ref = ragged_paged_attention_reference(*b.kernel_args(), sliding_window=window or None)
    expected = np.concatenate([np.asarray(ref)[: b.num_real_tokens], np.zeros_like(ref[b.num_real_tokens :])])
    return float(np.abs(out.numpy().reshape(expected.shape) - expected).max())


@needs_triton
def test_triton_body_matches_reference_interpreted():
    cases = [(1, 64, 16, 0), (4, 128, 32, 0), (8, 64, 16, 11)]
    code = ("import json, sys; from test_kernels_triton import interpreted_max_error as f; "
            f"print(json.dumps([f(*c) for c in {cases!r}]))")
    env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    assert max(errors) < 2e-5, dict(zip(map(str, cases), errors, strict=True))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error off GPU")
def test_backend_says_why_it_cannot_run():
    reason = triton_unavailable_reason()
    assert reason is not None and ("GPU" in reason or "not installed" in reason)
    x = np.zeros((1, 1, 64), np.float32)
    with pytest.raises(RuntimeError, match="the Triton attention kernel cannot run"):
        triton_ragged_paged_attention(x, np.zeros((1, 1, 16, 1, 64), np.float32), np.zeros((1, 1, 16, 1, 64)),
                                      np.int32(0), np.zeros((1, 1), np.int32), np.array([0, 1], np.int32),
                                      np.array([1], np.int32), np.zeros(1, np.int32))


@pytest.mark.gpu
def test_triton_backend_matches_reference_on_gpu():
    from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
    from pallas_kernels.testing import make_batch

    b = make_batch(1, [0, 1, 17, 5], [0, 16, 40, 5], block_size=16, num_kv_heads=2, group=4, head_dim=128)
    out = np.asarray(triton_ragged_paged_attention(*b.kernel_args(), sliding_window=9))
    ref = np.asarray(ragged_paged_attention_reference(*b.kernel_args(), sliding_window=9))
    n = b.num_real_tokens
    np.testing.assert_allclose(out[:n], ref[:n], atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(out[n:], 0)
