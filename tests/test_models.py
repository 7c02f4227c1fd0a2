"""Model forward passes against transformers (PyTorch, float32) on the same weights."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import assert_logits_close
from tiny_models import FAMILIES, make_tiny_checkpoint
from transformers import AutoModelForCausalLM

import jaxllm
from jaxllm.models import model_module
from jaxllm.models.attention import AttentionMetadata, get_attention_backend
from jaxllm.runner import kv_pool

# float32 on both sides: only summation order differs, ~1e-6 relative per op over a few layers.
F32_RTOL = 1e-4
# bfloat16 keeps 8 bits of mantissa: one rounding is 2^-8 ~ 4e-3; a few layers accumulate more.
BF16_RTOL = 5e-2


def _hf_logits(path, ids, dtype=torch.float32) -> np.ndarray:
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_logits_match_transformers(family, tmp_path):
    path = make_tiny_checkpoint(family, tmp_path)
    # 48 tokens: past mistral's 16-token sliding window and llama3_rope's 32 original positions.
    ids = np.random.default_rng(0).integers(3, 160, size=48).tolist()
    model = jaxllm.load_model(str(path), dtype="float32")
    assert_logits_close(model.forward(ids), _hf_logits(path, ids), F32_RTOL)


@pytest.mark.parametrize("family", ["llama", "gemma"])  # gemma: its (1 + w) norm scales rounded to bfloat16
def test_bfloat16_logits_close_to_transformers(tmp_path, family):
    path = make_tiny_checkpoint(family, tmp_path)
    ids = list(range(3, 40))
    model = jaxllm.load_model(str(path), dtype="bfloat16")
    assert model.params["embed"].dtype == jnp.bfloat16
    assert_logits_close(model.forward(ids), _hf_logits(path, ids, torch.bfloat16), BF16_RTOL)


def test_smollm2_logits_match_transformers(smollm2_model, smollm2_hf):
    tok = smollm2_model.tokenizer
    for prompt in ["What is the capital of France?", "def fibonacci(n):", "The quick brown fox"]:
        ids = tok.encode(prompt)
        with torch.no_grad():
            theirs = smollm2_hf(torch.tensor([ids])).logits[0].numpy()
        assert_logits_close(smollm2_model.forward(ids), theirs, F32_RTOL)


def test_smollm2_greedy_32_tokens_match_transformers(smollm2_model, smollm2_hf):
    from conftest import hf_greedy

    ids = smollm2_model.tokenizer.encode("The history of the Roman Empire")
    expected = hf_greedy(smollm2_hf, ids, 32)
    seq = list(ids)
    for _ in range(32):  # greedy through the research API: re-run the whole sequence each step
        seq.append(int(np.argmax(np.asarray(smollm2_model.forward(seq))[-1])))
    assert seq[len(ids):] == expected


# -- packing: sequences in one flat batch, and continuing from K/V already in the pool ---------------
BLOCK = 4


def _run_flat(model, kv, seqs):
    """seqs: list of (token ids, start position, block table). Returns per-seq logits and the pool."""
    cfg = model.config
    tokens, positions, slots, seq_ids, cu, lens = [], [], [], [], [0], []
    width = max(len(t) for _, _, t in seqs)
    tables = np.zeros((len(seqs), width), np.int32)
    for i, (ids, start, table) in enumerate(seqs):
        pos = np.arange(start, start + len(ids))
        tokens += list(ids)
        positions += pos.tolist()
        slots += (np.asarray(table)[pos // BLOCK] * BLOCK + pos % BLOCK).tolist()
        seq_ids += [i] * len(ids)
        tables[i, : len(table)] = table
        cu.append(cu[-1] + len(ids))
        lens.append(start + len(ids))
    md = AttentionMetadata(*(jnp.asarray(np.asarray(x, np.int32)) for x in (positions, slots, seq_ids, tables, cu, lens)))
    module = model_module(cfg)
    hidden, kv = module.forward(model.params, cfg, kv, jnp.asarray(tokens, jnp.int32), md, get_attention_backend("xla"))
    logits = np.asarray(module.logits(model.params, cfg, hidden))
    return [logits[cu[i] : cu[i + 1]] for i in range(len(seqs))], kv


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return jaxllm.load_model(str(make_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3"))), dtype="float32")


def test_two_sequences_packed_equal_each_alone(tiny_model):
    a, b = list(range(3, 13)), list(range(50, 57))
    kv = kv_pool.allocate(tiny_model.config, 16, BLOCK, jnp.float32)
    # NaN in every unused slot: reading outside a sequence's own positions poisons its logits.
    kv = tuple(jnp.full_like(x, jnp.nan) for x in kv)
    (la, lb), _ = _run_flat(tiny_model, kv, [(a, 0, [7, 2, 9]), (b, 0, [4, 11])])
    np.testing.assert_allclose(la, tiny_model.forward(a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lb, tiny_model.forward(b), rtol=1e-5, atol=1e-5)


def test_continuation_from_cached_kv_equals_full_forward(tiny_model):
    a, b = list(range(3, 13)), list(range(50, 57))
    kv = kv_pool.allocate(tiny_model.config, 16, BLOCK, jnp.float32)
    _, kv = _run_flat(tiny_model, kv, [(a[:6], 0, [7, 2])])  # first chunk of a, ends mid-block
    (lb, la), _ = _run_flat(tiny_model, kv, [(b, 0, [4, 11]), (a[6:], 6, [7, 2, 9])])
    np.testing.assert_allclose(la, tiny_model.forward(a)[6:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lb, tiny_model.forward(b), rtol=1e-5, atol=1e-5)


def test_forward_rejects_empty_input(tiny_model):
    with pytest.raises(ValueError, match="token_ids"):
        tiny_model.forward([])


def test_bfloat16_dtype_names(tmp_path):
    assert jaxllm.loader.resolve_dtype("bfloat16", "float32", "cpu") == np.dtype(ml_dtypes.bfloat16)
    assert jaxllm.loader.resolve_dtype("auto", "bfloat16", "cpu") == np.dtype(np.float32)
    assert jaxllm.loader.resolve_dtype("auto", "float16", "gpu") == np.dtype(np.float16)
    with pytest.raises(ValueError, match="dtype='float8'"):
        jaxllm.loader.resolve_dtype("float8", "float32", "cpu")


@pytest.mark.parametrize("family", ["phi3", "gemma"])
def test_newer_families_through_the_engine_equal_transformers_greedy(tmp_path, family):
    """Phi-3's fused projections (split by the converter) and sliding window (16 here), Gemma's
    norms, embedding scale and GeGLU, in the engine's paged steps: 40-token prompts chunked by a
    16-token budget, 24 tokens each (``min_tokens`` bans the eos as transformers'
    ``min_new_tokens`` does)."""
    from conftest import hf_greedy

    from jaxllm import LLM, SamplingParams

    path = make_tiny_checkpoint(family, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    prompts = [np.random.default_rng(seed).integers(3, 160, size=40).tolist() for seed in range(3)]
    llm = LLM(str(path), max_model_len=96, max_num_seqs=4, max_num_batched_tokens=16, num_kv_blocks=48, block_size=8)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=24, min_tokens=24), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 24) for p in prompts]
