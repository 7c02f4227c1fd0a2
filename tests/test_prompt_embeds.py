"""vLLM's prompt embeddings (``enable_prompt_embeds``, ``{"prompt_embeds": tensor}``): a prompt's
inputs given as embeddings generate what transformers' ``generate(inputs_embeds=...)`` does, the
embedding table's own rows give the token ids' output, through chunked prefill, preemption,
parallel sampling and the prefix cache (shared only between equal embeddings), and in the
server's completions."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from tiny_models import make_tiny_checkpoint, make_tiny_tokenizer

from jaxllm import LLM, SamplingParams

VOCAB = 320
LIMITS = dict(max_model_len=96, max_num_seqs=8, max_num_batched_tokens=16, num_kv_blocks=64)
TEXTS = ["The capital of France is Paris and the capital of Spain is", "def add(a, b):", "Once upon a time"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _checkpoint(path, family="llama", seed=0):
    make_tiny_checkpoint(family, path, seed=seed, config_overrides={"vocab_size": VOCAB})
    make_tiny_tokenizer().save_pretrained(path)
    return path


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _table_rows(hf, ids):
    """The embedding layer's output for ``ids``: a torch tensor [len(ids), hidden], as vLLM's example."""
    import torch

    with torch.no_grad():
        return hf.get_input_embeddings()(torch.tensor(ids))


def _hf_generate(hf, embeds, max_new_tokens=8) -> list[int]:
    import torch

    with torch.no_grad():
        out = hf.generate(inputs_embeds=torch.as_tensor(embeds)[None], max_new_tokens=max_new_tokens,
                          do_sample=False, attention_mask=torch.ones(1, len(embeds), dtype=torch.long),
                          pad_token_id=0)
    return out[0].tolist()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("emb"))


@pytest.fixture(scope="module")
def llm(model):
    return LLM(str(model), **LIMITS, enable_prompt_embeds=True)


def test_table_rows_give_the_token_ids_output_in_one_batch(llm, model):
    hf, tok = _hf(model), llm.get_tokenizer()
    ids = [tok.encode(t) for t in TEXTS]
    compiles = llm.llm_engine.stats.num_compiles
    plain = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": i} for i in ids], GREEDY,
                                                          use_tqdm=False)]
    mixed = llm.generate([{"prompt_embeds": _table_rows(hf, ids[0])}, {"prompt_token_ids": ids[1]},
                          {"prompt_embeds": _table_rows(hf, ids[2]).numpy()}], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed] == plain
    assert mixed[0].prompt is None and mixed[0].prompt_token_ids == [0] * len(ids[0])  # placeholders
    assert llm.llm_engine.stats.num_compiles == compiles  # both programs of each bucket were warmed up


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_any_embeddings_generate_as_transformers(tmp_path, family):
    path = _checkpoint(tmp_path / family, family=family, seed=1)
    hf = _hf(path)
    llm = LLM(str(path), **LIMITS, enable_prompt_embeds=True, warmup=False, compilation_cache_dir=None)
    rng = np.random.default_rng(0)
    width = hf.get_input_embeddings().weight.shape[1]
    embeds = [(0.5 * rng.standard_normal((n, width))).astype(np.float32) for n in (37, 5)]  # 37: 3 chunks
    outs = llm.generate([{"prompt_embeds": e} for e in embeds], GREEDY, use_tqdm=False)
    for out, e in zip(outs, embeds, strict=True):
        assert out.outputs[0].token_ids == _hf_generate(hf, e)


def test_the_prefix_cache_is_shared_only_between_equal_embeddings(llm, model):
    hf = _hf(model)
    rng = np.random.default_rng(1)
    a, b = ((0.5 * rng.standard_normal((40, 64))).astype(np.float32) for _ in range(2))  # same length: same ids
    first = llm.generate({"prompt_embeds": a}, GREEDY, use_tqdm=False)[0]
    again = llm.generate({"prompt_embeds": a}, GREEDY, use_tqdm=False)[0]
    other = llm.generate({"prompt_embeds": b}, GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == 32 and other.num_cached_tokens == 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == _hf_generate(hf, a)
    assert other.outputs[0].token_ids == _hf_generate(hf, b)
    salted = llm.generate({"prompt_embeds": a, "cache_salt": "tenant"}, GREEDY, use_tqdm=False)[0]
    assert salted.num_cached_tokens == 0 and salted.outputs[0].token_ids == first.outputs[0].token_ids


def test_forks_and_preemption_keep_the_embeddings(llm, model):
    """n=3 seeded samples in a 7-block pool that preempts: each equals the token-id prompt's."""
    hf, tok = _hf(model), llm.get_tokenizer()
    ids = tok.encode(TEXTS[0] * 2)
    sampled = SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=24, ignore_eos=True)
    want = [c.token_ids for c in llm.generate({"prompt_token_ids": ids}, sampled, use_tqdm=False)[0].outputs]
    tight = LLM(str(model), **dict(LIMITS, num_kv_blocks=8), enable_prompt_embeds=True, warmup=False,
                compilation_cache_dir=None)
    got = tight.generate({"prompt_embeds": _table_rows(hf, ids)}, sampled, use_tqdm=False)[0].outputs
    assert tight.llm_engine.stats.num_preemptions > 0
    assert [c.token_ids for c in got] == want


