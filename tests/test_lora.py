"""LoRA adapters (``enable_lora``, ``LoRARequest``): PEFT adapters read as PEFT merges them, several
adapters and the base model in one batch, equal to transformers on the merged weights; the
scheduler's ``max_loras``; prefix caching per adapter; slots and host memory reused without
recompiling."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import hf_greedy
from test_scheduler import BS, EOS, PagedSimRunner, check_pool, next_token
from tiny_models import make_lora_adapter, make_tiny_checkpoint, merge_lora

from jaxllm.config import CacheConfig, LoRAConfig, SchedulerConfig
from jaxllm.engine.messages import RunnerOutput
from jaxllm.engine.request import Request
from jaxllm.engine.scheduler import Scheduler
from jaxllm.lora import LoRARequest
from jaxllm.sampling_params import SamplingParams

LIMITS = dict(max_model_len=64, max_num_seqs=8, max_num_batched_tokens=32, num_kv_blocks=64, block_size=8,
              compilation_cache_dir=None)
PROMPTS = [[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 3, 4, 8, 15, 16, 23, 42], [2, 4, 6], [7, 8, 9, 10, 11]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


# -- reading adapters ------------------------------------------------------------------------------
def test_adapter_is_read_as_peft_merges_it(tmp_path):
    from jaxllm.loader import load_model
    from jaxllm.lora.adapter import load_adapter

    base = make_tiny_checkpoint("llama", tmp_path / "base")
    cfg = load_model(str(base), dtype="float32").config
    path = make_lora_adapter(base, tmp_path / "a", rank=4, alpha=6.0, targets=("q_proj", "down_proj"), layers=(1,))
    adapter = load_adapter(LoRARequest("a", 1, str(path)), cfg, max_lora_rank=8)
    assert adapter.rank == 4 and sorted(adapter.weights) == ["w_down", "wq"]
    from safetensors.numpy import load_file

    raw = load_file(str(path / "adapter_model.safetensors"))
    a, b = adapter.weights["wq"]
    assert a.shape == (2, 64, 4) and b.shape == (2, 4, 64)
    assert not a[0].any() and not b[0].any()  # layer 0 is not adapted
    name = "base_model.model.model.layers.1.self_attn.q_proj"
    np.testing.assert_allclose(a[1] @ b[1], 1.5 * (raw[name + ".lora_B.weight"] @ raw[name + ".lora_A.weight"]).T,
                               rtol=1e-5, atol=1e-6)
    rs = make_lora_adapter(base, tmp_path / "rs", rank=4, alpha=6.0, targets=("q_proj",), use_rslora=True)
    a, b = load_adapter(LoRARequest("rs", 2, str(rs)), cfg, 8).weights["wq"]
    raw = load_file(str(rs / "adapter_model.safetensors"))
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    np.testing.assert_allclose(a[0] @ b[0], 6.0 / math.sqrt(4) * (raw[name + ".lora_B.weight"]
                                                                   @ raw[name + ".lora_A.weight"]).T, rtol=1e-5, atol=1e-6)
    # alpha_pattern: one module's alpha
    pat = make_lora_adapter(base, tmp_path / "pat", rank=4, alpha=6.0, targets=("q_proj", "v_proj"),
                            extra_config={"alpha_pattern": {"v_proj": 2.0}})
    weights = load_adapter(LoRARequest("pat", 3, str(pat)), cfg, 8).weights
    raw = load_file(str(pat / "adapter_model.safetensors"))
    name = "base_model.model.model.layers.0.self_attn.v_proj"
    np.testing.assert_allclose(weights["wv"][0][0] @ weights["wv"][1][0],
                               0.5 * (raw[name + ".lora_B.weight"] @ raw[name + ".lora_A.weight"]).T, rtol=1e-5, atol=1e-6)


def test_adapters_that_do_not_fit_are_refused_by_name(tmp_path):
    from safetensors.numpy import save_file

    from jaxllm.loader import load_model
    from jaxllm.lora.adapter import load_adapter

    base = make_tiny_checkpoint("llama", tmp_path / "base")
    cfg = load_model(str(base), dtype="float32").config

    def refused(path, match, max_rank=8):
        with pytest.raises(ValueError, match=match):
            load_adapter(LoRARequest("x", 1, str(path)), cfg, max_rank)

    refused(tmp_path / "nowhere", "is not an adapter directory")
    refused(base, "has no adapter_config.json")
    good = make_lora_adapter(base, tmp_path / "good", rank=8, targets=("q_proj",))
    refused(good, r"rank 8 \(model.layers.0.self_attn.q_proj\) exceeds max_lora_rank=4", max_rank=4)
    for key, value, match in [("use_dora", True, "DoRA"), ("bias", "all", "adapter biases"),
                              ("modules_to_save", ["lm_head"], "modules_to_save"), ("peft_type", "IA3", "peft_type"),
                              ("fan_in_fan_out", True, "Conv1D")]:
        refused(make_lora_adapter(base, tmp_path / key, targets=("q_proj",), extra_config={key: value}), match)
    wrong_r = make_lora_adapter(base, tmp_path / "wrong_r", rank=4, targets=("q_proj",), extra_config={})
    config = json.loads((wrong_r / "adapter_config.json").read_text())
    (wrong_r / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    refused(wrong_r, "lora_A has rank 4 but adapter_config.json says r=8")
    for name, tensors, match in [
        ("embed", {"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 160), np.float32)},
         "embed_tokens.lora_embedding_A"),
        ("head", {"base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32)}, "lm_head"),
        ("shape", {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 32), np.float32),
                   "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((64, 4), np.float32)},
         r"do not fit this model's 64 -> 64 weight"),
        ("layer", {"base_model.model.model.layers.5.mlp.up_proj.lora_A.weight": np.zeros((4, 64), np.float32),
                   "base_model.model.model.layers.5.mlp.up_proj.lora_B.weight": np.zeros((96, 4), np.float32)},
         "layer 5 but the model has 2 layers"),
        ("half", {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": np.zeros((4, 64), np.float32)},
         "lora_A and lora_B must both be present"),
    ]:
        path = tmp_path / name
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
        save_file(tensors, str(path / "adapter_model.safetensors"))
        refused(path, match)
    for bad, match in [(dict(lora_name="", lora_int_id=1, lora_path="p"), "lora_name"),
                       (dict(lora_name="a", lora_int_id=0, lora_path="p"), "lora_int_id=0"),
                       (dict(lora_name="a", lora_int_id=True, lora_path="p"), "lora_int_id=True"),
                       (dict(lora_name="a", lora_int_id=1), "lora_path")]:
        with pytest.raises(ValueError, match=match):
            LoRARequest(**bad)
    for bad, match in [(dict(max_loras=0), "max_loras=0"), (dict(max_lora_rank=-1), "max_lora_rank=-1"),
                       (dict(max_loras=2, max_cpu_loras=1), "max_cpu_loras=1 must be >= max_loras=2")]:
        with pytest.raises(ValueError, match=match):
            LoRAConfig(**bad)
    assert LoRAConfig(max_loras=3).max_cpu_loras == 3


# -- the scheduler ---------------------------------------------------------------------------------
class LoRASimRunner(PagedSimRunner):
    """``PagedSimRunner`` whose K/V depend on the adapter: each token is stored with its request's
    lora id, and sampling reads them back, so a prefix-cache hit across adapters changes the
    output. Also checks no step runs more than ``max_loras`` adapters."""

    def __init__(self, num_blocks: int, max_loras: int):
        super().__init__(num_blocks)
        self.max_loras = max_loras
        self.adapters_per_step: list[set[int]] = []

    def execute(self, out) -> RunnerOutput:
        adapters = {s.lora_request.lora_int_id for s in out.sequences if s.lora_request is not None}
        assert len(adapters) <= self.max_loras, adapters
        self.adapters_per_step.append(adapters)
        for src, dst in out.block_copies:
            self.pool[dst] = self.pool[src]
        for seq in out.sequences:
            lora = 0 if seq.lora_request is None else seq.lora_request.lora_int_id
            for i, token in enumerate(seq.token_ids):
                self._slot(seq.block_ids, seq.start_pos + i, token + 1000 * lora)
        sampled = {}
        for seq in out.sequences:
            if seq.sample:
                end = seq.start_pos + len(seq.token_ids)
                sampled[seq.request_id] = next_token([self._slot(seq.block_ids, p) for p in range(end)])
        return RunnerOutput(sampled)


def lora_reference(prompt, lora_id: int, max_tokens: int) -> list[int]:
    seq, out = [t + 1000 * lora_id for t in prompt], []
    while len(out) < max_tokens:
        token = next_token(seq)
        seq.append(token + 1000 * lora_id)
        out.append(token)
    return out


def lora_scheduler(max_loras=1, num_blocks=64, budget=32, caching=True) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=256),
                     CacheConfig(block_size=BS, enable_prefix_caching=caching), num_kv_blocks=num_blocks,
                     eos_token_ids=(EOS,), max_loras=max_loras)


def lora_request(rid, prompt, lora_id, max_tokens=6) -> Request:
    lora = None if lora_id == 0 else LoRARequest(f"a{lora_id}", lora_id, "/adapters")
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True), 0.0,
                   lora_request=lora)


def run_sim(scheduler, runner, check=check_pool) -> dict:
    outputs = {}
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        for update in scheduler.update(out, runner.execute(out)):
            outputs.setdefault(update.request_id, []).extend(update.new_token_ids)
        check(scheduler)
    return outputs


def test_a_request_whose_adapter_is_one_too_many_waits_and_others_pass_it():
    scheduler, runner = lora_scheduler(max_loras=1), LoRASimRunner(64, 1)
    loras = {"r0": 1, "r1": 2, "r2": 1, "r3": 0, "r4": 2}
    for rid, lora in loras.items():
        scheduler.add_request(lora_request(rid, [5, 6, 7, int(rid[1])], lora))
    first = scheduler.schedule()
    assert [s.request_id for s in first.sequences] == ["r0", "r2", "r3"]  # adapter 2 must wait
    assert [r.request_id for r in scheduler.waiting] == ["r1", "r4"]  # in their order, at the front
    outputs = {u.request_id: list(u.new_token_ids) for u in scheduler.update(first, runner.execute(first))}
    for rid, tokens in run_sim(scheduler, runner).items():
        outputs.setdefault(rid, []).extend(tokens)
    for rid, lora in loras.items():
        assert outputs[rid] == lora_reference([5, 6, 7, int(rid[1])], lora, 6)
    assert {2} in runner.adapters_per_step and all(len(a) <= 1 for a in runner.adapters_per_step)
    with pytest.raises(ValueError, match="needs LoRA enabled"):
        from test_scheduler import make_scheduler

        make_scheduler().add_request(lora_request("x", [1, 2], 1))


def test_prefix_blocks_are_shared_only_under_the_same_adapter():
    from jaxllm.engine.kv_cache_manager import hash_block, root_hash

    scheduler, runner = lora_scheduler(max_loras=2), LoRASimRunner(64, 2)
    prompt = list(range(1, 4 * BS + 2))  # four full blocks and a token
    cached = {}
    for rid, lora in [("a1", 1), ("b2", 2), ("a1-again", 1), ("base", 0), ("base-again", 0), ("b2-again", 2)]:
        request = lora_request(rid, prompt, lora, max_tokens=3)
        scheduler.add_request(request)
        assert run_sim(scheduler, runner)[rid] == lora_reference(prompt, lora, 3), rid
        cached[rid] = request.num_cached_tokens
    assert cached == {"a1": 0, "b2": 0, "a1-again": 4 * BS, "base": 0, "base-again": 4 * BS, "b2-again": 4 * BS}
    first = tuple(prompt[:BS])
    assert len({hash_block(root_hash(None, lora), first) for lora in (None, 1, 2)}) == 3
    assert len({root_hash("salt", 1), root_hash("salt"), root_hash(None, 1), root_hash("salt", 2)}) == 4


def test_random_mixes_of_adapters_under_preemption_give_each_adapters_outputs():
    rng = np.random.default_rng(0)
    for trial in range(12):
        max_loras = int(rng.integers(1, 3))
        scheduler = lora_scheduler(max_loras=max_loras, num_blocks=int(rng.integers(12, 40)),
                                   budget=int(rng.integers(8, 33)), caching=bool(trial % 2))
        runner = LoRASimRunner(scheduler.kv.num_usable_blocks + 1, max_loras)
        want = {}
        for i in range(10):
            prompt = [int(t) for t in rng.integers(1, 40, size=int(rng.integers(2, 20)))]
            if i % 3 == 1:  # shared prefixes across adapters
                prompt = [3, 1, 4, 1, 5, 9, 2, 6] + prompt
            lora, max_tokens = int(rng.integers(0, 4)), int(rng.integers(1, 12))
            scheduler.add_request(lora_request(f"r{i}", prompt, lora, max_tokens))
            want[f"r{i}"] = lora_reference(prompt, lora, max_tokens)
        assert run_sim(scheduler, runner) == want, trial


# -- the engine on a model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama, three adapters of it, and transformers' greedy outputs on the merged weights."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    base = make_tiny_checkpoint("llama", root / "base")
    adapters = {
        1: make_lora_adapter(base, root / "a1", rank=4, seed=1),
        2: make_lora_adapter(base, root / "a2", rank=8, seed=2, targets=("q_proj", "v_proj", "down_proj"),
                             use_rslora=True),
        3: make_lora_adapter(base, root / "a3", rank=2, seed=3, targets=("o_proj", "gate_proj", "up_proj", "k_proj"),
                             layers=(0,)),
    }
    expected = {}
    for lora_id, path in [(0, None), *adapters.items()]:
        hf = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
        if path is not None:
            merge_lora(hf, path)
            hf.save_pretrained(root / f"merged{lora_id}")
        expected[lora_id] = [hf_greedy(hf, p, GREEDY.max_tokens) for p in PROMPTS]
    requests = {i: LoRARequest(f"a{i}", i, str(p)) for i, p in adapters.items()}
    return {"base": base, "root": root, "requests": requests, "expected": expected}


def test_adapters_and_the_base_model_in_one_batch_equal_transformers_on_merged_weights(tiny):
    from jaxllm import LLM

    llm = LLM(str(tiny["base"]), enable_lora=True, max_loras=3, max_lora_rank=8, **LIMITS)
    compiles = llm.llm_engine.runner.num_compiles
    order = [0, 1, 2, 3, 2, 0, 1, 3]  # each adapter several times, interleaved
    loras = [tiny["requests"].get(i) for i in order for _ in PROMPTS]
    prompts = [{"prompt_token_ids": p} for _ in order for p in PROMPTS]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=loras)
    for k, lora_id in enumerate(order):
        for j in range(len(PROMPTS)):
            out = outs[k * len(PROMPTS) + j]
            assert out.outputs[0].token_ids == tiny["expected"][lora_id][j], (lora_id, j)
            assert out.lora_request == tiny["requests"].get(lora_id)
    for lora_id in (1, 2, 3):  # each adapter really changes the outputs
        assert tiny["expected"][lora_id] != tiny["expected"][0]
    assert llm.llm_engine.runner.num_compiles == compiles  # adapters in slots: no recompiles
    assert llm.llm_engine.list_loras() == {1, 2, 3}
    # A repeated prompt under the same adapter hits the prefix cache; under another it does not.
    again = llm.generate([{"prompt_token_ids": PROMPTS[0]}] * 2, GREEDY, use_tqdm=False,
                         lora_request=[tiny["requests"][1], tiny["requests"][2]])
    assert again[0].num_cached_tokens == 16 and again[1].num_cached_tokens == 16  # both ran above
    fresh = PROMPTS[0][::-1]
    cold = llm.generate([{"prompt_token_ids": fresh}] * 2, GREEDY, use_tqdm=False,
                        lora_request=[tiny["requests"][1], tiny["requests"][2]])
    assert cold[1].num_cached_tokens == 0  # the same prompt's blocks under adapter 1 are not adapter 2's


def test_one_slot_and_one_host_copy_serve_many_adapters_in_turn(tiny):
    from jaxllm import LLM

    llm = LLM(str(tiny["base"]), enable_lora=True, max_loras=1, max_cpu_loras=1, max_lora_rank=8, **LIMITS)
    runner = llm.llm_engine.runner
    compiles = runner.num_compiles
    order = [1, 2, 0, 3, 1]
    loras = [tiny["requests"].get(i) for i in order for _ in PROMPTS]
    prompts = [{"prompt_token_ids": p} for _ in order for p in PROMPTS]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=loras)
    for k, lora_id in enumerate(order):
        for j in range(len(PROMPTS)):
            assert outs[k * len(PROMPTS) + j].outputs[0].token_ids == tiny["expected"][lora_id][j], (lora_id, j)
    # Adapter 1's later requests pass the others' while it runs: each adapter is loaded once.
    assert runner.lora.num_loads == 3
    assert len(runner.lora._host) == 1  # host memory holds one: the others were read again
    assert runner.num_compiles == compiles
    # vLLM's lora_requests_info: the adapters of running and waiting requests.
    from jaxllm.engine.llm_engine import LoRAStats

    engine = llm.llm_engine
    engine.add_request("s1", PROMPTS[1], GREEDY, lora_request=tiny["requests"][1])
    engine.add_request("s2", PROMPTS[2], GREEDY, lora_request=tiny["requests"][2])
    assert engine.stats.lora == LoRAStats(1, (), ("a1", "a2"))
    engine.step()
    assert engine.stats.lora == LoRAStats(1, ("a1",), ("a2",))  # one slot: a2 waits for a1
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats.lora == LoRAStats(1, (), ())
    assert engine.list_loras() == {2}  # the last adapter run: in the slot and in host memory
    assert engine.remove_lora(2) and not engine.remove_lora(2) and engine.list_loras() == set()
    assert engine.add_lora(tiny["requests"][3]) and not engine.add_lora(tiny["requests"][3])
    assert engine.list_loras() == {3}


def test_sampling_beam_search_logprobs_and_embeddings_equal_the_merged_checkpoint(tiny):
    """Everything else a request can ask for behaves with an adapter as on its merged weights."""
    from jaxllm import LLM, BeamSearchParams, PoolingParams

    lora = tiny["requests"][2]
    ours = LLM(str(tiny["base"]), enable_lora=True, max_lora_rank=8, **LIMITS)
    merged = LLM(str(tiny["root"] / "merged2"), **LIMITS)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    seeded = SamplingParams(n=2, temperature=0.8, top_k=20, seed=7, max_tokens=8, ignore_eos=True, logprobs=2)
    got = ours.generate(prompts, seeded, use_tqdm=False, lora_request=lora)
    want = merged.generate(prompts, seeded, use_tqdm=False)
    for g, w in zip(got, want, strict=True):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in w.outputs]
        for gc, wc in zip(g.outputs, w.outputs, strict=True):
            for gl, wl in zip(gc.logprobs, wc.logprobs, strict=True):
                assert gl.keys() == wl.keys()
                assert all(abs(gl[t].logprob - wl[t].logprob) < 1e-4 for t in gl)
    beams = BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True)
    got = ours.beam_search(prompts, beams, lora_request=lora)
    want = merged.beam_search(prompts, beams)
    assert [[s.tokens for s in o.sequences] for o in got] == [[s.tokens for s in o.sequences] for o in want]
    got = ours.embed(prompts, PoolingParams(), use_tqdm=False, lora_request=lora)
    want = merged.embed(prompts, PoolingParams(), use_tqdm=False)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.outputs.embedding, w.outputs.embedding, atol=2e-5)


def test_lora_argument_errors(tiny, tmp_path):
    from jaxllm import LLM

    plain = LLM(str(tiny["base"]), **LIMITS)
    prompt = {"prompt_token_ids": PROMPTS[1]}
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        plain.generate(prompt, GREEDY, use_tqdm=False, lora_request=tiny["requests"][1])
    assert plain.llm_engine.list_loras() == set() and not plain.llm_engine.remove_lora(1)
    llm = LLM(str(tiny["base"]), enable_lora=True, max_lora_rank=4, **LIMITS)
    with pytest.raises(ValueError, match="exceeds max_lora_rank=4"):
        llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=tiny["requests"][2])
    with pytest.raises(ValueError, match="got 2 lora_request values for 1 prompts"):
        llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=[None, None])
    with pytest.raises(ValueError, match="must be a LoRARequest"):
        llm.llm_engine.add_request("x", PROMPTS[1], GREEDY, lora_request="a1")
    assert not llm.llm_engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="LoRA adapters are supported for the Llama family"):
        LLM(str(make_tiny_checkpoint("gpt2", tmp_path / "gpt2")), enable_lora=True, **LIMITS)
    from jaxllm.engine_args import EngineArgs

    with pytest.raises(ValueError, match="max_loras=0"):
        EngineArgs(enable_lora=True, max_loras=0)
    EngineArgs(max_loras=0)  # not read unless LoRA is on, as vLLM


@pytest.mark.parametrize("backend", ["auto", "xla"])
def test_qwen3_adapters_equal_transformers_on_merged_weights(tmp_path, backend):
    """Another layout: q/k/v and o biases, q/k norms, a head_dim (32) that is not hidden / heads;
    through the CPU kernels' packed weights (auto) and XLA's plain dots."""
    from transformers import AutoModelForCausalLM

    from jaxllm import LLM

    base = make_tiny_checkpoint("qwen3", tmp_path / "base")
    adapter = make_lora_adapter(base, tmp_path / "a", rank=4, seed=5)
    hf = merge_lora(AutoModelForCausalLM.from_pretrained(base, dtype="float32"), adapter)
    llm = LLM(str(base), enable_lora=True, max_lora_rank=4, attention_backend=backend, **LIMITS)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False,
                        lora_request=LoRARequest("q", 7, str(adapter)))
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, GREEDY.max_tokens) for p in PROMPTS]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_slot_writes_land_in_the_packed_b_stacks_as_in_plain_ones(tmp_path, dtype):
    """The CPU kernel's b stacks (packed panels; bfloat16 ones as row pairs) hold, after adapters
    are loaded into slots, exactly the plain stacks' values."""
    import jax.numpy as jnp

    from jaxllm.loader import load_model
    from jaxllm.runner.lora_slots import LoRASlots
    from pallas_kernels.cpu_matmul import PackedMatrix, unpack

    base = make_tiny_checkpoint("llama", tmp_path / "base")
    cfg = load_model(str(base), dtype="float32").config
    config = LoRAConfig(max_loras=3, max_lora_rank=8, max_cpu_loras=3)
    plain, packed = LoRASlots(cfg, config, dtype), LoRASlots(cfg, config, dtype, pack_b=True)
    assert isinstance(packed.stacks["b.wq"], PackedMatrix) and not isinstance(plain.stacks["b.wq"], PackedMatrix)
    requests = [LoRARequest(f"a{i}", i, str(make_lora_adapter(base, tmp_path / f"a{i}", rank=r, seed=i)))
                for i, r in ((1, 8), (2, 4), (3, 2), (4, 8))]
    for slots in (plain, packed):
        assert slots.slots_for({3: requests[2], 1: requests[0]}) == {3: 0, 1: 1}
        assert slots.slots_for({2: requests[1], 3: requests[2]}) == {3: 0, 2: 2}  # the free slot
        assert slots.slots_for({4: requests[3], 3: requests[2]}) == {3: 0, 4: 1}  # over a1, least recently used
    for name, stack in plain.stacks.items():
        got = packed.stacks[name]
        got = unpack(got) if isinstance(got, PackedMatrix) else got
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(stack, np.float32), err_msg=name)
        assert np.asarray(stack, np.float32).any() and got.dtype == jnp.dtype(dtype)
    a, b = plain._host[2].weights["wv"]  # a2 in slot 2, rank 4 of 8: zero-padded
    np.testing.assert_array_equal(np.asarray(plain.stacks["a.qkv"], np.float32)[:, :, 2 * 24 + 16: 2 * 24 + 20],
                                  np.asarray(jnp.asarray(a, dtype), np.float32))
    np.testing.assert_array_equal(np.asarray(plain.stacks["b.wv"], np.float32)[:, 16:24],
                                  np.pad(np.asarray(jnp.asarray(b, dtype), np.float32), [(0, 0), (0, 4), (0, 0)]))


