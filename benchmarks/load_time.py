"""Start-up cost of the embedded SmolLM2: GGUF conversion vs reloading the orbax cache.

Usage: python benchmarks/load_time.py [--dtype float32|bfloat16] [--repeats 3] [--out PATH]

Both paths include the tokenizer, since a start needs one. Prints a summary and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

import converters

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
_DEFAULT_OUT = Path(__file__).parent / "results" / "load_time_cpu.json"


def _timed(fn) -> tuple[float, converters.Checkpoint]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _param_bytes(params: dict) -> int:
    return sum(_param_bytes(v) if isinstance(v, dict) else v.nbytes for v in params.values())


def measure(dtype_name: str, repeats: int) -> dict:
    """Median seconds of a fresh GGUF conversion and of an orbax reload, ``repeats`` each."""
    dtype = _DTYPES[dtype_name]
    convert_s = [_timed(lambda: converters.load_checkpoint(None, dtype))[0] for _ in range(repeats)]
    with tempfile.TemporaryDirectory() as cache:
        save_s, checkpoint = _timed(lambda: converters.load_checkpoint(None, dtype, cache_dir=cache))
        reload_s = [_timed(lambda: converters.load_checkpoint(None, dtype, cache_dir=cache))[0] for _ in range(repeats)]
    return {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "dtype": dtype_name,
        "param_bytes": _param_bytes(checkpoint.params),
        "repeats": repeats,
        "gguf_convert_s": convert_s,
        "first_start_convert_and_save_s": save_s,
        "orbax_reload_s": reload_s,
        "gguf_convert_median_s": statistics.median(convert_s),
        "orbax_reload_median_s": statistics.median(reload_s),
        "speedup": statistics.median(convert_s) / statistics.median(reload_s),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=_DEFAULT_OUT)
    args = parser.parse_args()
    result = measure(args.dtype, args.repeats)
    print(
        f"SmolLM2 {args.dtype}: GGUF conversion {result['gguf_convert_median_s']:.2f} s, "
        f"orbax reload {result['orbax_reload_median_s']:.2f} s (median of {args.repeats}), "
        f"{result['speedup']:.1f}x faster"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
