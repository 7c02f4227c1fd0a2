"""Draw docs/images/architecture.png: the data flow of one engine step, host and device sides.

    python docs/scripts/architecture_diagram.py [--output docs/images/architecture.png]

Boxes and arrows in matplotlib, laid out by hand on a 16 x 10 grid; the names in the boxes are
the code's (jaxllm/engine, jaxllm/runner, jaxllm/models), so the picture can be checked against it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

OUTPUT = Path(__file__).resolve().parents[1] / "images" / "architecture.png"
HOST, DEVICE, MESSAGE, ENTRY = "#dbe9f6", "#fde2c8", "#e8e8e8", "#d9f0d3"


def box(ax, x, y, w, h, title, body="", color=HOST, title_size=10, title_on_top=False):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.15",
                                facecolor=color, edgecolor="#444444", linewidth=1.0))
    if body or title_on_top:
        ax.text(x + w / 2, y + h - 0.12, title, ha="center", va="top", fontsize=title_size, fontweight="bold")
        ax.text(x + w / 2, y + h - 0.45, body, ha="center", va="top", fontsize=8, linespacing=1.35)
    else:
        ax.text(x + w / 2, y + h / 2, title, ha="center", va="center", fontsize=title_size, fontweight="bold")


def arrow(ax, start, end, label="", style="-|>", color="#333333", rad=0.0, label_at=0.5, offset=(0.1, 0.0)):
    ax.annotate("", xy=end, xytext=start,
                arrowprops=dict(arrowstyle=style, color=color, lw=1.4, shrinkA=2, shrinkB=2,
                                connectionstyle=f"arc3,rad={rad}"))
    if label:
        x = start[0] + (end[0] - start[0]) * label_at + offset[0]
        y = start[1] + (end[1] - start[1]) * label_at + offset[1]
        ax.text(x, y, label, fontsize=8, style="italic", va="center",
                bbox=dict(facecolor="white", edgecolor="none", pad=1.0))


def draw(output: Path) -> None:
    fig, ax = plt.subplots(figsize=(16, 11))
    ax.set_xlim(0, 16)
    ax.set_ylim(0, 11)
    ax.axis("off")

    # Host / device divide.
    ax.plot([9.0, 9.0], [0.1, 8.8], color="#888888", linestyle="--", linewidth=1)
    ax.text(4.6, 8.55, "host: Python + numpy, no jax", ha="center", fontsize=11, color="#1f4e79")
    ax.text(12.6, 8.55, "device: JAX under jit", ha="center", fontsize=11, color="#8a4b08")

    # Entry points.
    box(ax, 0.3, 9.3, 4.2, 1.2, "LLM.generate / chat / beam_search",
        "offline batches; returns RequestOutputs in input order", ENTRY)
    box(ax, 5.0, 9.3, 6.0, 1.2, "jaxllm serve: FastAPI, OpenAI API",
        "/v1/completions, /v1/chat/completions (SSE streaming), /metrics\n"
        "AsyncLLMEngine runs step() in a loop, fans outputs out to request streams", ENTRY)

    box(ax, 1.2, 6.9, 6.4, 1.3, "LLMEngine.add_request(prompt, SamplingParams)",
        "tokenize, validate (a bad request raises ValueError and never enters the queue)\n"
        "-> Request(WAITING) in the scheduler's queue")
    box(ax, 0.6, 4.0, 7.6, 2.4, "Scheduler.schedule()",
        "token budget per step (max_num_batched_tokens, max_num_seqs): running requests first,\n"
        "then waiting ones; a whole prompt, a chunk of one, or one decode token each\n"
        "preempts the newest request when blocks run out (recompute, or swap to host)")
    box(ax, 1.3, 4.15, 6.2, 1.05, "KVCacheManager",
        "block tables, free queue (LRU), ref counts, prefix-cache hashes (parent + tokens),\n"
        "copy-on-write of shared partial blocks", "#c6dbef", title_size=9)

    box(ax, 9.6, 6.2, 6.0, 1.0, "SchedulerOutput", "per sequence: new token ids, first position, block ids,\n"
        "sampling options; preempted, finished, block copies, swaps", MESSAGE)

    # Device side.
    box(ax, 9.6, 1.0, 6.0, 4.75, "ModelRunner.dispatch() / fetch()", "", DEVICE, title_on_top=True)
    box(ax, 9.9, 4.1, 5.4, 1.05, "build the batch (numpy)",
        "token_ids[T], positions[T], slot_mapping[T], block_tables[S, B],\n"
        "cu_q_lens, kv_lens, sampling arrays; T, B padded to warm-up buckets", "#fbd0a5", title_size=9)
    box(ax, 9.9, 1.15, 5.4, 2.7, "jitted step(params, kv_pool, batch, prev_tokens)",
        "decode inputs still on the device: from prev_tokens\n"
        "embed -> lax.scan over layers:\n"
        "  QKV, RoPE, write_kv at slot_mapping (in place)\n"
        "  attention backend over the paged pool:\n"
        "  cpu | xla | pallas | triton | pallas_mgpu | registered\n"
        "  MLP\n"
        "logits of each sequence's last token ->\n"
        "sampler: temperature, top-k/p, min-p, penalties, PRNG keys", "#fbd0a5", title_size=9)
    box(ax, 12.9, 0.05, 2.7, 0.75, "KV pool (donated)",
        "k, v: [L, blocks, block_size, K, H]", "#f4b183", title_size=8)

    box(ax, 0.6, 2.2, 7.6, 1.25, "Scheduler.advance() / resolve(RunnerOutput)",
        "placeholder for each token in flight; then the sampled tokens: eos / stop ids /\n"
        "max_tokens / max_model_len, prefix-cache registration, free finished requests")
    box(ax, 0.6, 0.35, 3.6, 1.3, "IncrementalDetokenizer", "text deltas, stop strings\n(a stop string finishes "
        "the request)")
    box(ax, 4.7, 0.35, 3.5, 1.3, "RequestOutput", "CompletionOutput(s): text, token_ids,\nlogprobs, finish_reason",
        MESSAGE)

    # Flow.
    arrow(ax, (2.4, 9.3), (2.4, 8.2))
    arrow(ax, (7.0, 9.3), (7.0, 8.2))
    arrow(ax, (4.4, 6.9), (4.4, 6.4))
    arrow(ax, (8.2, 5.8), (9.6, 6.6), "schedule", offset=(-0.5, 0.25))
    arrow(ax, (12.6, 6.2), (12.6, 5.7), "only this crosses to the device", offset=(0.15, 0.0))
    arrow(ax, (12.6, 4.1), (12.6, 3.85))
    arrow(ax, (12.9, 0.8), (12.9, 1.2), style="<|-|>")
    arrow(ax, (9.6, 2.8), (8.2, 2.8), "RunnerOutput:\nsampled ids\n(+ logprobs)", offset=(-0.6, 0.55))
    arrow(ax, (2.4, 2.2), (2.4, 1.65))
    arrow(ax, (4.2, 1.0), (4.7, 1.0))
    arrow(ax, (8.2, 1.0), (8.95, 1.0))
    ax.text(8.6, 0.45, "to the caller:\nreturned list,\nor SSE chunks", fontsize=7.5, ha="center", style="italic",
            bbox=dict(facecolor="white", edgecolor="none", pad=1.0))
    arrow(ax, (0.6, 2.8), (0.6, 5.2), "next\nstep()", rad=-0.6, label_at=0.5, offset=(-0.55, 0.0), color="#1f4e79")

    ax.text(0.3, 10.75, "jaxllm: one engine step = schedule -> dispatch -> resolve the step before -> advance", fontsize=13, fontweight="bold")
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=90, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {output}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    draw(parser.parse_args(argv).output)


if __name__ == "__main__":
    main()
