"""vLLM's token pooling tasks: "token_classify" (``LLM.reward``; a classifier's head on every prompt
token, from *ForTokenClassification or *ForSequenceClassification checkpoints) and "token_embed"
(every prompt token's final hidden state), against transformers on tiny random checkpoints, through
chunked prefill and preemption, and the server's POST /pooling."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from server_client import assert_error, client_for
from tiny_models import make_tiny_checkpoint, make_tiny_tokenizer

from jaxllm import LLM, PoolingParams, SamplingParams
from jaxllm.models.registry import config_from_hf

VOCAB = 320  # the tiny tokenizer's 300 ids, and spare rows
LIMITS = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32, num_kv_blocks=64)
TEXTS = ["The capital of France is Paris.", "A paged KV cache stores keys and values in blocks.",
         "Rerankers score a query against each document, one pair at a time.", "def add(a, b):"]


def _checkpoint(path, num_labels=None, token_classifier=False, family="llama", seed=0):
    make_tiny_checkpoint(family, path, num_labels=num_labels, token_classifier=token_classifier, seed=seed,
                         config_overrides={"vocab_size": VOCAB})
    make_tiny_tokenizer().save_pretrained(path)
    return path


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _hf_token_logits(path, token_ids: list[int]) -> np.ndarray:
    """[num_tokens, num_labels]: transformers' token classifier."""
    import torch
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].numpy()


