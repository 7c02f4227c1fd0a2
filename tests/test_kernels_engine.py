"""The engine with attention_backend="pallas" (interpreted on CPU) gives the xla backend's greedy tokens."""

from __future__ import annotations

import pytest
from tiny_models import make_tiny_checkpoint

import jaxllm
from jaxllm import LLM, SamplingParams

# Small limits: one token bucket, a few block buckets, so interpreted kernels compile few programs;
# and a small pool: an interpreted kernel's time grows with the size of the pool it is handed
# (SmolLM2's test took over 9 minutes with the default CPU pool, 5 s with 24 blocks).
LIMITS = dict(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, block_size=16, num_kv_blocks=24)
PROMPTS = [[5, 9, 23, 4, 77, 3, 18, 2, 40, 11, 6, 31, 8, 19, 52, 7, 21, 13, 90], [61, 2], [8, 44, 5, 3, 12, 9]]


def _greedy(model, backend: str, prompts, max_tokens: int) -> list[list[int]]:
    llm = LLM(model, attention_backend=backend, **LIMITS)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def test_tiny_llama_pallas_equals_xla(tmp_path):
    # 19 + 2 + 6 prompt tokens over a 16-token budget: chunked prefill mixed with decode steps,
    # then all-decode steps (the split-K kernel), crossing page edges.
    model = jaxllm.load_model(str(make_tiny_checkpoint("llama", tmp_path)), dtype="float32")
    assert _greedy(model, "pallas", PROMPTS, 12) == _greedy(model, "xla", PROMPTS, 12)


@pytest.mark.slow
def test_smollm2_pallas_equals_xla(smollm2_model):
    prompt = smollm2_model.tokenizer.encode("The capital of France is")
    assert _greedy(smollm2_model, "pallas", [prompt], 8) == _greedy(smollm2_model, "xla", [prompt], 8)


def test_tiny_llama_bfloat16_pallas_equals_xla(tmp_path):
    # On CPU a bfloat16 model's KV pool is uint16, the values' bits (kv_storage_dtype): the
    # interpreted kernels get it viewed as bfloat16 and read it as the xla backend does.
    model = jaxllm.load_model(str(make_tiny_checkpoint("llama", tmp_path)), dtype="bfloat16")
    llm = LLM(model, attention_backend="pallas", **LIMITS)
    assert str(llm.llm_engine.runner.kv_dtype) == "uint16" and str(llm.llm_engine.runner.dtype) == "bfloat16"
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == _greedy(model, "xla", PROMPTS, 12)
