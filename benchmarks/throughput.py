"""Offline throughput: jaxllm's continuous batching vs transformers' static-batch ``generate``.

Usage: python benchmarks/throughput.py [--num-prompts 64] [--seed 0] [--hf-batch-sizes 8,16,32,64]
                                       [--dtype float32|bfloat16] [--attention-backends auto,xla]
                                       [--skip-hf] [--quick] [--output PATH]

One seeded mixed-length workload (random non-special token ids, 16-200 prompt tokens, 16-128
output tokens each, greedy, ignore_eos) runs through ``LLM.generate`` and through transformers on
the same SmolLM2 weights in the same dtype (``--dtype``, float32 by default), in the same
process on the same machine. transformers gets static batches with left padding; each batch
decodes max(output length in batch) tokens (min_new_tokens, so it cannot stop early) and only
each request's own output tokens count. Both use every core: torch.set_num_threads(os.cpu_count()),
XLA at its default; the 1-minute load average before and after each timed phase is recorded,
since a shared machine skews both. ``--attention-backends`` runs jaxllm once per listed backend
(default "auto"), in the listed order: the first is the headline, the others are side-by-side
comparisons in the same process (``jaxllm_by_backend`` in the JSON). Prints a summary and writes JSON (``--quick``: 16 prompts,
batch sizes 8 and 16, and no file unless ``--output``; ``--skip-hf``: no file unless ``--output``).
"""

from __future__ import annotations

import argparse
import datetime
import enum
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import converters
import jaxllm
from jaxllm import LLM, SamplingParams, host_malloc
from jaxllm.models.attention import get_attention_backend

_DEFAULT_OUT = Path(__file__).parent / "results" / "throughput_cpu.json"
_ENGINE_LIMITS = {"max_model_len": 512, "max_num_seqs": 64, "max_num_batched_tokens": 512}
_PROMPT_LENS, _OUTPUT_LENS = (16, 200), (16, 128)  # inclusive ranges


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]  # token ids, no special ids
    output_lens: list[int]  # tokens each request must generate

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def load_model_and_workload(dtype: str = "float32", num_prompts: int = 64, seed: int = 0):
    """(GGUF path, the embedded SmolLM2 in ``dtype``, the seeded workload over its tokenizer):
    what every benchmark built on this one measures."""
    gguf_path = converters.resolve_model(None)
    model = jaxllm.load_model(str(gguf_path), dtype=dtype)
    tok = model.tokenizer
    return gguf_path, model, make_workload(num_prompts, seed, len(tok), set(tok.all_special_ids))


def min_time(fn, *args, repeats: int = 10) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn(*args)``, after one untimed call."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def make_workload(num_prompts: int, seed: int, vocab_size: int, special_ids: set[int]) -> Workload:
    rng = np.random.default_rng(seed)
    allowed = np.array([i for i in range(vocab_size) if i not in special_ids])
    prompt_lens = rng.integers(_PROMPT_LENS[0], _PROMPT_LENS[1] + 1, num_prompts)
    output_lens = rng.integers(_OUTPUT_LENS[0], _OUTPUT_LENS[1] + 1, num_prompts)
    prompts = [rng.choice(allowed, int(n)).tolist() for n in prompt_lens]
    return Workload(prompts, [int(n) for n in output_lens])


# -- jaxllm ------------------------------------------------------------------------------------


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _warm_up(llm: LLM, token_id: int) -> None:
    # One-step requests (prefill + first token, then done): they leave no block held after any
    # step, so the KV-waste mean of the timed run below starts from nothing.
    for n in (1, 8):
        llm.generate([{"prompt_token_ids": [token_id] * 48}] * n, _greedy(1), use_tqdm=False)


