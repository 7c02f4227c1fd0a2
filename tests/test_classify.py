"""Sequence classifiers and scoring (vLLM's LLM.classify and LLM.score): tiny random
*ForSequenceClassification checkpoints give transformers' probabilities, however the engine
chunks, caches or preempts them; a one-label classifier scores text pairs as a cross-encoder."""

from __future__ import annotations

import dataclasses

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
DOCS = ["Paris is the capital of France.", "Blocks of keys and values.", "A query and a document.",
        "return a + b"]


def _checkpoint(path, family="llama", num_labels=3, seed=0, **overrides):
    make_tiny_checkpoint(family, path, num_labels=num_labels, seed=seed,
                         config_overrides={"vocab_size": VOCAB, **overrides})
    make_tiny_tokenizer().save_pretrained(path)
    return path


def _hf(path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()


def _hf_logits(model, token_ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].numpy()


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


@pytest.fixture(scope="module")
def three_labels(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("cls3"), id2label={0: "negative", 1: "neutral", 2: "positive"})


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("cross"), num_labels=1, seed=1)


@pytest.fixture(scope="module")
def llm3(three_labels):
    return LLM(str(three_labels), **LIMITS)


def test_config_reads_labels_and_the_activation():
    base = dict(architectures=["LlamaForSequenceClassification"], vocab_size=VOCAB, hidden_size=64,
                num_attention_heads=4, num_hidden_layers=2, intermediate_size=96, max_position_embeddings=128)
    c = config_from_hf({**base, "id2label": {"1": "yes", "0": "no"}})
    assert (c.num_labels, c.id2label, c.classifier_activation, c.tie_word_embeddings) == (2, ("no", "yes"), "softmax",
                                                                                         True)
    assert config_from_hf({**base, "id2label": {"0": "LABEL_0"}}).classifier_activation == "sigmoid"
    for problem_type, activation in [("regression", "identity"), ("multi_label_classification", "sigmoid"),
                                     ("single_label_classification", "softmax")]:
        assert config_from_hf({**base, "problem_type": problem_type}).classifier_activation == activation
    assert config_from_hf({**base, "architectures": ["Qwen3ForSequenceClassification"]}).qk_norm
    assert config_from_hf({**base, "architectures": ["LlamaForCausalLM"]}).num_labels == 0
    from converters.orbax_cache import config_from_dict, config_to_dict

    assert config_from_dict(config_to_dict(c)) == c
    with pytest.raises(ValueError, match="id2label has 1 labels for num_labels=2"):
        dataclasses.replace(c, id2label=("x",))


def test_pooling_params_errors():
    assert PoolingParams(activation=False).use_activation is False
    for kwargs, match in [(dict(activation=True, use_activation=False), "disagree"),
                          (dict(use_activation=1), "use_activation=1 must be a bool"),
                          (dict(task="score"), "task='score' must be one of")]:
        with pytest.raises(ValueError, match=match):
            PoolingParams(**kwargs)


