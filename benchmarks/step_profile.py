"""Where an engine step's time goes on this machine: matmul rates, the sampler, attention's share.

Usage: python benchmarks/step_profile.py [--output PATH] [--only-breakdown] [--breakdown-backend auto]
                                         [--dtype float32]

Four measurements in one process (run 4 first, then 1-3):
1. Matmul GFLOP/s of ``jnp.dot`` and ``torch.matmul`` (float32, and bfloat16 with float32
   accumulation) on SmolLM2's layer shapes at 16, 64 and 512 rows, the minimum of 10 runs: the
   ceiling any engine on this CPU works under.
2. Greedy sampling of 64 rows over SmolLM2's 49152-token vocabulary: ``jnp.argmax`` against
   the sampler's two-level ``argmax`` and the whole ``sample`` of an all-greedy batch (minimum
   of 10 runs).
3. The throughput benchmark's workload (``benchmarks/throughput.py``: 64 prompts, greedy,
   ignore_eos) through ``LLM.generate`` three times, with the cpu backend (C++ attention and
   matmul kernels), the xla backend and a no-op backend (returns q; XLA's dots, as xla), steps
   synchronous, one run each: time per (tokens, blocks) bucket. xla minus no-op is the xla
   backend's attention; cpu minus no-op also holds the matmul kernel's gain.
4. A profiler trace of one compiled step per bucket of that workload (attention backend
   ``--breakdown-backend``, default auto; its last batch of the bucket, replayed; its step time the minimum of 5 runs): each moment of the step's wall time is shared among the XLA ops running
   on the threads at that moment, and the ops are grouped by the named scope and JAX op that
   produced them (see ``_CATEGORIES``). ``--only-breakdown`` runs just this part.
Measurements 3 and 4 run SmolLM2 in ``--dtype`` (float32 unless asked: bfloat16 puts the
cpu backend's matmuls on the kernel's bfloat16 path). JSON goes to
benchmarks/results/step_profile_cpu.json unless ``--output``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
import throughput  # noqa: E402  (the workload and engine limits, shared)

from jaxllm import LLM  # noqa: E402
from jaxllm.models.attention import register_attention_backend  # noqa: E402
from jaxllm.runner import model_runner  # noqa: E402
from jaxllm.runner.sampler import MAX_BANNED_IDS, SamplingTensors, argmax, sample  # noqa: E402

_DEFAULT_OUT = Path(__file__).parent / "results" / "step_profile_cpu.json"
_SHAPES = [(16, 576, 1536), (64, 576, 1536), (512, 576, 1536), (512, 1536, 576), (64, 576, 49152)]


def matmul_rates() -> list[dict]:
    import torch

    rows = []
    for m, k, n in _SHAPES:
        flops = 2 * m * k * n
        for jdt, tdt in ((jnp.float32, torch.float32), (jnp.bfloat16, torch.bfloat16)):
            dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
            t_jax = throughput.min_time(dot, jnp.ones((m, k), jdt), jnp.ones((k, n), jdt))
            a, b = torch.ones(m, k, dtype=tdt), torch.ones(k, n, dtype=tdt)
            t_torch = throughput.min_time(lambda a, b: torch.matmul(a, b), a, b)
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
        "jnp_argmax_ms": 1e3 * throughput.min_time(jax.jit(lambda x: jnp.argmax(x, axis=-1)), logits),
        "two_level_argmax_ms": 1e3 * throughput.min_time(jax.jit(argmax), logits),
        "greedy_sample_ms": 1e3 * throughput.min_time(jax.jit(sample), logits, greedy),
    }


def step_times(model, workload, backend: str) -> dict:
    # Synchronous steps: the engine then calls runner.execute, timed here whole.
    llm = LLM(model, **throughput._ENGINE_LIMITS, attention_backend=backend, async_scheduling=False)
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


# (name, test on the HLO op's metadata op_name), first match wins. The layers run in a scan
# ("while/body"); llama.py and gpt.py name their scopes "attention" and "mlp".
# A packed weight's matmul (the "cpu" backend's C++ kernel) runs under the scope "packed_matmul".
def _is_matmul(op: str) -> bool:
    return "dot_general" in op or "packed_matmul/" in op


_CATEGORIES = (
    ("attention: q/k/v/o projections", lambda op: "attention/" in op and (
        "packed_matmul/" in op or ("dot_general" in op and re.search(r"/(td,|tnh,nhd->td)", op) is not None))),
    ("attention: cpu kernel (custom call)", lambda op: "attention/" in op and "ffi_call" in op),
    ("attention: cached-context loop", lambda op: "attention/while" in op),
    ("attention: this step's tokens, merge, RoPE, KV write", lambda op: "attention/" in op),
    ("mlp matmuls", lambda op: "mlp/" in op and _is_matmul(op)),
    ("mlp element-wise", lambda op: "mlp/" in op),
    ("per-layer weight slices (scan)", lambda op: "while/body" in op and "dynamic_slice" in op),
    ("layer loop: norms, residuals, other", lambda op: "while/body" in op),
    ("logits matmul", _is_matmul),
    ("sampler, embedding, batch set-up", lambda op: True),
)


def _categorise(op_name: str) -> str:
    return next(name for name, test in _CATEGORIES if test(op_name))


def _wall_shares(events: list[dict], op_names: dict[str, str]) -> tuple[float, dict[str, float]]:
    """Split a step's wall time (us) among categories: at every instant, each thread's innermost
    running op gets an equal share of that instant; idle instants go to "idle"."""
    edges = sorted([(e["ts"], 1, i) for i, e in enumerate(events)] + [(e["ts"] + e["dur"], 0, i) for i, e in
                   enumerate(events)])
    stacks: dict[int, list[int]] = collections.defaultdict(list)
    shares: collections.Counter = collections.Counter()
    last = edges[0][0]
    for t, opening, i in edges:
        running = [stack[-1] for stack in stacks.values() if stack]
        for j in running:
            shares[_categorise(op_names.get(events[j]["name"], ""))] += (t - last) / len(running)
        if not running:
            shares["idle"] += t - last
        last = t
        stack = stacks[events[i]["tid"]]
        stack.append(i) if opening else stack.remove(i)
    return edges[-1][0] - edges[0][0], dict(shares)


def step_breakdown(model, workload, backend: str) -> dict:
    """Wall-time shares of one step per bucket (measurement 4 of the module docstring)."""
    llm = LLM(model, **throughput._ENGINE_LIMITS, attention_backend=backend)
    throughput._warm_up(llm, workload.prompts[0][0])
    runner, last_batch = llm.llm_engine.runner, {}
    build = model_runner.build_batch

    def logged_build(*args, **kwargs):
        batch = build(*args, **kwargs)
        last_batch[(batch.token_ids.shape[0], batch.md.block_tables.shape[1])] = (args[0].num_tokens, batch)
        return batch

    model_runner.build_batch = logged_build
    try:
        llm.generate([{"prompt_token_ids": p} for p in workload.prompts],
                     [throughput._greedy(n) for n in workload.output_lens], use_tqdm=False)
    finally:
        model_runner.build_batch = build
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    out = {}
    for (T, B), (tokens, batch) in sorted(last_batch.items()):
        executable = runner._executable(T, B)
        op_names = dict(re.findall(r'^\s*%?([\w.\-]+) = .*?op_name="([^"]*)"', executable.as_text(), re.M))

        def run(executable=executable, batch=batch):
            result, runner.kv = executable(runner.params, runner.kv, batch, runner._no_tokens, runner.masks.table, None)
            jax.block_until_ready(result)

        step_s = throughput.min_time(run, repeats=5)
        with tempfile.TemporaryDirectory() as log_dir:
            with jax.profiler.trace(log_dir, create_perfetto_trace=True, profiler_options=options):
                run()
            trace = json.load(gzip.open(glob.glob(f"{log_dir}/**/*.trace.json.gz", recursive=True)[0]))
        events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "hlo_op" in (e.get("args") or {})]
        traced_us, shares = _wall_shares(events, op_names)
        out[f"{T}x{B}"] = {"tokens": tokens, "step_ms": 1e3 * step_s, "traced_ms": traced_us / 1e3,
                           "share": {k: v / traced_us for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=_DEFAULT_OUT)
    parser.add_argument("--only-breakdown", action="store_true", help="measurement 4 alone")
    parser.add_argument("--breakdown-backend", default="auto", help="attention backend of measurement 4 (default auto)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the model's dtype in measurements 3 and 4")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count())
    _, model, workload = throughput.load_model_and_workload(args.dtype)
    report = {"environment": throughput._environment(), "dtype": args.dtype}
    report["breakdown_backend"] = args.breakdown_backend
    report["breakdown"] = step_breakdown(model, workload, args.breakdown_backend)
    for bucket, row in report["breakdown"].items():
        top = ", ".join(f"{k} {v:.0%}" for k, v in list(row["share"].items())[:4])
        print(f"step {bucket} ({row['tokens']} tokens) {row['step_ms']:.1f} ms: {top}")
    if args.only_breakdown:
        _write(args.output, report)
        return
    report["matmul"] = matmul_rates()
    for row in report["matmul"]:
        print(f"matmul {row['shape']} {row['dtype']:8s} jax {row['jax_gflops']:5.0f} torch {row['torch_gflops']:5.0f} GFLOP/s")
    report["sampler"] = sampler_times()
    print("sampler", {k: round(v, 2) for k, v in report["sampler"].items()})
    register_attention_backend("noop", lambda q, kv, layer, md, window: q)
    report["steps"] = {backend: step_times(model, workload, backend) for backend in ("cpu", "xla", "noop")}
    for backend, result in report["steps"].items():
        print(f"{backend}: {result['elapsed_s']:.1f} s", {k: round(v["mean_ms"]) for k, v in sorted(result["buckets"].items())})
    _write(args.output, report)


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