def run_jaxllm(model, workload: Workload, async_scheduling: bool = True,
               attention_backend: str = "auto") -> tuple[dict, list[list[int]]]:
    start = time.perf_counter()
    llm = LLM(model, **_ENGINE_LIMITS, async_scheduling=async_scheduling, attention_backend=attention_backend)
    startup_s = time.perf_counter() - start
    _warm_up(llm, workload.prompts[0][0])
    engine = llm.llm_engine
    before, before_load = engine.stats, os.getloadavg()[0]
    overlapped_before = engine.num_overlapped_steps
    prompts = [{"prompt_token_ids": p} for p in workload.prompts]
    start = time.perf_counter()
    outputs = llm.generate(prompts, [_greedy(n) for n in workload.output_lens], use_tqdm=False)
    elapsed = time.perf_counter() - start
    after = engine.stats
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    assert [len(t) for t in token_ids] == workload.output_lens, "jaxllm generated the wrong number of tokens"
    result = {
        "load_avg_1min_before_after": [before_load, os.getloadavg()[0]],
        "engine_args": {**_ENGINE_LIMITS, "dtype": str(llm.llm_engine.runner.dtype),
                        "block_size": llm.engine_args.block_size, "async_scheduling": async_scheduling,
                        "attention_backend": attention_backend,
                        "attention_fn": get_attention_backend(attention_backend).__name__},
        "startup_with_compile_s": startup_s,
        "elapsed_s": elapsed,
        "output_tokens": workload.num_output_tokens,
        "output_tokens_per_s": workload.num_output_tokens / elapsed,
        "total_tokens_per_s": (workload.num_output_tokens + sum(map(len, workload.prompts))) / elapsed,
        "num_steps": after.num_steps - before.num_steps,
        "num_overlapped_steps": engine.num_overlapped_steps - overlapped_before,
        "kv_waste": after.kv_waste,
        "kv_blocks_total": after.kv_blocks_total,
        "num_preemptions": after.num_preemptions - before.num_preemptions,
        "compiles_after_warmup": before.num_compiles,
        "compiles_after_run": after.num_compiles,
        "new_compiles_during_run": after.num_compiles - before.num_compiles,
    }
    return result, token_ids


# -- transformers ------------------------------------------------------------------------------


def load_hf(gguf_path: Path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=getattr(torch, dtype))
    return model.eval()


def _hf_batch(model, prompts: list[list[int]], num_new: int, pad_id: int):
    """Greedy ``num_new`` tokens for each left-padded prompt; returns [batch, num_new] ids."""
    import torch

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=num_new, min_new_tokens=num_new,
                             do_sample=False, pad_token_id=pad_id)
    return out[:, width:]


def run_hf_static(model, workload: Workload, batch_size: int, pad_id: int) -> tuple[dict, list[list[int]]]:
    n, load = len(workload.prompts), os.getloadavg()[0]
    start, generated, token_ids = time.perf_counter(), 0, []
    for lo in range(0, n, batch_size):
        lens = workload.output_lens[lo : lo + batch_size]
        new = _hf_batch(model, workload.prompts[lo : lo + batch_size], max(lens), pad_id)
        generated += new.numel()
        token_ids += [row[:k].tolist() for row, k in zip(new, lens, strict=True)]
    elapsed = time.perf_counter() - start
    return {
        "load_avg_1min_before_after": [load, os.getloadavg()[0]],
        "elapsed_s": elapsed,
        "useful_output_tokens": workload.num_output_tokens,
        "generated_tokens_incl_batch_tail": generated,
        "output_tokens_per_s": workload.num_output_tokens / elapsed,
    }, token_ids


