"""How fast could any engine run the throughput workload on this machine? A roofline bound.

Usage: python benchmarks/roofline.py [--hf-batch-sizes 64] [--skip-hf] [--output PATH]

The workload of ``benchmarks/throughput.py`` (64 seeded prompts, greedy, ignore_eos, float32)
needs at least this much work, whatever the engine, with no padding and perfect scheduling:

- FLOPs: every prompt token and every generated token but the last goes through the decoder
  layers once (projections, MLP and attention over its context); every generated token needs one
  row of logits.
- Bytes: the float32 weights are read at least once per step, and a request's tokens need one
  step each, so at least ``max(output lengths)`` steps; every decode token reads its context's
  float32 K/V once per layer.

Measured in the same process: the best float32 matmul rate over SmolLM2's layer shapes of
``jnp.dot``, ``torch.matmul`` and jaxllm's packed kernel (the compute roof) and the best read
bandwidth of a reduction over 400 MB, jax's or torch's (the memory roof).
The floor is ``max(FLOPs / compute roof, bytes / memory roof)``: both resources fully busy and
perfectly overlapped, which no engine reaches. transformers and jaxllm then run the workload in the
same process, as ``throughput.py`` runs them, so the report shows the largest ratio over
transformers that this machine allows (its time over the floor) next to jaxllm's measured one.
JSON goes to benchmarks/results/roofline_cpu.json unless ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
import throughput  # noqa: E402  (the workload, both engines' runs, the environment record)

from jaxllm.config import ModelConfig  # noqa: E402

_DEFAULT_OUT = Path(__file__).parent / "results" / "roofline_cpu.json"
_F32 = 4


def work(cfg: ModelConfig, workload: throughput.Workload) -> dict:
    """The FLOPs and bytes the workload needs at the least (see the module docstring)."""
    D, N, K, H, F, L, V = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.intermediate_size, cfg.num_layers, cfg.vocab_size)
    layer_params = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F
    weight_bytes = _F32 * (L * layer_params + V * D * (1 if cfg.tie_word_embeddings else 2))
    layer_tokens = head_rows = attn_flops = kv_bytes = 0
    for prompt, out in zip(workload.prompts, workload.output_lens, strict=True):
        fed = len(prompt) + out - 1  # positions 0 .. fed - 1 go through the layers
        layer_tokens += fed
        head_rows += out
        attn_flops += 4 * N * H * L * fed * (fed + 1) // 2  # QK and PV over positions 0..p
        decode_contexts = sum(range(len(prompt) + 1, fed + 1))  # tokens fed after the prompt
        kv_bytes += 2 * K * H * _F32 * L * decode_contexts
    dense_flops = 2 * layer_params * L * layer_tokens + 2 * D * V * head_rows
    min_steps = max(workload.output_lens)
    return {
        "layer_tokens": layer_tokens,
        "logit_rows": head_rows,
        "dense_flops": dense_flops,
        "attention_flops": attn_flops,
        "weight_bytes": weight_bytes,
        "min_steps": min_steps,
        "bytes": weight_bytes * min_steps + kv_bytes,
        "kv_read_bytes": kv_bytes,
    }


def roofs(cfg: ModelConfig) -> dict:
    """The best float32 matmul rate and read bandwidth any implementation here reaches.

    Each layer shape is timed through XLA's ``jnp.dot``, torch's ``matmul`` and jaxllm's packed C++
    kernel (where it builds); the compute roof is the fastest of them all. Which one wins depends on
    the machine: on one 2-core host XLA's dot led, on another torch's matmul was 20% faster.
    """
    import numpy as np
    import torch

    from pallas_kernels.cpu_kernels import cpu_kernels_unavailable_reason
    from pallas_kernels.cpu_matmul import pack, packed_matmul

    D, F = cfg.hidden_size, cfg.intermediate_size
    dot = jax.jit(lambda a, b: a @ b)
    packed = jax.jit(packed_matmul) if cpu_kernels_unavailable_reason() is None else None
    rates: dict[str, dict[str, float]] = {}
    rng = np.random.default_rng(0)
    for m, k, n in ((64, D, F), (512, D, F), (512, F, D), (64, D, cfg.vocab_size)):
        a, b = (rng.standard_normal(shape, dtype=np.float32) for shape in ((m, k), (k, n)))
        flops = 2 * m * k * n
        shape_rates = {"jnp.dot": flops / throughput.min_time(dot, jnp.asarray(a), jnp.asarray(b)),
                       "torch.matmul": flops / throughput.min_time(torch.matmul, torch.from_numpy(a),
                                                                   torch.from_numpy(b))}
        if packed is not None:
            shape_rates["jaxllm packed"] = flops / throughput.min_time(packed, jnp.asarray(a), pack(jnp.asarray(b), 1))
        rates[f"{m}x{k}x{n}"] = shape_rates
    big = np.ones(100_000_000, np.float32)
    reads = {"jnp.sum": big.nbytes / throughput.min_time(jax.jit(jnp.sum), jnp.asarray(big)),
             "torch.sum": big.nbytes / throughput.min_time(torch.sum, torch.from_numpy(big))}
    return {"matmul_flops_per_s": rates,
            "compute_roof_flops_per_s": max(r for shape in rates.values() for r in shape.values()),
            "read_bytes_per_s": reads, "memory_roof_bytes_per_s": max(reads.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-batch-sizes", default="64", help="comma separated (throughput.py's best is 64)")
    parser.add_argument("--skip-hf", action="store_true", help="only the bound and jaxllm (no file unless --output)")
    parser.add_argument("--output", type=Path, default=None, help=f"JSON path; default {_DEFAULT_OUT}")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count())
    gguf_path, model, workload = throughput.load_model_and_workload()
    tok = model.tokenizer
    need, roof = work(model.config, workload), roofs(model.config)
    compute_s = (need["dense_flops"] + need["attention_flops"]) / roof["compute_roof_flops_per_s"]
    memory_s = need["bytes"] / roof["memory_roof_bytes_per_s"]
    floor_s = max(compute_s, memory_s)
    report = {"environment": throughput._environment(), "model": gguf_path.name, "work": need, "roofs": roof,
              "floor": {"compute_s": compute_s, "memory_s": memory_s, "floor_s": floor_s}}
    print(f"work: {need['dense_flops'] / 1e12:.2f} TFLOP dense + {need['attention_flops'] / 1e12:.2f} TFLOP attention, "
          f"{need['bytes'] / 1e9:.1f} GB read; roofs {roof['compute_roof_flops_per_s'] / 1e9:.0f} GFLOP/s, "
          f"{roof['memory_roof_bytes_per_s'] / 1e9:.1f} GB/s")
    print(f"floor: {floor_s:.2f} s (compute {compute_s:.2f} s, memory {memory_s:.2f} s)", flush=True)
    report["jaxllm"], _ = throughput.run_jaxllm(model, workload)
    ours = report["jaxllm"]["elapsed_s"]
    print(f"jaxllm: {ours:.2f} s = {ours / floor_s:.2f}x the floor", flush=True)
    if not args.skip_hf:
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        sizes = [int(s) for s in args.hf_batch_sizes.split(",")]
        report["transformers"], _ = throughput.run_hf(gguf_path, workload, sizes, pad_id, "float32")
        best = report["transformers"]["per_batch_size"][str(report["transformers"]["best_batch_size"])]
        theirs = best["elapsed_s"]
        report["ratios"] = {"measured_jaxllm_vs_transformers": theirs / ours,
                            "ceiling_at_the_floor": theirs / floor_s,
                            "floor_fraction_needed_for_5x": 5 * floor_s / theirs}
        print(f"transformers: {theirs:.2f} s; measured ratio {theirs / ours:.2f}x; "
              f"an engine at the floor would reach {theirs / floor_s:.2f}x")
    out = args.output or (None if args.skip_hf else _DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