def test_classify_equals_transformers(llm3, three_labels):
    hf = _hf(three_labels)
    tok = llm3.get_tokenizer()
    compiles = llm3.llm_engine.stats.num_compiles
    outputs = llm3.classify(TEXTS, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == [tok.encode(t) for t in TEXTS]
    for out, text in zip(outputs, TEXTS, strict=True):
        want = _softmax(_hf_logits(hf, tok.encode(text)))
        assert out.outputs.num_classes == 3
        np.testing.assert_allclose(out.outputs.probs, want, atol=2e-5)
    logits = llm3.classify(TEXTS[0], pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    np.testing.assert_allclose(logits[0].outputs.probs, _hf_logits(hf, tok.encode(TEXTS[0])), atol=2e-5)
    # The same prompts again: full blocks come from the prefix cache, and the answer is the same.
    hits = llm3.llm_engine.stats.prefix_cache_hits
    again = llm3.encode(TEXTS, use_tqdm=False)  # the model's own task: classify
    assert llm3.llm_engine.stats.prefix_cache_hits > hits
    for a, b in zip(again, outputs, strict=True):
        np.testing.assert_allclose(a.outputs.data, b.outputs.probs, atol=1e-6)
    assert llm3.llm_engine.stats.num_compiles == compiles
    assert llm3.llm_engine.classifier.labels == ("negative", "neutral", "positive")


def test_classify_through_chunked_prefill_in_a_small_pool(three_labels):
    hf = _hf(three_labels)
    llm = LLM(str(three_labels), **dict(LIMITS, max_num_batched_tokens=8, num_kv_blocks=8, max_num_seqs=4),
              enable_prefix_caching=False)
    tok = llm.get_tokenizer()
    long_texts = [t * 2 for t in TEXTS]  # 2-6 blocks each, 15 in all, of the pool's 7; 200 tokens
    steps = llm.llm_engine.stats.num_steps
    outputs = llm.classify(long_texts, use_tqdm=False)
    assert llm.llm_engine.stats.num_steps - steps >= 200 // 8  # 8-token chunks
    for out, text in zip(outputs, long_texts, strict=True):
        np.testing.assert_allclose(out.outputs.probs, _softmax(_hf_logits(hf, tok.encode(text))), atol=2e-5)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_other_families_classify(tmp_path, family):
    path = _checkpoint(tmp_path / family, family=family, num_labels=2, seed=3)
    hf = _hf(path)
    llm = LLM(str(path), **LIMITS, warmup=False, compilation_cache_dir=None)
    tok = llm.get_tokenizer()
    out = llm.classify(TEXTS[:2], pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    for o, text in zip(out, TEXTS[:2], strict=True):
        np.testing.assert_allclose(o.outputs.probs, _hf_logits(hf, tok.encode(text)), atol=2e-5)


def test_cross_encoder_scores_pairs_as_transformers(cross_encoder):
    hf = _hf(cross_encoder)
    llm = LLM(str(cross_encoder), **LIMITS)
    tok = llm.get_tokenizer()
    pair_ids = [tok(text=TEXTS[0], text_pair=d)["input_ids"] for d in DOCS]
    assert pair_ids[0] == tok.encode(TEXTS[0]) + tok.encode(DOCS[0])
    want = [float(_sigmoid(_hf_logits(hf, ids))[0]) for ids in pair_ids]
    one_to_many = llm.score(TEXTS[0], DOCS, use_tqdm=False)
    assert [o.prompt_token_ids for o in one_to_many] == pair_ids
    np.testing.assert_allclose([o.outputs.score for o in one_to_many], want, atol=2e-5)
    assert len(set(np.round(want, 4))) == len(DOCS)  # the scores tell the documents apart
    pairwise = llm.score(TEXTS, DOCS, use_tqdm=False)
    want_pairwise = [float(_sigmoid(_hf_logits(hf, tok(text=q, text_pair=d)["input_ids"]))[0])
                     for q, d in zip(TEXTS, DOCS, strict=True)]
    np.testing.assert_allclose([o.outputs.score for o in pairwise], want_pairwise, atol=2e-5)
    raw = llm.score(TEXTS[0], DOCS[:1], pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    np.testing.assert_allclose(raw[0].outputs.score, _hf_logits(hf, pair_ids[0])[0], atol=2e-5)
    truncated = llm.score(TEXTS[0], DOCS[:1], truncate_prompt_tokens=4, use_tqdm=False)
    assert truncated[0].prompt_token_ids == pair_ids[0][-4:]
    for args, match in [((TEXTS[:2], DOCS[:3]), "data_1 has 2 texts and data_2 3"),
                        (([], DOCS), "data_1 .* is empty"), ((TEXTS[0], []), "data_2 .* is empty"),
                        ((TEXTS[0], [[1, 2]]), "data_2 must hold texts")]:
        with pytest.raises(ValueError, match=match):
            llm.score(*args, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_classifiers_refuse_generation_and_embedding(llm3, three_labels):
    engine = llm3.llm_engine
    assert engine.supported_tasks == ("classify", "token_classify")
    with pytest.raises(ValueError, match="this model is a sequence classifier"):
        llm3.generate(TEXTS[0], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="pooling_task='embed' is not supported by this model"):
        llm3.embed(TEXTS[0], use_tqdm=False)
    with pytest.raises(ValueError, match="task='embed' is not supported by this model"):
        engine.add_request("e", TEXTS[0], PoolingParams(task="embed"))
    with pytest.raises(ValueError, match="score needs a cross-encoder .* 3 labels"):
        llm3.score(TEXTS[0], DOCS, use_tqdm=False)
    with pytest.raises(ValueError, match="disagrees with pooling_task='classify'"):
        llm3.classify(TEXTS[0], pooling_params=PoolingParams(task="embed"), use_tqdm=False)
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="runner='generate': LlamaForSequenceClassification is a sequence classifier"):
        LLM(str(three_labels), runner="generate", **LIMITS, warmup=False, compilation_cache_dir=None)


# -- the server's /classify, /score and /rerank, in process ------------------------------------

def _client(path):
    llm = LLM(str(path), **LIMITS, warmup=False, compilation_cache_dir=None)
    return client_for(llm.llm_engine, LIMITS["max_model_len"], LIMITS["max_num_seqs"])



@pytest.fixture(scope="module")
def classifier_client(three_labels):
    with _client(three_labels) as client:  # runs the app's lifespan: the engine loop
        yield client


@pytest.fixture(scope="module")
def cross_encoder_client(cross_encoder):
    with _client(cross_encoder) as client:
        yield client


def test_classify_route(classifier_client, llm3):
    client = classifier_client
    want = [o.outputs.probs for o in llm3.classify(TEXTS[:2], use_tqdm=False)]
    response = client.post("/classify", json={"model": "m", "input": TEXTS[:2]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["id"].startswith("classify-") and body["model"] == "m"
    labels = ("negative", "neutral", "positive")
    for i, data in enumerate(body["data"]):
        assert data["index"] == i and data["num_classes"] == 3
        np.testing.assert_allclose(data["probs"], want[i], atol=1e-6)
        assert data["label"] == labels[int(np.argmax(want[i]))]
    tok = llm3.get_tokenizer()
    n = sum(len(tok.encode(t)) for t in TEXTS[:2])
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}
    raw = client.post("/classify", json={"input": TEXTS[0], "use_activation": False}).json()["data"][0]["probs"]
    assert abs(sum(raw) - 1) > 1e-3  # logits, not probabilities
    np.testing.assert_allclose(_softmax(np.asarray(raw)), want[0], atol=1e-5)
    # vLLM's chat form: the conversation through a chat template (the tiny tokenizer has none of its own).
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    chat = client.post("/classify", json={"messages": [{"role": "user", "content": TEXTS[0]}],
                                          "chat_template": template}).json()["data"][0]["probs"]
    plain = client.post("/classify", json={"input": f"user: {TEXTS[0]}\n"}).json()["data"][0]["probs"]
    np.testing.assert_allclose(chat, plain, atol=1e-6)
    assert_error(client.post("/score", json={"text_1": "a", "text_2": "b"}), 400, "a classifier of 3 labels, not a cross-encoder")
    assert_error(client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}), 400, "is a sequence classifier")
    assert_error(client.post("/v1/embeddings", json={"input": "a"}), 400, "task='embed' is not supported")
    assert_error(client.post("/classify", json={"input": "a", "activation": True, "use_activation": False}), 400,
           "disagree", "activation")
    assert_error(client.post("/classify", json={"input": []}), 400, "input must not be empty", "input")
    assert_error(client.post("/classify", json={"model": "other", "input": "a"}), 404, "other")


def test_score_and_rerank_routes(cross_encoder_client, cross_encoder):
    client = cross_encoder_client
    llm_scores = [s.outputs.score for s in LLM(str(cross_encoder), **LIMITS, warmup=False,
                                                compilation_cache_dir=None).score(TEXTS[0], DOCS, use_tqdm=False)]
    for path in ("/score", "/v1/score"):
        body = client.post(path, json={"model": "m", "text_1": TEXTS[0], "text_2": DOCS}).json()
        assert body["object"] == "list" and body["id"].startswith("score-")
        assert [d["index"] for d in body["data"]] == list(range(len(DOCS)))
        assert all(d["object"] == "score" for d in body["data"])
        np.testing.assert_allclose([d["score"] for d in body["data"]], llm_scores, atol=1e-6)
    pairwise = client.post("/score", json={"text_1": TEXTS[:2], "text_2": DOCS[:2]}).json()["data"]
    assert len(pairwise) == 2 and abs(pairwise[0]["score"] - llm_scores[0]) < 1e-6
    order = sorted(range(len(DOCS)), key=lambda i: -llm_scores[i])
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        body = client.post(path, json={"model": "m", "query": TEXTS[0], "documents": DOCS, "top_n": 2}).json()
        assert body["id"].startswith("rerank-") and body["model"] == "m"
        assert [r["index"] for r in body["results"]] == order[:2]
        assert [r["document"]["text"] for r in body["results"]] == [DOCS[i] for i in order[:2]]
        np.testing.assert_allclose([r["relevance_score"] for r in body["results"]],
                                   [llm_scores[i] for i in order[:2]], atol=1e-6)
        assert body["usage"]["total_tokens"] > 0
    everything = client.post("/rerank", json={"query": TEXTS[0], "documents": DOCS}).json()["results"]
    assert [r["index"] for r in everything] == order
    assert_error(client.post("/score", json={"text_1": TEXTS[:2], "text_2": DOCS[:3]}), 400, "data_1 has 2 texts", "text_1")
    assert_error(client.post("/rerank", json={"query": "q", "documents": []}), 400, "documents must hold non-empty texts",
           "documents")
    assert_error(client.post("/rerank", json={"query": "q", "documents": ["d"], "top_n": -1}), 400, "top_n=-1", "top_n")
    assert_error(client.post("/rerank", json={"query": "q", "documents": ["d"], "truncate_prompt_tokens": 0}), 400,
           "truncate_prompt_tokens=0", "truncate_prompt_tokens")


def test_update_weights_replaces_a_classifiers_head_too(tmp_path, three_labels):
    import jaxllm

    other = _checkpoint(tmp_path / "other", seed=5, id2label={0: "negative", 1: "neutral", 2: "positive"})
    llm = LLM(str(three_labels), **LIMITS, warmup=False)
    new = jaxllm.load_model(str(other), dtype="float32").params
    with pytest.raises(ValueError, match=r"a classifier's params need its head \['score'\]; missing \['score'\]"):
        llm.update_weights({k: v for k, v in new.items() if k != "score"})
    with pytest.raises(ValueError, match=r"update_weights params/score has shape \(64, 2\), expected \(64, 3\)"):
        llm.update_weights({**new, "score": new["score"][:, :2]})
    llm.update_weights(new)
    hf, tok = _hf(other), llm.get_tokenizer()
    out = llm.classify(TEXTS[:2], use_tqdm=False)
    for o, text in zip(out, TEXTS[:2], strict=True):
        np.testing.assert_allclose(o.outputs.probs, _softmax(_hf_logits(hf, tok.encode(text))), atol=2e-5)


def test_too_long_pairs_are_a_400_naming_the_fields(cross_encoder_client):
    long = "word " * 200  # over max_model_len=128 tokens together with the query
    response = cross_encoder_client.post("/rerank", json={"query": "q", "documents": ["short", long]})
    assert_error(response, 400, "an input (query/documents) has", "query/documents")
