"""vLLM's ``logprobs_mode``: raw logprobs (the default), raw logits, and the processed distribution
each token was chosen from (after penalties, temperature and top-k) as logprobs or logits, all
against numpy on transformers' logits; the tokens never change with the mode."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import make_tiny_checkpoint, make_tiny_tokenizer

from jaxllm import LLM, BeamSearchParams, SamplingParams

VOCAB = 320
LIMITS = dict(max_model_len=96, max_num_seqs=8, max_num_batched_tokens=32, num_kv_blocks=48, warmup=False,
              compilation_cache_dir=None)
PROMPT = "The capital of France is"
SAMPLED = SamplingParams(temperature=0.7, top_k=6, seed=11, max_tokens=6, ignore_eos=True, logprobs=4)
PENALISED = SamplingParams(temperature=0.0, presence_penalty=1.5, max_tokens=6, ignore_eos=True, logprobs=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("lpm")
    make_tiny_checkpoint("llama", path, seed=3, config_overrides={"vocab_size": VOCAB})
    make_tiny_tokenizer().save_pretrained(path)
    return path


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].double().numpy()


def _log_softmax(x):
    finite = np.where(np.isfinite(x), x, -np.inf)
    top = finite.max()
    return finite - top - np.log(np.exp(finite - top).sum())


def _processed(row, params: SamplingParams, outputs_so_far: list[int]):
    x = row.copy()
    for t in set(outputs_so_far):
        x[t] -= params.presence_penalty
    if params.temperature > 0:
        x = x / params.temperature
        kth = np.sort(x)[-params.top_k]
        x = np.where(x >= kth, x, -np.inf)
    return x


def _check(out, rows, values_of):
    """Each output token's logprob entry against ``values_of(i, row)`` (what the mode returns)."""
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        want = values_of(i, rows[i])
        assert entry[token].logprob == pytest.approx(want[token], abs=2e-4)
        top = sorted(entry.items(), key=lambda kv: kv[1].rank)[:4]
        expected = np.argsort(-want, kind="stable")[:4]
        finite = [t for t in expected if np.isfinite(want[t])]
        assert [t for t, _ in top][:len(finite)] == finite
        for t in finite:
            assert entry[t].logprob == pytest.approx(want[t], abs=2e-4)


@pytest.mark.parametrize("params", [SAMPLED, PENALISED], ids=["top_k_temperature", "presence_penalty"])
def test_each_mode_against_numpy(model, params):
    outs = {}
    for mode in ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits"):
        llm = LLM(str(model), **LIMITS, logprobs_mode=mode)
        outs[mode] = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    tokens = outs["raw_logprobs"].token_ids
    assert all(o.token_ids == tokens for o in outs.values())  # the mode never changes the tokens
    prompt = make_tiny_tokenizer().encode(PROMPT)
    logits = _hf_logits(model, prompt + tokens)[len(prompt) - 1:-1]  # the row each output was chosen from
    _check(outs["raw_logprobs"], logits, lambda i, row: _log_softmax(row))
    _check(outs["raw_logits"], logits, lambda i, row: row)
    _check(outs["processed_logits"], logits, lambda i, row: _processed(row, params, tokens[:i]))
    _check(outs["processed_logprobs"], logits, lambda i, row: _log_softmax(_processed(row, params, tokens[:i])))
    processed = outs["processed_logprobs"]
    assert processed.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(
        processed.token_ids, processed.logprobs, strict=True)), abs=1e-5)


def test_bad_modes_and_beam_search_are_refused(model):
    with pytest.raises(ValueError, match="logprobs_mode='logits' must be one of"):
        LLM(str(model), **LIMITS, logprobs_mode="logits")
    llm = LLM(str(model), **LIMITS, logprobs_mode="processed_logprobs")
    with pytest.raises(ValueError, match="beam search ranks by the model's logprobs; this engine's logprobs_mode is "
                                         "'processed_logprobs'"):
        llm.beam_search([PROMPT], BeamSearchParams(beam_width=2, max_tokens=2))
