"""Scheduler: chunked prefill, preemption, rejection, limits, stop conditions, pool accounting.

``PagedSimRunner`` stands in for the device: it writes each scheduled token into a simulated pool
slot through the block table and samples from what it reads back, so wrong block tables, a bad
prefix-cache hit or a missing copy-on-write all change the generated tokens.
"""

import random
import zlib
from collections import Counter

import numpy as np
import pytest

from jaxllm.config import CacheConfig, SchedulerConfig
from jaxllm.engine.kv_cache_manager import NULL_BLOCK_ID
from jaxllm.engine.messages import RunnerOutput
from jaxllm.engine.request import Request, RequestStatus
from jaxllm.engine.scheduler import Scheduler
from jaxllm.sampling_params import SamplingParams

VOCAB = 50
EOS = 0
BS = 4


def next_token(context) -> int:
    return zlib.crc32(np.asarray(context, dtype=np.int64).tobytes()) % VOCAB


def reference_output(prompt, params: SamplingParams, eos=(EOS,)) -> list[int]:
    """What any correct schedule must generate for ``prompt`` under ``next_token``."""
    seq, out = list(prompt), []
    while True:
        token = next_token(seq)
        seq.append(token)
        out.append(token)
        may_stop = len(out) >= params.min_tokens
        if may_stop and (token in params.stop_token_ids or (token in eos and not params.ignore_eos)):
            return out
        if len(out) >= params.max_tokens:
            return out


class PagedSimRunner:
    def __init__(self, num_blocks: int, block_size: int = BS):
        self.pool = np.full((num_blocks, block_size), -1, dtype=np.int64)
        self.block_size = block_size
        self.num_compiles = 0

    def execute(self, out) -> RunnerOutput:
        for src, dst in out.block_copies:
            self.pool[dst] = self.pool[src]
        for seq in out.sequences:  # all writes before any read, as in the real step
            assert NULL_BLOCK_ID not in seq.block_ids
            for i, token in enumerate(seq.token_ids):
                self._slot(seq.block_ids, seq.start_pos + i, token)
        sampled = {}
        for seq in out.sequences:
            if seq.sample:
                end = seq.start_pos + len(seq.token_ids)
                context = [self._slot(seq.block_ids, p) for p in range(end)]
                sampled[seq.request_id] = next_token(context)
        return RunnerOutput(sampled)

    def _slot(self, block_ids, pos, token=None) -> int:
        block, offset = block_ids[pos // self.block_size], pos % self.block_size
        if token is not None:
            self.pool[block, offset] = token
        return int(self.pool[block, offset])


def make_scheduler(num_blocks=64, budget=32, max_num_seqs=8, max_model_len=256, caching=True,
                   policy="fcfs") -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
                        scheduling_policy=policy),
        CacheConfig(block_size=BS, enable_prefix_caching=caching),
        num_kv_blocks=num_blocks,
        eos_token_ids=(EOS,),
    )


def make_request(rid, prompt, arrival=0.0, priority=0, **params) -> Request:
    return Request(rid, list(prompt), SamplingParams(**params), arrival_time=arrival, priority=priority)


def run_all(scheduler: Scheduler, runner, max_steps=10_000, check=None) -> dict:
    outputs, reasons = {}, {}
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return {"outputs": outputs, "reasons": reasons}
        out = scheduler.schedule()
        for update in scheduler.update(out, runner.execute(out)):
            outputs.setdefault(update.request_id, []).extend(update.new_token_ids)
            if update.finished:
                reasons[update.request_id] = (update.finish_reason, update.stop_reason)
        if check:
            check(scheduler)
    raise AssertionError("requests did not finish")


def check_pool(scheduler: Scheduler) -> None:
    """Exact accounting: every block is free xor held, with a ref count equal to its holders."""
    kv = scheduler.kv
    holders = Counter(b for rid in scheduler.requests for b in kv.block_ids(rid))
    free = kv.free_block_ids()
    assert len(set(free)) == len(free)
    assert not set(free) & set(holders)
    assert NULL_BLOCK_ID not in holders and NULL_BLOCK_ID not in free
    assert len(free) + len(holders) == kv.num_usable_blocks == kv.num_free_blocks + kv.num_used_blocks
    for block_id in range(1, kv.num_usable_blocks + 1):
        assert kv.ref_count(block_id) == holders[block_id], block_id
    for request in scheduler.waiting:
        assert kv.block_ids(request.request_id) == () and request.num_computed_tokens == 0
    for request in scheduler.running:
        assert len(kv.block_ids(request.request_id)) * BS >= request.num_computed_tokens
    assert len(scheduler.running) <= scheduler.config.max_num_seqs


