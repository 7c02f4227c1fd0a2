"""Matryoshka embeddings (vLLM's ``dimensions``): a model whose config.json says it was trained for
them (``is_matryoshka``, ``matryoshka_dimensions``, or the same through ``hf_overrides``) returns
the first ``dimensions`` values of each embedding, normalised after the cut; any other model refuses
by name, in LLM.embed and in the server's /v1/embeddings and /pooling."""

from __future__ import annotations

import numpy as np
import pytest
from server_client import assert_error, client_for
from tiny_models import make_tiny_checkpoint

from jaxllm import LLM
from jaxllm.pooling_params import PoolingParams

LIMITS = dict(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=32, block_size=8)
PROMPTS = [[3, 17, 33, 9, 101, 5, 7], [11, 12, 13] * 7]


def _checkpoint(tmp_path_factory, name: str, **overrides):
    return str(make_tiny_checkpoint("llama", tmp_path_factory.mktemp(name), seed=3, config_overrides=overrides))


@pytest.fixture(scope="module")
def matryoshka(tmp_path_factory):
    return LLM(_checkpoint(tmp_path_factory, "mrl", is_matryoshka=True), runner="pooling", **LIMITS)


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    return LLM(_checkpoint(tmp_path_factory, "mrl_dims", matryoshka_dimensions=[16, 32]), runner="pooling", **LIMITS)


def _embed(llm, **params):
    outs = llm.embed([{"prompt_token_ids": p} for p in PROMPTS], PoolingParams(**params), use_tqdm=False)
    return [np.asarray(o.outputs.embedding) for o in outs]


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_dimensions_cut_the_embedding_then_normalise(matryoshka):
    raw = _embed(matryoshka, normalize=False)  # the last token's final hidden state, 64 wide
    assert [r.shape for r in raw] == [(64,), (64,)]
    for d in (8, 16, 64):
        got = _embed(matryoshka, dimensions=d)
        for g, r in zip(got, raw, strict=True):
            assert g.shape == (d,)
            np.testing.assert_allclose(g, _unit(r[:d]), atol=1e-6)
    for g, r in zip(_embed(matryoshka, dimensions=8, normalize=False), raw, strict=True):
        np.testing.assert_allclose(g, r[:8], atol=1e-6)
    # token_embed: every prompt token's row, cut and normalised
    rows = matryoshka.encode([{"prompt_token_ids": PROMPTS[0]}], PoolingParams(normalize=False),
                             pooling_task="token_embed", use_tqdm=False)[0].outputs.data
    cut = matryoshka.encode([{"prompt_token_ids": PROMPTS[0]}], PoolingParams(dimensions=16),
                            pooling_task="token_embed", use_tqdm=False)[0].outputs.data
    assert np.asarray(cut).shape == (len(PROMPTS[0]), 16)
    np.testing.assert_allclose(cut, _unit(np.asarray(rows)[:, :16]), atol=1e-6)


def test_listed_dimensions_only_and_never_wider_than_the_model(matryoshka, listed):
    assert _embed(listed, dimensions=32)[0].shape == (32,)
    with pytest.raises(ValueError, match=r"dimensions=20: LlamaForCausalLM supports only \[16, 32\] matryoshka"):
        _embed(listed, dimensions=20)
    with pytest.raises(ValueError, match="dimensions=65 is more than the model's embedding size 64"):
        _embed(matryoshka, dimensions=65)


def test_a_model_not_trained_for_it_refuses_unless_overridden(tmp_path_factory):
    path = _checkpoint(tmp_path_factory, "plain")
    plain = LLM(path, runner="pooling", **LIMITS)
    with pytest.raises(ValueError, match="dimensions=16: LlamaForCausalLM does not support matryoshka"):
        _embed(plain, dimensions=16)
    assert [e.shape for e in _embed(plain)] == [(64,), (64,)]  # the engine serves on
    overridden = LLM(path, runner="pooling", hf_overrides={"is_matryoshka": True}, **LIMITS)
    np.testing.assert_allclose(_embed(overridden, dimensions=16)[1], _unit(_embed(plain, normalize=False)[1][:16]),
                               atol=1e-6)


def test_server_routes_cut_or_refuse_by_name(listed):
    want = _embed(listed, dimensions=16)
    with client_for(listed.llm_engine, LIMITS["max_model_len"], LIMITS["max_num_seqs"]) as client:
        body = client.post("/v1/embeddings", json={"input": PROMPTS, "dimensions": 16}).json()
        for data, w in zip(body["data"], want, strict=True):
            np.testing.assert_allclose(data["embedding"], w, atol=1e-6)
        rows = client.post("/pooling", json={"input": PROMPTS[:1], "dimensions": 32, "task": "token_embed"}).json()
        assert np.asarray(rows["data"][0]["data"]).shape == (len(PROMPTS[0]), 32)
        assert_error(client.post("/v1/embeddings", json={"input": PROMPTS, "dimensions": 20}), 400,
                     "supports only [16, 32] matryoshka dimensions", "dimensions")
        assert_error(client.post("/v1/embeddings", json={"input": PROMPTS, "dimensions": 0}), 400,
                     "dimensions=0 must be a positive integer", "dimensions")
        # this checkpoint has no tokenizer: token ids only, bounded by the model's vocabulary
        assert_error(client.post("/v1/embeddings", json={"input": "some text"}), 400, "has no tokenizer", "input")
        assert_error(client.post("/v1/embeddings", json={"input": [[5, 160]]}), 400,
                     "input token ids must be in [0, 160)", "input")
