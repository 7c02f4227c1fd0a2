"""vLLM's loading and compatibility engine arguments, so vLLM scripts run unchanged: enforce_eager,
enable_chunked_prefill=False, max_logprobs, skip_tokenizer_init, hf_overrides, load_format
(incl. "dummy"), revision of a cached Hub repo, and the values this engine cannot honour refused
by name (quantization, tokenizer_mode)."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from tiny_models import make_tiny_checkpoint, make_tiny_tokenizer

from jaxllm import LLM, SamplingParams

VOCAB = 320
LIMITS = dict(max_model_len=64, max_num_seqs=4, num_kv_blocks=40, compilation_cache_dir=None)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("compat")
    make_tiny_checkpoint("llama", path, seed=4, config_overrides={"vocab_size": VOCAB})
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts():
    tok = make_tiny_tokenizer()
    return [tok.encode(t)[:40] for t in ("The capital of France is Paris, the capital of Spain is Madrid and " * 3,
                                          "A paged KV cache stores keys and values in blocks of sixteen tokens; " * 3)]


@pytest.fixture(scope="module")
def want(model, prompts):
    llm = LLM(str(model), **LIMITS, max_num_batched_tokens=16, warmup=False)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY,
                                                          use_tqdm=False)]


def test_enforce_eager_compiles_on_demand(model, prompts, want):
    llm = LLM(str(model), **LIMITS, max_num_batched_tokens=16, enforce_eager=True)
    assert llm.llm_engine.stats.num_compiles == 0
    out = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == want
    assert llm.llm_engine.stats.num_compiles > 0


def test_without_chunked_prefill_prompts_go_whole(model, prompts, want):
    with pytest.raises(ValueError, match="max_num_batched_tokens=16 must be >= max_model_len=64 without chunked"):
        LLM(str(model), **LIMITS, max_num_batched_tokens=16, enable_chunked_prefill=False, warmup=False)
    llm = LLM(str(model), **LIMITS, enable_chunked_prefill=False, warmup=False)
    engine = llm.llm_engine
    assert engine.scheduler.config.max_num_batched_tokens == 64  # max_model_len, as vLLM
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, GREEDY)
    first = engine.scheduler.schedule()  # 40 + 40 tokens do not fit 64: the second prompt waits whole
    assert [(s.request_id, len(s.token_ids)) for s in first.sequences] == [("0", 40)]
    engine.abort_request(["0", "1"])
    chunked = LLM(str(model), **LIMITS, max_num_batched_tokens=64, warmup=False).llm_engine
    for i, p in enumerate(prompts):
        chunked.add_request(str(i), {"prompt_token_ids": p}, GREEDY)
    assert [(s.request_id, len(s.token_ids)) for s in chunked.scheduler.schedule().sequences] == [("0", 40), ("1", 24)]
    chunked.abort_request(["0", "1"])
    out = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == want


def test_max_logprobs_and_refused_values(model):
    llm = LLM(str(model), **LIMITS, max_logprobs=3, warmup=False)
    with pytest.raises(ValueError, match="logprobs=4 is more than this engine's max_logprobs=3"):
        llm.generate("hi", SamplingParams(logprobs=4), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_logprobs=5 is more than"):
        llm.generate("hi", SamplingParams(prompt_logprobs=5), use_tqdm=False)
    assert len(llm.generate("hi", SamplingParams(logprobs=3, max_tokens=1), use_tqdm=False)[0].outputs[0].logprobs[0]) >= 3
    for kwargs, match in [({"max_logprobs": 21}, r"max_logprobs=21 must be an integer in \[0, 20\]"),
                          ({"quantization": "awq"}, "quantization='awq' is not supported"),
                          ({"tokenizer_mode": "mistral"}, "tokenizer_mode='mistral' is not supported"),
                          ({"load_format": "npz"}, "load_format='npz' must be one of"),
                          ({"load_format": "pt"}, "load_format='pt': .* holds safetensors weights"),
                          ({"load_format": "gguf"}, "load_format='gguf': .* holds no single .gguf file"),
                          ({"revision": "v1"}, "revision='v1' picks a version of a Hub repo; .* is a local path")]:
        with pytest.raises(ValueError, match=match):
            LLM(str(model), **LIMITS, warmup=False, **kwargs)


def test_skip_tokenizer_init(model, prompts, want):
    llm = LLM(str(model), **LIMITS, max_num_batched_tokens=16, skip_tokenizer_init=True, warmup=False)
    assert llm.get_tokenizer() is None
    out = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == want and out[0].outputs[0].text == ""
    with pytest.raises(ValueError, match="prompt is a string but the engine has no tokenizer"):
        llm.generate("text", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="stop strings are matched on text, and this engine has no tokenizer"):
        llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(stop=["."]), use_tqdm=False)


def test_hf_overrides_and_dummy_weights(model, tmp_path):
    llm = LLM(str(model), **dict(LIMITS, max_model_len=None), hf_overrides={"max_position_embeddings": 48},
              warmup=False)
    assert llm.llm_engine.scheduler.config.max_model_len == 48
    with pytest.raises(ValueError, match="hf_overrides apply to a Hugging Face checkpoint's config.json"):
        LLM(None, hf_overrides={"x": 1}, warmup=False)  # the embedded GGUF
    bare = tmp_path / "bare"  # config and tokenizer, no weights
    shutil.copytree(model, bare, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    with pytest.raises(FileNotFoundError, match="no weights in"):
        LLM(str(bare), **LIMITS, warmup=False)
    from converters import load_checkpoint

    dummy, real = load_checkpoint(bare, load_format="dummy"), load_checkpoint(model)
    leaves = lambda params: {k: v for k, v in params.items() if k != "layers"} | params["layers"]  # noqa: E731
    assert {k: v.shape for k, v in leaves(dummy.params).items()} == {k: v.shape for k, v in leaves(real.params).items()}
    assert all(np.abs(v).max() <= 1e-3 and np.abs(v).max() > 5e-4 for v in leaves(dummy.params).values())
    out = LLM(str(bare), **LIMITS, load_format="dummy", warmup=False).generate("hi", GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 6


def test_revision_picks_a_cached_snapshot(model, tmp_path):
    from converters.resolve import resolve_model

    repo = tmp_path / "hub" / "models--org--tiny"
    for ref, commit in (("main", "a" * 40), ("v2", "b" * 40)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        shutil.copytree(model, repo / "snapshots" / commit)
    hub = tmp_path / "hub"
    assert resolve_model("org/tiny", hf_cache_dir=hub).name == "a" * 40
    assert resolve_model("org/tiny", hf_cache_dir=hub, revision="v2").name == "b" * 40
    assert resolve_model("org/tiny", hf_cache_dir=hub, revision="b" * 40).name == "b" * 40
    with pytest.raises(FileNotFoundError, match="'org/tiny' at revision 'v3' is not a local directory"):
        resolve_model("org/tiny", hf_cache_dir=hub, revision="v3")


def test_periodic_stats_line(model, monkeypatch, caplog):
    monkeypatch.setenv("JAXLLM_LOG_STATS_INTERVAL", "0")
    quiet = LLM(str(model), **LIMITS, warmup=False)  # LLM's default, as vLLM's: disable_log_stats=True
    with caplog.at_level("INFO", logger="jaxllm"):
        quiet.generate("hi", GREEDY, use_tqdm=False)
    assert "Avg prompt throughput" not in caplog.text
    llm = LLM(str(model), **LIMITS, warmup=False, disable_log_stats=False)
    with caplog.at_level("INFO", logger="jaxllm"):
        llm.generate(["hi", "there"], GREEDY, use_tqdm=False)
    lines = [r.getMessage() for r in caplog.records if "Avg prompt throughput" in r.getMessage()]
    assert lines and all(re.fullmatch(r"Avg prompt throughput: [\d.]+ tokens/s, Avg generation throughput: [\d.]+ "
                                      r"tokens/s, Running: \d+ reqs, Waiting: \d+ reqs, KV cache usage: [\d.]+%, "
                                      r"Prefix cache hit rate: [\d.]+%", line) for line in lines)
    assert "Running: 2 reqs" in lines[0]
    monkeypatch.setenv("JAXLLM_LOG_STATS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="JAXLLM_LOG_STATS_INTERVAL='soon' must be a number of seconds"):
        LLM(str(model), **LIMITS, warmup=False, disable_log_stats=False)


def test_get_metrics(model, prompts):
    from jaxllm.metrics_reader import Counter, Gauge, Vector

    llm = LLM(str(model), **LIMITS, warmup=False, speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    metrics = {m.name: m for m in llm.get_metrics()}
    assert isinstance(metrics["jaxllm:prompt_tokens"], Counter)
    assert metrics["jaxllm:prompt_tokens"].value == sum(len(p) for p in prompts)
    assert metrics["jaxllm:generation_tokens"].value == sum(len(o.outputs[0].token_ids) for o in outs) == 12
    assert isinstance(metrics["jaxllm:num_requests_running"], Gauge) and metrics["jaxllm:num_requests_running"].value == 0
    assert metrics["jaxllm:num_requests_running"].labels == {"model_name": str(model)}
    per_position = metrics["jaxllm:spec_decode_num_accepted_tokens_per_pos"]
    assert isinstance(per_position, Vector) and len(per_position.values) in (0, 2)  # one per proposal position
    assert sum(per_position.values) == metrics["jaxllm:spec_decode_num_accepted_tokens"].value


def test_read_metrics_gives_a_vector_per_position():
    import dataclasses

    from jaxllm.engine.llm_engine import EngineStats
    from jaxllm.engine.scheduler import SpecDecodeStats
    from jaxllm.metrics_reader import Vector, read_metrics

    stats = EngineStats(1, 2, 3, 10, 40, 20, 0.5, 1, 9, 7, 40, 12,
                        spec_decode=SpecDecodeStats(3, 6, 4, [3, 1]))
    metrics = {m.name: m for m in read_metrics(stats, "m")}
    assert metrics["jaxllm:spec_decode_num_accepted_tokens_per_pos"] == Vector(
        "jaxllm:spec_decode_num_accepted_tokens_per_pos", {"model_name": "m"}, [3, 1])
    assert (metrics["jaxllm:num_requests_waiting"].value, metrics["jaxllm:kv_cache_usage_perc"].value) == (2, 0.3)
    assert metrics["jaxllm:prefix_cache_hits"].value == 20
    assert "jaxllm:lora_requests_info" not in metrics and dataclasses.is_dataclass(metrics["jaxllm:prompt_tokens"])
