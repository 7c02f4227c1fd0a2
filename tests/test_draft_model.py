"""Speculative decoding with a draft model (speculative_config={"model": ..., ...}): whatever the
draft proposes, outputs equal decoding without proposals (greedy and seeded sampling, parallel
samples, chunked prefill, preemption, prefix caching, overlapped steps); a draft equal to the
target has all its proposals accepted, so a step yields k + 1 tokens."""

from __future__ import annotations

import re

import pytest
from tiny_models import make_tiny_checkpoint

from jaxllm import LLM, SamplingParams
from jaxllm.config import SpeculativeConfig

LIMITS = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32, num_kv_blocks=64,
              compilation_cache_dir=None)
PROMPTS = [{"prompt_token_ids": [5 + i, 6, 7, 8, 9, 10] * (i + 1)} for i in range(4)]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("target"))


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory):
    """A different model of the same vocabulary (fewer heads, narrower): its proposals are rarely right."""
    return make_tiny_checkpoint("smollm2", tmp_path_factory.mktemp("draft"))


def _draft(path, k=3, **extra):
    return {"model": str(path), "num_speculative_tokens": k, **extra}


def _ids(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


def test_config_infers_the_method_from_a_model_and_checks_it():
    config = SpeculativeConfig.from_dict({"model": "some/draft", "num_speculative_tokens": 2})
    assert (config.method, config.model, config.prompt_lookup_min) == ("draft_model", "some/draft", None)
    for bad, match in [
        ({"method": "draft_model", "num_speculative_tokens": 2}, "method='draft_model' needs model"),
        ({"method": "ngram", "model": "x", "num_speculative_tokens": 2}, "model='x' is for method='draft_model'"),
        ({"model": "x", "num_speculative_tokens": 2, "prompt_lookup_max": 3}, "prompt_lookup_max is for method='ngram'"),
        ({"method": "eagle", "model": "x", "num_speculative_tokens": 2}, "method='eagle' is not supported"),
        ({"num_speculative_tokens": 2, "max_model_len": 64}, "max_model_len=64 is for method='draft_model'"),
        ({"model": "x", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 0},
         "draft_tensor_parallel_size=0 must be a positive integer"),
        ({"model": "x", "num_speculative_tokens": 2, "max_model_len": 0}, "max_model_len=0 must be a positive"),
    ]:
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig.from_dict(bad)
    # the draft runs split over the target's devices: tensor_parallel_size (1 here) or unset
    from jaxllm.engine_args import EngineArgs

    with pytest.raises(ValueError, match="draft_tensor_parallel_size=2 must equal tensor_parallel_size=1"):
        EngineArgs(speculative_config={"model": "x", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2})


def test_a_draft_equal_to_the_target_is_always_right(target):
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = LLM(str(target), **LIMITS)
    want = _ids(plain.generate(PROMPTS, greedy, use_tqdm=False))
    llm = LLM(str(target), speculative_config=_draft(target), **LIMITS)
    engine = llm.llm_engine
    compiles = engine.stats.num_compiles
    assert compiles == 2 * plain.llm_engine.stats.num_compiles  # the draft model's programs, warmed up too
    assert _ids(llm.generate(PROMPTS, greedy, use_tqdm=False)) == want
    stats = engine.stats
    spec = stats.spec_decode
    assert spec.num_accepted_tokens == spec.num_draft_tokens > 0  # every proposal accepted
    assert spec.accepted_per_position == [spec.num_drafts] * 3
    # 29 tokens after the prompt's: one step per 4 tokens, instead of one each.
    assert stats.num_steps <= plain.llm_engine.stats.num_steps / 2.5
    assert stats.num_compiles == compiles
    assert stats.kv_blocks_used == 0  # the slots taken for proposals went back with the requests


@pytest.mark.parametrize("same", [True, False], ids=["self_draft", "other_draft"])
@pytest.mark.parametrize("case", ["seeded_n2", "chunked_tiny_pool", "prefix_hits"])
def test_outputs_equal_decoding_without_proposals(target, other_draft, same, case):
    draft = target if same else other_draft
    limits, params, prompts = dict(LIMITS), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), PROMPTS
    if case == "seeded_n2":
        params = SamplingParams(n=2, temperature=0.8, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True)
    elif case == "chunked_tiny_pool":  # 8-token chunks; 5 usable blocks for 4 requests of 3-4 blocks
        limits.update(max_num_batched_tokens=8, num_kv_blocks=6, max_num_seqs=4)
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    else:
        prompts = PROMPTS + PROMPTS  # the second half hits the first half's cached blocks
    plain = LLM(str(target), **limits, warmup=False)
    llm = LLM(str(target), speculative_config=_draft(draft), **limits, warmup=False)
    assert _ids(llm.generate(prompts, params, use_tqdm=False)) == _ids(plain.generate(prompts, params, use_tqdm=False))
    stats = llm.llm_engine.stats
    assert stats.spec_decode.num_drafts > 0
    if case == "chunked_tiny_pool":
        assert stats.num_preemptions > 0
    if case == "prefix_hits":
        assert stats.prefix_cache_hits > 0
    if same and case != "seeded_n2":
        assert stats.spec_decode.acceptance_rate > 0.9
    assert stats.kv_blocks_used == 0


