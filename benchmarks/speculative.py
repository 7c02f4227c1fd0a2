"""What n-gram speculative decoding gains: the same requests with and without proposals.

Usage: python benchmarks/speculative.py [--reps 3] [--k 4] [--disable-by-batch-size 4] [--max-tokens 96]
       [--output PATH]

On the embedded SmolLM2 in float32, greedy: two workloads of 8 chat requests each, "copy"
(repeat a given passage of prose or code: proposals found in the prompt hold) and "free"
(open-ended writing: few proposals hold), each run one request at a time (latency: each step
decodes one sequence, the case speculative decoding is for) and all 8 at once. The plain engine
overlaps each step with the host's work for the next (async scheduling); the speculative one runs
steps one at a time, since each proposal starts from the tokens just sampled. A third arm sets
``disable_by_batch_size``: no proposals (and overlapped steps) while that many requests run. Each
arm gets an untimed pass first, then the arms alternate. Outputs must be the same token for token in both
arms (the script fails otherwise). JSON goes to benchmarks/results/speculative_<platform>.json.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import _environment  # noqa: E402

from jaxllm import LLM, SamplingParams  # noqa: E402

_LIMITS = dict(max_model_len=512, max_num_seqs=8, max_num_batched_tokens=128, compilation_cache_dir=None)
_PASSAGES = [
    "The committee met on Tuesday to review the budget. After a long discussion, the members agreed to fund "
    "the new library, repair the old bridge, and plant two hundred trees along the river.",
    "def merge(left, right):\n    out = []\n    i = j = 0\n    while i < len(left) and j < len(right):\n"
    "        if left[i] <= right[j]:\n            out.append(left[i])\n            i += 1\n        else:\n"
    "            out.append(right[j])\n            j += 1\n    return out + left[i:] + right[j:]",
    "Photosynthesis turns light into chemical energy. Plants take in carbon dioxide and water, and with the "
    "energy of sunlight they make sugar and release oxygen into the air.",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()",
    "Our store opens at nine in the morning and closes at six in the evening, Monday to Saturday. On Sundays "
    "we open at ten and close at four. Holidays may change these hours.",
    "for name in ['alpha', 'beta', 'gamma']:\n    path = f'data/{name}.csv'\n    rows = load(path)\n"
    "    print(name, len(rows))",
    "The train leaves the central station at half past seven, stops at the harbour and the university, and "
    "reaches the airport a little after eight.",
    "SELECT name, email FROM users WHERE active = 1 AND created_at > '2024-01-01' ORDER BY name LIMIT 50;",
]
_TOPICS = ["a lighthouse keeper", "a lost cat", "the first day of school", "a storm at sea", "a robot gardener",
           "a market in winter", "an old violin", "a trip to the mountains"]


def chats() -> dict[str, list]:
    copy = [[{"role": "user", "content": f"Repeat this text exactly, word for word:\n\n{p}"}] for p in _PASSAGES]
    free = [[{"role": "user", "content": f"Write a short story about {t}."}] for t in _TOPICS]
    return {"copy": copy, "free": free}


def run(llm: LLM, conversations: list, params: SamplingParams, concurrency: int) -> tuple[float, list, dict]:
    engine = llm.llm_engine
    before = engine.stats
    start = time.perf_counter()
    if concurrency == 1:
        outputs = [llm.chat(c, params, use_tqdm=False)[0] for c in conversations]
    else:
        outputs = llm.chat(conversations, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    after = engine.stats
    counts = {"num_steps": after.num_steps - before.num_steps,
              "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
              "new_compiles": after.num_compiles - before.num_compiles}
    if after.spec_decode is not None:
        drafted = after.spec_decode.num_draft_tokens - before.spec_decode.num_draft_tokens
        accepted = after.spec_decode.num_accepted_tokens - before.spec_decode.num_accepted_tokens
        drafts = after.spec_decode.num_drafts - before.spec_decode.num_drafts
        counts.update(num_drafts=drafts, num_draft_tokens=drafted, num_accepted_tokens=accepted,
                      acceptance_rate=accepted / drafted if drafted else 0.0,
                      mean_acceptance_length=1 + accepted / drafts if drafts else 0.0)
    return elapsed, outputs, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--lookup-min", type=int, default=1)
    parser.add_argument("--lookup-max", type=int, default=3)
    parser.add_argument("--disable-by-batch-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    spec_config = {"method": "ngram", "num_speculative_tokens": args.k,
                   "prompt_lookup_min": args.lookup_min, "prompt_lookup_max": args.lookup_max}
    limited = {**spec_config, "disable_by_batch_size": args.disable_by_batch_size}
    engines = {"plain": LLM(None, **_LIMITS), "ngram": LLM(None, speculative_config=spec_config, **_LIMITS),
               "ngram_limited": LLM(None, speculative_config=limited, **_LIMITS)}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    cases = [(w, c) for w in ("copy", "free") for c in (1, 8)]
    workloads = chats()
    times = {f"{w}/{c}": {arm: [] for arm in engines} for w, c in cases}
    counts = {f"{w}/{c}": {} for w, c in cases}
    for workload, concurrency in cases:
        case = f"{workload}/{concurrency}"
        reference = None
        for arm, llm in engines.items():  # untimed; outputs must agree
            _, outputs, _ = run(llm, workloads[workload], params, concurrency)
            ids = [o.outputs[0].token_ids for o in outputs]
            if reference is not None and ids != reference:
                raise SystemExit(f"{case}: the {arm} arm's outputs differ from the plain arm's")
            reference = ids
        for _ in range(args.reps):
            for arm, llm in engines.items():
                elapsed, outputs, counts[case][arm] = run(llm, workloads[workload], params, concurrency)
                if [o.outputs[0].token_ids for o in outputs] != reference:
                    raise SystemExit(f"{case}: {arm}'s outputs changed between runs")
                times[case][arm].append(elapsed)
                tokens = counts[case][arm]["output_tokens"]
                print(f"{case:7s} {arm:6s} {elapsed:7.3f} s  {tokens / elapsed:7.1f} output tok/s", flush=True)
    summary = {}
    for case, by_arm in times.items():
        median = {arm: statistics.median(t) for arm, t in by_arm.items()}
        spec = counts[case]["ngram"]
        summary[case] = {"speed_vs_plain_median": {a: median["plain"] / m for a, m in median.items() if a != "plain"},
                         "output_tokens_per_s_median": {a: counts[case][a]["output_tokens"] / m
                                                        for a, m in median.items()},
                         "acceptance_rate": spec["acceptance_rate"],
                         "mean_acceptance_length": spec["mean_acceptance_length"],
                         "steps": {a: counts[case][a]["num_steps"] for a in median}}
        speeds = ", ".join(f"{a} {x:.2f}x" for a, x in summary[case]["speed_vs_plain_median"].items())
        print(f"{case:7s} speed vs plain: {speeds}; ngram acceptance {spec['acceptance_rate']:.1%}, "
              f"{spec['mean_acceptance_length']:.2f} tokens per verifying step; steps {summary[case]['steps']}")
    platform = jax.devices()[0].platform
    report = {
        "environment": {**_environment(), "device": str(jax.devices()[0]), "load_avg_1min": os.getloadavg()[0]},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": "SmolLM2-135M-Instruct (embedded), float32",
        "workload": {"requests_per_case": 8, "max_tokens": args.max_tokens, "greedy": True, "passages": _PASSAGES,
                     "topics": _TOPICS},
        "engine_args": {k: v for k, v in _LIMITS.items() if k != "compilation_cache_dir"},
        "speculative_config": {"ngram": spec_config, "ngram_limited": limited},
        "elapsed_s": times,
        "counts_last_rep": counts,
        "summary": summary,
    }
    out = args.output or Path(__file__).parent / "results" / f"speculative_{platform}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
