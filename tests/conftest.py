"""Shared fixtures: the embedded SmolLM2 converted once, transformers' reference of it, and a
persistent XLA compilation cache so the many small engines of the suite compile each program once."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

XLA_CACHE = {"JAX_COMPILATION_CACHE_DIR": "/tmp/jaxllm-test-xla-cache", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2"}
jax.config.update("jax_compilation_cache_dir", XLA_CACHE["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", float(XLA_CACHE["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
# Subprocesses (notebook kernels, the tensor-parallel worker, servers) share the cache: jaxllm
# defers to a cache directory JAX already has, and JAX reads these variables when imported.
os.environ.update(XLA_CACHE)


def pytest_collection_modifyitems(config, items):
    if jax.devices()[0].platform == "gpu":
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_path():
    from converters import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def smollm2_model(smollm2_path):
    """Our SmolLM2 in float32 (a jaxllm.Model)."""
    import jaxllm

    return jaxllm.load_model(str(smollm2_path), dtype="float32")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path):
    """transformers' own SmolLM2 from the same GGUF file, float32, eager attention."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, torch_dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


# Prompts whose greedy continuations several engine tests compare with transformers'.
GREEDY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 4,",
]
GREEDY_MAX_TOKENS = 24


@pytest.fixture(scope="session")
def smollm2_expected_greedy(smollm2_model, smollm2_hf) -> list[list[int]]:
    """transformers' greedy continuations of GREEDY_PROMPTS (no eos stop), computed once."""
    tok = smollm2_model.tokenizer
    return [hf_greedy(smollm2_hf, tok.encode(p), GREEDY_MAX_TOKENS) for p in GREEDY_PROMPTS]


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt (no eos stop), as a list of ids."""
    import torch

    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=0,
        )
    return out[0, len(prompt_ids):].tolist()


def assert_logits_close(ours, theirs, rtol: float) -> None:
    """Logits agree within ``rtol`` of their overall scale (elementwise relative error is
    meaningless for logits near zero)."""
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    assert ours.shape == theirs.shape
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=rtol * scale)
