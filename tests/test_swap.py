"""Preemption by swapping: host slot bookkeeping, exact block accounting through swap-out and
swap-in, fallback to recompute when swap space is full, and greedy SmolLM2 output on a tiny pool
equal to transformers'."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import numpy as np
import pytest
from conftest import GREEDY_MAX_TOKENS, GREEDY_PROMPTS
from test_scheduler import BS, VOCAB, PagedSimRunner, make_request, reference_output, run_all

from jaxllm.config import CacheConfig, SchedulerConfig
from jaxllm.engine.kv_cache_manager import NULL_BLOCK_ID
from jaxllm.engine.request import RequestStatus
from jaxllm.engine.scheduler import Scheduler
from jaxllm.engine.swap_space import SwapSpace
from jaxllm.sampling_params import SamplingParams


class SwapSimRunner(PagedSimRunner):
    """The simulated pool, plus host slots; blocks left free and unfindable after a swap-out are
    poisoned, so a swap-in that restored nothing changes the generated tokens."""

    def __init__(self, num_blocks: int, scheduler: Scheduler, num_slots: int):
        super().__init__(num_blocks)
        self.scheduler = scheduler
        self.host = np.full((num_slots, BS), -2, dtype=np.int64)

    def execute(self, out):
        kv = self.scheduler.kv
        for block, slot in out.swap_out:
            self.host[slot] = self.pool[block]
        for block, _ in out.swap_out:
            if kv.ref_count(block) == 0 and kv.block_hash(block) is None:
                self.pool[block] = -3
        for src, dst in out.block_copies:
            self.pool[dst] = self.pool[src]
        for slot, block in out.swap_in:
            self.pool[block] = self.host[slot]
        return super().execute(dataclasses.replace(out, block_copies=()))


def make_swap_scheduler(num_blocks, num_slots, budget=16, max_num_seqs=4, max_model_len=256, caching=True):
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len),
        CacheConfig(block_size=BS, enable_prefix_caching=caching, preemption_mode="swap"),
        num_kv_blocks=num_blocks, eos_token_ids=(0,), num_swap_blocks=num_slots,
    )


def check_accounting(scheduler: Scheduler) -> None:
    """Every block free xor held with exact ref counts; every host slot free xor held by exactly
    one waiting request, which holds no blocks and as many slots as its computed tokens need."""
    kv, swap = scheduler.kv, scheduler.swap_space
    holders = Counter(b for rid in scheduler.requests for b in kv.block_ids(rid))
    free = kv.free_block_ids()
    assert not set(free) & set(holders) and NULL_BLOCK_ID not in holders
    assert len(free) + len(holders) == kv.num_usable_blocks
    assert all(kv.ref_count(b) == holders[b] for b in range(1, kv.num_usable_blocks + 1))
    held = 0
    for request in scheduler.waiting:
        assert kv.block_ids(request.request_id) == ()
        if swap.holds(request.request_id):
            assert swap.num_held(request.request_id) == kv.num_blocks_for(request.num_computed_tokens) > 0
            held += swap.num_held(request.request_id)
        else:
            assert request.num_computed_tokens == 0
    assert held + swap.num_free == swap.num_slots
    assert not any(swap.holds(r.request_id) for r in scheduler.running)


def test_swap_space_hands_out_slots_all_or_nothing():
    swap = SwapSpace(4)
    assert swap.store("a", 3) == (0, 1, 2)
    assert swap.store("b", 2) is None and swap.num_free == 1
    assert swap.release("a") == (0, 1, 2) and swap.release("a") == ()
    assert swap.store("b", 4) == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="num_slots"):
        SwapSpace(-1)


def test_swapped_request_keeps_its_computed_tokens_and_comes_back_into_fresh_blocks():
    scheduler = make_swap_scheduler(num_blocks=5, num_slots=8)
    runner = SwapSimRunner(5, scheduler, 8)
    scheduler.add_request(make_request("a", range(1, 7), arrival=1.0, max_tokens=6, ignore_eos=True))
    scheduler.add_request(make_request("b", range(11, 17), arrival=2.0, max_tokens=6, ignore_eos=True))
    for _ in range(3):
        out = scheduler.schedule()
        scheduler.update(out, runner.execute(out))
    b_blocks = scheduler.kv.block_ids("b")
    out = scheduler.schedule()  # a needs a third block: b is swapped out
    assert out.preempted_ids == ("b",) and out.swap_out == tuple(zip(b_blocks, (0, 1), strict=True))
    b = scheduler.requests["b"]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 8 and scheduler.num_swaps == 1
    check_accounting(scheduler)
    scheduler.update(out, runner.execute(out))
    while "b" not in [s.request_id for s in out.sequences]:
        out = scheduler.schedule()
        scheduler.update(out, runner.execute(out))
        check_accounting(scheduler)
    (seq,) = [s for s in out.sequences if s.request_id == "b"]
    assert seq.start_pos == 8 and len(seq.token_ids) == 1  # no recompute: only its next token
    assert [slot for slot, _ in out.swap_in] == [0, 1]
    assert tuple(block for _, block in out.swap_in) == seq.block_ids[:2]
    run_all(scheduler, runner, check=check_accounting)
    assert b.output_token_ids == reference_output(range(11, 17), SamplingParams(max_tokens=6, ignore_eos=True))
    assert scheduler.stats.num_swaps == 1 and scheduler.swap_space.num_free == 8


def test_full_swap_space_falls_back_to_recompute():
    scheduler = make_swap_scheduler(num_blocks=5, num_slots=1)  # b's 2 blocks do not fit
    runner = SwapSimRunner(5, scheduler, 1)
    scheduler.add_request(make_request("a", range(1, 7), arrival=1.0, max_tokens=6, ignore_eos=True))
    scheduler.add_request(make_request("b", range(11, 17), arrival=2.0, max_tokens=6, ignore_eos=True))
    for _ in range(4):
        out = scheduler.schedule()
        scheduler.update(out, runner.execute(out))
    assert out.preempted_ids == ("b",) and out.swap_out == ()
    assert scheduler.requests["b"].num_computed_tokens == 0 and scheduler.num_swaps == 0
    outputs = run_all(scheduler, runner, check=check_accounting)["outputs"]
    assert outputs["b"] == reference_output(range(11, 17), SamplingParams(max_tokens=6, ignore_eos=True))[3:]


@pytest.mark.parametrize("seed", range(8))
def test_random_add_step_abort_keeps_block_and_slot_accounting_exact(seed):
    rng = random.Random(seed)
    num_blocks, num_slots = rng.choice([9, 13]), rng.choice([0, 3, 8, 40])
    scheduler = make_swap_scheduler(num_blocks, num_slots, budget=rng.choice([8, 16]), max_model_len=40,
                                    caching=seed % 3 != 2)
    runner = SwapSimRunner(num_blocks, scheduler, num_slots)
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
        elif op < 0.92 and scheduler.has_unfinished_requests():
            out = scheduler.schedule()
            for update in scheduler.update(out, runner.execute(out)):
                outputs.setdefault(update.request_id, []).extend(update.new_token_ids)
        elif scheduler.requests:
            rid = rng.choice(sorted(scheduler.requests))
            scheduler.finish_request(rid, RequestStatus.FINISHED_ABORTED)
            aborted.add(rid)
        check_accounting(scheduler)
    for rid, tokens in run_all(scheduler, runner, check=check_accounting)["outputs"].items():
        outputs.setdefault(rid, []).extend(tokens)
    assert scheduler.kv.num_free_blocks == scheduler.kv.num_usable_blocks
    assert scheduler.swap_space.num_free == num_slots
    assert scheduler.num_swaps <= scheduler.num_preemptions
    if num_slots == 0:
        assert scheduler.num_swaps == 0
    for rid, tokens in expected.items():
        if rid not in aborted:
            assert outputs[rid] == tokens, rid


def test_swapping_happens_in_the_random_workloads():
    # The randomized test above is only meaningful if it actually swaps: check one seed does.
    scheduler = make_swap_scheduler(9, 40, budget=8, max_model_len=40)
    runner = SwapSimRunner(9, scheduler, 40)
    for i in range(6):
        scheduler.add_request(make_request(f"r{i}", range(i + 1, i + 12), arrival=float(i), max_tokens=11))
    outputs = run_all(scheduler, runner, check=check_accounting)["outputs"]
    assert scheduler.num_swaps > 0
    for i in range(6):
        assert outputs[f"r{i}"] == reference_output(range(i + 1, i + 12), SamplingParams(max_tokens=11))


# -- end to end on SmolLM2 -----------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0.0, max_tokens=GREEDY_MAX_TOKENS, ignore_eos=True)
LIMITS = dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64)


# Plenty of swap space; and one slot, too few for the preempted request, which then recomputes.
@pytest.mark.parametrize("swap_blocks", [1000, 1])
def test_tiny_pool_swaps_and_matches_transformers(smollm2_model, smollm2_expected_greedy, swap_blocks):
    from jaxllm import LLM
    from jaxllm.runner.kv_pool import bytes_per_block

    cfg = smollm2_model.config
    gib = swap_blocks * bytes_per_block(cfg, 16, np.float32) / (1 << 30)
    llm = LLM(smollm2_model, num_kv_blocks=10, preemption_mode="swap", swap_space=gib, **LIMITS)
    engine = llm.llm_engine
    assert engine.runner.num_swap_blocks == swap_blocks
    compiles = engine.stats.num_compiles
    # + block copy, structured-output mask write, swap out, swap in
    assert compiles == len(engine.runner.buckets.shapes()) + 4
    outputs = llm.generate(GREEDY_PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == smollm2_expected_greedy
    stats = engine.stats
    assert stats.num_preemptions > 0 and stats.num_compiles == compiles and stats.kv_blocks_used == 0
    assert stats.num_swaps == (stats.num_preemptions if swap_blocks == 1000 else 0)
    assert engine.scheduler.swap_space.num_free == swap_blocks


def test_bfloat16_pool_swaps_its_bits_out_and_back(tmp_path):
    # A bfloat16 model's CPU pool is uint16 (the values' bits): swapped out to host memory and
    # back, its requests finish exactly as they do in a pool big enough never to preempt.
    from tiny_models import make_tiny_checkpoint

    from jaxllm import LLM
    from jaxllm.runner.kv_pool import bytes_per_block

    path = str(make_tiny_checkpoint("llama", tmp_path))
    limits = dict(dtype="bfloat16", max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64, warmup=False)
    prompts = [{"prompt_token_ids": list(range(i + 3, i + 40))} for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    roomy = LLM(path, **limits)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    assert roomy.llm_engine.stats.num_preemptions == 0
    cfg = roomy.llm_engine.runner.cfg
    gib = 100 * bytes_per_block(cfg, 16, np.uint16) / (1 << 30)
    tight = LLM(path, num_kv_blocks=12, preemption_mode="swap", swap_space=gib, **limits)
    assert tight.llm_engine.runner.kv_dtype == np.uint16 and tight.llm_engine.runner.num_swap_blocks == 100
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
    assert tight.llm_engine.stats.num_swaps > 0
    assert got == expected and all(len(t) == 20 for t in got)
