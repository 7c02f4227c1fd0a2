"""Beam search: equality with transformers where their semantics coincide, and block sharing."""

from __future__ import annotations

import pytest
import torch

from jaxllm import LLM, BeamSearchParams
from jaxllm.beam_search import beam_score

PROMPTS = ["The history of the Roman Empire", "def quicksort(arr):"]
LIMITS = dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def llm(smollm2_model):
    return LLM(smollm2_model, **LIMITS)


def _hf_beams(hf, ids, width, new_tokens) -> list[list[int]]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]), num_beams=width, num_return_sequences=width, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, length_penalty=1.0, early_stopping=False, pad_token_id=0,
        )
    return [row.tolist() for row in out]


@pytest.mark.parametrize("width", [2, 4])
def test_beams_equal_transformers_without_eos(llm, smollm2_hf, width):
    # ignore_eos here and min_new_tokens there: all beams have the same length, so both rank
    # candidates by cumulative logprob alone (see jaxllm.beam_search for where they differ).
    tok = llm.get_tokenizer()
    outputs = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=width, max_tokens=8, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        ids = tok.encode(prompt)
        assert [s.tokens for s in out.sequences] == _hf_beams(smollm2_hf, ids, width, 8)
        scores = [s.cum_logprob for s in out.sequences]
        assert scores == sorted(scores, reverse=True)
        assert out.sequences[0].text == tok.decode(out.sequences[0].tokens, skip_special_tokens=True)
    stats = llm.llm_engine.stats
    assert stats.kv_blocks_used == 0 and not llm.llm_engine.has_unfinished_requests()


def test_beam_width_one_is_greedy(llm):
    from jaxllm import SamplingParams

    greedy = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    beam = llm.beam_search(PROMPTS[0], BeamSearchParams(beam_width=1, max_tokens=10, ignore_eos=True))[0]
    assert beam.sequences[0].tokens == greedy[0].prompt_token_ids + greedy[0].outputs[0].token_ids


def test_eos_finishes_a_beam_and_scores_use_length_penalty(llm):
    chat = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "Say hi."}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    out = llm.beam_search({"prompt_token_ids": list(chat)}, BeamSearchParams(beam_width=3, max_tokens=24))[0]
    eos = llm.llm_engine.scheduler.eos_token_ids
    finished = [s for s in out.sequences if s.finish_reason == "stop"]
    assert finished and all(s.tokens[-1] in eos for s in finished)
    scores = [beam_score(s.tokens, s.cum_logprob, eos, 1.0) for s in out.sequences]
    assert scores == sorted(scores, reverse=True)
    assert llm.llm_engine.stats.kv_blocks_used == 0


def test_beam_search_params_are_validated():
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="temperature"):
        BeamSearchParams(beam_width=2, max_tokens=4, temperature=0.7)
