"""Generate docs/configuration.md from the code: EngineArgs, SamplingParams and the CLI parsers.

    python docs/scripts/configuration.py          # rewrite docs/configuration.md
    python docs/scripts/configuration.py --check  # exit 1 if it is out of date (tests/test_docs.py)

Types and defaults come from the dataclasses and argparse; only the help strings live here, and a
field without one is an error, so a new argument cannot go undocumented.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import sys
import typing
from pathlib import Path

OUTPUT = Path(__file__).resolve().parents[1] / "configuration.md"

ENGINE_HELP = {
    "model": "None or `SmolLM2-135M-Instruct`: the embedded model; else a HF checkpoint directory, a `.gguf` "
             "file, or a repo id already in the local Hugging Face cache. `LLM` also takes a loaded `Model`.",
    "tokenizer": "A directory or cached repo id whose Hugging Face tokenizer replaces the checkpoint's. "
                 "None: the checkpoint's own.",
    "enable_sleep_mode": "Accepted for vLLM scripts: `LLM.sleep(level)` / `wake_up(tags)` work on any engine here "
                         "(JAX frees the device buffers itself; vLLM needs its own allocator for them).",
    "trust_remote_code": "Accepted for vLLM scripts; no checkpoint code ever runs (only the built-in "
                         "architectures load).",
    "tensor_parallel_size": "Devices to split the model over (the first N of `jax.devices()`): query / kv "
                            "heads and the FFN width split evenly, the KV pool by kv heads; must divide "
                            "`num_attention_heads`, `num_key_value_heads` and `intermediate_size`.",
    "pipeline_parallel_size": "Must be 1: no pipeline parallelism (split a model with `tensor_parallel_size`).",
    "dtype": "`auto`, `float32`, `bfloat16`, `float16`. `auto` is float32 on CPU and, on GPU, the "
             "checkpoint's 16-bit type (bfloat16 for float32 and quantised checkpoints). On CPU `bfloat16` "
             "runs the `cpu` backend's matmuls on AVX512-BF16 with half the weight and KV bytes: faster, "
             "at bfloat16's rounding.",
    "block_size": "Tokens per KV block (a power of two). Smaller blocks waste less of each sequence's last "
                  "block and share prefixes at a finer grain; see notebooks/02_paged_kv_cache.ipynb.",
    "max_model_len": "Longest prompt + output in tokens. None: the model's `max_position_embeddings`.",
    "max_num_seqs": "Most sequences in one step. None: 256 on GPU, 64 on CPU.",
    "max_num_batched_tokens": "Token budget of one step (prefill chunks + decode tokens). None: 8192 on GPU, "
                              "512 on CPU (at least `max_num_seqs`). Prompts longer than this are chunked.",
    "gpu_memory_utilization": "GPU only: share of device memory for weights, activation peak and KV pool; "
                              "the pool gets what is left.",
    "kv_cache_memory_bytes": "Explicit KV pool budget in bytes. None: the GPU share above, or 1 GiB on CPU.",
    "num_kv_blocks": "Exact number of pool blocks, including the null block 0; overrides both budgets.",
    "enable_prefix_caching": "Hash full blocks and reuse them across requests with equal prefixes.",
    "attention_backend": "`auto` (`cpu` on CPU, or `xla` where no C++ compiler can build it; `pallas` on GPU), "
                          "`cpu` (C++ kernels through XLA's FFI, compiled on first use and cached in "
                          "`~/.cache/jaxllm`: paged attention, and float32 matmuls over weights packed at "
                          "start-up), `xla` (plain jnp and XLA's dots: the reference), `pallas` (interpreted on CPU), "
                          "`triton` (GPU, jax-triton), `pallas_mgpu` (H100/H200), or a name given to "
                          "`jaxllm.register_attention_backend`.",
    "kv_cache_dtype": "`auto` (the model's dtype; on CPU, where XLA has no 16-bit float scatter, a bfloat16 model's pool stores its K/V's bits as uint16, the same bytes and numbers, and a float16 model's is float32, which holds its K/V exactly), `fp8` (e4m3) or `int8`: quantised K/V with a float32 scale per token and kv head, about half of bf16's memory.",
    "swap_space": "GiB of host memory for swapped-out blocks when `preemption_mode=\"swap\"`.",
    "preemption_mode": "`recompute`: a preempted request's blocks are freed and recomputed later; `swap`: "
                       "they are copied to host memory and back (recompute when swap space is full).",
    "scheduling_policy": "`fcfs`: requests are admitted in arrival order; `priority`: by each request's "
                         "`priority` (lower first, then arrival; `LLM.generate(priority=[...])`, "
                         "`add_request(..., priority=)`, the server's `priority` field), and a preemption takes "
                         "the running request with the largest. Under `fcfs` a non-zero priority is refused.",
    "speculative_config": "vLLM's speculative decoding, as a dict (`--speculative-config` takes JSON): "
                          "`{\"method\": \"ngram\", \"num_speculative_tokens\": k}` with optional "
                          "`prompt_lookup_min` / `prompt_lookup_max` (the n-gram lengths looked up, both 5 by "
                          "default, as vLLM) and `disable_by_batch_size` (no proposals while that many requests "
                          "run). After each sample the engine proposes up to k tokens that followed the latest "
                          "earlier occurrence of the sequence's last n tokens, and the next step verifies them; "
                          "outputs are the same as without it (greedy and seeded sampling; penalties and structured "
                          "outputs apply at every verified position). Those steps run synchronously. Beam search "
                          "gets no proposals. `{\"model\": \"<draft checkpoint>\", \"num_speculative_tokens\": k}` "
                          "(method `draft_model`, as vLLM infers it from `model`): a smaller model of the same "
                          "vocabulary proposes k tokens greedily; its KV pool shares the target's block ids and "
                          "budget, and it runs every step in lockstep with the target; no proposals past the draft's positions "
                          "or the config's `max_model_len`. EAGLE and MTP are not built.",
    "runner": "vLLM's runner (`auto`, `generate`, `pooling`). A causal LM's engine serves both generation and "
              "pooling requests (`LLM.embed` / `LLM.encode`, `/v1/embeddings`), so the value only states the intent; "
              "a sequence classifier serves pooling only (`classify`, `score`) and refuses `generate`; "
              "others are refused.",
    "pooler_config": "How pooling requests turn a prompt's final hidden states (after the model's last norm) into one "
                     "vector, as a dict (`--pooler-config` takes JSON): `pooling_type` `LAST` (default, as vLLM for a "
                     "causal LM), `MEAN` or `CLS`, and `normalize` (default true: L2). MEAN and CLS requests skip the "
                     "prefix cache (they need every prompt position, or the first).",
    "seed": "Seed of the engine's sampling PRNG (requests without their own `seed`).",
    "async_scheduling": "Schedule and dispatch step k+1 before waiting for step k's sampled tokens; decode inputs "
    "are read on the device. Steps whose tokens the host needs first (penalties, `n > 1` forking, beam search, "
    "structured outputs) run synchronously. Outputs are the same either way.",
    "download_dir": "Directory where converted weights are cached with orbax; the second start skips "
                    "conversion.",
    "warmup": "Compile every (tokens, blocks) bucket at start-up so a running engine never compiles. "
              "False compiles each shape when first met (one-shot jobs, notebooks).",
    "compilation_cache_dir": "JAX persistent compilation cache; a second start loads compiled programs from "
                             "disk. None: off (or whatever the user configured).",
    "generation_config": "Default sampling parameters: `auto` takes the model's generation_config.json "
                         "(temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens), as vLLM; "
                         "`vllm` keeps SamplingParams' own; a directory reads its generation_config.json.",
    "enable_lora": "Serve LoRA adapters (PEFT directories): requests name one with a `LoRARequest(lora_name, "
                   "lora_int_id, lora_path)` (`LLM.generate(..., lora_request=)`, `add_request(..., lora_request=)`; "
                   "the server's `--lora-modules name=path` and the request's `model`). Llama-family models; the "
                   "seven attention and MLP projections can be adapted (embeddings, the output head, biases, DoRA "
                   "and `modules_to_save` are refused by name). Adapters and the base model mix in one step.",
    "max_loras": "Adapters one step can run (slots on the device). A waiting request whose adapter would be one "
                 "too many waits, and requests behind it may go first (as vLLM). Read only with `enable_lora`.",
    "max_lora_rank": "Largest adapter rank a slot holds (smaller ones are zero-padded); each slot costs "
                     "`2 * max_lora_rank` columns per adapted weight and step.",
    "max_cpu_loras": "Adapters kept read in host memory; others are read from disk again when a step needs them. "
                     "None: `max_loras`.",
    "enable_prompt_embeds": "Prompts may be input embeddings, `{\"prompt_embeds\": array [num_tokens, hidden_size]}` "
                            "(numpy, JAX or torch), in place of the embedding table's rows (the server's completions: "
                            "base64 of `torch.save` or `.npy` bytes). Each bucket is compiled twice (with and without "
                            "embedding inputs).",
    "logprobs_mode": "What returned logprobs are (vLLM's): `raw_logprobs`, the model's distribution (as transformers' "
                     "`log_softmax`); `processed_logprobs`, the distribution each token was chosen from (after "
                     "penalties, processors, min_tokens, and for sampled rows temperature and top-k / top-p / min-p); "
                     "`raw_logits` / `processed_logits`, the logits of either. Beam search needs `raw_logprobs`.",
    "enforce_eager": "vLLM's switch off CUDA graphs. JAX has no eager serving mode; the nearest thing: no warm-up, "
                     "each bucket is compiled when a step first needs it (a faster start, slower first steps).",
    "enable_chunked_prefill": "None / True: a long prompt is split to fit `max_num_batched_tokens` and mixed with "
                              "decodes (always on, as vLLM V1). False: a prompt is only scheduled whole; "
                              "`max_num_batched_tokens` must then be >= `max_model_len` (its default).",
    "max_logprobs": "The most `logprobs` / `prompt_logprobs` a request may ask for (at most 20 here); more is a "
                    "ValueError (a 400 in the server).",
    "quantization": "None only: weights load as float32 / bfloat16 / float16 (GGUF files are dequantised); any "
                    "other value is refused.",
    "skip_tokenizer_init": "Load no tokenizer: prompts must be token ids, outputs carry token ids and no text, and "
                           "stop strings, structured outputs and `bad_words` are refused.",
    "hf_overrides": "config.json fields replaced before the model is built, e.g. `{\"max_position_embeddings\": "
                    "4096}` (a Hugging Face checkpoint directory; part of the converted-weights cache key).",
    "load_format": "`auto` (safetensors, else torch .bin, or a GGUF file), `safetensors`, `pt`, `gguf` (refused "
                   "when the checkpoint holds another kind), or `dummy`: random weights of the config's shapes "
                   "(uniform in [-1e-3, 1e-3], never cached), for timing a model without its weights.",
    "revision": "The branch, tag or commit of a Hub repo in the local Hugging Face cache (nothing is downloaded); "
                "refused for local paths.",
    "tokenizer_revision": "`revision` for the repo named by `tokenizer`.",
    "tokenizer_mode": "`auto` (or vLLM's `hf`): the checkpoint's Hugging Face tokenizer; `slow`, `mistral` and "
                      "`custom` are refused.",
    "disable_log_stats": "No periodic stats line. Otherwise, while there is work, the engine logs prompt and "
                         "generation throughput, running and waiting requests, KV cache usage and the prefix-cache "
                         "hit rate every `JAXLLM_LOG_STATS_INTERVAL` (or vLLM's `VLLM_LOG_STATS_INTERVAL`) seconds, "
                         "10 by default. `LLM` sets it True unless given (as vLLM's); `jaxllm serve` logs.",
    "logits_processors": "Custom logits processors compiled into every step: `jaxllm.LogitsProcessor` subclasses, or "
                         "their names as `package.module:Class` (on the command line, several names after "
                         "`--logits-processors`). Requests pass their arguments in `SamplingParams.extra_args` "
                         "(the server's `vllm_xargs`); see `jaxllm/logits_processor.py`.",
}

SAMPLING_HELP = {
    "n": "Completions per prompt; they share the prompt's KV blocks (copy-on-write).",
    "best_of": "Not supported yet: must stay None.",
    "presence_penalty": "In [-2, 2]: subtracted from the logits of tokens already generated.",
    "frequency_penalty": "In [-2, 2]: subtracted once per earlier occurrence in the output.",
    "repetition_penalty": "> 0: divides positive (multiplies negative) logits of tokens in prompt or output.",
    "temperature": "0 is greedy; higher flattens the distribution.",
    "top_p": "In (0, 1]: keep the smallest set of tokens whose probability reaches top_p.",
    "top_k": "Keep the k most likely tokens; 0 or -1: off.",
    "min_p": "In [0, 1]: drop tokens less likely than min_p times the most likely one.",
    "seed": "Per-request seed: the same samples whatever else shares the batch.",
    "stop": "Stop strings (matched on text); not included in the output unless `include_stop_str_in_output`.",
    "stop_token_ids": "Token ids that end the request (the id is kept in `token_ids`).",
    "bad_words": "Words never generated (each word alone and with a leading space, as vLLM).",
    "include_stop_str_in_output": "Keep the matched stop string in the text.",
    "ignore_eos": "Keep generating after the end-of-sequence token.",
    "max_tokens": "Most tokens to generate; None: as many as `max_model_len` leaves after the prompt.",
    "min_tokens": "Hold back end-of-sequence and stop token ids until this many tokens are generated.",
    "logprobs": "Return the top-k log-probabilities of each generated token (0: only the sampled one's), <= 20.",
    "prompt_logprobs": "The same for each prompt token, <= 20.",
    "detokenize": "Produce text (needed for stop strings).",
    "skip_special_tokens": "Leave special tokens out of the text.",
    "spaces_between_special_tokens": "Put spaces between special tokens in the text.",
    "logit_bias": "Token id -> bias added to its logit, clamped to [-100, 100].",
    "allowed_token_ids": "Only these token ids can be generated (at most 300); None: any.",
    "truncate_prompt_tokens": "Keep only the prompt's last k tokens; -1: the last `max_model_len`.",
    "structured_outputs": "`StructuredOutputsParams(json=SCHEMA | regex=... | choice=[...] | grammar=EBNF | "
                          "json_object=True)`: the whole output matches it (`jaxllm.structured`; tokens outside the "
                          "pattern are masked on the device; a recursive grammar is unrolled to a bounded depth). "
                          "A dict of its fields also works.",
    "guided_decoding": "vLLM's older name for `structured_outputs` (`GuidedDecodingParams` is the same class).",
    "output_kind": "What `LLMEngine.step` returns: CUMULATIVE (all so far), DELTA (only the new part) or "
                   "FINAL_ONLY (nothing until the end).",
    "extra_args": "vLLM's custom arguments (the server's `vllm_xargs`), a dict with str keys: read by the engine's "
                  "custom logits processors (`logits_processors`), not by the built-in sampler.",
}


# CLI flags whose argparse help is missing or says only the default.
FLAG_HELP = {
    "--host": "Interface to bind; the default is loopback only.",
    "--port": "TCP port.",
    "--max-tokens": "Tokens to generate per prompt (greedy).",
    "--max-model-len": "Longest prompt + output in tokens.",
    "--dtype": "As the engine argument `dtype`.",
    "--log-level": "Logging level of the server process.",
    "--no-chat": "Send the raw prompt, without the chat template (default: chat template on).",
}


ENVIRONMENT = (
    ("JAXLLM_CACHE_DIR", "`~/.cache/jaxllm`", "Where the C++ CPU kernels' library is built and cached "
     "(`pallas_kernels/cpu_kernels.py`)."),
    ("CXX", "`g++`", "The C++ compiler that builds the CPU kernels."),
    ("JAXLLM_CPU_MATMUL_AMX", "`1`", "`0` keeps the `cpu` backend's float32 matmul kernel on AVX-512/AVX2 FMAs. "
     "Otherwise, on a CPU with AMX tiles (Sapphire Rapids and later Xeons), calls of 64 rows or more compute "
     "each float32 product as six bfloat16 tile products, as accurate as the FMA path and ~1.4x faster at "
     "128-337 rows (`pallas_kernels/cpu_matmul.cc`). Read when a step is traced; "
     "`pallas_kernels.cpu_matmul.amx_usable()` says whether this host can."),
    ("JAXLLM_ALLOW_RUNTIME_LORA_UPDATING", "unset", "`1` or `true` (or vLLM's "
     "`VLLM_ALLOW_RUNTIME_LORA_UPDATING`): `jaxllm serve` also has vLLM's `POST /v1/load_lora_adapter` "
     "(`{\"lora_name\", \"lora_path\"}`) and `POST /v1/unload_lora_adapter` (`{\"lora_name\"}`), which add and drop "
     "adapters served under their own model names."),
    ("JAXLLM_SERVER_DEV_MODE", "unset", "`1` or `true` (or vLLM's `VLLM_SERVER_DEV_MODE`): `jaxllm serve` also has "
     "vLLM's development routes `POST /sleep?level=`, `POST /wake_up?tags=`, `GET /is_sleeping` and "
     "`POST /reset_prefix_cache`."),
    ("JAXLLM_PROFILER_DIR", "unset", "Where `LLM.start_profile()` / `stop_profile()` (vLLM's names) write a JAX "
     "profiler trace (TensorBoard / XProf / Perfetto); when set (or vLLM's `VLLM_TORCH_PROFILER_DIR`), "
     "`jaxllm serve` also has `POST /start_profile` and `POST /stop_profile`."),
    ("JAXLLM_MALLOC_TUNING", "`1`", "`0` leaves glibc malloc as it is. Otherwise importing jaxllm on a CPU host "
     "sets one malloc arena, no mmap per block and no trimming, so XLA:CPU's per-step temporaries reuse "
     "pages (`jaxllm/host_malloc.py`); it takes effect only if jaxllm is imported before JAX runs anything."),
)


def _type_name(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _dataclass_rows(cls, helps: dict[str, str], flag: bool) -> list[str]:
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if not f.name.startswith("_")]
    missing = sorted({f.name for f in fields} - set(helps))
    stale = sorted(set(helps) - {f.name for f in fields})
    if missing or stale:
        raise SystemExit(f"{cls.__name__}: add help for {missing}, drop help for {stale} in {__file__}")
    rows = []
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        name = f"`{f.name}`" + (f" / `--{f.name.replace('_', '-')}`" if flag else "")
        shown = str(default) if isinstance(default, enum.Enum) else repr(default)  # RequestOutputKind.CUMULATIVE
        rows.append(f"| {name} | `{_cell(_type_name(hints[f.name]))}` | `{shown}` | {_cell(helps[f.name])} |")
    return rows


def _parser_rows(parser: argparse.ArgumentParser, group_title: str | None) -> list[str]:
    groups = parser._action_groups if group_title is None else [g for g in parser._action_groups
                                                                  if g.title == group_title]
    rows = []
    for group in groups:
        for action in group._group_actions:
            if isinstance(action, argparse._HelpAction):
                continue
            name = " / ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}` (positional)"
            no_default = action.default is None or isinstance(action, argparse._StoreFalseAction)
            default = "" if no_default else f"`{action.default!r}`"
            text = FLAG_HELP.get(action.option_strings[0], action.help) if action.option_strings else action.help
            if not text:
                raise SystemExit(f"flag {name} has no help: add it to FLAG_HELP in {__file__}")
            choices = f" One of {', '.join(map(str, action.choices))}." if action.choices else ""
            rows.append(f"| {name} | {default} | {_cell(text + choices)} |")
    return rows


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def render() -> str:
    from jaxllm.engine_args import EngineArgs
    from jaxllm.entrypoints.cli import build_parser
    from jaxllm.sampling_params import SamplingParams

    cli = build_parser()
    head = "| argument | type | default | meaning |\n|---|---|---|---|"
    flag_head = "| flag | default | meaning |\n|---|---|---|"
    parts = [
        "# Configuration reference",
        "",
        "<!-- Generated by docs/scripts/configuration.py from the code; do not edit by hand. -->",
        "Regenerate with `python docs/scripts/configuration.py`; `tests/test_docs.py` fails when this "
        "page is out of date.",
        "",
        "## Engine arguments",
        "",
        "`LLM(model, **kwargs)`, `EngineArgs(...)` and `jaxllm serve` take the same arguments (vLLM's names "
        "and defaults). On the command line each is a `--kebab-case` flag; booleans also have `--no-...`. "
        "A script of its own adds the same flags with `EngineArgs.add_cli_args(parser)`, reads them back "
        "with `EngineArgs.from_cli_args(args)`, and builds an engine with "
        "`LLMEngine.from_engine_args(engine_args)`, as in vLLM.",
        "",
        head, *_dataclass_rows(EngineArgs, ENGINE_HELP, flag=True),
        "",
        "## Sampling parameters",
        "",
        "`SamplingParams(...)`, per request. Fields vLLM has and jaxllm does not implement are accepted only "
        "at their neutral value; anything else raises `ValueError`.",
        "",
        head, *_dataclass_rows(SamplingParams, SAMPLING_HELP, flag=False),
        "",
        "## `jaxllm serve`: server flags",
        "",
        "Besides every engine argument above (`jaxllm serve --help` lists them all); the model may also be "
        "given positionally, `jaxllm serve MODEL`.",
        "",
        flag_head, *_parser_rows(_subparser(cli, "serve"), "server"),
        "",
        "## `jaxllm generate`",
        "",
        "Greedy answers from the command line; skips warm-up (a one-shot job).",
        "",
        flag_head, *_parser_rows(_subparser(cli, "generate"), "options"),
        "",
        "## Environment variables",
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
        *(f"| `{name}` | {default} | {_cell(meaning)} |" for name, default, meaning in ENVIRONMENT),
        "",
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is out of date: run python {Path(__file__).relative_to(Path.cwd())}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
