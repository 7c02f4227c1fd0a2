"""What structured outputs cost: the same requests free, under a JSON schema, as any JSON object, and under a grammar.

Usage: python benchmarks/structured_outputs.py [--reps 3] [--requests 32] [--max-tokens 128] [--output PATH]

On the embedded SmolLM2 (the masks need its tokenizer): chat prompts asking for a JSON object,
greedy, ``ignore_eos`` and a fixed ``max_tokens``, so every arm generates the same number of
tokens (a constrained request whose JSON is complete may only sample end-of-sequence, which
``ignore_eos`` lets it repeat). The arms run alternately, each after one untimed pass, so the
timed passes find every pattern compiled and every mask they need cached: they measure the
per-step cost (the device applies the masks; constrained steps run synchronously, since each
mask depends on the token just sampled). The one-off costs are timed apart, cold: building the
vocabulary's byte table, compiling each pattern, and the masks of every state the outputs visit.
JSON goes to benchmarks/results/structured_outputs_<platform>.json.
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

from jaxllm import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from jaxllm.structured.regex import _compile  # noqa: E402
from jaxllm.structured.token_masks import TokenDFA, TokenVocabulary  # noqa: E402

_LIMITS = dict(max_model_len=512, max_num_seqs=32, max_num_batched_tokens=256, enable_prefix_caching=False)
_CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Rome"]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
        "population": {"type": "integer", "minimum": 0},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 32}, "maxItems": 3},
    },
    "required": ["city", "country", "population", "landmarks"],
}


# The same objects as SCHEMA, written as a grammar (xgrammar's EBNF) instead of a JSON schema.
GRAMMAR = r"""
root ::= "{" ws "\"city\"" ws ":" ws text24 ws "," ws "\"country\"" ws ":" ws text24 ws "," ws
         "\"population\"" ws ":" ws int ws "," ws "\"landmarks\"" ws ":" ws landmarks ws "}"
text24 ::= "\"" [^"\\\n]{0,24} "\""
int ::= "0" | [1-9] [0-9]{0,15}
landmarks ::= "[" ws ( text32 ( ws "," ws text32 ){0,2} )? ws "]"
text32 ::= "\"" [^"\\\n]{0,32} "\""
ws ::= " "?
"""


def prompts(llm: LLM, n: int) -> list[str]:
    tokenizer = llm.get_tokenizer()
    return [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Describe {_CITIES[i % len(_CITIES)]} as a JSON object (request {i})."}],
        tokenize=False, add_generation_prompt=True) for i in range(n)]


def arms(max_tokens: int) -> dict[str, SamplingParams]:
    def params(so):
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, structured_outputs=so)

    return {"free": params(None), "json_schema": params(StructuredOutputsParams(json=SCHEMA)),
            "json_object": params(StructuredOutputsParams(json_object=True)),
            "grammar": params(StructuredOutputsParams(grammar=GRAMMAR))}


def run(llm: LLM, texts: list[str], params: SamplingParams) -> tuple[float, list, dict]:
    engine = llm.llm_engine
    before, overlapped, writes = engine.stats, engine.num_overlapped_steps, engine.runner.masks.num_writes
    start = time.perf_counter()
    outputs = llm.generate(texts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    after = engine.stats
    return elapsed, outputs, {"num_steps": after.num_steps - before.num_steps,
                              "num_overlapped_steps": engine.num_overlapped_steps - overlapped,
                              "mask_table_writes": engine.runner.masks.num_writes - writes,
                              "new_compiles": after.num_compiles - before.num_compiles}


def cold_costs(llm: LLM, outputs_by_arm: dict) -> dict:
    """One-off costs, timed on fresh objects: the vocabulary, each pattern, each visited state's mask."""
    tokenizer = llm.get_tokenizer()
    start = time.perf_counter()
    vocab = TokenVocabulary(tokenizer, llm.llm_engine.vocab_size)
    costs = {"vocabulary_s": time.perf_counter() - start}
    eos = tuple(sorted(llm.llm_engine.scheduler.eos_token_ids))
    for name, params in arms(1).items():
        if params.structured_outputs is None:
            continue
        pattern = params.structured_outputs.pattern()
        _compile.cache_clear()
        start = time.perf_counter()
        token_dfa = TokenDFA(_compile(pattern), vocab, eos)
        compiled = time.perf_counter() - start
        states = {token_dfa.start}
        for output in outputs_by_arm[name]:
            state = token_dfa.start
            for token in output.outputs[0].token_ids:
                state = token_dfa.next_state(state, token)
                states.add(state)
        start = time.perf_counter()
        for state in states:
            token_dfa.mask_words(state)
        costs[name] = {"pattern_chars": len(pattern), "dfa_states": int(token_dfa.dfa.transitions.shape[0] - 1),
                       "compile_s": compiled, "visited_states": len(states),
                       "masks_s": time.perf_counter() - start}
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    llm = LLM(None, compilation_cache_dir=None, **_LIMITS)
    texts = prompts(llm, args.requests)
    params = arms(args.max_tokens)
    num_tokens = args.requests * args.max_tokens
    outputs, steps, times = {}, {}, {name: [] for name in params}
    for name, p in params.items():  # untimed: patterns compiled, masks cached
        _, outputs[name], _ = run(llm, texts, p)
    for _ in range(args.reps):
        for name, p in params.items():
            elapsed, outputs[name], steps[name] = run(llm, texts, p)
            times[name].append(elapsed)
            print(f"{name:12s} {elapsed:7.3f} s  {num_tokens / elapsed:7.1f} output tok/s", flush=True)
    valid = {name: sum(_is_valid(name, o.outputs[0].text) for o in outputs[name]) for name in params}
    median = {name: statistics.median(t) for name, t in times.items()}
    cold = cold_costs(llm, outputs)
    for name in ("json_schema", "json_object", "grammar"):
        print(f"{name}: {median[name] / median['free']:.3f}x the free run's time; complete, valid JSON in "
              f"{valid[name]}/{args.requests} (the rest were cut by max_tokens); cold: {cold[name]}")
    print(f"vocabulary byte table: {cold['vocabulary_s']:.2f} s")
    platform = jax.devices()[0].platform
    report = {
        "environment": {**_environment(), "device": str(jax.devices()[0]), "load_avg_1min": os.getloadavg()[0]},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": "SmolLM2-135M-Instruct (embedded), float32",
        "workload": {"num_requests": args.requests, "max_tokens": args.max_tokens, "greedy": True,
                     "ignore_eos": True, "schema": SCHEMA, "grammar": GRAMMAR},
        "engine_args": _LIMITS,
        "elapsed_s": times,
        "output_tokens_per_s_median": {name: num_tokens / m for name, m in median.items()},
        "time_vs_free_median": {name: m / median["free"] for name, m in median.items()},
        "steps": steps,
        "valid_outputs": valid,
        "cold_costs": cold,
    }
    out = args.output or Path(__file__).parent / "results" / f"structured_outputs_{platform}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def _is_valid(name: str, text: str) -> bool:
    if name == "free":
        return True
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    if name == "json_object":
        return isinstance(value, dict)
    import jsonschema

    try:
        jsonschema.validate(value, SCHEMA)
    except jsonschema.ValidationError:
        return False
    return True


if __name__ == "__main__":
    main()
