"""The on-device sampler alone: one jitted ``sample`` over [rows, vocab] float32 logits.

Usage: python benchmarks/sampler.py [--rows 64] [--vocab 49152] [--reps 7] [--output PATH]

Times greedy, temperature 1, top-k 50, top-p 0.9 and min-p 0.1 batches (every row the same
kind), and, in the same process, the draw the sampler used before: ``jax.random.categorical``
(Gumbel noise over every logit) beside its ``categorical`` (inverse CDF, one uniform per row).
Minimum of ``--reps`` runs after a compile. JSON goes to benchmarks/results/sampler_<backend>.json
unless ``--output``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from throughput import _environment  # noqa: E402

from jaxllm.runner.sampler import MAX_BANNED_IDS, SamplingTensors, categorical, sample  # noqa: E402

_CASES = {
    "greedy": dict(temperature=0.0),
    "temperature_1": dict(temperature=1.0),
    "top_k_50": dict(temperature=1.0, top_k=50),
    "top_p_0.9": dict(temperature=1.0, top_p=0.9),
    "min_p_0.1": dict(temperature=1.0, min_p=0.1),
}


def _tensors(rows: int, vocab: int, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> SamplingTensors:
    full = lambda v, dt: jnp.full((rows,), v, dt)  # noqa: E731
    return SamplingTensors(full(temperature, jnp.float32), full(top_k, jnp.int32), full(top_p, jnp.float32),
                           full(min_p, jnp.float32), jnp.arange(rows, dtype=jnp.uint32), full(0, jnp.int32),
                           jnp.full((rows, MAX_BANNED_IDS), vocab, jnp.int32))


def _best_ms(fn, *args, reps: int) -> list[float]:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49152)  # SmolLM2's
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((args.rows, args.vocab), np.float32) * 3)
    report = {"environment": _environment(), "rows": args.rows, "vocab": args.vocab, "reps": args.reps,
              "sample_ms": {}, "draw_ms": {}}
    jitted = jax.jit(sample)
    for name, kwargs in _CASES.items():
        report["sample_ms"][name] = _best_ms(jitted, logits, _tensors(args.rows, args.vocab, **kwargs), reps=args.reps)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(args.rows))
    gumbel = jax.jit(jax.vmap(lambda key, row: jax.random.categorical(key, row)))
    report["draw_ms"]["gumbel_jax_random_categorical"] = _best_ms(gumbel, keys, logits, reps=args.reps)
    report["draw_ms"]["inverse_cdf_categorical"] = _best_ms(jax.jit(categorical), keys, logits, reps=args.reps)
    for section in ("sample_ms", "draw_ms"):
        for name, times in report[section].items():
            print(f"{section[:-3]:7s} {name:32s} {min(times):8.2f} ms")
    out = args.output or Path(__file__).parent / "results" / f"sampler_{jax.default_backend()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
