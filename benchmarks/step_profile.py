"""Where an engine step's time goes on this machine: matmul rates, the sampler, attention's share.

Usage: python benchmarks/step_profile.py [--output PATH]

Three measurements, each the minimum of several runs in one process:
1. Matmul GFLOP/s of ``jnp.dot`` and ``torch.matmul`` (float32, and bfloat16 with float32
   accumulation) on SmolLM2's layer shapes at 16, 64 and 512 rows: the ceiling any engine on
   this CPU works under.
2. Greedy sampling of 64 rows over SmolLM2's 49152-token vocabulary: ``jnp.argmax`` against
   the sampler's two-level ``argmax`` and the whole ``sample`` of an all-greedy batch.
3. The throughput benchmark's workload (``benchmarks/throughput.py``: 64 prompts, greedy,
   ignore_eos) through ``LLM.generate`` twice, with the xla attention backend and with a no-op
   backend (returns q): time per (tokens, blocks) bucket. The difference is attention's share.
JSON goes to benchmarks/results/step_profile_cpu.json unless ``--output``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
import throughput  # noqa: E402  (the workload and engine limits, shared)

import converters  # noqa: E402
import jaxllm  # noqa: E402
from jaxllm import LLM  # noqa: E402
from jaxllm.models.attention import register_attention_backend  # noqa: E402
from jaxllm.runner import model_runner  # noqa: E402
from jaxllm.runner.sampler import MAX_BANNED_IDS, SamplingTensors, argmax, sample  # noqa: E402

_DEFAULT_OUT = Path(__file__).parent / "results" / "step_profile_cpu.json"
_SHAPES = [(16, 576, 1536), (64, 576, 1536), (512, 576, 1536), (512, 1536, 576), (64, 576, 49152)]


def _min_time(fn, *args, repeats: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_rates() -> list[dict]:
    import torch

    rows = []
    for m, k, n in _SHAPES:
        flops = 2 * m * k * n
        for jdt, tdt in ((jnp.float32, torch.float32), (jnp.bfloat16, torch.bfloat16)):
            dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
            t_jax = _min_time(dot, jnp.ones((m, k), jdt), jnp.ones((k, n), jdt))
            a, b = torch.ones(m, k, dtype=tdt), torch.ones(k, n, dtype=tdt)
            t_torch = _min_time(lambda a, b: torch.matmul(a, b), a, b)
            rows.append({"shape": [m, k, n], "dtype": jnp.dtype(jdt).name,
                         "jax_gflops": flops / t_jax / 1e9, "torch_gflops": flops / t_torch / 1e9})
    return rows


def sampler_times(rows: int = 64, vocab: int = 49152) -> dict:
    logits = jax.random.normal(jax.random.PRNGKey(0), (rows, vocab))
    zeros = jnp.zeros(rows)
    greedy = SamplingTensors(zeros, jnp.zeros(rows, jnp.int32), jnp.ones(rows), zeros, jnp.zeros(rows, jnp.uint32),
                             jnp.zeros(rows, jnp.int32), jnp.full((rows, MAX_BANNED_IDS), vocab, jnp.int32))
    return {
        "rows": rows, "vocab": vocab,
        "jnp_argmax_ms": 1e3 * _min_time(jax.jit(lambda x: jnp.argmax(x, axis=-1)), logits),
        "two_level_argmax_ms": 1e3 * _min_time(jax.jit(argmax), logits),
        "greedy_sample_ms": 1e3 * _min_time(jax.jit(sample), logits, greedy),
    }


def step_times(model, workload, backend: str) -> dict:
    llm = LLM(model, **throughput._ENGINE_LIMITS, attention_backend=backend)
    throughput._warm_up(llm, workload.prompts[0][0])
    runner, log = llm.llm_engine.runner, []
    build, execute = model_runner.build_batch, runner.execute

    def logged_build(*args, **kwargs):
        batch = build(*args, **kwargs)
        log.append([batch.token_ids.shape[0], batch.md.block_tables.shape[1], args[0].num_tokens])
        return batch

    def timed_execute(sched):
        start = time.perf_counter()
        out = execute(sched)
        log[-1].append(time.perf_counter() - start)
        return out

    model_runner.build_batch, runner.execute = logged_build, timed_execute
    try:
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in workload.prompts],
                     [throughput._greedy(n) for n in workload.output_lens], use_tqdm=False)
        elapsed = time.perf_counter() - start
    finally:
        model_runner.build_batch = build
    buckets = collections.defaultdict(lambda: {"steps": 0, "seconds": 0.0, "tokens": 0})
    for T, B, tokens, seconds in log:
        entry = buckets[f"{T}x{B}"]
        entry["steps"] += 1
        entry["seconds"] += seconds
        entry["tokens"] += tokens
    for entry in buckets.values():
        entry["mean_ms"] = 1e3 * entry["seconds"] / entry["steps"]
    return {"elapsed_s": elapsed, "execute_s": sum(x[3] for x in log), "buckets": dict(buckets)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=_DEFAULT_OUT)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count())
    report = {"environment": throughput._environment(), "matmul": matmul_rates()}
    for row in report["matmul"]:
        print(f"matmul {row['shape']} {row['dtype']:8s} jax {row['jax_gflops']:5.0f} torch {row['torch_gflops']:5.0f} GFLOP/s")
    report["sampler"] = sampler_times()
    print("sampler", {k: round(v, 2) for k, v in report["sampler"].items()})
    register_attention_backend("noop", lambda q, kv, layer, md, window: q)
    gguf_path = converters.resolve_model(None)
    model = jaxllm.load_model(str(gguf_path), dtype="float32")
    tok = model.tokenizer
    workload = throughput.make_workload(64, 0, len(tok), set(tok.all_special_ids))
    report["steps"] = {backend: step_times(model, workload, backend) for backend in ("xla", "noop")}
    for backend, result in report["steps"].items():
        print(f"{backend}: {result['elapsed_s']:.1f} s", {k: round(v["mean_ms"]) for k, v in sorted(result["buckets"].items())})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
