"""LLMEngine host loop with fake runners: outputs, stop strings, aborts, validation, stats."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from jaxllm.config import CacheConfig, SchedulerConfig
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.engine.messages import RunnerOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams

CORPUS = ["Hello world! The quick brown fox jumps over the lazy dog.", "naïve café 你好 🙂", "hello world"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")


class PositionRunner:
    """Next token = a function of the last fed token and its position: the same under any schedule."""

    def __init__(self, token_ids):
        self.token_ids = token_ids
        self.num_compiles = 4
        self.num_calls = 0

    def execute(self, out) -> RunnerOutput:
        self.num_calls += 1
        sampled = {}
        for seq in out.sequences:
            if seq.sample:
                position = seq.start_pos + len(seq.token_ids)
                sampled[seq.request_id] = self.token_ids[(31 * seq.token_ids[-1] + 7 * position) % len(self.token_ids)]
        return RunnerOutput(sampled)


class ScriptedRunner:
    num_compiles = 0

    def __init__(self, script):
        self.script = list(script)

    def execute(self, out) -> RunnerOutput:
        return RunnerOutput({s.request_id: self.script.pop(0) for s in out.sequences if s.sample})


def make_engine(tokenizer, runner, num_blocks=64, max_model_len=128, budget=16, eos=None) -> LLMEngine:
    eos_ids = (tokenizer.eos_token_id,) if eos is None and tokenizer is not None else (eos or ())
    return LLMEngine(tokenizer, runner, SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget,
                                                        max_model_len=max_model_len),
                     CacheConfig(block_size=4), num_kv_blocks=num_blocks, eos_token_ids=eos_ids)


def run(engine: LLMEngine) -> dict:
    final, steps = {}, 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id not in final, "output after finish"
            if output.finished:
                final[output.request_id] = output
        steps += 1
        assert steps < 1000
    return final


def word_ids(tokenizer):
    return sorted({i for word in [" world", " the", " fox", " lazy", " dog", " quick"] for i in tokenizer.encode(word)})


def test_string_prompt_streams_cumulative_outputs(tokenizer):
    engine = make_engine(tokenizer, PositionRunner(word_ids(tokenizer)))
    engine.add_request("a", "Hello", SamplingParams(max_tokens=5))
    lengths = []
    while engine.has_unfinished_requests():
        (output,) = engine.step()
        completion = output.outputs[0]
        lengths.append(len(completion.token_ids))
        assert completion.text == tokenizer.decode(completion.token_ids)
        assert output.prompt == "Hello" and output.prompt_token_ids == tokenizer.encode("Hello")
    assert lengths == [1, 2, 3, 4, 5]
    assert output.finished and (completion.finish_reason, completion.stop_reason) == ("length", None)
    assert output.metrics.first_token_time <= output.metrics.finished_time
    stats = engine.stats
    assert (stats.num_generated_tokens, stats.num_steps, stats.num_compiles, stats.kv_blocks_used) == (5, 5, 4, 0)
    assert engine.step() == []


def test_add_request_takes_vllm_prompt_dicts(tokenizer):
    engine = make_engine(tokenizer, PositionRunner(word_ids(tokenizer)))
    ids = tokenizer.encode("Hello")
    params = SamplingParams(max_tokens=3)
    engine.add_request("text", {"prompt": "Hello"}, params)
    engine.add_request("tokens", {"prompt_token_ids": ids}, params)
    engine.add_request("plain", "Hello", params)
    with pytest.raises(ValueError, match=r"prompt keys \['multi_modal_data'\] are not supported"):
        engine.add_request("image", {"prompt": "Hello", "multi_modal_data": {}}, params)
    with pytest.raises(ValueError, match="prompt must be a str or a dict"):
        engine.add_request("empty", {}, params)
    final = run(engine)
    assert sorted(final) == ["plain", "text", "tokens"]
    assert final["text"].prompt == "Hello" and final["tokens"].prompt is None
    assert final["text"].prompt_token_ids == final["tokens"].prompt_token_ids == ids
    assert final["text"].outputs[0].token_ids == final["tokens"].outputs[0].token_ids == final["plain"].outputs[0].token_ids


def _outputs_per_step(engine) -> list[list]:
    steps = []
    while engine.has_unfinished_requests():
        steps.append(engine.step())
    return steps


def test_delta_and_final_only_outputs(tokenizer):
    """DELTA: each step carries only the new tokens and text, which add up to the cumulative
    output, stop string cut included; FINAL_ONLY: nothing until the end, then the whole output."""
    script = tokenizer.encode("Hello world, the quick brown fox")
    want = {}
    for kind in RequestOutputKind:
        engine = make_engine(tokenizer, ScriptedRunner(script))
        engine.add_request("a", [5, 6, 7], SamplingParams(stop="brown", max_tokens=20, output_kind=kind))
        want[kind] = _outputs_per_step(engine)
    cumulative = want[RequestOutputKind.CUMULATIVE]
    final = cumulative[-1][0].outputs[0]
    assert final.text == "Hello world, the quick " and final.finish_reason == "stop"
    deltas = [out.outputs[0] for (out,) in want[RequestOutputKind.DELTA]]
    assert len(deltas) == len(cumulative) and all(len(d.token_ids) == 1 for d in deltas)
    assert [t for d in deltas for t in d.token_ids] == final.token_ids
    assert "".join(d.text for d in deltas) == final.text
    assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + ["stop"]
    final_only = want[RequestOutputKind.FINAL_ONLY]
    assert final_only[:-1] == [[]] * (len(cumulative) - 1)
    assert final_only[-1][0].outputs == cumulative[-1][0].outputs and final_only[-1][0].finished


class ForkingRunner(PositionRunner):
    """PositionRunner whose parallel-sampling children draw the next word ids."""

    def execute(self, out) -> RunnerOutput:
        sampled = dict(super().execute(out).sampled)
        for seq in out.sequences:
            for i, fork_id in enumerate(seq.fork_ids, 1):
                sampled[fork_id] = self.token_ids[(self.token_ids.index(sampled[seq.request_id]) + i) % len(self.token_ids)]
        return RunnerOutput(sampled)


def test_delta_outputs_of_parallel_completions_carry_each_ones_new_text(tokenizer):
    runs = {}
    for kind in (RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA):
        engine = make_engine(tokenizer, ForkingRunner(word_ids(tokenizer)))
        engine.add_request("a", "Hello", SamplingParams(n=2, max_tokens=7, temperature=1.0, seed=1, output_kind=kind))
        runs[kind] = _outputs_per_step(engine)
    final = {c.index: c for c in runs[RequestOutputKind.CUMULATIVE][-1][0].outputs}
    assert final[0].token_ids != final[1].token_ids
    text, tokens = {0: "", 1: ""}, {0: [], 1: []}
    for step in runs[RequestOutputKind.DELTA]:
        for out in step:
            for c in out.outputs:
                assert c.token_ids or c.finish_reason, "a completion that did not move"
                assert c.text == tokenizer.decode(c.token_ids), "text lagging behind its tokens"
                text[c.index] += c.text
                tokens[c.index] += c.token_ids
    for i in (0, 1):
        assert (text[i], tokens[i]) == (final[i].text, final[i].token_ids)
        assert text[i] == tokenizer.decode(final[i].token_ids)


def test_server_joins_delta_outputs_into_what_cumulative_outputs_say(tokenizer):
    """The server asks for DELTA outputs: its per-choice chunks (DeltaTracker) and its whole
    answers (WholeOutput) must say what the CUMULATIVE outputs of the same requests say, and its
    latency metrics must count every token of completion 0 once."""
    from jaxllm.entrypoints.openai.metrics import ServerMetrics
    from jaxllm.entrypoints.openai.serving_engine import DeltaTracker
    from jaxllm.outputs import WholeOutput

    runs = {}
    for kind in (RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA):
        engine = make_engine(tokenizer, ForkingRunner(word_ids(tokenizer)))
        for rid, stop in (("a", [" world"]), ("b", [])):
            engine.add_request(rid, "Hello", SamplingParams(n=2, max_tokens=9, temperature=1.0, seed=3, stop=stop,
                                                            output_kind=kind))
        runs[kind] = _outputs_per_step(engine)
    final = {out.request_id: out for step in runs[RequestOutputKind.CUMULATIVE] for out in step if out.finished}
    reasons = sorted(c.finish_reason for out in final.values() for c in out.outputs)
    assert reasons == ["length", "length", "length", "stop"], reasons  # one child of "a" met " world"
    whole = {rid: WholeOutput() for rid in final}
    trackers = {rid: DeltaTracker(i, 2) for i, rid in enumerate(sorted(final))}
    chunks: dict[int, list] = {}
    metrics = ServerMetrics("m", lambda: None)
    now = 100.0
    for step in runs[RequestOutputKind.DELTA]:
        now += 1.0
        for out in step:
            whole[out.request_id].add(out)
            metrics.observe(out, now)
            for delta in trackers[out.request_id].deltas(out):
                chunks.setdefault(delta.index, []).append(delta)
    for i, rid in enumerate(sorted(final)):
        joined = whole[rid].result()
        assert joined.outputs == final[rid].outputs and joined.finished
        assert joined.prompt_token_ids == final[rid].prompt_token_ids
        for c in final[rid].outputs:
            mine = chunks[2 * i + c.index]
            assert "".join(d.text for d in mine) == c.text
            assert [t for d in mine for t in d.token_ids] == c.token_ids
            assert mine[-1].num_tokens == len(c.token_ids) and mine[-1].finish_reason == c.finish_reason
            assert [d.finish_reason for d in mine[:-1]] == [None] * (len(mine) - 1)
    def count(histogram) -> float:
        return next(s.value for s in histogram.collect()[0].samples if s.name.endswith("_count"))

    first_tokens = sum(len(out.outputs[0].token_ids) for out in final.values())
    assert (count(metrics.ttft), count(metrics.e2e), count(metrics.itl)) == (2, 2, first_tokens - 2)
    assert WholeOutput().result() is None


def test_stop_string_ends_the_request_and_frees_its_blocks(tokenizer):
    script = tokenizer.encode("Hello world, again")
    engine = make_engine(tokenizer, ScriptedRunner(script))
    engine.add_request("a", [5, 6, 7], SamplingParams(stop="lo wo", max_tokens=20))
    completion = run(engine)["a"].outputs[0]
    assert (completion.text, completion.finish_reason, completion.stop_reason) == ("Hel", "stop", "lo wo")
    assert completion.token_ids == script[:3]
    assert engine.stats.kv_blocks_used == 0 and engine.get_num_unfinished_requests() == 0


def test_stop_string_wins_over_length_on_the_same_token(tokenizer):
    engine = make_engine(tokenizer, ScriptedRunner(tokenizer.encode("Hello world")))
    engine.add_request("a", [5], SamplingParams(stop=["lo wo"], max_tokens=3))
    completion = run(engine)["a"].outputs[0]
    assert (completion.text, completion.finish_reason, completion.stop_reason) == ("Hel", "stop", "lo wo")


def test_eos_stops_and_is_not_in_the_text(tokenizer):
    eos = tokenizer.eos_token_id
    engine = make_engine(tokenizer, ScriptedRunner(tokenizer.encode("Hello") + [eos]))
    engine.add_request("a", [5], SamplingParams(max_tokens=10))
    completion = run(engine)["a"].outputs[0]
    assert completion.token_ids[-1] == eos and completion.text == "Hello"
    assert (completion.finish_reason, completion.stop_reason) == ("stop", None)


def test_abort_frees_blocks_and_silences_the_request(tokenizer):
    engine = make_engine(tokenizer, PositionRunner(word_ids(tokenizer)))
    for rid in "abc":
        engine.add_request(rid, "Hello world", SamplingParams(max_tokens=8, ignore_eos=True))
    assert {o.request_id for o in engine.step()} == {"a", "b", "c"}
    engine.abort_request(["a", "b", "unknown"])
    engine.abort_request("a")
    assert engine.get_num_unfinished_requests() == 1
    assert engine.stats.kv_blocks_used == len(engine.scheduler.kv.block_ids("c"))
    assert set(run(engine)) == {"c"}
    assert engine.stats.kv_blocks_used == 0


def test_invalid_requests_raise_and_queue_nothing(tokenizer):
    engine = make_engine(tokenizer, PositionRunner([1]), max_model_len=16)
    with pytest.raises(ValueError, match="exceeds max_model_len=16"):
        engine.add_request("a", "Hello world", SamplingParams(max_tokens=15))
    with pytest.raises(ValueError, match="non-negative integers"):
        engine.add_request("a", [1, -2])
    with pytest.raises(ValueError, match="must not be empty"):
        engine.add_request("a", [])
    with pytest.raises(ValueError, match="params must be a SamplingParams"):
        engine.add_request("a", [1], {"max_tokens": 3})
    assert not engine.has_unfinished_requests() and engine.stats.num_prompt_tokens == 0
    engine.add_request("a", [1], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [1], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="no tokenizer"):
        make_engine(None, PositionRunner([1])).add_request("b", "text")


def test_prompt_token_ids_outside_the_vocabulary_are_refused(tokenizer):
    engine = LLMEngine(tokenizer, PositionRunner([1]), SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16,
                                                                       max_model_len=32),
                       CacheConfig(block_size=4), num_kv_blocks=16, vocab_size=300)
    with pytest.raises(ValueError, match=r"prompt token ids \[300, 512\] are outside the vocabulary of 300"):
        engine.add_request("a", [5, 512, 300, 299])
    assert not engine.has_unfinished_requests()
    engine.add_request("a", [5, 299], SamplingParams(max_tokens=1))
    assert engine.has_unfinished_requests()


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(tokenizer):
    engine = make_engine(tokenizer, PositionRunner(word_ids(tokenizer)), max_model_len=8)
    prompt = "Hello world! The quick brown fox jumps over the lazy dog."
    ids = tokenizer.encode(prompt)
    assert len(ids) > 8
    engine.add_request("a", prompt, SamplingParams(max_tokens=3, truncate_prompt_tokens=4))
    engine.add_request("b", ids[-4:], SamplingParams(max_tokens=3))
    # -1: the last max_model_len tokens, which leave no room for a completion here.
    with pytest.raises(ValueError, match="exceeds max_model_len=8"):
        engine.add_request("c", ids, SamplingParams(max_tokens=1, truncate_prompt_tokens=-1))
    with pytest.raises(ValueError, match="truncate_prompt_tokens=9 is greater than max_model_len=8"):
        engine.add_request("c", ids, SamplingParams(max_tokens=1, truncate_prompt_tokens=9))
    final = run(engine)
    assert set(final) == {"a", "b"} and engine.stats.num_prompt_tokens == 8
    assert final["a"].prompt == prompt and final["a"].prompt_token_ids == ids[-4:]
    assert final["a"].outputs[0].token_ids == final["b"].outputs[0].token_ids


def test_tiny_pool_preempts_and_gives_the_same_outputs(tokenizer):
    def generate(num_blocks):
        engine = make_engine(tokenizer, PositionRunner(word_ids(tokenizer)), num_blocks=num_blocks)
        for i, prompt in enumerate(["Hello world", "The quick brown fox", "naïve café", "hello"]):
            engine.add_request(str(i), prompt, SamplingParams(max_tokens=12, ignore_eos=True))
        outputs = {rid: (o.outputs[0].text, o.outputs[0].token_ids) for rid, o in run(engine).items()}
        return outputs, engine.stats.num_preemptions

    (big, big_preemptions), (tiny, tiny_preemptions) = generate(64), generate(7)
    assert big_preemptions == 0 and tiny_preemptions > 0
    assert big == tiny and len(big) == 4


def test_prefix_cache_hits_show_in_outputs_and_stats(tokenizer):
    engine = make_engine(tokenizer, PositionRunner(word_ids(tokenizer)))
    prompt = "The quick brown fox jumps over the lazy dog."
    engine.add_request("a", prompt, SamplingParams(max_tokens=2))
    first = run(engine)["a"]
    engine.add_request("b", prompt, SamplingParams(max_tokens=2))
    second = run(engine)["b"]
    num_prompt = len(first.prompt_token_ids)
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == (num_prompt - 1) // 4 * 4
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    stats = engine.stats
    assert stats.prefix_cache_hits == second.num_cached_tokens
    assert stats.prefix_cache_hit_rate == pytest.approx(second.num_cached_tokens / (2 * num_prompt))


def test_n_larger_than_max_num_seqs_is_rejected():
    from jaxllm.config import CacheConfig, SchedulerConfig
    from jaxllm.engine.llm_engine import LLMEngine
    from jaxllm.sampling_params import SamplingParams

    class NeverRuns:
        num_compiles = 0

        def execute(self, scheduled):
            raise AssertionError("nothing may be scheduled")

    engine = LLMEngine(None, NeverRuns(), SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64),
                       CacheConfig(block_size=4), num_kv_blocks=32)
    with pytest.raises(ValueError, match="n=5 exceeds max_num_seqs=4"):
        engine.add_request("r", [1, 2, 3], SamplingParams(n=5))
    assert not engine.has_unfinished_requests()


def test_max_tokens_none_runs_to_max_model_len(tokenizer):
    from jaxllm import TokensPrompt

    engine = make_engine(tokenizer, PositionRunner(word_ids(tokenizer)), max_model_len=12)
    prompt = TokensPrompt(prompt_token_ids=[5, 6, 7])
    engine.add_request("a", prompt["prompt_token_ids"], SamplingParams(max_tokens=None))
    completion = run(engine)["a"].outputs[0]
    assert (len(completion.token_ids), completion.finish_reason) == (9, "length")
    with pytest.raises(ValueError, match="exceeds max_model_len=12"):
        engine.add_request("b", list(range(3, 15)), SamplingParams(max_tokens=None))


def test_priority_policy_runs_requests_by_priority_and_fcfs_refuses_priorities(tokenizer):
    def finish_order(policy, priorities):
        engine = LLMEngine(tokenizer, PositionRunner(word_ids(tokenizer)),
                           SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=16, max_model_len=128,
                                           scheduling_policy=policy),
                           CacheConfig(block_size=4), num_kv_blocks=64, eos_token_ids=(tokenizer.eos_token_id,))
        for rid, (prompt, priority) in enumerate(zip(["Hello world", "The quick fox", "hello"], priorities, strict=True)):
            engine.add_request(str(rid), prompt, SamplingParams(max_tokens=5, ignore_eos=True), priority=priority)
        final = run(engine)  # one request at a time: the dict's order is the order they finished in
        return list(final), {rid: o.outputs[0].token_ids for rid, o in final.items()}

    by_priority, tokens = finish_order("priority", [2, 0, 1])
    in_arrival, fcfs_tokens = finish_order("fcfs", [0, 0, 0])
    assert by_priority == ["1", "2", "0"] and in_arrival == ["0", "1", "2"]
    assert tokens == fcfs_tokens
    engine = make_engine(tokenizer, PositionRunner(word_ids(tokenizer)))
    with pytest.raises(ValueError, match=r"priority=3 needs scheduling_policy='priority'"):
        engine.add_request("x", "hello", SamplingParams(max_tokens=2), priority=3)
    assert not engine.has_unfinished_requests()