def run_hf(gguf_path: Path, workload: Workload, batch_sizes: list[int], pad_id: int, dtype: str,
           repeats: int = 1) -> tuple[dict, dict]:
    model = load_hf(gguf_path, dtype)
    _hf_batch(model, [workload.prompts[0][:16]] * 2, 4, pad_id)  # warm-up
    per_batch, outputs = {}, {}
    for bs in batch_sizes:
        per_batch[str(bs)], outputs[bs] = run_hf_static(model, workload, bs, pad_id)
        print(f"transformers batch {bs:3d}: {per_batch[str(bs)]['output_tokens_per_s']:8.1f} output tok/s", flush=True)
    best = max(per_batch, key=lambda k: per_batch[k]["output_tokens_per_s"])
    if repeats > 1:  # the best batch size again, as jaxllm's headline run is repeated
        more = [run_hf_static(model, workload, int(best), pad_id) for _ in range(repeats - 1)]
        per_batch[best], outputs[int(best)] = _fastest([(per_batch[best], outputs[int(best)]), *more])
        print(f"transformers batch {best:>3}: {per_batch[best]['output_tokens_per_s']:8.1f} output tok/s, "
              f"fastest of {repeats}", flush=True)
    summary = {
        "attn_implementation": model.config._attn_implementation,
        "dtype": str(model.dtype),
        "per_batch_size": per_batch,
        "best_batch_size": int(best),
        "output_tokens_per_s": per_batch[best]["output_tokens_per_s"],
    }
    return summary, outputs[int(best)]


def _fastest(runs: list[tuple[dict, object]]) -> tuple[dict, object]:
    """The run with the shortest elapsed time, its result listing every run's (``elapsed_s_runs``):
    on a shared machine the fastest run is the one least disturbed."""
    result, outputs = min(runs, key=lambda run: run[0]["elapsed_s"])
    return {**result, "elapsed_s_runs": [run[0]["elapsed_s"] for run in runs]}, outputs


# -- report ------------------------------------------------------------------------------------


