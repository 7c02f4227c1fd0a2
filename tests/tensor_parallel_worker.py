"""Runs engines split over several CPU devices (not a test file): test_tensor_parallel.py starts it in
a process of its own with ``--xla_force_host_platform_device_count=3`` (the flag must be set before
JAX starts, and the rest of the suite runs on one device), and asserts on the JSON it writes.

``python tests/tensor_parallel_worker.py OUT.json WORKDIR``: every case's results under its name;
a case that raises records ``{"error": "<type>: <message>"}``.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import jax
import numpy as np

jax.config.update("jax_compilation_cache_dir", "/tmp/jaxllm-test-xla-cache")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

sys.path.insert(0, str(Path(__file__).parent))
from conftest import GREEDY_MAX_TOKENS, GREEDY_PROMPTS  # noqa: E402
from tiny_models import make_lora_adapter, make_tiny_checkpoint  # noqa: E402

from jaxllm import LLM, SamplingParams  # noqa: E402
from jaxllm.lora import LoRARequest  # noqa: E402

LIMITS = dict(max_model_len=96, max_num_seqs=4, max_num_batched_tokens=32, block_size=8, compilation_cache_dir=None)
# Four prompts of 9-45 tokens: chunked under a 32-token budget.
PROMPTS = [[3 + i, 17, 33 + 5 * i, (9 * i) % 150 + 3, 101 - 7 * i] * (2 + 2 * i) for i in range(4)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)


def generate(llm: LLM, params=GREEDY, prompts=PROMPTS, **kwargs) -> dict:
    warm = llm.llm_engine.runner.num_compiles
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, **kwargs)
    stats = llm.llm_engine.stats
    return {
        "tokens": [[o.token_ids for o in r.outputs] for r in outs],
        "logprobs": [[[lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs, strict=True)] if o.logprobs else []
                      for o in r.outputs] for r in outs],
        "new_compiles": llm.llm_engine.runner.num_compiles - warm,
        "preemptions": stats.num_preemptions,
        "prefix_hits": stats.prefix_cache_hits,
    }


def both(path, params=GREEDY, prompts=PROMPTS, tps=(1, 2), **kwargs) -> dict:
    """The same requests on one device and split over two."""
    out = {}
    for tp in tps:
        llm = LLM(str(path), dtype="float32", tensor_parallel_size=tp, **{**LIMITS, **kwargs})
        out[tp] = generate(llm, params, prompts)
        del llm
    return out


def shardings(path) -> dict:
    llm = LLM(str(path), dtype="float32", tensor_parallel_size=2, kv_cache_memory_bytes=1 << 20, **LIMITS)
    runner = llm.llm_engine.runner
    wq, w_down, k = runner.params["layers"]["wq"], runner.params["layers"]["w_down"], runner.kv[0]
    lowered = runner._executable(*runner.buckets.shapes()[0], False, False).as_text()
    return {
        "wq_shape": list(wq.shape), "wq_shard_shapes": [list(s.data.shape) for s in wq.addressable_shards],
        "w_down_shard_shapes": [list(s.data.shape) for s in w_down.addressable_shards],
        "embed_shard_shapes": [list(s.data.shape) for s in runner.params["embed"].addressable_shards],
        "kv_shape": list(k.shape), "kv_shard_shapes": [list(s.data.shape) for s in k.addressable_shards],
        "kv_devices": sorted(d.id for d in k.sharding.device_set),
        "num_blocks": runner.num_blocks,
        "all_reduces": lowered.count("all-reduce("),
        "other_collectives": {op: lowered.count(op + "(") for op in ("all-gather", "all-to-all", "collective-permute",
                                                                     "reduce-scatter")},
        # the GPU's pool sizing compiles the largest bucket against a split 2-block pool
        "activation_peak": runner._activation_peak(),
    }


def errors(path) -> dict:
    out = {}
    for name, kwargs in {"tp3_on_4_heads": dict(tensor_parallel_size=3), "tp4_on_3_devices": dict(tensor_parallel_size=4),
                         "tp0": dict(tensor_parallel_size=0), "pp2": dict(pipeline_parallel_size=2),
                         "draft_tp1": dict(tensor_parallel_size=2, speculative_config={
                             "model": str(path), "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1})}.items():
        try:
            LLM(str(path), dtype="float32", **{**LIMITS, **kwargs})
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)
    return out


def sleep_and_update(path, tp: int) -> dict:
    """Outputs before sleeping, after waking up, and after new weights (the old ones x 1.5)."""
    from jaxllm.loader import load_checkpoint_as

    llm = LLM(str(path), dtype="float32", tensor_parallel_size=tp, **LIMITS)
    before = generate(llm)["tokens"]
    llm.sleep(level=1)
    llm.wake_up()
    after_wake = generate(llm)["tokens"]
    wq = llm.llm_engine.runner.params["layers"]["wq"]
    spec = list(wq.sharding.spec) if tp > 1 else None  # one device: the cpu kernel's packed panels
    params = jax.tree.map(lambda x: np.asarray(x) * 1.5 if x.ndim > 1 else np.asarray(x),
                          load_checkpoint_as(str(path), "float32").params)
    llm.update_weights(params)
    updated = generate(llm)["tokens"]
    return {"before": before, "after_wake": after_wake, "spec_after_wake": spec, "updated": updated,
            "spec_after_update": list(llm.llm_engine.runner.params["layers"]["wq"].sharding.spec) if tp > 1 else None}


def main(out_path: str, workdir: str) -> None:
    work = Path(workdir)
    ck = {name: make_tiny_checkpoint(name, work / name) for name in ("llama", "qwen2", "qwen3", "gpt2")}
    lora = make_lora_adapter(ck["llama"], work / "lora", rank=4, seed=1)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=7, n=2, max_tokens=10, ignore_eos=True)
    cases = {
        "devices": lambda: len(jax.devices()),
        # A pool of 12 blocks of 8 tokens: four requests of up to 57 tokens preempt each other (and
        # find their own blocks in the prefix cache when they come back).
        "llama_preempt": lambda: both(ck["llama"], num_kv_blocks=12),
        "llama_xla": lambda: both(ck["llama"], tps=(2,), attention_backend="xla"),
        # interpreted Pallas is slow on a CPU: two of the prompts
        "llama_pallas": lambda: both(ck["llama"], tps=(2,), attention_backend="pallas", prompts=PROMPTS[:2]),
        "llama_sampled": lambda: both(ck["llama"], sampled),
        "llama_fp8": lambda: both(ck["llama"], kv_cache_dtype="fp8"),
        "llama_swap": lambda: both(ck["llama"], tps=(2,), num_kv_blocks=12, preemption_mode="swap"),
        "llama_bf16": lambda: {tp: generate(LLM(str(ck["llama"]), dtype="bfloat16", tensor_parallel_size=tp, **LIMITS))
                               for tp in (1, 2)},
        "qwen3": lambda: both(ck["qwen3"]),
        "gpt2": lambda: both(ck["gpt2"]),
        "lora": lambda: {tp: generate(LLM(str(ck["llama"]), dtype="float32", tensor_parallel_size=tp, enable_lora=True,
                                          max_lora_rank=8, **LIMITS), lora_request=LoRARequest("a", 1, str(lora)))
                         for tp in (1, 2)},
        "draft": lambda: {2: generate(LLM(str(ck["llama"]), dtype="float32", tensor_parallel_size=2, **LIMITS,
                                          speculative_config={"model": str(ck["qwen2"]), "num_speculative_tokens": 2}))},
        "embed": lambda: {tp: [o.outputs.embedding for o in LLM(str(ck["llama"]), dtype="float32", tensor_parallel_size=tp,
                                                                runner="pooling", **LIMITS).embed(
            [{"prompt_token_ids": p} for p in PROMPTS], use_tqdm=False)] for tp in (1, 2)},
        "shardings": lambda: shardings(ck["llama"]),
        "errors": lambda: errors(ck["llama"]),
        "sleep_and_update": lambda: {tp: sleep_and_update(ck["llama"], tp) for tp in (1, 2)},
        "smollm2_tp3": lambda: smollm2(),
    }
    only = set(sys.argv[3:])
    results = {}
    for name, case in cases.items():
        if only and name not in only:
            continue
        start = time.perf_counter()
        try:
            results[name] = case()
        except Exception as e:  # recorded for the test to show
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        Path(out_path).write_text(json.dumps(results, default=_plain))


def smollm2() -> dict:
    """The embedded model (9 query heads, 3 kv heads) split over three devices."""
    llm = LLM(dtype="float32", tensor_parallel_size=3, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64,
              num_kv_blocks=64, compilation_cache_dir=None)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in GREEDY_PROMPTS]
    return generate(llm, SamplingParams(temperature=0.0, max_tokens=GREEDY_MAX_TOKENS, ignore_eos=True), prompts)


def _plain(x):
    if isinstance(x, np.ndarray | jax.Array):
        return np.asarray(x).tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
