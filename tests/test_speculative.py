"""Speculative decoding (n-gram proposals): the proposer, the config, and the scheduler's
verification against a simulated paged pool.

``DraftSimRunner`` samples the token after every scheduled position from what the pool holds
up to it, drafts included, as the real step does. A draft counted as computed when it was
rejected, or a kept token sampled from the wrong position, changes the outputs, which must equal
what decoding one token at a time gives.
"""

import random
import zlib

import numpy as np
import pytest

from jaxllm.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from jaxllm.engine.messages import RunnerOutput, draft_sample_id
from jaxllm.engine.ngram_proposer import propose_ngram
from jaxllm.engine.request import Request
from jaxllm.engine.scheduler import Scheduler
from jaxllm.sampling_params import SamplingParams
from tests.test_scheduler import BS, EOS, PagedSimRunner, check_pool

VOCAB = 12


def brute_force_proposal(tokens, min_n, max_n, k):
    """The definition, spelled out: longest n, then latest occurrence, then an overlapping copy."""
    tokens = list(tokens)
    for n in range(max_n, min_n - 1, -1):
        if n > len(tokens) - 1:
            continue
        suffix = tokens[-n:]
        starts = [i for i in range(len(tokens) - n) if tokens[i:i + n] == suffix]
        if starts:
            seq = list(tokens)
            source = starts[-1] + n
            for j in range(k):
                seq.append(seq[source + j])
            return tuple(seq[len(tokens):])
    return ()


@pytest.mark.parametrize(("tokens", "min_n", "max_n", "k", "expected"), [
    ([1, 2, 3, 9, 1, 2, 3], 1, 3, 2, (9, 1)),
    ([5, 6, 7, 1, 8, 6, 7], 1, 3, 2, (1, 8)),
    ([1, 2, 3, 5, 9, 2, 3, 6, 1, 2, 3], 1, 3, 2, (5, 9)),  # "1 2 3" beats the later "2 3"
    ([4, 1, 5, 4, 1, 6, 4, 1], 2, 2, 3, (6, 4, 1)),  # the latest of two equal matches
    ([7, 7, 7], 1, 2, 4, (7, 7, 7, 7)),  # a period shorter than k is continued
    ([3, 1, 2, 3], 1, 3, 5, (1, 2, 3, 1, 2)),  # copying runs into its own proposal
    ([1, 2, 3, 4, 1], 2, 4, 3, ()),  # only a 1-gram matches: below min_n
    ([1, 2, 3, 4], 1, 4, 3, ()),  # the last token never occurred before
    ([1, 2, 1], 1, 2, 0, ()),
    ([1], 1, 1, 3, ()),
])
def test_ngram_proposals(tokens, min_n, max_n, k, expected):
    assert propose_ngram(np.asarray(tokens), min_n, max_n, k) == expected
    assert brute_force_proposal(tokens, min_n, max_n, k) == expected


def test_ngram_proposals_match_the_definition_on_random_sequences():
    rng = random.Random(0)
    found = 0
    for _ in range(3000):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        min_n = rng.randrange(1, 4)
        max_n = rng.randrange(min_n, 6)
        k = rng.randrange(0, 6)
        got = propose_ngram(np.asarray(tokens, np.int32), min_n, max_n, k)
        assert got == brute_force_proposal(tokens, min_n, max_n, k), (tokens, min_n, max_n, k)
        found += bool(got)
    assert found > 1000