def test_a_bfloat16_engine_applies_adapters(tiny):
    """bfloat16 weights and slots (the kernel's row-pair panels): the first token's top logprobs
    under an adapter are transformers' float32 ones on the merged weights as closely as a bfloat16
    engine on the merged checkpoint gets them (this adapter's large activations cost bfloat16 ~0.2)."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxllm import LLM

    llm = LLM(str(tiny["base"]), dtype="bfloat16", enable_lora=True, max_loras=2, max_lora_rank=8, **LIMITS)
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    for lora_id in (1, 2):
        hf = AutoModelForCausalLM.from_pretrained(tiny["root"] / f"merged{lora_id}", dtype="float32")
        with torch.no_grad():
            want = [torch.log_softmax(hf(torch.tensor([p])).logits[0, -1], -1).numpy() for p in PROMPTS]

        def error(outs, want=want):
            return max(abs(lp.logprob - w[t]) for o, w in zip(outs, want, strict=True)
                       for t, lp in o.outputs[0].logprobs[0].items())

        ours = llm.generate(prompts, params, use_tqdm=False, lora_request=tiny["requests"][lora_id])
        merged = LLM(str(tiny["root"] / f"merged{lora_id}"), dtype="bfloat16", **LIMITS).generate(
            prompts, params, use_tqdm=False)
        assert error(ours) < 0.3 and error(ours) <= 1.25 * error(merged), (error(ours), error(merged))
        assert [o.outputs[0].token_ids[0] for o in ours] == [int(np.argmax(w)) for w in want]


def test_jaxllm_generate_takes_an_adapter(tmp_path, capsys, monkeypatch):
    """`jaxllm generate --lora PATH` runs every prompt with the adapter (max_lora_rank from its config)."""
    from tiny_models import make_tiny_tokenizer

    from jaxllm import LLM
    from jaxllm.entrypoints import cli
    from jaxllm.runner import kv_pool

    monkeypatch.setattr(kv_pool, "DEFAULT_CPU_KV_CACHE_BYTES", 4 << 20)  # a small pool for a tiny model
    base = make_tiny_checkpoint("llama", tmp_path / "base", config_overrides={"vocab_size": 320})
    make_tiny_tokenizer().save_pretrained(base)
    adapter = make_lora_adapter(base, tmp_path / "adapter", rank=24)  # above the default max_lora_rank
    args = ["generate", "--model", str(base), "--no-chat", "--prompt", "The capital of France", "--max-tokens", "6",
            "--max-model-len", "128", "--dtype", "float32"]
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    llm = LLM(str(base), enable_lora=True, max_lora_rank=24, max_model_len=128, num_kv_blocks=64, warmup=False)
    texts = [llm.generate("The capital of France", greedy, use_tqdm=False, lora_request=lora)[0].outputs[0].text
             for lora in (None, LoRARequest("a", 1, str(adapter)))]
    assert texts[0] != texts[1]
    for extra, text in (([], texts[0]), (["--lora", str(adapter)], texts[1])):
        assert cli.main(args + extra) == 0
        assert capsys.readouterr().out == f"### The capital of France\n{text.strip()}\n\n"