def test_bad_embeddings_and_settings_are_refused(llm, model):
    engine = llm.llm_engine
    good = np.zeros((4, 64), np.float32)
    for prompt, params, match in [
        ({"prompt_embeds": np.zeros((4, 32), np.float32)}, GREEDY, r"shape \(4, 32\): this model's input "
                                                                   "embeddings are 64 wide"),
        ({"prompt_embeds": np.zeros((0, 64))}, GREEDY, r"num_tokens > 0"),
        ({"prompt_embeds": np.full((2, 64), np.nan)}, GREEDY, "NaN or infinite"),
        ({"prompt_embeds": good, "prompt_token_ids": [1]}, GREEDY, "not both"),
        ({"prompt_embeds": good}, SamplingParams(prompt_logprobs=1), "prompt_logprobs need the prompt's token ids"),
        ({"prompt_embeds": good}, SamplingParams(repetition_penalty=1.2), "repetition_penalty counts"),
    ]:
        with pytest.raises(ValueError, match=match):
            engine.add_request("bad", prompt, params)
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="a prompt_embeds prompt has no text or token ids"):
        from jaxllm import BeamSearchParams

        llm.beam_search([{"prompt_embeds": good}], BeamSearchParams(beam_width=2, max_tokens=2))
    plain = LLM(str(model), **LIMITS, warmup=False, compilation_cache_dir=None)
    with pytest.raises(ValueError, match="need an engine built with enable_prompt_embeds=True"):
        plain.generate({"prompt_embeds": good}, use_tqdm=False)
    with pytest.raises(ValueError, match="the draft model of speculative_config cannot read"):
        LLM(str(model), **LIMITS, enable_prompt_embeds=True, warmup=False, compilation_cache_dir=None,
            speculative_config={"model": str(model), "num_speculative_tokens": 2})


def test_completions_take_prompt_embeds(llm, model):
    import torch
    from server_client import client_for

    hf, tok = _hf(model), llm.get_tokenizer()
    ids = tok.encode(TEXTS[1])
    rows = _table_rows(hf, ids)
    want = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    saved = io.BytesIO()
    torch.save(rows, saved)
    npy = io.BytesIO()
    np.save(npy, rows.numpy())
    with client_for(llm.llm_engine, LIMITS["max_model_len"], LIMITS["max_num_seqs"]) as client:  # the server's now
        body = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
        both = client.post("/v1/completions", json={**body, "prompt": TEXTS[1], "prompt_embeds": [
            base64.b64encode(saved.getvalue()).decode(), base64.b64encode(npy.getvalue()).decode()],
            "return_token_ids": True}).json()
        # vLLM's order: the embeddings prompts first, then the text ones.
        assert [c["text"] for c in both["choices"]] == [want] * 3
        # return_token_ids: an embeddings prompt has no ids to show (its ids are placeholders)
        assert [c.get("prompt_token_ids") for c in both["choices"]] == [None, None, ids]
        assert len({tuple(c["token_ids"]) for c in both["choices"]}) == 1
        assert both["usage"]["prompt_tokens"] == 3 * len(ids)
        for extra, param in [({"prompt_embeds": "not base64!"}, "prompt_embeds"),
                             ({"prompt_embeds": base64.b64encode(b"junk").decode()}, "prompt_embeds"),
                             ({"prompt_embeds": base64.b64encode(npy.getvalue()).decode(), "echo": True}, "echo"),
                             ({}, "prompt")]:
            response = client.post("/v1/completions", json={**body, **extra})
            assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
