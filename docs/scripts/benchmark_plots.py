"""Plot the recorded benchmark results and write docs/benchmarks.md from them.

    python docs/scripts/benchmark_plots.py          # PNGs in docs/images/, then docs/benchmarks.md
    python docs/scripts/benchmark_plots.py --check  # exit 1 if benchmarks.md is out of date

Reads the JSON files under benchmarks/results/ (written by the scripts in benchmarks/); a
missing file is skipped, and its section says how to produce it. Nothing here is typed in by
hand: every number and picture comes from those files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
IMAGES = ROOT / "docs" / "images"
OUTPUT = ROOT / "docs" / "benchmarks.md"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _missing(name: str, command: str) -> list[str]:
    return [f"No `benchmarks/results/{name}` recorded yet. Produce it with `{command}`.", ""]


def _host(env: dict) -> str:
    """'2 cores', and the CPU where the result names it (sessions land on different machines)."""
    cpu = env.get("cpu")
    if not cpu:
        return f"{env['cpu_count']} cores"
    family, model, _ = cpu["family_model_stepping"]
    return f"{env['cpu_count']} cores; CPU: {cpu['model_name']}, family {family} model {model}, {cpu['mhz']:.0f} MHz"


# -- load time ---------------------------------------------------------------------------------

def plot_load_time(r: dict, ax) -> None:
    labels = ["GGUF convert", "first start:\nconvert + orbax save", "orbax reload"]
    medians = [r["gguf_convert_median_s"], r["first_start_convert_and_save_s"], r["orbax_reload_median_s"]]
    ax.bar(labels, medians, color=["#c44e52", "#dd8452", "#4c72b0"])
    for i, runs in ((0, r["gguf_convert_s"]), (2, r["orbax_reload_s"])):
        ax.plot([i] * len(runs), runs, "k.", label="each run" if i == 0 else None)
    ax.set_ylabel("seconds")
    ax.set_title(f"{r['model']} ({r['dtype']}), {r['machine']['cpu_count']} CPU cores")
    ax.legend()


def section_load_time(r: dict | None) -> list[str]:
    lines = ["## Model load time", ""]
    if r is None:
        return lines + _missing("load_time_cpu.json", "python benchmarks/load_time.py")
    return lines + [
        "Converting the embedded SmolLM2 GGUF into a float32 parameter pytree, against reloading the "
        "converted parameters with orbax (`LLM(..., download_dir=DIR)`), "
        f"median of {r['repeats']} runs (`benchmarks/results/load_time_cpu.json`).",
        "",
        "| | seconds |",
        "|---|---|",
        f"| GGUF convert (median) | {r['gguf_convert_median_s']:.1f} |",
        f"| first start: convert + orbax save | {r['first_start_convert_and_save_s']:.1f} |",
        f"| orbax reload (median) | {r['orbax_reload_median_s']:.1f} |",
        f"| speed-up of the reload | {r['speedup']:.1f}x |",
        "",
        f"Parameters: {r['param_bytes'] / 2**20:.0f} MiB; machine: {r['machine']['platform']}, "
        f"{r['machine']['cpu_count']} cores.",
        "",
        *_load_time_before(r),
        "![load time](images/bench_load_time.png)",
        "",
    ]


def _load_time_before(r: dict) -> list[str]:
    """The same command at an earlier commit, run just before on the same host, where recorded."""
    before = r.get("before")
    if before is None:
        return []
    return [
        f"The same command at `{before['commit']}` ({before['note']}): GGUF convert "
        f"{before['gguf_convert_median_s']:.1f} s (median), first start {before['first_start_convert_and_save_s']:.1f} s, "
        f"orbax reload {before['orbax_reload_median_s']:.1f} s. Since `{r['commit']}` the GGUF metadata is read by "
        "`converters/gguf_file.py` instead of gguf-py's reader, and converted layers are written straight "
        "into their stacks.",
        "",
    ]


# -- serving -----------------------------------------------------------------------------------

def plot_serving(r: dict, axes) -> None:
    levels = r["levels"]
    conc = [lv["concurrency"] for lv in levels]
    axes[0].plot(conc, [lv["output_throughput_tok_s"] for lv in levels], "o-")
    axes[0].set_ylabel("output tokens / s")
    axes[0].set_title("throughput")
    for metric, style in (("ttft", "o-"), ("tpot", "s-")):
        for pct, alpha in (("p50_ms", 1.0), ("p90_ms", 0.45)):
            axes[1].plot(conc, [lv[metric][pct] for lv in levels], style, alpha=alpha,
                         label=f"{metric.upper()} {pct[:3]}")
    axes[1].set_ylabel("milliseconds")
    axes[1].set_title("latency")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrent clients")
        ax.set_ylim(bottom=0)


def section_serving(name: str, r: dict) -> list[str]:
    stem = Path(name).stem
    lines = [
        f"### `{name}`",
        "",
        f"`benchmarks/serving.py` against `jaxllm serve` ({r.get('model') or 'the embedded SmolLM2-135M-Instruct'}), "
        f"{r['num_requests']} streamed `/v1/completions` requests of {r['max_tokens']} tokens per concurrency "
        f"level; host `{r.get('host')}` ({r.get('machine')}), recorded {r.get('time')}.",
        "",
        "| concurrency | completed | output tok/s | req/s | TTFT p50 / p90 (ms) | TPOT p50 / p90 (ms) | E2E p50 (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for lv in r["levels"]:
        lines.append(
            f"| {lv['concurrency']} | {lv['completed']}/{lv['completed'] + lv['failed']} | "
            f"{lv['output_throughput_tok_s']:.1f} | {lv['request_throughput_rps']:.2f} | "
            f"{lv['ttft']['p50_ms']:.0f} / {lv['ttft']['p90_ms']:.0f} | "
            f"{lv['tpot']['p50_ms']:.0f} / {lv['tpot']['p90_ms']:.0f} | {lv['e2e']['p50_ms'] / 1e3:.1f} |"
        )
    return lines + ["", f"![serving](images/bench_{stem}.png)", ""]


# -- memory sharing ----------------------------------------------------------------------------

def plot_memory_sharing(r: dict, ax) -> None:
    rows = r["rows"]
    labels = [f"{'n' if row['kind'] == 'parallel_sampling' else 'beam'}={row['width']}" for row in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [row["mean_blocks_without_sharing"] for row in rows], 0.4, label="without sharing",
           color="#c44e52")
    ax.bar([i + 0.2 for i in x], [row["mean_blocks_with_sharing"] for row in rows], 0.4, label="with sharing",
           color="#4c72b0")
    for i, row in enumerate(rows):
        ax.text(i, row["mean_blocks_without_sharing"], f"-{row['memory_saving_pct']:.0f}%", ha="center",
                va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("KV blocks held (mean over steps)")
    ax.set_title("parallel sampling (n) and beam search: blocks with and without sharing")
    ax.legend()


def section_memory_sharing(r: dict | None) -> list[str]:
    lines = ["## Memory saved by sharing KV blocks", ""]
    if r is None:
        return lines + _missing("memory_sharing_cpu.json", "python benchmarks/memory_sharing.py")
    lines += [
        f"After the PagedAttention paper's section 6.3: {r['num_prompts']} prompts, {r['max_tokens']} tokens, "
        f"block size {r['block_size']}, prefix caching off so that only forks share. Device `{r['device']}`, "
        f"commit `{r.get('git_commit', '')[:10]}`, {r['timestamp']}.",
        "",
        "| decoding | width | mean blocks (shared) | mean blocks (no sharing) | saving |",
        "|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['kind']} | {row['width']} | {row['mean_blocks_with_sharing']:.1f} | "
                     f"{row['mean_blocks_without_sharing']:.1f} | {row['memory_saving_pct']:.1f}% |")
    return lines + ["", "![memory sharing](images/bench_memory_sharing.png)", ""]


# -- offline throughput ------------------------------------------------------------------------

def plot_throughput(r: dict, ax) -> None:
    labels, values = ["jaxllm"], [r["jaxllm"]["output_tokens_per_s"]]
    for bs, row in r.get("transformers", {}).get("per_batch_size", {}).items():
        labels.append(f"transformers\nbatch {bs}")
        values.append(row["output_tokens_per_s"])
    ax.bar(labels, values, color=["#4c72b0"] + ["#999999"] * (len(values) - 1))
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"{r['workload']['num_prompts']} prompts, greedy, {r['environment']['jax_backend']}")


def section_throughput(name: str, r: dict) -> list[str]:
    w, ours, env = r["workload"], r["jaxllm"], r["environment"]
    dtype = ours["engine_args"]["dtype"]
    lines = [
        f"### `{name}`: {dtype}", "",
        f"`{env['command']}` at commit `{(env.get('git_commit') or '')[:10]}`: {w['num_prompts']} prompts of "
        f"{w['prompt_len_range'][0]}-{w['prompt_len_range'][1]} tokens, {w['output_len_range'][0]}-"
        f"{w['output_len_range'][1]} output tokens each, greedy, through `LLM.generate` and through "
        f"transformers' `generate` in the same run, both in {dtype} ({env['platform']}, {_host(env)}).",
        "",
        "| system | output tok/s | notes |",
        "|---|---|---|",
    ]
    for backend, run in r.get("jaxllm_by_backend", {None: ours}).items():
        attention = run["engine_args"].get("attention_fn")
        label = "jaxllm" if backend is None else f"jaxllm, `attention_backend={backend!r}` (`{attention}`)"
        lines.append(f"| {label} | {run['output_tokens_per_s']:.1f} | {run['num_steps']} steps, KV waste "
                     f"{run['kv_waste']:.1%}, {run['compiles_after_warmup']} programs compiled at start-up, "
                     f"{run['new_compiles_during_run']} during the run |")
    if "transformers" in r:
        hf = r["transformers"]
        for bs, row in hf["per_batch_size"].items():
            lines.append(f"| transformers, static batch {bs} | {row['output_tokens_per_s']:.1f} | |")
        lines += ["", f"Speed-up over transformers' best batch size: {r['speedup_vs_transformers']:.2f}x"
                  + (" (the first jaxllm row)." if "jaxllm_by_backend" in r else ".")]
        for backend, run in list(r.get("jaxllm_by_backend", {}).items())[1:]:
            ratio = run["output_tokens_per_s"] / hf["output_tokens_per_s"]
            same = r["greedy_agreement_between_backends"][backend]["identical_outputs"]
            lines.append(f"With `{backend}` attention: {ratio:.2f}x; its greedy outputs equal the first row's "
                         f"for {same} of {w['num_prompts']} requests.")
    if name == "throughput_cpu.json":
        lines += ["", "![throughput](images/bench_throughput.png)"]
    return lines + [""]


def section_sampler(name: str, r: dict) -> list[str]:
    env = r["environment"]
    lines = [
        f"### `{name}`", "",
        f"`{env['command']}` at commit `{(env.get('git_commit') or '')[:10]}` ({env['jax_backend']}, "
        f"{env['cpu_count']} cores): one jitted `sample` over {r['rows']} rows x {r['vocab']} float32 logits, "
        f"every row alike; minimum of {r['reps']} runs.",
        "",
        "| | ms |",
        "|---|---|",
    ]
    lines += [f"| `sample`, {case} | {min(times):.2f} |" for case, times in r["sample_ms"].items()]
    lines += [f"| draw only: {case} | {min(times):.2f} |" for case, times in r["draw_ms"].items()]
    return lines + [""]


def section_dtype_step(name: str, r: dict) -> list[str]:
    env = r["environment"]
    dtypes = list(r["step_ms"])
    lines = [
        f"### `{name}`", "",
        f"`{env['command']}` at commit `{(env.get('git_commit') or '')[:10]}` ({env['cpu_count']} cores): one "
        f"compiled greedy engine step of SmolLM2 per dtype, minimum of {r['reps']} runs, dtypes alternating. "
        "KV pool dtype: " + ", ".join(f"{d} -> {p}" for d, p in r["kv_pool_dtype"].items()) + ".",
    ]
    if "note" in r:
        lines += ["", r["note"] + "."]
    lines += ["", "| batch | " + " | ".join(f"{d} (ms)" for d in dtypes) + " |", "|---" * (len(dtypes) + 1) + "|"]
    for case in r["cases"]:
        lines.append(f"| {case} | " + " | ".join(f"{min(r['step_ms'][d][case]):.1f}" for d in dtypes) + " |")
    return lines + [""]


def _roof_source(roofs: dict) -> str:
    """Which implementation and shape set the compute roof (results before per-implementation rates: none)."""
    best = [(rate, impl, shape) for shape, rates in roofs["matmul_flops_per_s"].items() if isinstance(rates, dict)
            for impl, rate in rates.items()]
    if not best:
        return ""
    _, impl, shape = max(best)
    return f" ({impl}, {shape})"


def section_roofline(r: dict | None) -> list[str]:
    if r is None:
        return _missing("roofline_cpu.json", "python benchmarks/roofline.py")
    env, w, roofs, floor = r["environment"], r["work"], r["roofs"], r["floor"]
    lines = [
        "### `roofline_cpu.json`", "",
        f"`{env['command']}` at commit `{(env.get('git_commit') or '')[:10]}` ({_host(env)}): the "
        f"throughput workload needs at least {w['dense_flops'] / 1e12:.2f} TFLOP of matmuls, "
        f"{w['attention_flops'] / 1e12:.2f} TFLOP of attention and {w['bytes'] / 1e9:.1f} GB of reads "
        f"(weights once per step over {w['min_steps']} steps, K/V once per decode token). At the best "
        f"float32 matmul rate measured in the run, {roofs['compute_roof_flops_per_s'] / 1e9:.0f} GFLOP/s"
        f"{_roof_source(roofs)}, and "
        f"{roofs['memory_roof_bytes_per_s'] / 1e9:.1f} GB/s of reads, no engine can finish it in less than "
        f"**{floor['floor_s']:.2f} s** (compute {floor['compute_s']:.2f} s, memory {floor['memory_s']:.2f} s).",
        "",
        "| | seconds | |",
        "|---|---|---|",
        f"| floor | {floor['floor_s']:.2f} | |",
        f"| jaxllm | {r['jaxllm']['elapsed_s']:.2f} | {r['jaxllm']['elapsed_s'] / floor['floor_s']:.2f}x the floor |",
    ]
    if "ratios" in r:
        hf, ratios = r["transformers"], r["ratios"]
        row = hf["per_batch_size"][str(hf["best_batch_size"])]
        needed = ratios["floor_fraction_needed_for_5x"]
        verdict = (f"so 5x needs {needed:.0%} of this machine's roofline." if needed <= 1 else
                   f"so 5x is out of reach on this machine: it would take {needed:.0%} of its roofline.")
        lines += [
            f"| transformers, static batch {hf['best_batch_size']} | {row['elapsed_s']:.2f} | |",
            "",
            f"Measured ratio {ratios['measured_jaxllm_vs_transformers']:.2f}x; an engine at the floor would reach "
            f"{ratios['ceiling_at_the_floor']:.2f}x, {verdict}",
        ]
    return lines + [""]


def section_step_breakdown(r: dict | None, name: str = "step_profile_cpu.json") -> list[str]:
    if r is None or "breakdown" not in r:
        return _missing("step_profile_cpu.json", "python benchmarks/step_profile.py")
    env, rows = r["environment"], r["breakdown"]
    categories = list(dict.fromkeys(k for row in rows.values() for k in row["share"]))
    lines = [
        f"### `{name}`", "",
        f"`{env['command']}` at commit `{(env.get('git_commit') or '')[:10]}` ({env['cpu_count']} cores): the "
        f"throughput workload ({r.get('dtype', 'float32')})'s last step of each (tokens x blocks) bucket with "
        f"`{r.get('breakdown_backend', 'xla')}` attention, replayed under the profiler; each instant of the step's wall time is shared among the ops "
        "running on the threads then.",
        "",
        "| share of wall time | " + " | ".join(f"{b} ({row['tokens']} tok, {row['step_ms']:.0f} ms)"
                                          for b, row in rows.items()) + " |",
        "|---" * (len(rows) + 1) + "|",
    ]
    for c in categories:
        lines.append(f"| {c} | " + " | ".join(f"{row['share'].get(c, 0.0):.0%}" for row in rows.values()) + " |")
    if "steps" in r:
        times = {b: run["elapsed_s"] for b, run in r["steps"].items()}
        named = ", ".join(f"{t:.1f} s with the `{b}` attention backend" for b, t in times.items() if b != "noop")
        lines += ["", f"The same run times the whole workload with synchronous steps: {named}, "
                  f"{times['noop']:.1f} s with a no-op backend that skips attention (returns q)."]
    return lines + [""]


def section_cpu_kernels(name: str, r: dict) -> list[str]:
    env, att = r["environment"], r["attention"]
    impls = list(r["mlp"][0]["ms"])
    packed = [i for i in impls if i.startswith("jaxllm packed")]  # the FMA path, and AMX's where the CPU has it
    lines = [
        f"### `{name}`", "",
        f"`{env['command']}` at commit `{(env.get('git_commit') or '')[:10]}` ({_host(env)}): SmolLM2's 30 MLP "
        "layers (212 MB of float32 weights, read from memory as in a decode step) in one jitted loop, minimum "
        f"of {r['reps']} runs."
        + (" The `bf16` columns run the same layers in bfloat16 (106 MB of weights; the packed kernel on its "
           "AVX512-BF16 pair path)." if any(i.endswith("bf16") for i in impls) else ""),
        "",
        "| rows | " + " | ".join(f"{i} (ms)" for i in impls) + " | packed: weights GB/s | "
        + " | ".join(f"{i}: GFLOP/s" for i in packed) + " |",
        "|---" * (len(impls) + 2 + len(packed)) + "|",
    ]
    for row in r["mlp"]:
        lines.append(f"| {row['rows']} | " + " | ".join(f"{row['ms'][i]:.2f}" for i in impls)
                     + f" | {row['weight_gb_per_s']['jaxllm packed']:.1f} | "
                     + " | ".join(f"{row['gflop_per_s'][i]:.0f}" for i in packed) + " |")
    lines += ["", f"Decode attention, one kernel call: {att['num_seqs']} sequences, {att['cached_tokens']} cached "
              f"tokens, {att['kv_bytes_per_call'] / 1e6:.1f} MB of K/V per call.", "",
              "| pool | ms per call | K/V GB/s |", "|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {att['gb_per_s'][k]:.1f} |" for k, v in att["ms_per_call"].items()]
    cases = r.get("attention_cases")
    if cases:
        lines += ["", "The same kernel per case and pool dtype: decode (one token per sequence, as above) and "
                  "a prefill step (prompt chunks of 67-100 tokens, 337 in all, after 10-210 cached ones).", "",
                  "| case | pool | tokens | ms per call, from memory | ms per call, cached |", "|---|---|---|---|---|"]
        lines += [f"| {c['case']} | {c['pool_dtype']} | {c['tokens']} | "
                  f"{c['ms_per_call']['layers in turn (from memory)']:.3f} | {c['ms_per_call']['one layer (cached)']:.3f} |"
                  for c in cases]
    return lines + [""]


def section_async_scheduling(name: str, r: dict) -> list[str]:
    env, m, w = r["environment"], r["model"], r["workload"]
    steps = r["steps"]["async"]
    lines = [
        f"### `{name}`", "",
        f"`{r['command']}` at commit `{env['git_commit'][:10]}` on {env['device']} ({env['cpu_count']} cores): "
        f"random-weight Llama of shape `{m['shape']}` ({m['num_layers']} layers, width {m['hidden_size']}, "
        f"{m['dtype']}), {w['num_requests']} requests, {w['output_tokens']} output tokens, greedy. Runs "
        f"alternate between the modes; {steps['num_overlapped_steps']} of {steps['num_steps']} steps were "
        f"dispatched while the previous one was still running; same tokens in both modes: {r['same_tokens']}.",
        "",
        "| async_scheduling | elapsed per run (s) | output tok/s (median) |",
        "|---|---|---|",
    ]
    for mode, key in (("True", "async"), ("False", "sync")):
        runs = ", ".join(f"{t:.3f}" for t in r["elapsed_s"][key])
        lines.append(f"| {mode} | {runs} | {r['output_tokens_per_s_median'][key]:.1f} |")
    return lines + ["", f"Median speed-up: {r['speedup_median']:.2f}x.", ""]


def section_structured_outputs(name: str, r: dict) -> list[str]:
    env, w = r["environment"], r["workload"]
    lines = [
        f"### `{name}`", "",
        f"`{r['command']}` at commit `{env['git_commit'][:10]}` on {env['device']} ({env['cpu_count']} cores): "
        f"{r['model']}, {w['num_requests']} chat requests asking for JSON, {w['max_tokens']} output tokens each "
        "(greedy, ignore_eos), free and constrained, runs alternating. Constrained steps run synchronously "
        "(each mask depends on the token just sampled).",
        "",
        "| arm | elapsed per run (s) | output tok/s (median) | time vs free | complete valid JSON | "
        "overlapped steps |",
        "|---|---|---|---|---|---|",
    ]
    for arm, times in r["elapsed_s"].items():
        runs = ", ".join(f"{t:.2f}" for t in times)
        steps = r["steps"][arm]
        valid = "" if arm == "free" else f"{r['valid_outputs'][arm]}/{w['num_requests']}"
        lines.append(f"| {arm} | {runs} | {r['output_tokens_per_s_median'][arm]:.1f} | "
                     f"{r['time_vs_free_median'][arm]:.3f}x | {valid} | {steps['num_overlapped_steps']} of "
                     f"{steps['num_steps']} |")
    cold = r["cold_costs"]
    lines += ["", f"One-off costs, cold: the vocabulary's byte table {cold['vocabulary_s']:.2f} s;", ""]
    lines += [f"- {arm}: a {c['pattern_chars']}-character pattern, {c['dfa_states']} DFA states, compiled in "
              f"{c['compile_s']:.2f} s; the outputs visit {c['visited_states']} states, whose masks take "
              f"{c['masks_s']:.2f} s in all." for arm, c in cold.items() if isinstance(c, dict)]
    lines += ["", "Valid JSON counts only outputs that completed within max_tokens; every constrained output "
              "is a prefix of a valid text.", ""]
    return lines


def section_speculative(name: str, r: dict) -> list[str]:
    env, w, summary = r["environment"], r["workload"], r["summary"]
    arms = list(next(iter(r["elapsed_s"].values())))
    configs = "; ".join(f"{arm}: `{json.dumps(c)}`" for arm, c in r["speculative_config"].items())
    lines = [
        f"### `{name}`", "",
        f"`{r['command']}` at commit `{env['git_commit'][:10]}` on {env['device']} ({_host(env)}): "
        f"{r['model']}, greedy, up to {w['max_tokens']} tokens per request. Workloads of "
        f"{w['requests_per_case']} chats each: `copy` asks to repeat a passage (prose or code), `free` for a "
        "short story; run one request at a time (`/1`) or all at once (`/8`). Outputs are the same token for "
        f"token in every arm (the script checks). {configs}.",
        "",
        "| case | " + " | ".join(f"{a} output tok/s (median)" for a in arms) + " | "
        + " | ".join(f"{a} vs plain" for a in arms if a != "plain") + " | acceptance | tokens per verifying step "
        "| steps |",
        "|---|" + "---|" * (2 * len(arms) + 2),
    ]
    for case, c in summary.items():
        rates = " | ".join(f"{c['output_tokens_per_s_median'][a]:.1f}" for a in arms)
        speeds = " | ".join(f"{c['speed_vs_plain_median'][a]:.2f}x" for a in arms if a != "plain")
        steps = ", ".join(f"{a} {n}" for a, n in c["steps"].items())
        lines.append(f"| {case} | {rates} | {speeds} | {c['acceptance_rate']:.1%} | "
                     f"{c['mean_acceptance_length']:.2f} | {steps} |")
    lines += ["", "Acceptance: accepted proposed tokens / proposed tokens (the `ngram` arm). The plain engine "
              "overlaps each step with the host's work for the next; verifying steps run one at a time.", ""]
    return lines


def section_lora(name: str, r: dict) -> list[str]:
    env, w, summary, a = r["environment"], r["workload"], r["summary"], r["adapters"]
    lines = [
        f"### `{name}`", "",
        f"`{r['command']}` at commit `{env['git_commit'][:10]}` on {env['device']} ({_host(env)}): "
        f"{r['model']}, greedy, {w['num_prompts']} prompts ({w['prompt_tokens']} prompt and {w['output_tokens']} "
        f"output tokens, the throughput workload's kind). `plain`: no LoRA; `lora_engine_base`: an engine with "
        f"{r['engine_args']['max_loras']} slots of rank {r['engine_args']['max_lora_rank']}, every request on the "
        f"base model (same tokens as `plain`, checked); `lora_engine_adapters`: the same engine, requests "
        f"{a['requests']} ({a['count']} random adapters of rank {a['rank']}, {a['targets']}).",
        "",
        "| arm | output tok/s (median) | vs plain |",
        "|---|---|---|",
    ]
    for arm, rate in summary["output_tokens_per_s_median"].items():
        speed = summary["speed_vs_plain_median"].get(arm)
        lines.append(f"| {arm} | {rate:.1f} | {'' if speed is None else f'{speed:.3f}x'} |")
    lines += ["", f"Compiles during the timed runs: {summary['new_compiles_during_timed_runs']}.", ""]
    return lines


# -- attention kernels -------------------------------------------------------------------------

def plot_attention(r: dict, ax) -> None:
    timed = [row for row in r["results"] if "ms" in row]
    workloads = list(dict.fromkeys(row["workload"] for row in timed))
    backends = list(dict.fromkeys(row["backend"] for row in timed))
    width = 0.8 / max(1, len(backends))
    for j, backend in enumerate(backends):
        ms = {row["workload"]: row["ms"] for row in timed if row["backend"] == backend}
        ax.bar([i + j * width for i in range(len(workloads))], [ms.get(w, 0) for w in workloads], width,
               label=backend)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(workloads))], workloads, rotation=30, ha="right",
                  fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median)")
    ax.set_title(f"paged attention, {r['device']}, {r['dtype']}")
    ax.legend(fontsize=8)


def section_attention(name: str, r: dict) -> list[str]:
    stem = Path(name).stem
    note = " Interpreted Pallas kernels off GPU: these numbers only show every path runs." if r["platform"] != "gpu" \
        else ""
    lines = [f"### `{name}`", "", f"`benchmarks/attention.py` on {r['device']} ({r['platform']}), {r['dtype']}, "
             f"jax {r['jax']}.{note}", "", "| workload | backend | ms | HBM GB/s | TFLOP/s |", "|---|---|---|---|---|"]
    for row in r["results"]:
        if "ms" in row:
            lines.append(f"| {row['workload']} | {row['backend']} | {row['ms']:.3f} | {row['hbm_gb_s']:.1f} | "
                         f"{row['tflop_s']:.2f} |")
        else:
            lines.append(f"| {row['workload']} | {row['backend']} | skipped: {row['skipped'][:60]} | | |")
    return lines + ["", f"![attention](images/bench_{stem}.png)", ""]


# -- assembly ----------------------------------------------------------------------------------

def _globbed(pattern: str) -> list[tuple[str, dict]]:
    return [(p.name, json.loads(p.read_text())) for p in sorted(RESULTS.glob(pattern))]


def render() -> str:
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by docs/scripts/benchmark_plots.py from benchmarks/results/*.json; do not edit. -->",
        "Every number and picture on this page comes from a JSON file under `benchmarks/results/`, written "
        "by the script in `benchmarks/` named with it. Regenerate the page and its pictures with "
        "`python docs/scripts/benchmark_plots.py`.",
        "",
        "All results so far were recorded on a 2-core CPU virtual machine under load from other jobs: "
        "they show that the paths work and how the engine scales with batching, not what jaxllm does on "
        "a GPU. GPU numbers (H100/H200) are pending.",
        "",
        "Comparisons of two commits (`ab_*.json`, not drawn here) run each commit from its own checkout, "
        "alternating in ABBA order: this machine drifts by several percent from one run to the next. A "
        "`git worktree` sharing the virtual environment must be run with `PYTHONPATH` set to its own "
        "directory: `python benchmarks/X.py` otherwise imports the main checkout's `jaxllm` and "
        "`pallas_kernels` through the editable install, and both arms measure the same code.",
        "",
    ]
    lines += section_load_time(_load("load_time_cpu.json"))
    lines += ["## Offline throughput", ""]
    lines += [x for name, r in _globbed("throughput_*.json") for x in section_throughput(name, r)] or \
        _missing("throughput_cpu.json", "python benchmarks/throughput.py")
    lines += ["## How far from this machine's limits", ""]
    lines += section_roofline(_load("roofline_cpu.json"))
    lines += [x for name, r in _globbed("step_profile_*.json") for x in section_step_breakdown(r, name)] or \
        section_step_breakdown(None)
    lines += ["## The CPU kernels alone", ""]
    lines += [x for name, r in _globbed("cpu_kernels_*.json") for x in section_cpu_kernels(name, r)] or \
        _missing("cpu_kernels_cpu.json", "python benchmarks/cpu_kernels.py")
    lines += ["## One step per dtype", ""]
    lines += [x for name, r in _globbed("dtype_step_*.json") for x in section_dtype_step(name, r)] or \
        _missing("dtype_step_cpu.json", "python benchmarks/dtype_step.py")
    lines += ["## Sampler", ""]
    lines += [x for name, r in _globbed("sampler_*.json") for x in section_sampler(name, r)] or \
        _missing("sampler_cpu.json", "python benchmarks/sampler.py")
    lines += ["## Async scheduling", ""]
    lines += [x for name, r in _globbed("async_scheduling_*.json") for x in section_async_scheduling(name, r)] or \
        _missing("async_scheduling_cpu_small.json", "python benchmarks/async_scheduling.py")
    lines += ["## Structured outputs", ""]
    lines += [x for name, r in _globbed("structured_outputs_*.json") for x in section_structured_outputs(name, r)] or \
        _missing("structured_outputs_cpu.json", "python benchmarks/structured_outputs.py")
    lines += ["## Speculative decoding", ""]
    lines += [x for name, r in _globbed("speculative_*.json") for x in section_speculative(name, r)] or \
        _missing("speculative_cpu.json", "python benchmarks/speculative.py")
    lines += ["## LoRA adapters", ""]
    lines += [x for name, r in _globbed("lora_*.json") for x in section_lora(name, r)] or \
        _missing("lora_cpu.json", "python benchmarks/lora.py")
    lines += ["## Online serving", ""]
    serving = _globbed("serving_*.json")
    lines += [x for name, r in serving for x in section_serving(name, r)] or _missing(
        "serving_cpu.json", "python benchmarks/serving.py --url http://127.0.0.1:8000")
    lines += section_memory_sharing(_load("memory_sharing_cpu.json"))
    lines += ["## Attention backends", ""]
    attention = _globbed("attention_*.json")
    lines += [x for name, r in attention for x in section_attention(name, r)] or _missing(
        "attention_gpu.json", "python benchmarks/attention.py")
    return "\n".join(lines)


def _figure(path: Path, draw: Callable, ncols: int = 1, size=(6.5, 3.6)) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=size)
    draw(axes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def plot_all(images: Path = IMAGES) -> list[Path]:
    written = []

    def emit(name: str, draw: Callable, **kwargs) -> None:
        _figure(images / name, draw, **kwargs)
        written.append(images / name)

    if (r := _load("load_time_cpu.json")) is not None:
        emit("bench_load_time.png", lambda ax: plot_load_time(r, ax))
    if (r := _load("throughput_cpu.json")) is not None:
        emit("bench_throughput.png", lambda ax: plot_throughput(r, ax))
    for name, r in _globbed("serving_*.json"):
        emit(f"bench_{Path(name).stem}.png", lambda axes, r=r: plot_serving(r, axes), ncols=2, size=(10, 3.6))
    if (r := _load("memory_sharing_cpu.json")) is not None:
        emit("bench_memory_sharing.png", lambda ax: plot_memory_sharing(r, ax), size=(8, 3.8))
    for name, r in _globbed("attention_*.json"):
        emit(f"bench_{Path(name).stem}.png", lambda ax, r=r: plot_attention(r, ax), size=(10, 4.5))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run python docs/scripts/benchmark_plots.py", file=sys.stderr)
            return 1
        return 0
    plot_all()
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
