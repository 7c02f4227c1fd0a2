"""LLM end to end on the embedded SmolLM2: greedy output equals transformers' token for token,
however the requests are batched, cached, preempted or chunked."""

from __future__ import annotations

import pytest
from conftest import GREEDY_MAX_TOKENS as MAX_TOKENS
from conftest import GREEDY_PROMPTS as PROMPTS

from jaxllm import LLM, BeamSearchParams, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
# Small limits keep the compiled bucket set (and the suite) small.
LIMITS = dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def expected(smollm2_expected_greedy):
    return smollm2_expected_greedy


@pytest.fixture(scope="module")
def llm(smollm2_model):
    return LLM(smollm2_model, **LIMITS)


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_batched_greedy_equals_transformers(llm, expected):
    compiles = llm.llm_engine.stats.num_compiles
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert _tokens(outputs) == expected
    assert [o.prompt for o in outputs] == PROMPTS
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outputs)
    assert llm.llm_engine.stats.num_compiles == compiles  # warm-up covered every shape


def test_one_at_a_time_and_with_prefix_cache_hits(llm, expected):
    for prompt, want in zip(PROMPTS, expected, strict=True):
        assert _tokens(llm.generate(prompt, GREEDY, use_tqdm=False)) == [want]
    # The same prompts again: their full blocks now come from the prefix cache.
    before = llm.llm_engine.stats.prefix_cache_hits
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
    assert llm.llm_engine.stats.prefix_cache_hits > before


def test_prefix_caching_off(smollm2_model, expected):
    llm = LLM(smollm2_model, enable_prefix_caching=False, **LIMITS)
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
    assert llm.llm_engine.stats.prefix_cache_hits == 0


@pytest.mark.parametrize("policy, priority", [("fcfs", None), ("priority", [3, 1, 2, 0])])
def test_tiny_pool_preempts_and_still_matches(smollm2_model, expected, policy, priority):
    # 9 usable blocks of 16 tokens; the four requests need 2-4 blocks each.
    llm = LLM(smollm2_model, num_kv_blocks=10, scheduling_policy=policy, **LIMITS)
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False, priority=priority)) == expected
    stats = llm.llm_engine.stats
    assert stats.num_preemptions > 0
    assert stats.kv_blocks_used == 0


def test_chunked_prefill_matches(smollm2_model, expected):
    llm = LLM(smollm2_model, **dict(LIMITS, max_num_batched_tokens=16))
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
    # + the block copy and the structured-output mask-table write
    assert llm.llm_engine.stats.num_compiles == len(llm.llm_engine.runner.buckets.shapes()) + 2


def test_seeded_sampling_is_independent_of_the_batch(llm):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], seeded, use_tqdm=False)[0].outputs[0].token_ids
    other = SamplingParams(temperature=1.0, max_tokens=8)
    mixed = llm.generate([PROMPTS[2], PROMPTS[0], PROMPTS[1]], [other, seeded, other], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    unseeded = [llm.generate(PROMPTS[0], other, use_tqdm=False)[0].outputs[0].token_ids for _ in range(3)]
    assert len({tuple(u) for u in unseeded}) > 1


def test_stop_string_and_stop_token(llm, expected):
    tok = llm.get_tokenizer()
    full = tok.decode(expected[0])
    stop = full.split()[1]  # a word inside the greedy continuation
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=[stop]), use_tqdm=False)
    c = out[0].outputs[0]
    assert (c.finish_reason, c.stop_reason) == ("stop", stop)
    assert c.text == full[: full.index(stop)]
    stop_id = expected[0][3]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop_id]),
                       use_tqdm=False)
    c = out[0].outputs[0]
    first = expected[0].index(stop_id)
    assert (c.finish_reason, c.stop_reason, c.token_ids) == ("stop", stop_id, expected[0][: first + 1])
    # As in vLLM, the stop token stays in token_ids but not in the text, unless asked for.
    assert c.text == tok.decode(expected[0][:first])
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop_id],
                                                  include_stop_str_in_output=True), use_tqdm=False)
    assert out[0].outputs[0].text == tok.decode(expected[0][: first + 1])