def test_chunked_prefill_splits_the_prompt_and_mixes_in_decode_tokens():
    scheduler = make_scheduler(budget=8, max_num_seqs=4)
    runner = PagedSimRunner(64)
    scheduler.add_request(make_request("short", range(1, 4), max_tokens=10))
    scheduler.add_request(make_request("long", range(10, 30), max_tokens=10))
    steps = []
    for _ in range(4):
        out = scheduler.schedule()
        steps.append([(s.request_id, s.start_pos, len(s.token_ids), s.sample) for s in out.sequences])
        assert out.num_tokens <= 8
        scheduler.update(out, runner.execute(out))
    assert steps == [
        [("short", 0, 3, True), ("long", 0, 5, False)],
        [("short", 3, 1, True), ("long", 5, 7, False)],
        [("short", 4, 1, True), ("long", 12, 7, False)],
        [("short", 5, 1, True), ("long", 19, 1, True)],
    ]
    long_request = scheduler.requests["long"]
    assert long_request.num_output_tokens == 1 and long_request.num_computed_tokens == 20


def test_chunks_carry_the_exact_prompt_slices():
    scheduler = make_scheduler(budget=8, max_num_seqs=1)
    runner = PagedSimRunner(64)
    scheduler.add_request(make_request("a", range(1, 21), max_tokens=3))
    chunks = []
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        chunks.append(out.sequences[0].token_ids)
        scheduler.update(out, runner.execute(out))
    assert chunks[:3] == [tuple(range(1, 9)), tuple(range(9, 17)), tuple(range(17, 21))]
    assert [len(c) for c in chunks[3:]] == [1, 1]


def test_max_num_seqs_is_respected():
    scheduler = make_scheduler(max_num_seqs=2, budget=32)
    runner = PagedSimRunner(64)
    for i in range(5):
        scheduler.add_request(make_request(f"r{i}", [i + 1] * 3, ignore_eos=True, max_tokens=4))
    out = scheduler.schedule()
    assert [s.request_id for s in out.sequences] == ["r0", "r1"]
    scheduler.update(out, runner.execute(out))
    result = run_all(scheduler, runner, check=check_pool)
    assert sorted(result["outputs"]) == ["r0", "r1", "r2", "r3", "r4"]


def test_preemption_recomputes_and_gives_the_same_outputs_as_a_big_pool():
    def run(num_blocks):
        scheduler = make_scheduler(num_blocks=num_blocks, budget=16, max_num_seqs=4)
        for i in range(4):
            scheduler.add_request(make_request(f"r{i}", range(i + 1, i + 7), arrival=float(i), max_tokens=10))
        return run_all(scheduler, PagedSimRunner(num_blocks), check=check_pool), scheduler.num_preemptions

    (big, big_preemptions), (tiny, tiny_preemptions) = run(64), run(5)
    assert big_preemptions == 0 and tiny_preemptions > 0
    assert big == tiny
    for i in range(4):
        assert big["outputs"][f"r{i}"] == reference_output(range(i + 1, i + 7), SamplingParams(max_tokens=10))


def test_preemption_picks_the_latest_arrival_and_requeues_it_at_the_front():
    scheduler = make_scheduler(num_blocks=5, budget=16, max_num_seqs=4)
    runner = PagedSimRunner(5)
    scheduler.add_request(make_request("a", range(1, 7), arrival=1.0, max_tokens=6, ignore_eos=True))
    scheduler.add_request(make_request("b", range(11, 17), arrival=2.0, max_tokens=6, ignore_eos=True))
    scheduler.add_request(make_request("c", range(21, 24), arrival=3.0, max_tokens=1))
    for _ in range(3):
        out = scheduler.schedule()
        assert [s.request_id for s in out.sequences] == ["a", "b"] and out.preempted_ids == ()
        scheduler.update(out, runner.execute(out))
    out = scheduler.schedule()  # a's 9th token needs a third block; the pool has none left
    assert out.preempted_ids == ("b",)
    assert [s.request_id for s in out.sequences] == ["a"]
    b = scheduler.requests["b"]
    assert [r.request_id for r in scheduler.waiting] == ["b", "c"]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.num_output_tokens == 3
    assert scheduler.kv.block_ids("b") == ()
    scheduler.update(out, runner.execute(out))
    run_all(scheduler, runner, check=check_pool)
    assert b.output_token_ids == reference_output(range(11, 17), SamplingParams(max_tokens=6, ignore_eos=True))