def test_speculative_config_defaults_and_errors():
    assert SpeculativeConfig.from_dict(None) is None
    config = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3})
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (5, 5)  # vLLM's defaults
    config = SpeculativeConfig.from_dict({"num_speculative_tokens": 3, "prompt_lookup_max": 4})
    assert (config.method, config.prompt_lookup_min, config.prompt_lookup_max) == ("ngram", 4, 4)
    config = SpeculativeConfig.from_dict({"num_speculative_tokens": 3, "prompt_lookup_min": 2})
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (2, 2)
    assert SpeculativeConfig.from_dict(config) is config
    for bad, match in [
        ({"num_speculative_tokens": 3, "method": "eagle"}, "method='eagle' is not supported"),
        ({"num_speculative_tokens": 3, "method": "ngram", "model": "some/draft"},
         "model='some/draft' is for method='draft_model'"),
        ({"num_speculative_tokens": 3, "speculative_tokens": 2}, r"unknown key\(s\) \['speculative_tokens'\]"),
        ({"method": "ngram"}, "num_speculative_tokens is required"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens=0 must be a positive integer"),
        ({"num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
         "prompt_lookup_min=4 must be <= prompt_lookup_max=2"),
        ({"num_speculative_tokens": 2, "prompt_lookup_max": 0}, "prompt_lookup_max=0 must be a positive"),
        ("ngram", "speculative_config must be a dict"),
    ]:
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig.from_dict(bad)


def test_speculative_config_from_the_command_line_and_engine_args():
    import argparse

    from jaxllm.engine_args import EngineArgs

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser(exit_on_error=False))
    args = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    engine_args = EngineArgs.from_cli_args(args)
    assert engine_args.speculative() == SpeculativeConfig(3, prompt_lookup_max=5, prompt_lookup_min=5)
    assert EngineArgs().speculative() is None
    for bad in ("{not json", "[3]"):
        with pytest.raises(argparse.ArgumentError, match="speculative-config"):
            parser.parse_args(["--speculative-config", bad])
    # Checked before any model loads.
    with pytest.raises(ValueError, match="num_speculative_tokens=-1 must be a positive integer"):
        EngineArgs(speculative_config={"num_speculative_tokens": -1})


def repetitive_next_token(context) -> int:
    """Mostly repeats what came 3 tokens back (n-gram proposals then often hold), sometimes not."""
    h = zlib.crc32(np.asarray(context, dtype=np.int64).tobytes())
    if len(context) >= 3 and h % 4:
        return int(context[-3])
    return h % VOCAB


def reference(prompt, params: SamplingParams) -> list[int]:
    seq, out = list(prompt), []
    while True:
        token = repetitive_next_token(seq)
        seq.append(token)
        out.append(token)
        if len(out) >= params.min_tokens:
            if token in params.stop_token_ids or (token == EOS and not params.ignore_eos):
                return out
        if len(out) >= params.max_tokens:
            return out


class DraftSimRunner(PagedSimRunner):
    """Samples after each position a sequence asks for, from the pool's content up to it."""

    def execute(self, out) -> RunnerOutput:
        for src, dst in out.block_copies:
            self.pool[dst] = self.pool[src]
        for seq in out.sequences:
            for i, token in enumerate(seq.token_ids):
                self._slot(seq.block_ids, seq.start_pos + i, token)
        sampled = {}
        for seq in out.sequences:
            if not seq.sample:
                continue
            end = seq.start_pos + len(seq.token_ids)
            for j in range(seq.num_draft_tokens + 1):
                stop = end - seq.num_draft_tokens + j
                context = [self._slot(seq.block_ids, p) for p in range(stop)]
                sid = seq.request_id if j == 0 else draft_sample_id(seq.request_id, j)
                sampled[sid] = repetitive_next_token(context)
        return RunnerOutput(sampled)


def spec_scheduler(num_blocks=64, budget=32, max_num_seqs=8, k=3, min_n=1, max_n=3) -> Scheduler:
    config = None if k == 0 else SpeculativeConfig(k, prompt_lookup_min=min_n, prompt_lookup_max=max_n)
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=128),
        CacheConfig(block_size=BS), num_kv_blocks=num_blocks, eos_token_ids=(EOS,), speculative_config=config,
    )


