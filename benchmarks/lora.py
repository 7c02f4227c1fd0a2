"""What serving LoRA adapters costs: the throughput workload with and without adapters.

Usage: python benchmarks/lora.py [--reps 3] [--num-prompts 32] [--max-loras 4] [--rank 16] [--output PATH]

On the embedded SmolLM2 in float32, greedy, ``ignore_eos``: the seeded mixed-length workload of
benchmarks/throughput.py (``--num-prompts`` prompts of 16-200 tokens, 16-128 output tokens each)
through three arms in one process:

- ``plain``: an engine without LoRA;
- ``lora_engine_base``: an engine with ``enable_lora`` (``--max-loras`` slots of rank ``--rank``),
  every request on the base model: the cost of the slots alone (each adapted weight's two extra
  matmuls, and the CPU matmul kernel's gate and up projections run apart);
- ``lora_engine_adapters``: the same engine, requests spread round-robin over ``--max-loras``
  random adapters of rank ``--rank`` on all seven projections.

Each arm gets an untimed pass, then the arms alternate ``--reps`` times; the plain arm and the
base requests of the LoRA engine must give the same tokens. JSON goes to
benchmarks/results/lora_<platform>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from throughput import _ENGINE_LIMITS, _environment, _greedy, load_model_and_workload  # noqa: E402
from tiny_models import make_lora_adapter  # noqa: E402

from jaxllm import LLM, LoRARequest  # noqa: E402

_SMOLLM2_SHAPES = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                       num_hidden_layers=30)


def run(llm: LLM, workload, loras) -> tuple[float, list[list[int]], int]:
    prompts = [{"prompt_token_ids": p} for p in workload.prompts]
    params = [_greedy(n) for n in workload.output_lens]
    before = llm.llm_engine.stats.num_compiles
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    elapsed = time.perf_counter() - start
    return elapsed, [list(o.outputs[0].token_ids) for o in outputs], llm.llm_engine.stats.num_compiles - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    _, model, workload = load_model_and_workload("float32", args.num_prompts)
    adapter_dir = Path(tempfile.mkdtemp(prefix="jaxllm-lora-bench-"))
    adapters = [LoRARequest(f"adapter{i}", i + 1, str(make_lora_adapter(
        _SMOLLM2_SHAPES, adapter_dir / f"adapter{i}", rank=args.rank, seed=i, std=0.02)))
        for i in range(args.max_loras)]
    plain = LLM(model, **_ENGINE_LIMITS)
    lora = LLM(model, enable_lora=True, max_loras=args.max_loras, max_lora_rank=args.rank, **_ENGINE_LIMITS)
    n = len(workload.prompts)
    arms = {"plain": (plain, None), "lora_engine_base": (lora, None),
            "lora_engine_adapters": (lora, [adapters[i % len(adapters)] for i in range(n)])}
    reference = {}
    for arm, (llm, loras) in arms.items():  # untimed
        _, ids, _ = run(llm, workload, loras)
        reference[arm] = ids
    if reference["lora_engine_base"] != reference["plain"]:
        raise SystemExit("the LoRA engine's base-model outputs differ from the plain engine's")
    times = {arm: [] for arm in arms}
    new_compiles = {arm: 0 for arm in arms}
    for _ in range(args.reps):
        for arm, (llm, loras) in arms.items():
            elapsed, ids, compiles = run(llm, workload, loras)
            if ids != reference[arm]:
                raise SystemExit(f"{arm}: outputs changed between runs")
            times[arm].append(elapsed)
            new_compiles[arm] += compiles
            print(f"{arm:22s} {elapsed:7.3f} s  {workload.num_output_tokens / elapsed:7.1f} output tok/s", flush=True)
    median = {arm: statistics.median(t) for arm, t in times.items()}
    summary = {
        "output_tokens_per_s_median": {a: workload.num_output_tokens / m for a, m in median.items()},
        "speed_vs_plain_median": {a: median["plain"] / m for a, m in median.items() if a != "plain"},
        "new_compiles_during_timed_runs": new_compiles,
        "adapter_loads": lora.llm_engine.runner.lora.num_loads,
    }
    print("speed vs plain:", ", ".join(f"{a} {x:.3f}x" for a, x in summary["speed_vs_plain_median"].items()))
    platform = jax.devices()[0].platform
    report = {
        "environment": {**_environment(), "device": str(jax.devices()[0]), "load_avg_1min": os.getloadavg()[0]},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": "SmolLM2-135M-Instruct (embedded), float32",
        "workload": {"num_prompts": n, "prompt_tokens": sum(map(len, workload.prompts)),
                     "output_tokens": workload.num_output_tokens, "greedy": True, "ignore_eos": True},
        "engine_args": {**_ENGINE_LIMITS, "max_loras": args.max_loras, "max_lora_rank": args.rank},
        "adapters": {"count": len(adapters), "rank": args.rank, "targets": "all seven projections",
                     "requests": "round-robin over the adapters"},
        "elapsed_s": times,
        "summary": summary,
    }
    out = args.output or Path(__file__).parent / "results" / f"lora_{platform}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
