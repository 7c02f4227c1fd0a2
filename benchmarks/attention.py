"""Paged-attention backends side by side: xla, pallas, triton, jax's own Pallas paged_attention, and a
dense (unpaged) reference.

Usage: python benchmarks/attention.py [--smoke] [--dtype bfloat16] [--repeats 20] [--output PATH]

Sweeps decode batches (batch x context, one token per sequence) and prefill/mixed batches (some
sequences prefilling a chunk, the rest decoding) over a NaN-free random pool with randomly permuted
block tables. Reports median time, achieved HBM bandwidth (bytes of K/V the causal masks make
visible + q + out, each read or written once: the least any kernel must move) and TFLOP/s
(4 * visible keys * heads * head_dim per token). Off GPU the Pallas kernels run interpreted, so
CPU numbers only show that every path runs (``--quick``: tiny sizes); GPU numbers are to be taken
on an H100/H200. JSON goes to benchmarks/results/attention_<platform>.json unless ``--output``.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models.attention import get_attention_backend
from pallas_kernels.testing import make_batch

_RESULTS = Path(__file__).parent / "results"
# heads: (query heads, kv heads) per GQA ratio 1, 4, 8 with Llama-3-8B's 8 kv heads (4 is Llama-3-8B).
_GPU_SWEEP = dict(decode=[(b, c) for b in (1, 8, 32, 128) for c in (512, 2048, 8192)],
                  mixed=[(4, 512, 60, 2048), (2, 2048, 126, 4096)], heads=[(8, 8), (32, 8), (64, 8)],
                  head_dim=128, block_size=16)
_QUICK_SWEEP = dict(decode=[(2, 48), (4, 100)], mixed=[(1, 20, 3, 40)], heads=[(4, 2)], head_dim=64, block_size=16)
# Peak HBM bandwidth (bytes/s) by device kind, for "% of peak" on decode.
_PEAK_HBM = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.04e12}


def _peak_bandwidth() -> float | None:
    kind = getattr(jax.devices()[0], "device_kind", "")
    return next((bw for name, bw in _PEAK_HBM.items() if name in kind), None)


def _workloads(sweep):
    """(name, q_lens, kv_lens) for every point of the sweep."""
    for batch, context in sweep["decode"]:
        yield f"decode b={batch} ctx={context}", [1] * batch, [context] * batch
    for prefills, chunk, decodes, context in sweep["mixed"]:
        q_lens = [chunk] * prefills + [1] * decodes
        yield f"mixed {prefills}x{chunk} + {decodes} decode ctx={context}", q_lens, [context] * len(q_lens)


def _traffic(batch, q_lens, kv_lens, itemsize) -> tuple[float, float]:
    """(bytes, flops) the causal mask makes necessary."""
    _, heads, head_dim = batch.q.shape
    kv_heads = batch.k_pool.shape[3]
    visible = sum(sum(range(kv - n + 1, kv + 1)) for n, kv in zip(q_lens, kv_lens, strict=True))
    keys_read = sum(kv_lens)
    nbytes = (2 * keys_read * kv_heads + 2 * sum(q_lens) * heads) * head_dim * itemsize
    return nbytes, 4.0 * visible * heads * head_dim


def _dense(batch):
    """Unpaged reference: each sequence's context gathered contiguously once, outside the timing."""
    tables = batch.block_tables
    k = batch.k_pool[batch.layer][tables].reshape(tables.shape[0], -1, *batch.k_pool.shape[3:])
    v = batch.v_pool[batch.layer][tables].reshape(k.shape)
    seq = batch.seq_ids

    def run(q, k, v, positions):
        qg = q.reshape(q.shape[0], k.shape[2], -1, q.shape[-1])
        s = jnp.einsum("tkgh,tckh->tkgc", qg, k[seq], preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
        s = jnp.where(jnp.arange(k.shape[1]) <= positions[:, None, None, None], s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        return jnp.einsum("tkgc,tckh->tkgh", p, v[seq]).reshape(q.shape)

    return jax.jit(run), (batch.q, k, v, batch.positions)


def _jax_paged(batch, interpret):
    """jax.experimental.pallas.ops.gpu.paged_attention (decode only; its layout is [K, pages, page, H])."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    k = jnp.moveaxis(batch.k_pool[batch.layer], 2, 0)
    v = jnp.moveaxis(batch.v_pool[batch.layer], 2, 0)
    pages = batch.block_tables.shape[1]
    fn = functools.partial(paged_attention, pages_per_compute_block=min(4, pages), k_splits=1, interpret=interpret)
    return jax.jit(fn), (batch.q[: batch.kv_lens.shape[0]], k, v, batch.block_tables, batch.kv_lens)


def _candidates(batch, decode: bool, on_gpu: bool):
    kv, md = (batch.k_pool, batch.v_pool), batch.metadata()
    for name in ("xla", "pallas", "triton", "pallas_mgpu"):
        if name == "pallas_mgpu" and not (on_gpu and batch.q.dtype == jnp.bfloat16):
            yield name, None, "Hopper only, 16-bit dtypes"
            continue
        try:
            fn = get_attention_backend(name)
        except ValueError as error:
            yield name, None, str(error)
            continue
        yield name, (jax.jit(fn), (batch.q, kv, batch.layer, md)), None
    yield "dense", _dense(batch), None
    if decode:
        yield "jax_paged_attention", _jax_paged(batch, interpret=not on_gpu), None


def _time(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run(sweep, dtype, repeats: int) -> list[dict]:
    on_gpu = jax.default_backend() == "gpu"
    peak = _peak_bandwidth()
    rows = []
    for (heads, kv_heads), (name, q_lens, kv_lens) in ((h, w) for h in sweep["heads"] for w in _workloads(sweep)):
        name = f"{name} gqa={heads // kv_heads}"
        batch = make_batch(0, q_lens, kv_lens, block_size=sweep["block_size"], num_kv_heads=kv_heads,
                           group=heads // kv_heads, head_dim=sweep["head_dim"], dtype=dtype, num_layers=1, layer=0,
                           extra_tokens=0, nan=False)
        nbytes, flops = _traffic(batch, q_lens, kv_lens, jnp.dtype(dtype).itemsize)
        for backend, call, skipped in _candidates(batch, max(q_lens) == 1, on_gpu):
            row = dict(workload=name, backend=backend)
            if call is None:
                row["skipped"] = skipped
            else:
                seconds = _time(*call, repeats)
                row.update(ms=seconds * 1e3, hbm_gb_s=nbytes / seconds / 1e9, tflop_s=flops / seconds / 1e12)
                if peak is not None:
                    row["pct_peak_hbm"] = 100.0 * nbytes / seconds / peak
            rows.append(row)
            print(json.dumps(row))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", "--smoke", dest="quick", action="store_true",
                        help="tiny sizes (CPU, interpreted kernels): checks every path runs")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on GPU)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.dtype(args.dtype or ("bfloat16" if on_gpu else "float32"))
    repeats = args.repeats or (2 if args.quick else 20)
    rows = run(_QUICK_SWEEP if args.quick or not on_gpu else _GPU_SWEEP, dtype, repeats)
    device = jax.devices()[0]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = dict(device=getattr(device, "device_kind", str(device)), platform=jax.default_backend(),
                  jax=jax.__version__, git_commit=commit, command=" ".join(sys.argv), host=platform.node(),
                  dtype=str(dtype), quick=args.quick, repeats=repeats, results=rows)
    out = args.output or _RESULTS / f"attention_{jax.default_backend()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
