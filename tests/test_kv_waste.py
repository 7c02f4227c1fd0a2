"""KV waste: allocated but unfilled token slots / allocated slots, averaged over steps.

Every number is worked out by hand with block_size 16; shared prefix-cache blocks count once.
"""

from jaxllm.config import CacheConfig, SchedulerConfig
from jaxllm.engine.kv_cache_manager import KVCacheManager, SlotUsage
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.engine.messages import RunnerOutput
from jaxllm.engine.request import Request
from jaxllm.sampling_params import SamplingParams

BS = 16


class ConstantRunner:
    """Samples token 1 for every sequence that samples."""

    num_compiles = 0

    def execute(self, out) -> RunnerOutput:
        return RunnerOutput({s.request_id: 1 for s in out.sequences if s.sample})


def make_engine(budget: int = 64) -> LLMEngine:
    return LLMEngine(None, ConstantRunner(),
                     SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget, max_model_len=128),
                     CacheConfig(block_size=BS), num_kv_blocks=32)


def waste_after_each_step(engine: LLMEngine, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        engine.step()
        out.append(engine.stats.kv_waste)
    return out


def test_one_request_prefill_then_decode():
    engine = make_engine()
    engine.add_request("a", list(range(2, 22)), SamplingParams(max_tokens=3, ignore_eos=True))
    assert engine.stats.kv_waste == 0.0  # no step yet
    # Step 1: 20 prompt tokens in 2 blocks (32 slots). Step 2: 21 in 32. Step 3 finishes the
    # request and frees its blocks, so that step holds nothing and does not count.
    assert waste_after_each_step(engine, 3) == [12 / 32, (12 / 32 + 11 / 32) / 2, (12 / 32 + 11 / 32) / 2]
    assert not engine.has_unfinished_requests()


def test_chunked_prefill_counts_each_chunk():
    engine = make_engine(budget=8)
    engine.add_request("a", list(range(2, 22)), SamplingParams(max_tokens=3, ignore_eos=True))
    # Chunks of 8, 8, 4 tokens: 8/16, 16/16, 20/32 filled; then one decode token, 21/32.
    wastes = [8 / 16, 0 / 16, 12 / 32, 11 / 32]
    expected = [sum(wastes[: i + 1]) / (i + 1) for i in range(len(wastes))]
    assert waste_after_each_step(engine, 4) == expected


def test_shared_prefix_blocks_count_once():
    engine = make_engine()
    prompt = list(range(2, 38))  # 36 tokens: blocks of 16, 16, 4
    engine.add_request("a", prompt, SamplingParams(max_tokens=10, ignore_eos=True))
    engine.step()  # a: 36 tokens in 3 blocks
    engine.add_request("b", prompt[:32] + [40, 41, 42, 43], SamplingParams(max_tokens=10, ignore_eos=True))
    engine.step()  # a decodes to 37 tokens; b hits a's 2 full blocks and computes 4 in a new block
    assert engine.stats.prefix_cache_hits == 32
    kv = engine.scheduler.kv
    a, b = (engine.scheduler.requests[r] for r in "ab")
    assert kv.block_ids("a")[:2] == kv.block_ids("b")[:2]
    # 4 distinct blocks = 64 slots, holding 16 + 16 + 5 (a's tail) + 4 (b's tail) tokens.
    assert kv.slot_usage([a, b]) == SlotUsage(allocated=64, filled=41)
    assert engine.stats.kv_waste == (12 / 48 + 23 / 64) / 2


def test_slot_usage_of_forked_partial_block():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    parent = Request("p", list(range(2, 22)), SamplingParams(), 0.0)
    kv.allocate_slots(parent, 20)
    parent.num_computed_tokens = 20
    child = Request("c", list(range(2, 22)), SamplingParams(), 0.0)
    kv.fork(parent, child)
    child.num_computed_tokens = 20
    # Both hold the same 2 blocks, the second of them 4 tokens full.
    assert kv.slot_usage([parent, child]) == SlotUsage(allocated=32, filled=20)
    kv.free(child)
    assert kv.pool.num_shared == 0
    assert kv.slot_usage([parent]) == SlotUsage(allocated=32, filled=20)