def test_priority_policy_admits_by_priority_then_arrival():
    scheduler = make_scheduler(max_num_seqs=1, policy="priority")
    runner = PagedSimRunner(64)
    for rid, priority in [("a", 2), ("b", 0), ("c", 1), ("d", 0), ("e", -1)]:
        scheduler.add_request(make_request(rid, [ord(rid), 5, 6], priority=priority, max_tokens=3, ignore_eos=True))
    assert [r.request_id for r in scheduler.waiting] == ["e", "b", "d", "c", "a"]
    admitted = []
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        admitted += [s.request_id for s in out.sequences if s.request_id not in admitted]
        scheduler.update(out, runner.execute(out))
    assert admitted == ["e", "b", "d", "c", "a"]


def test_priority_policy_preempts_the_lowest_priority_and_requeues_it_by_priority():
    # As test_preemption_picks_the_latest_arrival_..., but "a" came first with a lower priority.
    scheduler = make_scheduler(num_blocks=5, budget=16, max_num_seqs=4, policy="priority")
    runner = PagedSimRunner(5)
    scheduler.add_request(make_request("a", range(1, 7), arrival=1.0, priority=1, max_tokens=6, ignore_eos=True))
    scheduler.add_request(make_request("b", range(11, 17), arrival=2.0, priority=0, max_tokens=6, ignore_eos=True))
    scheduler.add_request(make_request("c", range(21, 24), arrival=3.0, priority=2, max_tokens=1))
    for _ in range(3):
        out = scheduler.schedule()
        assert [s.request_id for s in out.sequences] == ["b", "a"] and out.preempted_ids == ()
        scheduler.update(out, runner.execute(out))
    out = scheduler.schedule()  # b's 9th token needs a third block; the pool has none left
    assert out.preempted_ids == ("a",)
    assert [s.request_id for s in out.sequences] == ["b"]
    assert [r.request_id for r in scheduler.waiting] == ["a", "c"]
    a = scheduler.requests["a"]
    assert a.status is RequestStatus.PREEMPTED and a.num_computed_tokens == 0 and a.num_output_tokens == 3
    scheduler.update(out, runner.execute(out))
    outputs = run_all(scheduler, runner, check=check_pool)["outputs"]
    assert a.output_token_ids == reference_output(range(1, 7), SamplingParams(max_tokens=6, ignore_eos=True))
    assert outputs["c"] == reference_output(range(21, 24), SamplingParams(max_tokens=1))


def test_priority_policy_schedules_running_requests_by_priority():
    # "b" (higher priority) joins after "a"; when b's next block is missing it is a that goes,
    # even though a, running longer, would come first in arrival order.
    scheduler = make_scheduler(num_blocks=5, budget=16, max_num_seqs=4, policy="priority")
    runner = PagedSimRunner(5)
    scheduler.add_request(make_request("a", range(1, 7), arrival=1.0, priority=1, max_tokens=8, ignore_eos=True))
    out = scheduler.schedule()
    scheduler.update(out, runner.execute(out))
    scheduler.add_request(make_request("b", range(11, 19), arrival=2.0, priority=0, max_tokens=4, ignore_eos=True))
    out = scheduler.schedule()
    assert [s.request_id for s in out.sequences] == ["a", "b"] and scheduler.kv.num_free_blocks == 0
    scheduler.update(out, runner.execute(out))
    out = scheduler.schedule()  # b's 9th token needs a third block
    assert out.preempted_ids == ("a",) and [s.request_id for s in out.sequences] == ["b"]
    a, b = scheduler.requests["a"], scheduler.requests["b"]
    scheduler.update(out, runner.execute(out))
    run_all(scheduler, runner, check=check_pool)
    assert a.output_token_ids == reference_output(range(1, 7), SamplingParams(max_tokens=8, ignore_eos=True))
    assert b.output_token_ids == reference_output(range(11, 19), SamplingParams(max_tokens=4, ignore_eos=True))
    assert scheduler.num_preemptions == 1


