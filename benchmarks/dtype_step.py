"""One compiled engine step of SmolLM2 in float32 and in bfloat16, side by side in one process.

Usage: python benchmarks/dtype_step.py [--dtypes float32,bfloat16] [--reps 5] [--output PATH]

Each dtype gets its own engine (the throughput benchmark's limits, default CPU KV budget, no
warm-up) and three greedy batches built by the runner's own ``build_batch``: 16 decodes at
context 128, 64 decodes at context 256, and a 512-token prefill (4 prompts of 128). Each batch's
bucket is compiled once, then the step runs ``--reps`` times per dtype, the dtypes alternating;
the minimum is reported. The KV pool is donated and replaced as in the engine. JSON goes to
benchmarks/results/dtype_step_cpu.json unless ``--output``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from throughput import _ENGINE_LIMITS, _environment  # noqa: E402

from jaxllm import LLM  # noqa: E402
from jaxllm.engine.messages import SamplingOptions, ScheduledSequence, SchedulerOutput  # noqa: E402
from jaxllm.runner.batch import build_batch  # noqa: E402

# name -> (sequences, new tokens each, context before the step)
_CASES = {"decode_16_at_128": (16, 1, 128), "decode_64_at_256": (64, 1, 256), "prefill_4x128": (4, 128, 0)}


def _schedule(num_seqs: int, new: int, context: int, block_size: int) -> SchedulerOutput:
    blocks_each = -(-(context + new) // block_size)
    greedy = SamplingOptions(temperature=0.0)
    seqs = []
    for i in range(num_seqs):
        table = tuple(range(1 + i * blocks_each, 1 + (i + 1) * blocks_each))  # block 0 is the null block
        ids = tuple(int(x) for x in np.random.default_rng(i).integers(100, 40000, new))
        seqs.append(ScheduledSequence(f"r{i}", ids, context, table, True, greedy, 0))
    return SchedulerOutput(tuple(seqs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "dtype_step_cpu.json")
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    runs = {}
    for dtype in dtypes:
        runner = LLM(model=None, dtype=dtype, warmup=False, **_ENGINE_LIMITS).llm_engine.runner
        for case, (n, new, ctx) in _CASES.items():
            batch = build_batch(_schedule(n, new, ctx, runner.cache.block_size), runner.buckets,
                                runner.cache.block_size, np.random.default_rng(0), runner.cfg.vocab_size)
            T, B = batch.token_ids.shape[0], batch.md.block_tables.shape[1]
            runs[dtype, case] = (runner, runner._executable(T, B), batch, [])
    for _ in range(args.reps + 1):  # the first round is not timed
        for runner, step, batch, times in runs.values():
            start = time.perf_counter()
            (tokens, *_), runner.kv = step(runner.params, runner.kv, batch, runner._no_tokens, runner.masks.table, None)
            jax.block_until_ready(tokens)
            times.append((time.perf_counter() - start) * 1e3)
    report = {"environment": _environment(), "engine_limits": _ENGINE_LIMITS, "cases": _CASES, "reps": args.reps,
              "kv_pool_dtype": {d: str(runs[d, next(iter(_CASES))][0].kv_dtype) for d in dtypes},
              "step_ms": {d: {c: runs[d, c][3][1:] for c in _CASES} for d in dtypes}}
    for case in _CASES:
        print(f"{case:18s} " + "  ".join(f"{d} {min(report['step_ms'][d][case]):8.1f} ms" for d in dtypes))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
