"""KV blocks needed with and without sharing, for parallel sampling and beam search.

In the manner of the PagedAttention paper's section 6.3: the same prompts run with n in {2, 4, 6}
parallel samples and beam widths {2, 4, 6}; after every engine step we record the blocks the
live requests hold (with sharing) and the blocks they would hold if every request had its own
copy of each block (without sharing). Prints a table and writes JSON.

    python benchmarks/memory_sharing.py [--max-tokens 64] [--output benchmarks/results/memory_sharing_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import jax

from jaxllm import LLM, BeamSearchParams, SamplingParams

PROMPTS = [
    "The history of the Roman Empire begins with",
    "Write a short poem about the ocean at night.",
    "def merge_sort(values):",
    "Explain in simple words why the sky is blue, and what role the atmosphere plays in it.",
    "A recipe for a quick vegetable soup:",
    "The three laws of thermodynamics state that",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "List five tips for learning a new language:",
]


class StepRecorder:
    """Wraps engine.step to record block usage with sharing and without, after every step."""

    def __init__(self, engine):
        self.engine, self.samples = engine, []
        self._step = engine.step
        engine.step = self._recording_step

    def _recording_step(self):
        outputs = self._step()
        s = self.engine.stats
        if s.kv_blocks_used:
            self.samples.append((s.kv_blocks_used, s.kv_blocks_used + s.kv_blocks_saved))
        return outputs

    def summary(self) -> dict:
        with_sharing = sum(a for a, _ in self.samples)
        without = sum(b for _, b in self.samples)
        return {
            "steps": len(self.samples),
            "peak_blocks_with_sharing": max(a for a, _ in self.samples),
            "peak_blocks_without_sharing": max(b for _, b in self.samples),
            "mean_blocks_with_sharing": with_sharing / len(self.samples),
            "mean_blocks_without_sharing": without / len(self.samples),
            "memory_saving_pct": 100.0 * (1 - with_sharing / without),
        }


def run(llm: LLM, kind: str, width: int, max_tokens: int) -> dict:
    recorder = StepRecorder(llm.llm_engine)
    try:
        if kind == "parallel_sampling":
            params = SamplingParams(n=width, temperature=1.0, seed=0, max_tokens=max_tokens, ignore_eos=True)
            llm.generate(PROMPTS, params, use_tqdm=False)
        else:
            llm.beam_search(PROMPTS, BeamSearchParams(beam_width=width, max_tokens=max_tokens, ignore_eos=True))
    finally:
        llm.llm_engine.step = recorder._step
    return {"kind": kind, "width": width, **recorder.summary()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--widths", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--output", default="benchmarks/results/memory_sharing_cpu.json")
    args = parser.parse_args(argv)
    # Prefix caching off: only forks share blocks, as in the paper's comparison.
    llm = LLM(max_model_len=512, max_num_seqs=64, max_num_batched_tokens=512, enable_prefix_caching=False)
    rows = [run(llm, kind, w, args.max_tokens) for kind in ("parallel_sampling", "beam_search") for w in args.widths]
    print(f"{'decoding':<18} {'width':>5} {'blocks (shared)':>16} {'blocks (no sharing)':>20} {'saving %':>9}")
    for r in rows:
        print(f"{r['kind']:<18} {r['width']:>5} {r['mean_blocks_with_sharing']:>16.1f} "
              f"{r['mean_blocks_without_sharing']:>20.1f} {r['memory_saving_pct']:>9.1f}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {
        "benchmark": "memory_sharing",
        "command": " ".join([sys.executable, *sys.argv]),
        "device": str(jax.devices()[0]),
        "jax_version": jax.__version__,
        "git_commit": commit,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": "SmolLM2-135M-Instruct (embedded GGUF)",
        "block_size": 16,
        "num_prompts": len(PROMPTS),
        "max_tokens": args.max_tokens,
        "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