def run(scheduler, runner, requests, check=None):
    for r in requests:
        scheduler.add_request(r)
    outputs, steps = {}, 0
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        steps += 1
        for update in scheduler.update(out, runner.execute(out)):
            outputs.setdefault(update.request_id, []).extend(update.new_token_ids)
        if check:
            check(scheduler)
        assert steps < 5000
    return outputs, steps


def random_requests(rng, count):
    requests = []
    for i in range(count):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 20))]
        max_tokens = rng.randrange(1, 40)
        params = dict(max_tokens=max_tokens, min_tokens=min(max_tokens, rng.choice([0, 0, 5])),
                      ignore_eos=rng.random() < 0.3, stop_token_ids=rng.choice([[], [3]]))
        requests.append(Request(f"r{i}", prompt, SamplingParams(**params), arrival_time=float(i)))
    return requests


@pytest.mark.parametrize(("k", "num_blocks", "budget", "seed"), [
    (1, 64, 32, 0), (3, 64, 32, 1), (5, 64, 32, 2), (4, 64, 9, 3), (3, 17, 16, 4), (5, 18, 24, 5),
])
def test_verified_drafts_give_exactly_the_one_token_at_a_time_outputs(k, num_blocks, budget, seed):
    rng = random.Random(seed)
    requests = random_requests(rng, 12)
    expected = {r.request_id: reference(r.prompt_token_ids, r.sampling_params) for r in requests}
    scheduler = spec_scheduler(num_blocks=num_blocks, budget=budget, k=k)
    outputs, steps = run(scheduler, DraftSimRunner(num_blocks), requests, check=check_pool)
    assert outputs == expected
    stats = scheduler.stats.spec_decode
    assert stats.num_draft_tokens > 50 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert sum(stats.accepted_per_position) == stats.num_accepted_tokens
    assert len(stats.accepted_per_position) == k
    assert scheduler.kv.num_used_blocks == 0
    if num_blocks < 20:
        assert scheduler.num_preemptions > 0
    # Fewer steps than one token at a time, through the same schedule otherwise.
    plain = spec_scheduler(num_blocks=num_blocks, budget=budget, k=0)
    plain_outputs, plain_steps = run(plain, DraftSimRunner(num_blocks), random_requests(random.Random(seed), 12))
    assert plain_outputs == expected and plain.stats.spec_decode is None
    if num_blocks > 20:
        assert steps < plain_steps


def test_a_sequence_that_repeats_is_decoded_k_plus_one_tokens_per_step():
    scheduler = spec_scheduler(k=4, min_n=2, max_n=2)
    # A period-3 prompt whose first sample keeps the pattern (as repetitive_next_token mostly does).
    prompt = next(p for a in range(1, VOCAB) if repetitive_next_token(p := [a, a + 1, a + 2] * 3) == a)
    request = Request("a", prompt, SamplingParams(max_tokens=30, ignore_eos=True), arrival_time=0.0)
    runner = DraftSimRunner(64)
    scheduler.add_request(request)
    out = scheduler.schedule()
    assert out.sequences[0].num_draft_tokens == 0  # the prompt: nothing proposed yet
    scheduler.update(out, runner.execute(out))
    first = request.output_token_ids[0]
    assert request.spec_token_ids == propose_ngram(np.asarray(prompt + [first]), 2, 2, 4)
    drafted = request.spec_token_ids
    out = scheduler.schedule()
    (seq,) = out.sequences
    assert len(drafted) == 4 and seq.token_ids == (first, *drafted) and seq.num_draft_tokens == 4
    assert seq.start_pos == 9
    assert request.spec_token_ids == ()  # consumed
    result = runner.execute(out)
    (update,) = scheduler.update(out, result)
    targets = [result.sampled["a"]] + [result.sampled[draft_sample_id("a", j)] for j in range(1, 5)]
    accepted = 0
    while accepted < 4 and drafted[accepted] == targets[accepted]:
        accepted += 1
    assert update.new_token_ids == tuple(targets[: accepted + 1])
    assert request.num_computed_tokens == 10 + accepted == request.num_tokens - 1
    assert scheduler.stats.spec_decode.num_accepted_tokens == accepted


