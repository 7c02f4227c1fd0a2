"""Flags of ``jaxllm serve``: every EngineArgs field (``EngineArgs.add_cli_args``), plus the server's own."""

from __future__ import annotations

import argparse
import json

from jaxllm.engine_args import EngineArgs
from jaxllm.entrypoints.openai.reasoning import REASONING_PARSERS
from jaxllm.entrypoints.openai.tool_calls import TOOL_CALL_PARSERS


def add_server_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* routes")
    group.add_argument("--served-model-name", default=None, help="the name clients use; default: the model")
    group.add_argument("--max-waiting-requests", type=int, default=None,
                       help="answer 503 while this many requests wait to be scheduled; default: unbounded")
    group.add_argument("--enable-prompt-tokens-details", action="store_true",
                       help="put prompt_tokens_details.cached_tokens (prompt tokens served from the prefix cache) "
                            "in every response's usage")
    group.add_argument("--return-tokens-as-token-ids", action="store_true",
                       help="logprobs show tokens as 'token_id:<id>' (requests may say otherwise with "
                            "return_tokens_as_token_ids)")
    group.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="let the model decide when to call tools (tool_choice 'auto'); needs --tool-call-parser")
    group.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                       help="how tool calls are read out of 'auto' replies (vLLM's parsers: hermes "
                            "<tool_call>{...}</tool_call>; llama3_json: the reply is {\"name\": .., \"parameters\": ..}, "
                            "several joined by ';'; mistral: [TOOL_CALLS] then a JSON list, or name[ARGS]{...} "
                            "per call; pythonic: [f(x=1), g()]; granite, jamba, internlm, phi4_mini_json, "
                            "deepseek_v3, qwen3_coder, xlam, minimax, kimi_k2, glm45: those models' formats; see tool_calls.py)")
    group.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                       help="put a reasoning model's <think> ... </think> part of chat replies in the message's "
                            "'reasoning' (and 'reasoning_content') instead of 'content'")
    group.add_argument("--lora-modules", nargs="+", type=lora_module, default=None, metavar="NAME=PATH",
                       help="LoRA adapters to serve under their own model names (needs --enable-lora): name=path, "
                            "or JSON {\"name\": ..., \"path\": ..., \"base_model_name\": ...}")
    group.add_argument("--graceful-shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish after SIGINT/SIGTERM")
    group.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def lora_module(text: str) -> tuple[str, str, str | None]:
    """One ``--lora-modules`` value (vLLM's forms): ``name=path`` or a JSON object with ``name``,
    ``path`` and optionally ``base_model_name``; (name, path, base model name)."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
        unknown = sorted(set(value) - {"name", "path", "base_model_name"}) if isinstance(value, dict) else None
        if unknown is None or unknown or not all(isinstance(value.get(k), str) and value[k] for k in ("name", "path")):
            raise argparse.ArgumentTypeError(f"{text!r}: needs string 'name' and 'path' (and optional "
                                             f"'base_model_name') only; unknown: {unknown}")
        return value["name"], value["path"], value.get("base_model_name")
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} must be name=path or a JSON object")
    return name, path, None


def build_serve_parser(parser: argparse.ArgumentParser | None = None, positional_model: bool = True):
    parser = parser or argparse.ArgumentParser(prog="jaxllm serve", description="OpenAI-compatible server")
    if positional_model:
        parser.add_argument("model_tag", nargs="?", default=None, help="the model (same as --model)")
    EngineArgs.add_cli_args(parser)
    add_server_args(parser)
    return parser


def resolve_model_tag(namespace: argparse.Namespace) -> argparse.Namespace:
    """``jaxllm serve MODEL`` and ``--model MODEL`` mean the same; giving both differently is an error."""
    tag = getattr(namespace, "model_tag", None)
    if tag is not None:
        if namespace.model is not None and namespace.model != tag:
            raise SystemExit(f"error: model given twice: {tag!r} and --model {namespace.model!r}")
        namespace.model = tag
    return namespace
