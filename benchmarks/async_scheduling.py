"""Async scheduling on and off, side by side: the same greedy workload through ``LLM.generate``.

Usage: python benchmarks/async_scheduling.py [--shape small|smollm2|llama3-8b] [--reps 3] [--output PATH]

With ``async_scheduling`` the engine dispatches step k+1 before it waits for step k's tokens,
so the host's scheduling, batch building and output processing run while the device computes.
What that buys is the host time per step, so it shows where a step is short: on a GPU, or on
this CPU with a small model. The model has random weights of the named shape (``small``: 4
layers of width 256, a step of a few milliseconds on a CPU); the workload is 64 requests of
32-128 prompt tokens and 32-96 output tokens, greedy, ignore_eos, prefix caching off so every
repetition does the same work. Runs alternate between the two modes; both must generate the
same tokens. JSON goes to benchmarks/results/async_scheduling_<platform>_<shape>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import _environment  # noqa: E402

from jaxllm import LLM, SamplingParams  # noqa: E402
from jaxllm.config import ModelConfig  # noqa: E402
from jaxllm.loader import Model  # noqa: E402
from jaxllm.models.layout import random_params  # noqa: E402

_SHAPES = {
    "small": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                  intermediate_size=768, vocab_size=8192),
    "smollm2": dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                    intermediate_size=1536, vocab_size=49152),
    "llama3-8b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                      intermediate_size=14336, vocab_size=128256),
}
_LIMITS = dict(max_model_len=512, max_num_seqs=64, enable_prefix_caching=False)


def model_of(shape: str, dtype) -> Model:
    cfg = ModelConfig(family="llama", architecture="LlamaForCausalLM", max_position_embeddings=2048,
                      rope_theta=10000.0, **_SHAPES[shape])
    return Model(cfg, jax.device_put(random_params(cfg, dtype=dtype)), None)


def workload(vocab: int, seed: int = 0) -> tuple[list[dict], list[SamplingParams]]:
    rng = np.random.default_rng(seed)
    prompts = [{"prompt_token_ids": rng.integers(1, vocab, rng.integers(32, 129)).tolist()} for _ in range(64)]
    params = [SamplingParams(temperature=0.0, max_tokens=int(rng.integers(32, 97)), ignore_eos=True) for _ in prompts]
    return prompts, params


def run(llm: LLM, prompts, params) -> tuple[float, list[list[int]], dict]:
    engine = llm.llm_engine
    before, overlapped = engine.stats, engine.num_overlapped_steps
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    after = engine.stats
    steps = {"num_steps": after.num_steps - before.num_steps,
             "num_overlapped_steps": engine.num_overlapped_steps - overlapped,
             "new_compiles": after.num_compiles - before.num_compiles}
    return elapsed, [list(o.outputs[0].token_ids) for o in outputs], steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(_SHAPES), default="small")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    platform = jax.devices()[0].platform
    dtype = args.dtype or ("bfloat16" if platform == "gpu" else "float32")
    model = model_of(args.shape, getattr(jax.numpy, dtype))
    prompts, params = workload(model.config.vocab_size)
    num_tokens = sum(p.max_tokens for p in params)
    llms = {mode: LLM(model, async_scheduling=mode, compilation_cache_dir=None, **_LIMITS) for mode in (True, False)}
    for llm in llms.values():  # one untimed pass: every bucket the workload meets is compiled and warm
        run(llm, prompts, params)
    times: dict[bool, list[float]] = {True: [], False: []}
    tokens, steps = {}, {}
    for _ in range(args.reps):
        for mode, llm in llms.items():
            elapsed, tokens[mode], steps[mode] = run(llm, prompts, params)
            times[mode].append(elapsed)
            print(f"async_scheduling={mode}: {elapsed:.3f} s, {num_tokens / elapsed:.1f} output tok/s", flush=True)
    same = tokens[True] == tokens[False]
    speedup = statistics.median(times[False]) / statistics.median(times[True])
    print(f"median speedup of async scheduling: {speedup:.3f}x; same tokens: {same}")
    report = {
        "environment": {**_environment(), "device": str(jax.devices()[0]), "load_avg_1min": os.getloadavg()[0]},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": {"shape": args.shape, **_SHAPES[args.shape], "dtype": dtype, "weights": "random"},
        "workload": {"num_requests": len(prompts), "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in prompts),
                     "output_tokens": num_tokens, "greedy": True, "ignore_eos": True},
        "engine_args": _LIMITS,
        "elapsed_s": {"async": times[True], "sync": times[False]},
        "output_tokens_per_s_median": {"async": num_tokens / statistics.median(times[True]),
                                       "sync": num_tokens / statistics.median(times[False])},
        "speedup_median": speedup,
        "steps": {"async": steps[True], "sync": steps[False]},
        "same_tokens": same,
    }
    out = args.output or Path(__file__).parent / "results" / f"async_scheduling_{platform}_{args.shape}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if not same:
        raise SystemExit("async and synchronous scheduling generated different tokens")


if __name__ == "__main__":
    main()