def test_drafts_are_dropped_rather_than_preempting_another_request():
    scheduler = spec_scheduler(num_blocks=3, budget=16, k=2)  # two usable blocks of 4 slots
    runner = DraftSimRunner(3)
    a = Request("a", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True), arrival_time=0.0)
    b = Request("b", [4, 5, 6], SamplingParams(max_tokens=2, ignore_eos=True), arrival_time=1.0)
    scheduler.add_request(a)
    scheduler.add_request(b)
    out = scheduler.schedule()
    scheduler.update(out, runner.execute(out))
    a.spec_token_ids, a.spec_num_tokens = (9, 9), a.num_tokens  # positions 4, 5 need a block b holds
    out = scheduler.schedule()
    assert [(s.request_id, s.num_draft_tokens) for s in out.sequences] == [("a", 0), ("b", 0)]
    assert out.preempted_ids == () and scheduler.num_preemptions == 0
    scheduler.update(out, runner.execute(out))
    check_pool(scheduler)


def test_mask_rows_cover_forks_and_the_samples_after_drafts():
    from jaxllm.engine.messages import SamplingOptions, ScheduledSequence, SchedulerOutput
    from jaxllm.runner.batch import Buckets, build_batch
    from jaxllm.runner.mask_table import DeviceMaskTable
    from tests.test_structured_outputs import _FakeDFA

    table, dfa = DeviceMaskTable(vocab_size=40, capacity=8), _FakeDFA(40)
    sched = SchedulerOutput((
        ScheduledSequence("a", (1,), 0, (1,), True, SamplingOptions(), 0, fork_ids=("a#1",), token_mask_key=(dfa, 5)),
        ScheduledSequence("b", (1, 2, 3), 0, (2,), True, SamplingOptions(), 0, token_mask_key=(dfa, 7),
                          num_draft_tokens=2, draft_mask_keys=((dfa, 8), (dfa, 5))),
        ScheduledSequence("c", (4,), 0, (3,), True, SamplingOptions(), 0),
    ))
    rows = table.rows_for(sched)
    assert rows == {"a": 0, "a#1": 0, "b": 1, draft_sample_id("b", 1): 2, draft_sample_id("b", 2): 0}
    batch = build_batch(sched, Buckets.make(64, 4, 4, num_speculative_tokens=2), 4, np.random.default_rng(0), 40,
                        mask_slots=rows)
    # Rows: a, a#1, b, b after draft 1, b after draft 2, c; each samples after its own position.
    assert batch.sampling.mask_rows[:6].tolist() == [0, 0, 1, 2, 0, -1]
    assert batch.logits_indices[:6].tolist() == [0, 0, 1, 2, 3, 4]
    assert batch.sampling.steps[:6].tolist() == [0, 0, 0, 1, 2, 0]


def test_penalty_histories_of_the_rows_after_drafts_hold_the_drafts_before_them():
    from jaxllm.engine.messages import SamplingOptions, ScheduledSequence
    from jaxllm.runner.penalties import penalty_tensors

    options = SamplingOptions(frequency_penalty=0.5)
    seq = ScheduledSequence("a", (3, 4, 5), 2, (1,), True, options, 1, num_prompt_tokens=2,
                            token_history=np.array([1, 2, 3], np.int32), num_draft_tokens=2)
    pt = penalty_tensors([seq] * 3, 4, 8, vocab_size=9, drafts_before=[0, 1, 2])
    V = 9
    assert pt.history[:3].tolist() == [[1, 2, 3, V, V, V, V, V], [1, 2, 3, 4, V, V, V, V], [1, 2, 3, 4, 5, V, V, V]]
    assert pt.num_tokens[:3].tolist() == [3, 4, 5] and pt.num_prompt[:3].tolist() == [2, 2, 2]


