"""The C++ CPU kernels alone, with their operands coming from memory as in an engine step.

Usage: python benchmarks/cpu_kernels.py [--rows 1,6,9,12,17,33,57,128,337] [--reps 15] [--output PATH]
       [--attention-only]

1. MLP matmuls: SmolLM2-135M's 30 MLP layers (gate/up 576 -> 1536, down 1536 -> 576, 212 MB of
   float32 weights, more than the caches hold) in one jitted loop over the layers, for a few row
   counts of engine steps: the packed kernel (``pack_gated`` / ``pack``, as the engine runs them)
   on its AVX-512 FMA path and, where the CPU has AMX tiles, with ``amx=True`` (which takes the
   tiles from 64 rows on), beside XLA's dots on the unpacked stack and torch's matmuls in a Python
   loop; then the same three in bfloat16 (the packed kernel on its AVX512-BF16 pair path: half
   the weight bytes). Minimum of ``--reps`` runs, reported as ms, GB/s of weights and GFLOP/s.
2. Decode attention: one call of the cpu paged-attention kernel per layer over a 30-layer pool of
   1455 blocks (SmolLM2's shapes: 9 query heads, 3 kv heads, head dim 64, block size 16), 48
   sequences of 100-400 cached tokens with their blocks scattered, layers taken in turn so the
   pool comes from memory; and the same calls on one layer (its K/V stay in the caches). Reported
   as ms per call and GB/s of K/V read. Then (``attention_cases``) the same decode calls on a
   bfloat16 pool, and a prefill step's calls: four prompt chunks of 67-100 tokens (337 in all)
   after 10-210 cached ones, on float32 and bfloat16 pools.

JSON goes to benchmarks/results/cpu_kernels_cpu.json unless ``--output``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from throughput import _environment, min_time  # noqa: E402

from jaxllm.models.attention import AttentionMetadata  # noqa: E402
from pallas_kernels.cpu_attention import cpu_paged_attention  # noqa: E402
from pallas_kernels.cpu_kernels import amx_usable, cpu_kernels_unavailable_reason  # noqa: E402
from pallas_kernels.cpu_matmul import pack, pack_gated, packed_matmul  # noqa: E402

_DEFAULT_OUT = Path(__file__).parent / "results" / "cpu_kernels_cpu.json"
LAYERS, HIDDEN, INTERMEDIATE = 30, 576, 1536
NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, GROUP, HEAD_DIM = 1455, 16, 3, 3, 64


def mlp(rows_list: list[int], reps: int) -> list[dict]:
    import torch

    rng = np.random.default_rng(0)
    gate, up = (rng.standard_normal((LAYERS, HIDDEN, INTERMEDIATE), dtype=np.float32) * 0.02 for _ in range(2))
    down = rng.standard_normal((LAYERS, INTERMEDIATE, HIDDEN), dtype=np.float32) * 0.02
    packed_gate_up = pack_gated(jnp.asarray(gate), jnp.asarray(up), stacked=True)
    packed_down = pack(jnp.asarray(down), 1, stacked=True)
    dense = tuple(map(jnp.asarray, (gate, up, down)))
    torch_w = tuple(map(torch.from_numpy, (gate, up, down)))
    dense16 = tuple(a.astype(jnp.bfloat16) for a in dense)
    packed16 = (pack_gated(dense16[0], dense16[1], stacked=True), pack(dense16[2], 1, stacked=True))
    torch16 = tuple(w.to(torch.bfloat16) for w in torch_w)

    @functools.partial(jax.jit, static_argnames="amx")
    def run_packed(x, gate_up, down, rows, amx):
        def layer(i, x):
            h = packed_matmul(x, gate_up.at_layer(i), rows, amx)
            return x + packed_matmul(h, down.at_layer(i), rows, amx)
        return jax.lax.fori_loop(0, LAYERS, layer, x)

    @jax.jit
    def run_xla(x, gate, up, down):
        def layer(i, x):
            h = jax.nn.silu(x @ gate[i]) * (x @ up[i])
            return x + h @ down[i]
        return jax.lax.fori_loop(0, LAYERS, layer, x)

    @jax.jit
    def run_xla16(x, gate, up, down):  # as jaxllm.models.layers.einsum: float32 sums, bfloat16 results
        def dot(a, b):
            return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)

        def layer(i, x):
            return x + dot(jax.nn.silu(dot(x, gate[i])) * dot(x, up[i]), down[i])
        return jax.lax.fori_loop(0, LAYERS, layer, x)

    def run_torch(x, w=torch_w):
        with torch.no_grad():
            for i in range(LAYERS):
                x = x + (torch.nn.functional.silu(x @ w[0][i]) * (x @ w[1][i])) @ w[2][i]
        return x

    weight_bytes = 3 * LAYERS * HIDDEN * INTERMEDIATE * 4  # half that for the bfloat16 ones
    out = []
    for rows in rows_list:
        bucket = next(b for b in (8, 16, 32, 64, 128, 256, 512, 1024) if b >= rows)  # the engine pads to buckets
        x = rng.standard_normal((bucket, HIDDEN), dtype=np.float32)
        flops = 2 * 3 * HIDDEN * INTERMEDIATE * LAYERS * rows
        padded, real, real_torch = jnp.asarray(x), jnp.asarray(x[:rows]), torch.from_numpy(x[:rows].copy())
        count = jnp.int32(rows)
        ms = {"jaxllm packed": 1e3 * min_time(run_packed, padded, packed_gate_up, packed_down, count, False, repeats=reps)}
        if amx_usable():
            ms["jaxllm packed, amx"] = 1e3 * min_time(run_packed, padded, packed_gate_up, packed_down, count, True,
                                                       repeats=reps)
        ms |= {
              "xla dot": 1e3 * min_time(run_xla, real, *dense, repeats=reps),
              "torch": 1e3 * min_time(run_torch, real_torch, repeats=reps),
              "jaxllm packed bf16": 1e3 * min_time(run_packed, padded.astype(jnp.bfloat16), *packed16, count, False,
                                                   repeats=reps),
              "xla dot bf16": 1e3 * min_time(run_xla16, real.astype(jnp.bfloat16), *dense16, repeats=reps),
              "torch bf16": 1e3 * min_time(run_torch, real_torch.to(torch.bfloat16), torch16, repeats=reps)}
        gb = {k: weight_bytes / (2 if k.endswith("bf16") else 1) / v / 1e6 for k, v in ms.items()}
        out.append({"rows": rows, "ms": ms, "weight_gb_per_s": gb,
                    "gflop_per_s": {k: flops / v / 1e6 for k, v in ms.items()}})
        print(f"mlp rows {rows:3d}: " + "  ".join(f"{k} {v:6.2f} ms" for k, v in ms.items()), flush=True)
    return out


# Prefill chunks of one 337-token engine step (bucket 512): (new tokens, context after them) per sequence.
PREFILL_CHUNKS = ((100, 150), (90, 300), (80, 90), (67, 200))


def attention(reps: int, num_seqs: int = 48, pool_dtype: str = "float32", case: str = "decode") -> dict:
    """One kernel call per layer, as described in the module docstring. ``case="prefill"``: the
    four prompt chunks of PREFILL_CHUNKS (337 tokens) instead of one decode token per sequence.
    ``pool_dtype="bfloat16"``: the pool holds bfloat16 bits as uint16, as the engine's CPU pool."""
    rng = np.random.default_rng(0)
    if case == "decode":
        context = rng.integers(100, 400, num_seqs)
        new = np.ones(num_seqs, np.int64)
    else:
        new, context = (np.array(c) for c in zip(*PREFILL_CHUNKS, strict=True))
        num_seqs = len(context)
    blocks = -(-context // BLOCK_SIZE)
    ids = rng.permutation(np.arange(1, NUM_BLOCKS))
    tables = np.zeros((num_seqs, 32), np.int32)
    for s, start in enumerate(np.cumsum(blocks) - blocks):
        tables[s, : blocks[s]] = ids[start : start + blocks[s]]
    shape = (LAYERS, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k, v = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in range(2))
    if pool_dtype == "bfloat16":
        k, v = (jax.lax.bitcast_convert_type(a.astype(jnp.bfloat16), jnp.uint16) for a in (k, v))
    tokens = 64 if case == "decode" else 512  # the engine's bucket: padding rows after the real ones
    positions = np.zeros(tokens, np.int32)
    positions[: new.sum()] = np.concatenate([np.arange(c - n, c) for n, c in zip(new, context, strict=True)])
    md = AttentionMetadata(jnp.asarray(positions), jnp.zeros(tokens, jnp.int32), jnp.zeros(tokens, jnp.int32),
                           jnp.asarray(tables), jnp.asarray(np.concatenate([[0], np.cumsum(new)]).astype(np.int32)),
                           jnp.asarray(context.astype(np.int32)))
    q = jnp.asarray(rng.standard_normal((tokens, KV_HEADS * GROUP, HEAD_DIM), dtype=np.float32))
    call = jax.jit(lambda layer: cpu_paged_attention(q, (k, v), layer, md))
    layer_ids = [jnp.int32(i) for i in range(LAYERS)]
    jax.block_until_ready([call(i) for i in layer_ids])

    def per_call_ms(order) -> float:
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            for i in order:
                jax.block_until_ready(call(i))
            best = min(best, (time.perf_counter() - start) / len(order))
        return best * 1e3

    kv_bytes = int(context.sum()) * 2 * KV_HEADS * HEAD_DIM * (4 if pool_dtype == "float32" else 2)
    ms = {"layers in turn (from memory)": per_call_ms(layer_ids), "one layer (cached)": per_call_ms(layer_ids[:1] * LAYERS)}
    print(f"attention {case} {pool_dtype}: " + "  ".join(f"{k} {v:.3f} ms ({kv_bytes / v / 1e6:.1f} GB/s)"
                                                        for k, v in ms.items()), flush=True)
    return {"case": case, "pool_dtype": pool_dtype, "num_seqs": num_seqs, "tokens": int(new.sum()),
            "cached_tokens": int(context.sum()), "kv_bytes_per_call": kv_bytes,
            "ms_per_call": ms, "gb_per_s": {key: kv_bytes / val / 1e6 for key, val in ms.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,6,9,12,17,33,57,128,337")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--output", type=Path, default=_DEFAULT_OUT)
    parser.add_argument("--attention-only", action="store_true", help="skip the MLP matmuls")
    args = parser.parse_args()
    reason = cpu_kernels_unavailable_reason()
    if reason is not None:
        raise SystemExit(f"the cpu kernels are not usable here: {reason}")
    mlp_rows = [] if args.attention_only else [int(r) for r in args.rows.split(",")]
    report = {"environment": _environment(), "reps": args.reps, "mlp": mlp(mlp_rows, args.reps),
              "attention": attention(args.reps),
              "attention_cases": [attention(args.reps, pool_dtype=d, case=c)
                                  for c in ("decode", "prefill") for d in ("float32", "bfloat16")]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
