"""Randomized pool accounting under a mix of parallel sampling (n > 1), beam-search forks of
retained requests, aborts and preemption: no block is ever leaked or freed twice, and every
completion still generates exactly what an unshared, unpreempted run would."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from test_scheduler import BS, VOCAB, make_scheduler, next_token, reference_output

from jaxllm.engine.kv_cache_manager import NULL_BLOCK_ID
from jaxllm.engine.messages import RunnerOutput
from jaxllm.engine.request import Request, RequestStatus
from jaxllm.sampling_params import SamplingParams


class ForkingSimRunner:
    """Writes tokens through block tables and samples from what it reads back; fork child i of a
    sequence samples (next token + i) so children diverge and must copy the shared block."""

    def __init__(self, num_blocks: int):
        self.pool = [[-1] * BS for _ in range(num_blocks)]
        self.num_compiles = 0

    def execute(self, out) -> RunnerOutput:
        for src, dst in out.block_copies:
            self.pool[dst] = list(self.pool[src])
        for seq in out.sequences:
            assert NULL_BLOCK_ID not in seq.block_ids
            for i, token in enumerate(seq.token_ids):
                pos = seq.start_pos + i
                self.pool[seq.block_ids[pos // BS]][pos % BS] = token
        sampled = {}
        for seq in out.sequences:
            end = seq.start_pos + len(seq.token_ids)
            context = [self.pool[seq.block_ids[p // BS]][p % BS] for p in range(end)]
            for i, sid in enumerate(seq.sample_ids):
                sampled[sid] = (next_token(context) + i) % VOCAB
        return RunnerOutput(sampled)


def fork_reference(prompt, params: SamplingParams, index: int) -> list[int]:
    first = (next_token(prompt) + index) % VOCAB
    if params.max_tokens == 1 or (first == 0 and not params.ignore_eos):
        return [first]
    rest = reference_output(prompt + [first], SamplingParams(max_tokens=params.max_tokens - 1,
                                                             ignore_eos=params.ignore_eos))
    return [first, *rest]


def check_pool(scheduler) -> None:
    kv = scheduler.kv
    holders_ids = list(scheduler.requests) + list(scheduler._retained)
    holders = Counter(b for rid in holders_ids for b in kv.block_ids(rid))
    free = kv.free_block_ids()
    assert len(set(free)) == len(free) and not set(free) & set(holders)
    assert len(free) + len(holders) == kv.num_usable_blocks
    for block_id in range(1, kv.num_usable_blocks + 1):
        assert kv.ref_count(block_id) == holders[block_id], block_id
    assert kv.num_held_blocks == len(holders)
    assert kv.num_block_references == sum(holders.values())
    for request in scheduler.running:
        assert len(kv.block_ids(request.request_id)) * BS >= request.num_computed_tokens
    assert sum(1 + r.num_pending_forks for r in scheduler.running) <= scheduler.config.max_num_seqs


@pytest.mark.parametrize("seed", range(6))
def test_random_mix_of_forks_beams_aborts_and_preemption(seed):
    rng = random.Random(seed)
    num_blocks = rng.choice([13, 17, 28])
    scheduler = make_scheduler(num_blocks=num_blocks, budget=rng.choice([8, 16]), max_num_seqs=6,
                               max_model_len=40, caching=seed % 2 == 0)
    runner = ForkingSimRunner(num_blocks)
    expected, outputs, aborted = {}, {}, set()
    for step in range(300):
        op = rng.random()
        if op < 0.2:  # a request, sometimes with parallel samples, sometimes a retained beam step
            rid, n = f"r{step}", rng.choice([1, 1, 2, 3])
            prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 14))]
            kwargs = dict(max_tokens=rng.randrange(1, 10), ignore_eos=rng.random() < 0.5, n=n)
            retain = n == 1 and rng.random() < 0.3
            scheduler.add_request(Request(rid, prompt, SamplingParams(**kwargs), float(step), retain_blocks=retain))
            for i in range(n):
                expected[rid if i == 0 else f"{rid}#{i}"] = fork_reference(prompt, SamplingParams(**kwargs), i)
        elif op < 0.3 and scheduler._retained:  # beam step: fork children of a retained request
            parent_id = rng.choice(sorted(scheduler._retained))
            parent = scheduler._retained[parent_id]
            base = parent.all_token_ids[: parent.num_computed_tokens]
            for k in range(rng.randrange(0, 3)):
                child_id = f"{parent_id}.{step}.{k}"
                tokens = base + [rng.randrange(1, VOCAB)]
                if len(tokens) + 2 > 40:
                    break
                params = SamplingParams(max_tokens=2, ignore_eos=True)
                scheduler.add_forked_request(Request(child_id, tokens, params, float(step), retain_blocks=True),
                                             parent_id)
                expected[child_id] = reference_output(tokens, params)
            scheduler.release(parent_id)
        elif op < 0.9 and scheduler.has_unfinished_requests():
            out = scheduler.schedule()
            for update in scheduler.update(out, runner.execute(out)):
                outputs.setdefault(update.request_id, []).extend(update.new_token_ids)
        elif scheduler.requests:
            rid = rng.choice(sorted(scheduler.requests))
            scheduler.finish_request(rid, RequestStatus.FINISHED_ABORTED)
            aborted.add(rid)
        while len(scheduler._retained) > 2:  # retained requests are the caller's to release
            scheduler.release(next(iter(scheduler._retained)))
        check_pool(scheduler)
    for rid in list(scheduler._retained):
        scheduler.release(rid)
    for _ in range(10_000):
        if not scheduler.has_unfinished_requests():
            break
        out = scheduler.schedule()
        for update in scheduler.update(out, runner.execute(out)):
            outputs.setdefault(update.request_id, []).extend(update.new_token_ids)
        check_pool(scheduler)
    for rid in list(scheduler._retained):
        scheduler.release(rid)
    check_pool(scheduler)
    assert scheduler.kv.num_free_blocks == scheduler.kv.num_usable_blocks
    assert all(scheduler.kv.ref_count(b) == 0 for b in range(num_blocks))
    assert scheduler.stats.num_preemptions > 0 or num_blocks == 28
    finished = [rid for rid in expected if rid not in aborted and rid in outputs]
    assert finished
    for rid in finished:
        if not any(rid.startswith(a + "#") for a in aborted):
            assert outputs[rid] == expected[rid], rid