def _cpu_identity() -> dict:
    """The host CPU as /proc/cpuinfo names it: sessions land on different machines, and numbers taken on one
    do not carry to another (the same commit ran 1.8x slower on a 2.6 GHz part than on the one before)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "stepping", "cpu MHz", "flags") and key not in fields:
                fields[key] = value.strip()
    except OSError:
        return {"model_name": platform.processor()}
    flags = set(fields.get("flags", "").split())
    return {"model_name": fields.get("model name"),
            "family_model_stepping": [fields.get(k) for k in ("cpu family", "model", "stepping")],
            "mhz": float(fields["cpu MHz"]) if "cpu MHz" in fields else None,
            "isa": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"})}


def _environment() -> dict:
    import jax
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    return {
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "git_commit": commit.stdout.strip() or None,
        # recorded results (this run's and earlier ones') are not code: they do not make a tree dirty
        "git_dirty": bool(subprocess.run(["git", "status", "--porcelain", "--", ".", ":!benchmarks/results"],
                                         capture_output=True, text=True, cwd=Path(__file__).parent.parent).stdout.strip()),
        "jax_version": jax.__version__,
        "jax_backend": jax.default_backend(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "xla_threads": f"XLA default (all {os.cpu_count()} cores); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        "cpu_count": os.cpu_count(),
        # glibc malloc kept for XLA's per-step temporaries (jaxllm/host_malloc.py), for both engines
        "host_malloc_tuned": host_malloc.tuned(),
        "platform": platform.platform(),
        "cpu": _cpu_identity(),
    }


def _agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    # Informational: batched float32 (left padding, other kernels) may legitimately diverge late.
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    first16 = sum(a[:16] == b[:16] for a, b in zip(ours, theirs, strict=True))
    return {"identical_outputs": same, "identical_first_16_tokens": first16, "num_requests": len(ours)}


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=None, help="default 64, or 16 with --quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-batch-sizes", default=None, help="comma separated; default 8,16,32,64 (8,16 quick)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights and activations of both engines (KV cache: jaxllm's 'auto', the same dtype)")
    parser.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                        help="jaxllm waits for each step's tokens before scheduling the next")
    parser.add_argument("--attention-backends", default="auto",
                        help="comma separated jaxllm attention backends; the first is the headline (default auto)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of jaxllm (headline backend) and of transformers' best batch size; each "
                             "engine's fastest counts, every run's time is recorded (default 1)")
    parser.add_argument("--skip-hf", action="store_true", help="measure jaxllm only (no file unless --output)")
    parser.add_argument("--quick", action="store_true", help="a smoke check: 16 prompts, no file unless --output")
    parser.add_argument("--output", type=Path, default=None, help=f"JSON path; default {_DEFAULT_OUT}")
    args = parser.parse_args()
    args.num_prompts = args.num_prompts or (16 if args.quick else 64)
    args.attention_backends = args.attention_backends.split(",")
    sizes = args.hf_batch_sizes or ("8,16" if args.quick else "8,16,32,64")
    args.hf_batch_sizes = [int(s) for s in sizes.split(",")]
    default_out = _DEFAULT_OUT.with_stem(f"{_DEFAULT_OUT.stem}_{args.dtype}") if args.dtype != "float32" else _DEFAULT_OUT
    args.output = args.output or (None if args.quick or args.skip_hf else default_out)
    return args


def main() -> None:
    import torch

    args = _parse_args()
    torch.set_num_threads(os.cpu_count())
    gguf_path, model, workload = load_model_and_workload(args.dtype, args.num_prompts, args.seed)
    tokenizer = model.tokenizer
    report = {"environment": _environment(), "model": gguf_path.name,
              "workload": _describe(workload, args.seed)}
    runs = {}
    for backend in args.attention_backends:
        repeats = args.repeats if backend == args.attention_backends[0] else 1
        runs[backend] = _fastest([run_jaxllm(model, workload, args.async_scheduling, backend) for _ in range(repeats)])
        print(f"jaxllm ({backend} attention): {runs[backend][0]['output_tokens_per_s']:.1f} output tok/s "
              f"({runs[backend][0]['elapsed_s']:.1f} s)", flush=True)
    report["jaxllm"], ours = runs[args.attention_backends[0]]
    if len(runs) > 1:
        report["jaxllm_by_backend"] = {b: r for b, (r, _) in runs.items()}
        report["greedy_agreement_between_backends"] = {
            b: _agreement(ours, ids) for b, (_, ids) in list(runs.items())[1:]}
    if not args.skip_hf:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        report["transformers"], theirs = run_hf(gguf_path, workload, args.hf_batch_sizes, pad_id, args.dtype,
                                                args.repeats)
        report["speedup_vs_transformers"] = (report["jaxllm"]["output_tokens_per_s"]
                                             / report["transformers"]["output_tokens_per_s"])
        report["greedy_agreement_with_best_hf_batch"] = _agreement(ours, theirs)
    _print_summary(report)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")


def _describe(workload: Workload, seed: int) -> dict:
    prompt_lens = [len(p) for p in workload.prompts]
    return {
        "seed": seed,
        "num_prompts": len(workload.prompts),
        "prompt_len_range": _PROMPT_LENS,
        "output_len_range": _OUTPUT_LENS,
        "prompt_tokens": sum(prompt_lens),
        "output_tokens": workload.num_output_tokens,
        # Enums (output_kind) by name: the report is JSON.
        "sampling": {k: v.name if isinstance(v, enum.Enum) else v for k, v in asdict(_greedy(1)).items()}
        | {"max_tokens": "per request"},
    }


def _print_summary(report: dict) -> None:
    ours = report["jaxllm"]
    print(f"jaxllm        {ours['output_tokens_per_s']:8.1f} output tok/s, {ours['num_steps']} steps, "
          f"kv waste {ours['kv_waste']:.2%}, compiles {ours['compiles_after_warmup']} -> {ours['compiles_after_run']}")
    if "transformers" in report:
        hf = report["transformers"]
        print(f"transformers  {hf['output_tokens_per_s']:8.1f} output tok/s (batch {hf['best_batch_size']})")
        print(f"speedup       {report['speedup_vs_transformers']:.2f}x")


if __name__ == "__main__":
    main()