def _hf_hidden(path, token_ids: list[int]) -> np.ndarray:
    """[num_tokens, hidden_size]: transformers' final hidden states (after the last norm)."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).last_hidden_state[0].numpy()


@pytest.fixture(scope="module")
def token_classifier(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("tokcls"), num_labels=3, token_classifier=True)


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("lm"), seed=2)


@pytest.fixture(scope="module")
def llm_tokens(token_classifier):
    return LLM(str(token_classifier), **LIMITS)


def test_config_reads_a_token_classifier():
    base = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96,
                max_position_embeddings=128, num_labels=5)
    for arch in ("LlamaForTokenClassification", "MistralForTokenClassification", "Qwen2ForTokenClassification",
                 "Qwen3ForTokenClassification"):
        c = config_from_hf({**base, "architectures": [arch]})
        assert (c.num_labels, c.classifies_tokens, c.classifier_activation) == (5, True, "softmax")
    assert not config_from_hf({**base, "architectures": ["LlamaForSequenceClassification"]}).classifies_tokens
    from converters.orbax_cache import config_from_dict, config_to_dict

    assert config_from_dict(config_to_dict(c)) == c


def test_pooling_params_take_the_token_tasks():
    assert PoolingParams(task="token_embed").task == "token_embed"
    with pytest.raises(ValueError, match="task='reward' must be one of"):
        PoolingParams(task="reward")


def test_reward_equals_transformers_token_classifier(llm_tokens, token_classifier):
    llm = llm_tokens
    assert llm.llm_engine.supported_tasks == ("token_classify",)
    tok = llm.get_tokenizer()
    compiles = llm.llm_engine.stats.num_compiles
    outputs = llm.reward(TEXTS, use_tqdm=False)
    for out, text in zip(outputs, TEXTS, strict=True):
        ids = tok.encode(text)
        assert out.prompt_token_ids == ids
        assert out.outputs.data.shape == (len(ids), 3) and out.outputs.data.dtype == np.float32
        np.testing.assert_allclose(out.outputs.data, _softmax(_hf_token_logits(token_classifier, ids)), atol=2e-5)
    # encode's default task is the model's own; use_activation=False gives the logits.
    raw = llm.encode(TEXTS[1], PoolingParams(use_activation=False), use_tqdm=False)[0].outputs.data
    np.testing.assert_allclose(raw, _hf_token_logits(token_classifier, tok.encode(TEXTS[1])), atol=2e-5)
    # The same prompts again: a token task computes every position, so nothing comes from the cache.
    hits = llm.llm_engine.stats.prefix_cache_hits
    again = llm.reward(TEXTS, use_tqdm=False)
    assert llm.llm_engine.stats.prefix_cache_hits == hits
    for a, b in zip(again, outputs, strict=True):
        np.testing.assert_allclose(a.outputs.data, b.outputs.data, atol=1e-6)
    assert llm.llm_engine.stats.num_compiles == compiles


def test_token_classify_through_chunked_prefill(token_classifier):
    llm = LLM(str(token_classifier), **dict(LIMITS, max_num_batched_tokens=8, num_kv_blocks=8, max_num_seqs=4))
    tok = llm.get_tokenizer()
    long_texts = [t * 2 for t in TEXTS]  # 2-6 blocks each, 15 in all, of the pool's 7
    steps = llm.llm_engine.stats.num_steps
    outputs = llm.reward(long_texts, use_tqdm=False)
    assert llm.llm_engine.stats.num_steps - steps >= 200 // 8  # 8-token chunks
    for out, text in zip(outputs, long_texts, strict=True):
        ids = tok.encode(text)
        np.testing.assert_allclose(out.outputs.data, _softmax(_hf_token_logits(token_classifier, ids)), atol=2e-5)
    assert llm.llm_engine.stats.kv_blocks_used == 0


def test_token_embed_preempted_mid_prompt_starts_over(causal_lm):
    """Decoding requests outgrow a 7-block pool and preempt the token_embed request part way
    through its chunked prompt: it recomputes from the start, and its rows are whole and right."""
    llm = LLM(str(causal_lm), **dict(LIMITS, max_num_batched_tokens=8, num_kv_blocks=8, max_num_seqs=4))
    engine, tok = llm.llm_engine, llm.get_tokenizer()
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(TEXTS[:2], greedy, use_tqdm=False)]
    long_text = TEXTS[2] * 2
    engine.add_request("gen0", TEXTS[0], greedy)
    engine.add_request("gen1", TEXTS[1], greedy)
    engine.add_request("tok", long_text, PoolingParams(task="token_embed", normalize=False))
    pooled = engine.scheduler.requests["tok"]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert pooled.num_preemptions > 0
    assert [done["gen0"].outputs[0].token_ids, done["gen1"].outputs[0].token_ids] == alone
    ids = tok.encode(long_text)
    assert done["tok"].outputs.data.shape == (len(ids), 64)
    np.testing.assert_allclose(done["tok"].outputs.data, _hf_hidden(causal_lm, ids), atol=1e-4)


def test_update_weights_replaces_a_token_classifiers_head_and_bias(tmp_path, token_classifier):
    import jaxllm

    other = _checkpoint(tmp_path / "other", num_labels=3, token_classifier=True, seed=6)
    llm = LLM(str(token_classifier), **LIMITS, warmup=False, compilation_cache_dir=None)
    new = jaxllm.load_model(str(other), dtype="float32").params
    with pytest.raises(ValueError, match=r"need its head \['score', 'score_bias'\]; missing \['score_bias'\]"):
        llm.update_weights({k: v for k, v in new.items() if k != "score_bias"})
    llm.update_weights(new)
    ids = llm.get_tokenizer().encode(TEXTS[0])
    rows = llm.reward(TEXTS[0], use_tqdm=False)[0].outputs.data
    np.testing.assert_allclose(rows, _softmax(_hf_token_logits(other, ids)), atol=2e-5)


def test_a_sequence_classifier_also_classifies_each_token(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    path = _checkpoint(tmp_path / "seq", num_labels=2, family="qwen3", seed=4)
    llm = LLM(str(path), **LIMITS, warmup=False, compilation_cache_dir=None)
    assert llm.llm_engine.supported_tasks == ("classify", "token_classify")
    hf = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()
    ids = llm.get_tokenizer().encode(TEXTS[2])
    with torch.no_grad():
        want = hf.score(hf.model(torch.tensor([ids])).last_hidden_state)[0].numpy()
    rows = llm.reward(TEXTS[2], use_tqdm=False)[0].outputs.data
    np.testing.assert_allclose(rows, _softmax(want), atol=2e-5)
    last = llm.classify(TEXTS[2], use_tqdm=False)[0].outputs.probs
    np.testing.assert_allclose(last, rows[-1], atol=1e-6)  # classify is the last token's row


def test_token_embed_equals_transformers_hidden_states_beside_generation(causal_lm):
    llm = LLM(str(causal_lm), **LIMITS)
    tok = llm.get_tokenizer()
    assert llm.llm_engine.supported_tasks == ("generate", "embed", "token_embed")
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    alone = llm.generate(TEXTS[0], greedy, use_tqdm=False)[0].outputs[0].token_ids
    engine = llm.llm_engine
    engine.add_request("gen", TEXTS[0], greedy)
    engine.add_request("tok", TEXTS[1], PoolingParams(task="token_embed"))
    engine.add_request("raw", TEXTS[2], PoolingParams(task="token_embed", normalize=False))
    engine.add_request("emb", TEXTS[1], PoolingParams(task="embed"))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert done["gen"].outputs[0].token_ids == alone
    hidden = _hf_hidden(causal_lm, tok.encode(TEXTS[1]))
    np.testing.assert_allclose(done["tok"].outputs.data, hidden / np.linalg.norm(hidden, axis=-1, keepdims=True),
                               atol=2e-5)
    np.testing.assert_allclose(done["raw"].outputs.data, _hf_hidden(causal_lm, tok.encode(TEXTS[2])), atol=1e-4)
    # embed is the last token's row of token_embed.
    np.testing.assert_allclose(done["emb"].outputs.data, done["tok"].outputs.data[-1], atol=1e-6)
    via_encode = llm.encode(TEXTS[1], pooling_task="token_embed", use_tqdm=False)[0].outputs.data
    np.testing.assert_allclose(via_encode, done["tok"].outputs.data, atol=1e-6)


def test_tasks_a_model_does_not_serve_are_refused(llm_tokens, token_classifier, causal_lm):
    llm = llm_tokens
    with pytest.raises(ValueError, match="pooling_task='classify' is not supported by this model; supported: "
                                         r"\['token_classify'\]"):
        llm.classify(TEXTS[0], use_tqdm=False)
    with pytest.raises(ValueError, match="pooling_task='embed' is not supported"):
        llm.embed(TEXTS[0], use_tqdm=False)
    with pytest.raises(ValueError, match="this model is a token classifier: it serves token_classify"):
        llm.generate(TEXTS[0], use_tqdm=False)
    with pytest.raises(ValueError, match="this model is a token classifier: use token_classify"):
        llm.score(TEXTS[0], TEXTS[1], use_tqdm=False)
    with pytest.raises(ValueError, match="task='token_embed' is not supported by this model"):
        llm.llm_engine.add_request("x", TEXTS[0], PoolingParams(task="token_embed"))
    assert not llm.llm_engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="LlamaForTokenClassification is a token classifier, which serves pooling "
                                         r"requests \(token_classify\) only"):
        LLM(str(token_classifier), runner="generate", **LIMITS, warmup=False, compilation_cache_dir=None)
    lm = LLM(str(causal_lm), **LIMITS, warmup=False, compilation_cache_dir=None)
    with pytest.raises(ValueError, match="pooling_task='token_classify' is not supported .* needs a "
                                         r"\*ForSequenceClassification or \*ForTokenClassification model"):
        lm.reward(TEXTS[0], use_tqdm=False)


# -- the server's POST /pooling, in process ------------------------------------------------------

def _client(path):
    llm = LLM(str(path), **LIMITS, warmup=False, compilation_cache_dir=None)
    return client_for(llm.llm_engine, LIMITS["max_model_len"], LIMITS["max_num_seqs"])



def test_pooling_route_on_a_token_classifier(llm_tokens, token_classifier):
    want = [o.outputs.data for o in llm_tokens.reward(TEXTS[:2], use_tqdm=False)]
    with _client(token_classifier) as client:
        response = client.post("/pooling", json={"model": "m", "input": TEXTS[:2]})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "list" and body["id"].startswith("pool-") and body["model"] == "m"
        for i, data in enumerate(body["data"]):
            assert data["index"] == i and data["object"] == "pooling"
            np.testing.assert_allclose(data["data"], want[i], atol=1e-6)
        n = sum(len(w) for w in want)
        assert body["usage"] == {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}
        packed = client.post("/pooling", json={"input": TEXTS[0], "encoding_format": "base64"}).json()
        values = np.frombuffer(base64.b64decode(packed["data"][0]["data"]), "<f4")
        np.testing.assert_allclose(values, want[0].reshape(-1), atol=1e-6)
        logits = client.post("/pooling", json={"input": TEXTS[0], "use_activation": False}).json()["data"][0]["data"]
        np.testing.assert_allclose(_softmax(np.asarray(logits)), want[0], atol=1e-5)
        assert_error(client.post("/pooling", json={"input": "a", "task": "classify"}), 400,
               "task='classify' is not supported by this model, which serves ['token_classify']", "task")
        assert_error(client.post("/pooling", json={"input": "a", "task": "reward"}), 400, "task")
        assert_error(client.post("/pooling", json={"input": "a", "dimensions": 4}), 400, "dimensions=4", "dimensions")
        assert_error(client.post("/classify", json={"input": "a"}), 400, "not a sequence classifier")
        assert_error(client.post("/score", json={"text_1": "a", "text_2": "b"}), 400, "is a token classifier")
        assert_error(client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}), 400,
               "is a token classifier")


def test_pooling_route_on_a_causal_lm(causal_lm):
    with _client(causal_lm) as client:
        rows = client.post("/pooling", json={"input": TEXTS[0]}).json()["data"][0]["data"]  # token_embed
        tok = make_tiny_tokenizer()
        hidden = _hf_hidden(causal_lm, tok.encode(TEXTS[0]))
        np.testing.assert_allclose(rows, hidden / np.linalg.norm(hidden, axis=-1, keepdims=True), atol=2e-5)
        vector = client.post("/pooling", json={"input": TEXTS[0], "task": "embed"}).json()["data"][0]["data"]
        embedding = client.post("/v1/embeddings", json={"input": TEXTS[0]}).json()["data"][0]["embedding"]
        np.testing.assert_allclose(vector, embedding, atol=1e-6)
        np.testing.assert_allclose(vector, rows[-1], atol=1e-6)