def test_eos_adds_no_text_even_with_special_tokens_kept(llm):
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    kept = llm.chat(chat, SamplingParams(temperature=0, max_tokens=40, skip_special_tokens=False),
                    use_tqdm=False)[0].outputs[0]
    tok = llm.get_tokenizer()
    assert kept.finish_reason == "stop" and kept.stop_reason is None
    assert kept.token_ids[-1] == tok.eos_token_id
    assert kept.text == tok.decode(kept.token_ids[:-1]) and "Paris" in kept.text
    shown = llm.chat(chat, SamplingParams(temperature=0, max_tokens=40, skip_special_tokens=False,
                                          include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert shown.text == kept.text + tok.eos_token


def test_chat_answers_capital_of_france(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text
    assert out[0].outputs[0].finish_reason == "stop"  # ends on the chat's end-of-turn token


def test_min_tokens_holds_back_eos(llm):
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    short = llm.chat(chat, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "stop"
    n = len(short.token_ids) + 5
    held = llm.chat(chat, SamplingParams(temperature=0, max_tokens=40, min_tokens=n), use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) >= n
    assert short.token_ids[-1] not in held.token_ids[: n - 1]  # eos never sampled before min_tokens


def test_bad_requests_are_rejected_and_leave_nothing_queued(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate("hello " * 300, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(PROMPTS, [GREEDY], use_tqdm=False)
    with pytest.raises(ValueError, match="got 1 priority values for 4 prompts"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False, priority=[0])
    with pytest.raises(ValueError, match=r"priority=1 needs scheduling_policy='priority' \(this engine's is 'fcfs'\)"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False, priority=[0, 0, 1, 0])
    with pytest.raises(ValueError, match=r"prompt keys \['multi_modal_data'\] are not supported"):
        llm.generate([PROMPTS[0], {"prompt": "Describe", "multi_modal_data": {"image": None}}], GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.stats.kv_blocks_used == 0


def test_chat_reads_tool_history_and_tools_as_the_server_does(llm):
    # The prompt's token ids are those of the text the template rendered: the tools' names, the
    # text parts joined, the assistant's call with its JSON arguments parsed, the tool's answer with its id.
    template = ("{% for t in tools or [] %}{{ t.function.name }} {% endfor %}"
                "{% for m in messages %}{{ m.role }}:{{ m.content }}"
                "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments.city }}]{% endfor %}"
                "{% if m.tool_call_id %}<{{ m.tool_call_id }}>{% endif %};{% endfor %}")
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    params = SamplingParams(temperature=0, max_tokens=1)
    out = llm.chat(history, params, use_tqdm=False, chat_template=template, tools=[tool])[0]
    text = "get_weather user:Weather\nin Paris?;assistant:[get_weather Paris];tool:sunny<c1>;"
    assert out.prompt_token_ids == llm.get_tokenizer().encode(text)
    bad = [history[0], {**history[1], "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]
    with pytest.raises(ValueError, match=r"tool_calls\[0\]\.function\.arguments is not valid JSON"):
        llm.chat(bad, params, use_tqdm=False, chat_template=template)


def test_chat_continues_the_final_message_and_passes_template_kwargs(llm):
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    whole = llm.chat(chat, GREEDY, use_tqdm=False)[0].outputs[0]
    head = llm.get_tokenizer().decode(whole.token_ids[:3])
    partial = [*chat, {"role": "assistant", "content": head}]
    cont = llm.chat(partial, GREEDY, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)[0]
    # The prompt ends in the partial reply, not in an end of turn, and greedy goes on from it.
    assert cont.prompt_token_ids[-3:] == whole.token_ids[:3]
    assert cont.outputs[0].token_ids[: MAX_TOKENS - 3] == whole.token_ids[3:]
    with pytest.raises(ValueError, match="cannot both be true"):
        llm.chat(partial, GREEDY, use_tqdm=False, continue_final_message=True)
    template = "{% for m in messages %}{{ m.content }}{% endfor %}{{ tail }}"
    out = llm.chat(chat, GREEDY, use_tqdm=False, chat_template=template, chat_template_kwargs={"tail": " Answer:"})[0]
    assert out.prompt_token_ids == llm.get_tokenizer().encode(chat[0]["content"] + " Answer:")
    with pytest.raises(ValueError, match=r"chat_template_kwargs may not set \['tools'\]"):
        llm.chat(chat, GREEDY, use_tqdm=False, chat_template_kwargs={"tools": []})


def test_generation_config_gives_the_default_sampling_params(tmp_path, caplog, monkeypatch):
    import json

    from tiny_models import make_tiny_checkpoint

    path = make_tiny_checkpoint("llama", tmp_path / "model")
    (path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.0, "max_new_tokens": 3, "top_k": 50, "eos_token_id": 2}))
    limits = dict(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, warmup=False, compilation_cache_dir=None)
    with caplog.at_level("WARNING", logger="jaxllm"):
        llm = LLM(str(path), **limits)
    assert "generation config" in caplog.text
    default = llm.get_default_sampling_params()
    assert (default.temperature, default.max_tokens, default.top_k) == (0.0, 3, 0)
    prompt = {"prompt_token_ids": [5, 9, 12, 7]}
    got = llm.generate(prompt, use_tqdm=False)[0].outputs[0]
    want = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)[0].outputs[0]
    assert got.token_ids == want.token_ids and len(got.token_ids) <= 3
    assert LLM(str(path), generation_config="vllm", **limits).get_default_sampling_params() == SamplingParams()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "generation_config.json").write_text(json.dumps({"top_p": 0.5}))
    assert LLM(str(path), generation_config=str(elsewhere), **limits).get_default_sampling_params().top_p == 0.5
    with pytest.raises(ValueError, match="generation_config="):
        LLM(str(path), generation_config="nowhere", **limits)
    # A model loaded in a notebook has no directory for "auto" to read: nothing is looked up.
    import converters
    import jaxllm

    loaded = jaxllm.load_model(str(path), dtype="float32")
    monkeypatch.setattr(converters, "model_generation_defaults", lambda _: pytest.fail("looked up a model"))
    assert LLM(loaded, **limits).get_default_sampling_params() == SamplingParams()
    monkeypatch.undo()
    (path / "generation_config.json").write_text(json.dumps({"temperature": -1.0}))
    with pytest.raises(ValueError, match="temperature"):
        LLM(str(path), **limits)


def test_vllm_parallelism_and_tokenizer_arguments(tmp_path, smollm2_model):
    from tiny_models import make_tiny_checkpoint

    from jaxllm.engine_args import EngineArgs

    # tensor parallelism needs the devices (tests/test_tensor_parallel.py splits over three)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 needs 2 devices; 1 cpu device\(s\) are visible"):
        LLM(smollm2_model, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="pipeline_parallel_size=2: pipeline parallelism is not supported"):
        LLM(smollm2_model, pipeline_parallel_size=2)
    assert EngineArgs(tensor_parallel_size=1, trust_remote_code=True).tensor_parallel_size == 1
    path = make_tiny_checkpoint("llama", tmp_path / "model")  # weights only, no tokenizer
    tokenizer_dir = tmp_path / "tokenizer"
    smollm2_model.tokenizer.save_pretrained(tokenizer_dir)
    limits = dict(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, warmup=False, compilation_cache_dir=None)
    assert LLM(str(path), **limits).get_tokenizer() is None
    tokenizer = LLM(str(path), tokenizer=str(tokenizer_dir), **limits).get_tokenizer()
    assert len(tokenizer) == 49152 and tokenizer.encode("Paris") == smollm2_model.tokenizer.encode("Paris")
    with pytest.raises(ValueError, match="holds no Hugging Face tokenizer files"):
        LLM(str(path), tokenizer=str(path), **limits)


def test_vllm_engine_script_builds_from_cli_args(tmp_path):
    """vLLM's LLMEngine example: flags from EngineArgs.add_cli_args, EngineArgs.from_cli_args,
    LLMEngine.from_engine_args, then add_request / step until done."""
    import argparse

    from tiny_models import make_tiny_checkpoint

    from jaxllm import EngineArgs, LLMEngine

    path = make_tiny_checkpoint("llama", tmp_path / "model")
    parser = argparse.ArgumentParser()
    assert EngineArgs.add_cli_args(parser) is parser
    parser.add_argument("--num-prompts", type=int, default=2)  # a script's own flag is left alone
    args = parser.parse_args(["--model", str(path), "--max-model-len", "64", "--max-num-seqs", "4",
                              "--max-num-batched-tokens", "16", "--no-enable-prefix-caching", "--no-warmup",
                              "--block-size", "8", "--compilation-cache-dir", str(tmp_path / "xla")])
    engine_args = EngineArgs.from_cli_args(args)
    assert (engine_args.max_model_len, engine_args.block_size, engine_args.enable_prefix_caching) == (64, 8, False)
    assert engine_args.dtype == "auto" and engine_args.num_kv_blocks is None
    engine = LLMEngine.from_engine_args(engine_args)
    assert isinstance(engine, LLMEngine) and engine.get_tokenizer() is None
    assert engine.scheduler.config.max_model_len == 64
    prompts = [[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41], [2, 4, 6]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((out.request_id, out) for out in engine.step() if out.finished)
    reference = LLM(str(path), max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, block_size=8,
                    warmup=False, compilation_cache_dir=None)
    expected = reference.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [finished[str(i)].outputs[0].token_ids for i in range(2)] == [e.outputs[0].token_ids for e in expected]
    assert all(len(e.outputs[0].token_ids) == 6 for e in expected)


def test_reset_prefix_cache(llm, caplog):
    """A repeated prompt is served from the prefix cache until reset_prefix_cache; the output
    does not change; while a request holds blocks the reset is refused."""
    prompt = "The prefix cache keeps full blocks of sixteen tokens, so this prompt must be long enough."
    params = SamplingParams(temperature=0.0, max_tokens=4)
    llm.reset_prefix_cache()
    first, second = (llm.generate(prompt, params, use_tqdm=False)[0] for _ in range(2))
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 16 * (len(first.prompt_token_ids) // 16)
    assert second.num_cached_tokens >= 16
    assert llm.reset_prefix_cache()
    third = llm.generate(prompt, params, use_tqdm=False)[0]
    assert third.num_cached_tokens == 0
    assert first.outputs[0].token_ids == second.outputs[0].token_ids == third.outputs[0].token_ids
    engine = llm.llm_engine
    engine.add_request("held", prompt, params)
    engine.step()
    with caplog.at_level("WARNING", logger="jaxllm"):
        assert not llm.reset_prefix_cache()
    assert "prefix cache not reset" in caplog.text
    engine.abort_request("held")
    while engine.has_unfinished_requests():
        engine.step()
    assert llm.reset_prefix_cache()


def test_cache_salt_shares_prefix_blocks_only_within_a_salt(llm, smollm2_model):
    prompt = "The prefix cache keeps full blocks of sixteen tokens, so this prompt must be long enough."
    params = SamplingParams(temperature=0.0, max_tokens=4)
    llm.reset_prefix_cache()

    def cached(**salt) -> tuple[int, list[int]]:
        (out,) = llm.generate({"prompt": prompt, **salt}, params, use_tqdm=False)
        return out.num_cached_tokens, out.outputs[0].token_ids

    runs = [cached(cache_salt="a"), cached(cache_salt="a"), cached(cache_salt="b"), cached(), cached()]
    hits = [n for n, _ in runs]
    assert hits[0] == 0 and hits[1] >= 16 and hits[2:4] == [0, 0] and hits[4] == hits[1]
    assert all(tokens == runs[0][1] for _, tokens in runs)
    for bad in ("", 7):
        with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
            llm.generate({"prompt": prompt, "cache_salt": bad}, params, use_tqdm=False)
    with pytest.raises(ValueError, match="cache_salt is not supported by beam_search"):
        llm.beam_search([{"prompt": prompt, "cache_salt": "a"}], BeamSearchParams(beam_width=2, max_tokens=2))
    plain = LLM(smollm2_model, enable_prefix_caching=False, max_model_len=128, max_num_seqs=4, warmup=False,
                compilation_cache_dir=None)
    with pytest.raises(ValueError, match="cache_salt is only supported with prefix caching enabled"):
        plain.generate({"prompt": prompt, "cache_salt": "a"}, params, use_tqdm=False)
    assert not plain.llm_engine.has_unfinished_requests()


def test_generate_leaves_the_callers_params_as_given(llm):
    from jaxllm import RequestOutputKind

    params = SamplingParams(temperature=0, max_tokens=2)
    llm.generate(PROMPTS[0], params, use_tqdm=False)
    assert params.output_kind is RequestOutputKind.CUMULATIVE and params == SamplingParams(temperature=0, max_tokens=2)


def test_start_and_stop_profile_write_a_jax_trace(llm, tmp_path, monkeypatch):
    for name in ("JAXLLM_PROFILER_DIR", "VLLM_TORCH_PROFILER_DIR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="start_profile needs a directory: pass profile_dir, or set JAXLLM_PROFILER_DIR"):
        llm.start_profile()
    with pytest.raises(ValueError, match="no profile is being recorded"):
        llm.stop_profile()
    monkeypatch.setenv("VLLM_TORCH_PROFILER_DIR", str(tmp_path / "vllm_name"))
    llm.start_profile()
    with pytest.raises(ValueError, match="a profile is already being recorded"):
        llm.start_profile(str(tmp_path / "other"))
    llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    llm.stop_profile()
    traces = list((tmp_path / "vllm_name").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
