"""Sleep mode and weight updates (vLLM's LLM.sleep / wake_up; update_weights for reinforcement-
learning loops): the device's weights and KV pool are freed and brought back, new weights replace
the old without a rebuild or a recompile, and the outputs are those of an engine built on them."""

from __future__ import annotations

import jax
import pytest
from tiny_models import make_tiny_checkpoint, make_tiny_tokenizer

import jaxllm
from jaxllm import LLM, SamplingParams

LIMITS = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=32,
              compilation_cache_dir=None)
PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8, 9, 10] * 3}, {"prompt_token_ids": [11, 12, 13]}]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    paths = [make_tiny_checkpoint("llama", root / name, seed=seed, config_overrides={"vocab_size": 320})
             for name, seed in (("a", 0), ("b", 1))]
    for path in paths:
        make_tiny_tokenizer().save_pretrained(path)  # for the server's text prompts
    return paths


def _ids(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_sleep_frees_the_device_and_wake_up_restores_it(checkpoints):
    llm = LLM(str(checkpoints[0]), enable_sleep_mode=True, **LIMITS)
    engine, runner = llm.llm_engine, llm.llm_engine.runner
    want = _ids(llm)
    compiles = engine.stats.num_compiles
    held = [*jax.tree.leaves(runner.params), *jax.tree.leaves(runner.kv)]
    llm.sleep(level=1)
    assert engine.is_sleeping() and all(x.is_deleted() for x in held if isinstance(x, jax.Array))
    with pytest.raises(ValueError, match="the engine is sleeping: wake_up"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.wake_up(["kv_cache"])
    assert engine.is_sleeping()  # the weights are still on the host
    llm.wake_up(["weights"])
    assert not engine.is_sleeping()
    hits = engine.stats.prefix_cache_hits
    assert _ids(llm) == want
    assert engine.stats.prefix_cache_hits == hits  # the cache was forgotten with the pool
    assert engine.stats.num_compiles == compiles
    with pytest.raises(ValueError, match=r"tags=\['weights', 'gpu'\]: unknown \['gpu'\]"):
        llm.wake_up(["weights", "gpu"])
    with pytest.raises(ValueError, match="level=3 must be 1"):
        llm.sleep(level=3)


def test_update_weights_serves_new_weights_without_a_rebuild(checkpoints):
    first, second = (jaxllm.load_model(str(p), dtype="float32") for p in checkpoints)
    want_second = _ids(LLM(second, **LIMITS, warmup=False))
    llm = LLM(str(checkpoints[0]), **LIMITS)
    engine = llm.llm_engine
    want_first = _ids(llm)
    assert want_first != want_second
    compiles = engine.stats.num_compiles
    # Level 2 discards the weights: new ones come through update_weights.
    llm.sleep(level=2)
    with pytest.raises(ValueError, match=r"sleep\(level=2\): the weights were discarded; update_weights"):
        llm.wake_up()
    llm.update_weights(second.params)
    llm.wake_up(["kv_cache"])
    assert _ids(llm) == want_second
    # Awake: the old weights back, and the prefix cache of the new ones forgotten.
    hits = engine.stats.prefix_cache_hits
    llm.update_weights(first.params)
    assert _ids(llm) == want_first and engine.stats.prefix_cache_hits == hits
    assert engine.stats.num_compiles == compiles
    bad = dict(first.params, layers={**first.params["layers"], "wq": first.params["layers"]["wq"][:, :8]})
    with pytest.raises(ValueError, match=r"update_weights params/layers/wq has shape \(2, 8, 4, 16\),"):
        llm.update_weights(bad)
    llm.llm_engine.add_request("pending", PROMPTS[0], GREEDY)
    for call in (lambda: llm.sleep(), lambda: llm.update_weights(first.params)):
        with pytest.raises(ValueError, match="needs an idle engine: 1 requests are unfinished"):
            call()
    llm.llm_engine.abort_request("pending")
    # A finished request that kept its blocks (as beam search's do) holds K/V a sleep would lose.
    engine.add_request("kept", PROMPTS[0], GREEDY, retain_blocks=True)
    while engine.has_unfinished_requests():
        engine.step()
    with pytest.raises(ValueError, match="KV blocks are still held by retained requests"):
        llm.sleep()
    engine.release_request("kept")
    assert _ids(llm) == want_first  # nothing was changed by the refused calls


def _client(path):
    from fastapi.testclient import TestClient

    from jaxllm.engine.async_engine import AsyncLLMEngine
    from jaxllm.entrypoints.openai.api_server import build_app
    from jaxllm.entrypoints.openai.metrics import ServerMetrics
    from jaxllm.entrypoints.openai.serving_engine import ServedModel

    engine = AsyncLLMEngine(LLM(str(path), **LIMITS, warmup=False).llm_engine)
    served = ServedModel("m", str(path), LIMITS["max_model_len"], LIMITS["max_num_seqs"])
    return TestClient(build_app(engine, served, ServerMetrics("m", lambda: engine.stats)))


def test_dev_mode_server_routes(checkpoints, monkeypatch):
    """vLLM's /sleep, /wake_up, /is_sleeping and /reset_prefix_cache, with JAXLLM_SERVER_DEV_MODE=1
    (or VLLM_SERVER_DEV_MODE): run on the engine thread between steps."""
    for name in ("JAXLLM_SERVER_DEV_MODE", "VLLM_SERVER_DEV_MODE"):
        monkeypatch.delenv(name, raising=False)
    with _client(checkpoints[0]) as client:
        assert client.post("/sleep").status_code == 404
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    body = {"model": "m", "prompt": "The capital of France", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with _client(checkpoints[0]) as client:
        want = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert client.get("/is_sleeping").json() == {"is_sleeping": False}
        assert client.post("/sleep", params={"level": 1}).status_code == 200
        assert client.get("/is_sleeping").json() == {"is_sleeping": True}
        refused = client.post("/v1/completions", json=body)
        assert refused.status_code == 400 and "sleeping" in refused.json()["error"]["message"]
        bad = client.post("/wake_up", params={"tags": ["weights", "gpu"]})
        assert bad.status_code == 400 and "unknown ['gpu']" in bad.json()["error"]["message"]
        assert client.post("/wake_up", params={"tags": ["kv_cache"]}).status_code == 200
        assert client.get("/is_sleeping").json() == {"is_sleeping": True}
        assert client.post("/wake_up").status_code == 200
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == want
        assert client.post("/reset_prefix_cache").status_code == 200
        assert client.post("/sleep", params={"level": 5}).status_code == 400