def test_priority_policy_children_inherit_the_parents_priority():
    scheduler = make_scheduler(max_num_seqs=4, policy="priority")
    scheduler.add_request(make_request("p", [1, 2, 3], priority=-4, n=2, max_tokens=2, ignore_eos=True))
    out = scheduler.schedule()
    assert out.sequences[0].fork_ids == ("p#1",)
    scheduler.update(out, RunnerOutput({"p": 7, "p#1": 8}))  # the device samples each child's token
    assert {r.request_id: r.priority for r in scheduler.running} == {"p": -4, "p#1": -4}


def test_priority_needs_the_priority_policy():
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match=r"priority=1 needs scheduling_policy='priority' \(this engine's is 'fcfs'\)"):
        scheduler.add_request(make_request("x", [1, 2], priority=1))
    with pytest.raises(ValueError, match="priority=0.5 must be an integer"):
        make_scheduler(policy="priority").add_request(make_request("y", [1, 2], priority=0.5))
    assert not scheduler.requests and not scheduler.waiting
    with pytest.raises(ValueError, match=r"scheduling_policy='lifo' must be one of \('fcfs', 'priority'\)"):
        make_scheduler(policy="lifo")


def test_prefix_cache_hit_skips_computed_tokens_and_keeps_outputs_exact():
    scheduler = make_scheduler()
    runner = PagedSimRunner(64)
    prompt = list(range(1, 14))
    scheduler.add_request(make_request("a", prompt, max_tokens=2, ignore_eos=True))
    run_all(scheduler, runner)
    scheduler.add_request(make_request("b", prompt + [7, 7], max_tokens=5, ignore_eos=True))
    out = scheduler.schedule()
    (seq,) = out.sequences
    assert (seq.start_pos, seq.token_ids) == (12, (13, 7, 7))
    assert seq.block_ids == (1, 2, 3, 5)  # a's full blocks; a's partial block 4 went back to the queue
    assert scheduler.requests["b"].num_cached_tokens == 12
    assert scheduler.stats.prefix_cache_hits == 12
    first = scheduler.update(out, runner.execute(out))[0].new_token_ids
    rest = run_all(scheduler, runner)["outputs"]["b"]
    assert list(first) + rest == reference_output(prompt + [7, 7], SamplingParams(max_tokens=5, ignore_eos=True))


@pytest.mark.parametrize(
    "request_kwargs, match",
    [
        (dict(prompt=range(1, 200), max_tokens=100), "exceeds max_model_len"),
        (dict(prompt=range(1, 60), max_tokens=10), "whole pool has 16"),
    ],
)
def test_add_request_rejects_what_can_never_run(request_kwargs, match):
    scheduler = make_scheduler(num_blocks=17, max_model_len=256)
    prompt = request_kwargs.pop("prompt")
    with pytest.raises(ValueError, match=match):
        scheduler.add_request(make_request("x", prompt, **request_kwargs))
    assert not scheduler.has_unfinished_requests() and not scheduler.waiting


def test_add_request_rejects_duplicates_and_empty_prompts():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("x", [1, 2]))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("x", [3]))
    with pytest.raises(ValueError, match="must not be empty"):
        make_request("y", [])
    assert scheduler.get_num_unfinished_requests() == 1


class ScriptedRunner:
    """Samples a fixed script of tokens per request."""

    num_compiles = 0

    def __init__(self, scripts):
        self.scripts = {rid: list(tokens) for rid, tokens in scripts.items()}

    def execute(self, out) -> RunnerOutput:
        return RunnerOutput({s.request_id: self.scripts[s.request_id].pop(0) for s in out.sequences if s.sample})