def test_proposals_off_in_large_batches_and_overlapped_steps(target):
    """disable_by_batch_size: while 3 or more requests run, steps overlap (the draft model runs in
    lockstep with placeholders fed on the device); as requests finish, proposals start."""
    lengths = [8, 16, 24, 40]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    plain = LLM(str(target), **LIMITS, warmup=False)
    llm = LLM(str(target), speculative_config=_draft(target, disable_by_batch_size=3), **LIMITS, warmup=False)
    assert _ids(llm.generate(PROMPTS, params, use_tqdm=False)) == _ids(plain.generate(PROMPTS, params, use_tqdm=False))
    stats = llm.llm_engine.stats
    assert stats.num_overlapped_steps > 0 and stats.spec_decode.num_accepted_tokens > 0


def test_draft_models_that_cannot_serve_are_refused(tmp_path, target):
    wide_vocab = make_tiny_checkpoint("llama", tmp_path / "v", config_overrides={"vocab_size": 200})
    classifier = make_tiny_checkpoint("llama", tmp_path / "c", num_labels=2)
    limits = dict(LIMITS, warmup=False)
    for draft, extra, match in [
        (wide_vocab, {}, "has a vocabulary of 200 tokens, the target 160"),
        (classifier, {}, r"is a classifier \(LlamaForSequenceClassification\), not a generative model"),
        (target, {"preemption_mode": "swap"}, "works with preemption_mode='recompute' only"),
    ]:
        with pytest.raises(ValueError, match=match):
            LLM(str(target), speculative_config=_draft(draft), **limits, **extra)


@pytest.mark.parametrize("limit", ["draft_positions", "max_model_len_key"])
def test_no_proposals_past_the_drafts_positions(tmp_path, target, limit):
    """As vLLM: a draft of 64 positions (or speculative max_model_len=64) proposes while the
    proposals stay below position 64, and the request goes on one token per step after that."""
    if limit == "draft_positions":  # the target's weights (same seed), fewer positions
        draft = make_tiny_checkpoint("llama", tmp_path / "d", config_overrides={"max_position_embeddings": 64})
        extra = {}
    else:
        draft, extra = target, {"max_model_len": 64}
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    prompt = [{"prompt_token_ids": list(range(5, 17))}]  # 12 tokens: 112 in all
    plain = LLM(str(target), **LIMITS, warmup=False)
    llm = LLM(str(target), speculative_config=_draft(draft, **extra), **LIMITS, warmup=False)
    assert _ids(llm.generate(prompt, params, use_tqdm=False)) == _ids(plain.generate(prompt, params, use_tqdm=False))
    stats = llm.llm_engine.stats
    assert stats.spec_decode.acceptance_rate > 0.9
    # Up to position 64 about 4 tokens a step; the last 112 - 64 tokens one a step.
    assert 112 - 64 <= stats.num_steps < 112 - 64 + 20


def test_smollm2_drafting_for_itself_equals_transformers(smollm2_path, smollm2_model, smollm2_expected_greedy):
    from conftest import GREEDY_MAX_TOKENS, GREEDY_PROMPTS

    from jaxllm import StructuredOutputsParams

    # Compiled as needed (warm-up and its flat compile count are the tiny models' tests).
    limits = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, num_kv_blocks=64, warmup=False)
    llm = LLM(str(smollm2_path), dtype="float32", speculative_config=_draft(smollm2_path, k=4), **limits)
    greedy = SamplingParams(temperature=0.0, max_tokens=GREEDY_MAX_TOKENS, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in llm.generate(GREEDY_PROMPTS, greedy, use_tqdm=False)] == \
        smollm2_expected_greedy
    assert llm.llm_engine.stats.spec_decode.acceptance_rate > 0.9
    # Under structured outputs a draft's proposal ends before the first token the pattern forbids
    # (the draft model knows nothing of the pattern); outputs still equal the plain engine's.
    regex = r"(Paris|London|Rome), (France|England|Italy)\. [A-Z][a-z ]{5,40}\."
    constrained = SamplingParams(temperature=0.0, max_tokens=40,
                                 structured_outputs=StructuredOutputsParams(regex=regex))
    prompts = ["The capital of France is", "Name a European capital and its country:"]
    drafted = llm.generate(prompts, constrained, use_tqdm=False)
    plain = LLM(smollm2_model, **limits).generate(prompts, constrained, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in drafted] == [o.outputs[0].token_ids for o in plain]
    assert all(re.fullmatch(regex, o.outputs[0].text) for o in drafted)
