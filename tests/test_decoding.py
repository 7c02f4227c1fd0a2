"""Logprobs, prompt logprobs and parallel sampling (n > 1) end to end on the embedded SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import hf_greedy

from jaxllm import LLM, SamplingParams

PROMPT = "The capital of France is"
LIMITS = dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64)
# Our logits match transformers' to ~1e-4 of their scale (test_models); log_softmax subtracts a
# logsumexp of the same error size, so 2e-3 absolute bounds the difference with margin.
LOGPROB_ATOL = 2e-3


@pytest.fixture(scope="module")
def llm(smollm2_model):
    return LLM(smollm2_model, **LIMITS)


def _hf_logprobs(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1).numpy()


def test_sample_logprobs_match_transformers(llm, smollm2_hf):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
    out = llm.generate(PROMPT, params, use_tqdm=False)[0]
    c = out.outputs[0]
    ref = _hf_logprobs(smollm2_hf, out.prompt_token_ids + c.token_ids)
    P = len(out.prompt_token_ids)
    assert len(c.logprobs) == len(c.token_ids) == 8
    total = 0.0
    for i, (token, step) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
        row = ref[P - 1 + i]
        top5 = np.argsort(-row)[:5].tolist()
        assert list(step)[:5] == top5 and token == top5[0]  # greedy: the sampled token ranks first
        assert step[token].rank == 1
        np.testing.assert_allclose([step[t].logprob for t in top5], row[top5], atol=LOGPROB_ATOL)
        assert step[token].decoded_token == llm.get_tokenizer().decode([token])
        total += step[token].logprob
    assert c.cumulative_logprob == pytest.approx(total)


def test_sampled_token_is_always_in_logprobs(llm):
    params = SamplingParams(temperature=1.5, max_tokens=12, ignore_eos=True, logprobs=0, seed=3)
    c = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    for token, step in zip(c.token_ids, c.logprobs, strict=True):
        assert list(step) == [token]  # logprobs=0: only the sampled token
        assert step[token].rank >= 1


def test_prompt_logprobs_match_transformers(llm, smollm2_hf):
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3)
    out = llm.generate(PROMPT, params, use_tqdm=False)[0]
    ids = out.prompt_token_ids
    ref = _hf_logprobs(smollm2_hf, ids)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        entry, row = out.prompt_logprobs[pos], ref[pos - 1]
        assert ids[pos] in entry
        np.testing.assert_allclose(entry[ids[pos]].logprob, row[ids[pos]], atol=LOGPROB_ATOL)
        assert entry[ids[pos]].rank == 1 + int(np.sum(row > row[ids[pos]]))
        assert list(entry)[:3] == np.argsort(-row)[:3].tolist()


def test_prompt_logprobs_of_a_one_token_prompt(llm):
    # vLLM's shape: one entry per prompt token, the first (no context) None.
    out = llm.generate({"prompt_token_ids": [504]}, SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    assert out.prompt_logprobs == [None]
    assert llm.generate({"prompt_token_ids": [504]}, SamplingParams(max_tokens=1), use_tqdm=False)[0].prompt_logprobs is None


def test_prompt_logprobs_across_prefill_chunks(smollm2_model):
    llm = LLM(smollm2_model, **dict(LIMITS, max_num_batched_tokens=16))
    prompt = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    chunked = llm.generate(prompt, params, use_tqdm=False)[0]
    assert len(chunked.prompt_token_ids) > 16  # the prompt really spans several steps
    assert len(chunked.prompt_logprobs) == len(chunked.prompt_token_ids)
    whole = LLM(smollm2_model, **LIMITS).generate(prompt, params, use_tqdm=False)[0]
    for a, b in zip(chunked.prompt_logprobs[1:], whole.prompt_logprobs[1:], strict=True):
        assert list(a) == list(b)
        np.testing.assert_allclose([x.logprob for x in a.values()], [x.logprob for x in b.values()], atol=1e-4)


def test_prompt_logprobs_are_computed_a_chunk_of_rows_at_a_time():
    # 600 tokens: three chunks of 256 rows (the last one padded). Each row gets the values the
    # whole [T, V] computation gives, and the compiled program holds no [T, V] array.
    import jax
    import jax.numpy as jnp

    from jaxllm.runner.logprobs import PROMPT_LOGPROBS_CHUNK, _compute, prompt_logprobs_if

    assert PROMPT_LOGPROBS_CHUNK == 256
    rng = np.random.default_rng(0)
    T, D, V = 600, 8, 3000
    hidden = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((D, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, T), jnp.int32)

    def logits_fn(h):
        return jnp.dot(h, w, precision=jax.lax.Precision.HIGHEST)

    run = jax.jit(lambda h, t: prompt_logprobs_if(jnp.bool_(True), logits_fn, h, t))
    got, whole = run(hidden, targets), jax.jit(lambda h, t: _compute(logits_fn(h), t))(hidden, targets)
    assert got.token_logprob.shape == (T,) and got.top_ids.shape == (T, 20)
    np.testing.assert_allclose(np.asarray(got.token_logprob), np.asarray(whole.token_logprob), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.top_logprobs), np.asarray(whole.top_logprobs), rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got.token_rank), np.asarray(whole.token_rank))
    np.testing.assert_array_equal(np.asarray(got.top_ids), np.asarray(whole.top_ids))
    hlo = run.lower(hidden, targets).compile().as_text()
    assert f"f32[256,{V}]" in hlo and f"f32[{T},{V}]" not in hlo and f"f32[768,{V}]" not in hlo


def test_prompt_logprobs_of_a_long_prompt_in_one_step_equal_chunked_prefill(smollm2_model):
    # A 300-token prompt in one 512-token step (its logprobs taken in chunks of 256 rows) against
    # the same prompt prefilled 64 tokens a step.
    prompt = {"prompt_token_ids": np.random.default_rng(1).integers(3, 20000, 300).tolist()}
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3)
    outs = [LLM(smollm2_model, max_model_len=512, max_num_seqs=4, max_num_batched_tokens=tokens, warmup=False)
            .generate(prompt, params, use_tqdm=False)[0].prompt_logprobs for tokens in (512, 64)]
    assert len(outs[0]) == 300 and outs[0][0] is None
    for a, b in zip(outs[0][1:], outs[1][1:], strict=True):
        assert list(a) == list(b)
        np.testing.assert_allclose([x.logprob for x in a.values()], [x.logprob for x in b.values()], atol=1e-5)


def test_greedy_parallel_samples_all_equal_transformers(llm, smollm2_model, smollm2_hf):
    # Four children share the prompt's blocks; each must copy the shared partial block before
    # writing into it, or their continuations would corrupt each other.
    ids = smollm2_model.tokenizer.encode(PROMPT)
    expected = hf_greedy(smollm2_hf, ids, 20)
    out = llm.generate(PROMPT, SamplingParams(n=4, temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert len(out) == 1 and [c.index for c in out[0].outputs] == [0, 1, 2, 3]
    assert all(c.token_ids == expected for c in out[0].outputs)
    assert out[0].finished and llm.llm_engine.stats.kv_blocks_used == 0


def test_seeded_parallel_samples_are_distinct_and_reproducible(llm):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=16, ignore_eos=True, seed=11)
    first = [c.token_ids for c in llm.generate(PROMPT, params, use_tqdm=False)[0].outputs]
    again = [c.token_ids for c in llm.generate([PROMPT, "Hello"], params, use_tqdm=False)[0].outputs]
    assert first == again
    assert len({tuple(t) for t in first}) == 3
    # Child i samples as a single request seeded with seed + i.
    single = llm.generate(PROMPT, SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=13),
                          use_tqdm=False)[0].outputs[0].token_ids
    assert first[2] == single


def test_abort_parallel_request_frees_every_child(llm):
    engine = llm.llm_engine
    engine.add_request("group", PROMPT, SamplingParams(n=3, temperature=1.0, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats.num_running == 3
    engine.abort_request("group")
    assert not engine.has_unfinished_requests() and engine.stats.kv_blocks_used == 0
