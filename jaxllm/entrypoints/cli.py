"""Command line: ``jaxllm generate`` and ``jaxllm serve``."""

from __future__ import annotations

import argparse
import logging
import sys

DEFAULT_PROMPT = "What is the capital of France?"


def _generate(args: argparse.Namespace) -> int:
    from jaxllm import LLM, SamplingParams

    lora, lora_args = None, {}
    if args.lora is not None:  # one adapter for every prompt
        from jaxllm import LoRARequest
        from jaxllm.lora.adapter import adapter_rank

        lora = LoRARequest("cli", 1, args.lora)
        lora_args = dict(enable_lora=True, max_lora_rank=max(16, adapter_rank(args.lora)))
    # A one-shot job: compile only the shapes it meets instead of warming up every bucket.
    llm = LLM(args.model, max_model_len=args.max_model_len, dtype=args.dtype, warmup=False, **lora_args)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    prompts = args.prompt or [DEFAULT_PROMPT]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    if args.chat:
        outputs = llm.chat(conversations, params, use_tqdm=False, lora_request=lora)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
    for prompt, out in zip(prompts, outputs, strict=True):
        print(f"### {prompt}\n{out.outputs[0].text.strip()}\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from jaxllm.entrypoints.openai import api_server, cli_args

    logging.getLogger().setLevel(args.log_level.upper())
    return api_server.run_server(cli_args.resolve_model_tag(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxllm", description="vLLM's engine in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="greedy generation for one or more prompts")
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    gen.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--max-model-len", type=int, default=1024)
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--no-chat", dest="chat", action="store_false", help="send the raw prompt, no chat template")
    gen.add_argument("--lora", default=None, metavar="PATH", help="a PEFT LoRA adapter (directory or cached repo id) "
                     "to generate with")
    gen.set_defaults(func=_generate)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (every engine argument is a flag)")
    _add_serve_args(serve)
    serve.set_defaults(func=_serve)
    return parser


def _add_serve_args(parser: argparse.ArgumentParser) -> None:
    # Imported here so that `jaxllm generate` does not pay for FastAPI's import.
    from jaxllm.entrypoints.openai.cli_args import build_serve_parser

    build_serve_parser(parser)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