def test_a_proposal_made_for_a_shorter_sequence_is_not_verified():
    scheduler = spec_scheduler(k=2)
    runner = DraftSimRunner(64)
    a = Request("a", [1, 2, 3], SamplingParams(max_tokens=8, ignore_eos=True), arrival_time=0.0)
    scheduler.add_request(a)
    out = scheduler.schedule()
    scheduler.update(out, runner.execute(out))
    a.spec_token_ids, a.spec_num_tokens = (9, 9), a.num_tokens - 1  # proposed before the last sample
    (seq,) = scheduler.schedule().sequences
    assert seq.num_draft_tokens == 0 and a.spec_token_ids == ()


def test_disable_by_batch_size_stops_proposals_while_the_batch_is_large():
    def drafts_per_step(disable):
        config = SpeculativeConfig(3, prompt_lookup_min=1, prompt_lookup_max=3, disable_by_batch_size=disable)
        scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128),
                              CacheConfig(block_size=BS), num_kv_blocks=64, eos_token_ids=(EOS,),
                              speculative_config=config)
        runner = DraftSimRunner(64)
        for i, max_tokens in enumerate((40, 8, 8)):  # three at first, one after the short two end
            scheduler.add_request(Request(f"r{i}", [5, 6, 7] * 3, SamplingParams(max_tokens=max_tokens,
                                                                                  ignore_eos=True), 0.0))
        history = []
        while scheduler.has_unfinished_requests():
            out = scheduler.schedule()
            history.append((len(out.sequences), sum(s.num_draft_tokens for s in out.sequences)))
            scheduler.update(out, runner.execute(out))
        return history

    limited = drafts_per_step(2)
    assert all(drafts == 0 for seqs, drafts in limited if seqs >= 2)
    assert any(drafts > 0 for seqs, drafts in limited if seqs == 1)
    assert any(drafts > 0 for seqs, drafts in drafts_per_step(None) if seqs == 3)
    with pytest.raises(ValueError, match="disable_by_batch_size=0 must be a positive integer"):
        SpeculativeConfig(2, disable_by_batch_size=0)


def test_drafts_stay_within_max_tokens_max_model_len_and_the_budget():
    scheduler = spec_scheduler(k=5, budget=8, max_num_seqs=4)
    runner = DraftSimRunner(64)
    request = Request("a", [5, 6, 7] * 4, SamplingParams(max_tokens=4, ignore_eos=True), arrival_time=0.0)
    scheduler.add_request(request)
    for _ in range(4):
        out = scheduler.schedule()
        for seq in out.sequences:
            assert seq.num_draft_tokens <= 5
            # Every kept token fits max_tokens: drafts never exceed what is left after one sample.
            assert request.num_output_tokens + seq.num_draft_tokens + 1 <= 4 or not seq.sample
        if not out.sequences:
            break
        scheduler.update(out, runner.execute(out))
    assert request.num_output_tokens == 4 and request.is_finished
    # The budget caps the drafts too: 3 requests decoding with a budget of 8.
    scheduler = spec_scheduler(k=5, budget=8, max_num_seqs=4)
    for i in range(3):
        scheduler.add_request(Request(f"r{i}", [5, 6, 7], SamplingParams(max_tokens=30, ignore_eos=True), 0.0))
    for _ in range(6):
        out = scheduler.schedule()
        assert out.num_tokens <= 8
        scheduler.update(out, runner.execute(out))


# -- on the embedded SmolLM2 ----------------------------------------------------------------------

# 128 blocks (2k tokens) instead of the CPU default of 1 GiB: small pools keep the suite's memory down.
LIMITS = dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64, num_kv_blocks=128)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
PASSAGE = ("The committee met on Tuesday to review the budget. After a long discussion, the members agreed "
           "to fund the new library, repair the old bridge, and plant two hundred trees along the river.")
COPY_CHATS = [
    [{"role": "user", "content": f"Repeat this text exactly, word for word:\n\n{PASSAGE}"}],
    [{"role": "user", "content": "Write the numbers from 1 to 30, separated by commas."}],
]