@pytest.mark.parametrize(
    "params, expected_tokens, reason",
    [
        (dict(max_tokens=10), [5, 6, EOS], ("stop", None)),
        (dict(max_tokens=10, ignore_eos=True), [5, 6, EOS, 9, 8, 7, 6, 5, 4, 3], ("length", None)),
        (dict(max_tokens=10, min_tokens=4), [5, 6, EOS, 9, 8, 7, 6, 5, 4, 3], ("length", None)),
        (dict(max_tokens=10, stop_token_ids=[6]), [5, 6], ("stop", 6)),
        (dict(max_tokens=10, stop_token_ids=[6], min_tokens=2), [5, 6], ("stop", 6)),
        (dict(max_tokens=10, stop_token_ids=[8], ignore_eos=True), [5, 6, EOS, 9, 8], ("stop", 8)),
        (dict(max_tokens=2), [5, 6], ("length", None)),
    ],
)
def test_stop_conditions_and_finish_reasons(params, expected_tokens, reason):
    scheduler = make_scheduler()
    scheduler.add_request(make_request("r", [1, 2, 3], **params))
    result = run_all(scheduler, ScriptedRunner({"r": [5, 6, EOS, 9, 8, 7, 6, 5, 4, 3, 2]}))
    assert result["outputs"]["r"] == expected_tokens
    assert result["reasons"]["r"] == reason
    assert scheduler.kv.num_used_blocks == 0


def test_max_model_len_caps_length():
    scheduler = make_scheduler(max_model_len=8)
    scheduler.add_request(make_request("r", [1, 2, 3], max_tokens=5, ignore_eos=True))
    result = run_all(scheduler, ScriptedRunner({"r": [4] * 9}))
    assert result["outputs"]["r"] == [4] * 5 and result["reasons"]["r"] == ("length", None)


def test_finish_request_frees_blocks_and_reports_the_id_once():
    scheduler = make_scheduler()
    runner = PagedSimRunner(64)
    scheduler.add_request(make_request("a", range(1, 10)))
    scheduler.add_request(make_request("b", range(1, 10)))
    out = scheduler.schedule()
    scheduler.update(out, runner.execute(out))
    assert scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert not scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert scheduler.kv.block_ids("a") == ()
    check_pool(scheduler)
    assert scheduler.schedule().finished_ids == ("a",)
    assert scheduler.schedule().finished_ids == ()
    with pytest.raises(ValueError, match="not a finished status"):
        scheduler.finish_request("b", RequestStatus.RUNNING)


def test_aborted_between_schedule_and_update_is_skipped():
    scheduler = make_scheduler()
    runner = PagedSimRunner(64)
    scheduler.add_request(make_request("a", range(1, 10)))
    out = scheduler.schedule()
    ran = runner.execute(out)
    scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert scheduler.update(out, ran) == []
    assert scheduler.kv.num_used_blocks == 0


@pytest.mark.parametrize("seed", range(6))
def test_random_add_step_abort_keeps_pool_accounting_exact(seed):
    rng = random.Random(seed)
    num_blocks = rng.choice([9, 13, 24])
    scheduler = make_scheduler(num_blocks=num_blocks, budget=rng.choice([8, 16]), max_num_seqs=4, max_model_len=40,
                               caching=seed % 3 != 2)
    runner = PagedSimRunner(num_blocks)
    prefixes = [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 12))] for _ in range(3)]
    expected, aborted, outputs = {}, set(), {}
    for step in range(300):
        op = rng.random()
        if op < 0.25:
            rid = f"r{step}"
            prompt = rng.choice(prefixes) + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(0, 10))]
            kwargs = dict(max_tokens=rng.randrange(1, 12), ignore_eos=rng.random() < 0.5)
            scheduler.add_request(make_request(rid, prompt, arrival=float(step), **kwargs))
            expected[rid] = reference_output(prompt, SamplingParams(**kwargs))
        elif op < 0.9 and scheduler.has_unfinished_requests():
            out = scheduler.schedule()
            for update in scheduler.update(out, runner.execute(out)):
                outputs.setdefault(update.request_id, []).extend(update.new_token_ids)
        elif scheduler.requests:
            rid = rng.choice(sorted(scheduler.requests))
            scheduler.finish_request(rid, RequestStatus.FINISHED_ABORTED)
            aborted.add(rid)
        check_pool(scheduler)
    for rid, tokens in run_all(scheduler, runner, check=check_pool)["outputs"].items():
        outputs.setdefault(rid, []).extend(tokens)
    assert scheduler.kv.num_free_blocks == scheduler.kv.num_usable_blocks
    assert all(scheduler.kv.ref_count(b) == 0 for b in range(num_blocks))
    for rid, tokens in expected.items():
        if rid not in aborted:
            assert outputs[rid] == tokens, rid