@pytest.fixture(scope="module")
def plain_llm(smollm2_model):
    from jaxllm import LLM

    return LLM(smollm2_model, **LIMITS)


@pytest.fixture(scope="module")
def spec_llm(smollm2_model):
    from jaxllm import LLM

    return LLM(smollm2_model, speculative_config=NGRAM, **LIMITS)


def _ids(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


def test_smollm2_greedy_with_proposals_equals_transformers(spec_llm, smollm2_expected_greedy):
    from conftest import GREEDY_MAX_TOKENS, GREEDY_PROMPTS

    from jaxllm import SamplingParams

    compiles = spec_llm.llm_engine.stats.num_compiles
    greedy = SamplingParams(temperature=0.0, max_tokens=GREEDY_MAX_TOKENS, ignore_eos=True)
    outputs = spec_llm.generate(GREEDY_PROMPTS, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == smollm2_expected_greedy
    stats = spec_llm.llm_engine.stats
    assert stats.spec_decode.num_accepted_tokens > 0  # "1, 2, 3, 4," goes on as the prompt did
    assert stats.num_compiles == compiles  # verifying rows fit the buckets warm-up compiled


def test_smollm2_copying_needs_fewer_steps_and_gives_the_same_text(plain_llm, spec_llm):
    from jaxllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=80)
    steps_before = [llm.llm_engine.stats.num_steps for llm in (plain_llm, spec_llm)]
    accepted_before = spec_llm.llm_engine.stats.spec_decode.num_accepted_tokens
    plain = plain_llm.chat(COPY_CHATS, params, use_tqdm=False)
    spec = spec_llm.chat(COPY_CHATS, params, use_tqdm=False)
    assert _ids(spec) == _ids(plain)
    assert [o.outputs[0].text for o in spec] == [o.outputs[0].text for o in plain]
    assert PASSAGE[:60] in plain[0].outputs[0].text  # the model does copy
    plain_steps, spec_steps = (llm.llm_engine.stats.num_steps - b for llm, b in zip((plain_llm, spec_llm),
                                                                                    steps_before, strict=True))
    stats = spec_llm.llm_engine.stats.spec_decode
    assert stats.num_accepted_tokens - accepted_before > 40
    assert spec_steps < 0.7 * plain_steps  # 50 vs 81 when written


VARIANTS = [
    dict(temperature=0.8, top_p=0.9, seed=11, max_tokens=60),
    dict(temperature=1.0, top_k=20, seed=3, n=2, max_tokens=40),
    dict(temperature=0.0, logprobs=3, max_tokens=40),
    dict(temperature=0.0, min_tokens=30, max_tokens=50),
    dict(temperature=0.0, stop=["bridge", "15,"], max_tokens=80),
    dict(temperature=0.0, stop=["bridge"], include_stop_str_in_output=True, max_tokens=80),
    dict(temperature=0.0, repetition_penalty=1.3, max_tokens=30),
    dict(temperature=0.7, seed=5, frequency_penalty=0.5, presence_penalty=0.3, max_tokens=40),
    dict(temperature=0.0, bad_words=["bridge", " 7,"], logit_bias={11: 2.0}, max_tokens=60),
]


@pytest.fixture(scope="module")
def variant_outputs(plain_llm, spec_llm):
    """COPY_CHATS under every one of VARIANTS, all in one batch (18 chats, 19 sequences: more than
    max_num_seqs, so some wait), through the engine without proposals and the one with them.
    One batch costs about what one variant alone did (a step reads all the weights whatever its
    rows), and every request shares its steps with requests of other sampling settings."""
    from jaxllm import SamplingParams

    chats = [chat for _ in VARIANTS for chat in COPY_CHATS]
    params = [SamplingParams(**v) for v in VARIANTS for _ in COPY_CHATS]
    before = spec_llm.llm_engine.stats.spec_decode
    plain = plain_llm.chat(chats, params, use_tqdm=False)
    spec = spec_llm.chat(chats, params, use_tqdm=False)
    after, n = spec_llm.llm_engine.stats.spec_decode, len(COPY_CHATS)
    return {"plain": [plain[i * n:(i + 1) * n] for i in range(len(VARIANTS))],
            "spec": [spec[i * n:(i + 1) * n] for i in range(len(VARIANTS))],
            "drafted": after.num_draft_tokens - before.num_draft_tokens,
            "accepted": after.num_accepted_tokens - before.num_accepted_tokens}


def test_smollm2_sampling_variants_get_proposals_and_keep_some(variant_outputs):
    assert variant_outputs["drafted"] > 100 and variant_outputs["accepted"] > 40


@pytest.mark.parametrize("index", range(len(VARIANTS)), ids=[",".join(v) for v in VARIANTS])
def test_smollm2_outputs_with_proposals_equal_outputs_without(variant_outputs, index):
    params = VARIANTS[index]
    plain, spec = variant_outputs["plain"][index], variant_outputs["spec"][index]
    assert _ids(spec) == _ids(plain)
    for s, p in zip(spec, plain, strict=True):
        for sc, pc in zip(s.outputs, p.outputs, strict=True):
            assert (sc.text, sc.finish_reason, sc.stop_reason) == (pc.text, pc.finish_reason, pc.stop_reason)
            if params.get("logprobs"):
                assert len(sc.logprobs) == len(sc.token_ids)
                for a, b in zip(sc.logprobs, pc.logprobs, strict=True):
                    assert a.keys() == b.keys()
                    assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
                assert sc.cumulative_logprob == pytest.approx(pc.cumulative_logprob, abs=1e-3)
    if params.get("n"):
        assert all(len(s.outputs) == params["n"] for s in spec)
    if "stop" in params:  # the copy stops at "bridge", in the middle of accepted proposals
        assert spec[0].outputs[0].finish_reason == "stop" and spec[0].outputs[0].stop_reason == "bridge"


CONSTRAINED = [
    (COPY_CHATS[1], {"regex": r"([0-9]+, )+[0-9]+"}),
    ([{"role": "user", "content": "List three people with their name and age as a JSON array."}],
     {"json": {"type": "array", "items": {"type": "object", "properties": {
         "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}}, "required": ["name", "age"]}}}),
]


def test_smollm2_structured_outputs_with_proposals_match(plain_llm, spec_llm):
    """Both constraints in one batch through each engine."""
    from jaxllm import SamplingParams
    from jaxllm.sampling_params import StructuredOutputsParams

    chats = [chat for chat, _ in CONSTRAINED]
    params = [SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=StructuredOutputsParams(**constraint))
              for _, constraint in CONSTRAINED]
    before, compiles = spec_llm.llm_engine.stats.spec_decode, spec_llm.llm_engine.stats.num_compiles
    spec = spec_llm.chat(chats, params, use_tqdm=False)
    assert _ids(spec) == _ids(plain_llm.chat(chats, params, use_tqdm=False))
    after = spec_llm.llm_engine.stats.spec_decode
    assert after.num_accepted_tokens > before.num_accepted_tokens  # the patterns' repeats are proposed
    assert spec_llm.llm_engine.stats.num_compiles == compiles


def test_smollm2_proposals_off_in_large_batches_overlap_steps_and_match(smollm2_model, plain_llm):
    from jaxllm import LLM, SamplingParams

    # Four chats of different lengths: proposals start once fewer than 3 are left; before that
    # the steps overlap as without speculative decoding.
    llm = LLM(smollm2_model, speculative_config={**NGRAM, "disable_by_batch_size": 3}, **LIMITS)
    chats = COPY_CHATS + [[{"role": "user", "content": "Say hi."}], [{"role": "user", "content": "Count to 3."}]]
    params = SamplingParams(temperature=0.0, max_tokens=80)
    spec = llm.chat(chats, params, use_tqdm=False)
    assert _ids(spec) == _ids(plain_llm.chat(chats, params, use_tqdm=False))
    stats = llm.llm_engine.stats
    assert stats.num_overlapped_steps > 0 and stats.spec_decode.num_accepted_tokens > 0


def test_smollm2_tiny_pool_preempts_with_proposals_and_still_matches(smollm2_model, plain_llm):
    from jaxllm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=80)
    llm = LLM(smollm2_model, speculative_config=NGRAM, **{**LIMITS, "num_kv_blocks": 16})
    spec = llm.chat(COPY_CHATS * 2, params, use_tqdm=False)
    assert _ids(spec) == _ids(plain_llm.chat(COPY_CHATS * 2, params, use_tqdm=False))
    stats = llm.llm_engine.stats
    assert stats.num_preemptions > 0 and stats.spec_decode.num_accepted_tokens > 0
    assert stats.kv_blocks_used == 0


class AsyncDraftRunner(DraftSimRunner):
    """DraftSimRunner behind the runner's dispatch/fetch interface (as test_async_scheduling's):
    a placeholder input is read from the step still in flight, and proposals never come with one."""

    def __init__(self, num_blocks):
        super().__init__(num_blocks)
        self.last = None

    def dispatch(self, sched, prev=None):
        import dataclasses

        from jaxllm.engine.scheduler import PLACEHOLDER

        assert prev is None or prev is self.last
        sequences = []
        for seq in sched.sequences:
            assert PLACEHOLDER not in seq.token_ids[:-1]
            if seq.token_ids[-1] == PLACEHOLDER:
                assert seq.num_draft_tokens == 0 and prev is not None and not prev["fetched"]
                seq = dataclasses.replace(seq, token_ids=(*seq.token_ids[:-1], prev["sampled"][seq.request_id]))
            sequences.append(seq)
        sampled = DraftSimRunner.execute(self, dataclasses.replace(sched, sequences=tuple(sequences))).sampled
        self.last = {"sampled": sampled, "fetched": False}
        return self.last

    def fetch(self, handle) -> RunnerOutput:
        assert not handle["fetched"]
        handle["fetched"] = True
        return RunnerOutput(handle["sampled"])

    def execute(self, sched) -> RunnerOutput:
        return self.fetch(self.dispatch(sched))


@pytest.mark.parametrize("seed", range(4))
def test_engine_alternates_overlapped_steps_and_verifying_steps_exactly(seed):
    """disable_by_batch_size=3: steps overlap while 3+ requests run and verify proposals below
    that; requests arrive while others run, so the engine switches back and forth."""
    from jaxllm.engine.llm_engine import LLMEngine

    rng = random.Random(seed)
    requests = random_requests(rng, 10)
    config = SpeculativeConfig(3, prompt_lookup_min=1, prompt_lookup_max=3, disable_by_batch_size=3)
    engine = LLMEngine(None, AsyncDraftRunner(48), SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=24,
                                                                  max_model_len=128),
                       CacheConfig(block_size=BS), num_kv_blocks=48, eos_token_ids=(EOS,), speculative_config=config)
    pending, outputs, steps = list(requests), {}, 0
    while pending or engine.has_unfinished_requests():
        while pending and (steps < 1 or steps % 5 == 0 or not engine.has_unfinished_requests()) and (
                engine.get_num_unfinished_requests() < 5):
            r = pending.pop(0)
            engine.add_request(r.request_id, r.prompt_token_ids, r.sampling_params)
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        check_pool(engine.scheduler)
        steps += 1
        assert steps < 3000
    assert outputs == {r.request_id: reference(r.prompt_token_ids, r.sampling_params) for r in requests}
    stats = engine.stats
    assert stats.num_overlapped_steps > 0 and stats.spec_decode.num_accepted_tokens > 0
    assert stats.kv_blocks_used == 0
