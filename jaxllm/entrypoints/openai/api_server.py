"""The OpenAI-compatible HTTP server (vLLM's ``vllm serve``): FastAPI app and its entry point.

    python -m jaxllm.entrypoints.openai.api_server --model PATH --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import secrets
import sys

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import jaxllm
from jaxllm.engine.async_engine import AsyncLLMEngine, EngineDeadError, EngineQueueFullError
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.engine_args import EngineArgs
from jaxllm.entrypoints.openai import cli_args
from jaxllm.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from jaxllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ClassificationRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    PoolingRequest,
    RerankRequest,
    ScoreRequest,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
)
from jaxllm.entrypoints.openai.serving_chat import OpenAIServingChat, apply_chat_template
from jaxllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from jaxllm.entrypoints.openai.serving_embedding import OpenAIServingEmbedding
from jaxllm.entrypoints.openai.serving_engine import APIError, LoRAModules, ServedModel, error_body
from jaxllm.entrypoints.openai.serving_score import OpenAIServingScores
from jaxllm.lora.adapter import load_adapter
from jaxllm.profiler import PROFILER, profiler_dir_from_env

logger = logging.getLogger("jaxllm")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def _error(message: str, status: int, type: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, type, param), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":
            return f"the body is not valid JSON: {err.get('ctx', {}).get('error', 'decode error')}", None
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = param or next((x for x in loc if not x.isdigit()), None)
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", param


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return JSONResponse(exc.response_body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error(message, 400, "BadRequestError", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        kind = "NotFoundError" if exc.status_code == 404 else "HTTPError"
        return _error(str(exc.detail), exc.status_code, kind)

    @app.exception_handler(ValueError)
    async def refused(_, exc: ValueError):  # the engine refused the request (e.g. too long)
        # The engine's messages start with the field they name ("stop=[...]: ..."): its param.
        named = re.match(r"([a-z_]+)=", str(exc))
        return _error(str(exc), 400, "BadRequestError", named.group(1) if named else None)

    @app.exception_handler(EngineQueueFullError)
    async def overloaded(_, exc: EngineQueueFullError):
        return _error(str(exc), 503, "ServiceUnavailableError")

    @app.exception_handler(EngineDeadError)
    async def dead(_, exc: EngineDeadError):
        return _error(str(exc), 503, "ServiceUnavailableError")

    @app.exception_handler(Exception)
    async def internal(_, exc: Exception):
        logger.exception("unhandled error")
        return _error(f"internal error: {exc!r}", 500, "InternalServerError")


def _add_auth(app: FastAPI, api_key: str | None) -> None:
    if api_key is None:
        return
    expected = f"Bearer {api_key}".encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "").encode()
            if not secrets.compare_digest(given, expected):
                return _error("invalid or missing API key", 401, "AuthenticationError")
        return await call_next(request)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, coro):
    """Run a handler, cancelling it (and so aborting its engine requests) if the client leaves first."""
    handler = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    done, _ = await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if handler in done:
        watcher.cancel()
        return handler.result()
    handler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await handler
    return Response(status_code=499)  # nobody is listening any more


def _add_openai_routes(app: FastAPI, engine: AsyncLLMEngine, served: ServedModel) -> None:
    completions = OpenAIServingCompletion(engine, served)
    chat = OpenAIServingChat(engine, served)
    embeddings = OpenAIServingEmbedding(engine, served)
    scores = OpenAIServingScores(engine, served)

    @app.get("/v1/models")
    async def models() -> ModelList:
        base = ModelCard(id=served.name, root=served.root, max_model_len=served.max_model_len)
        adapters = [ModelCard(id=lora.lora_name, root=lora.lora_path, parent=served.name,
                              max_model_len=served.max_model_len) for lora in served.loras]
        return ModelList(data=[base, *adapters])

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw: Request):
        return await cancel_on_disconnect(raw, completions.create_completion(request))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw: Request):
        return await cancel_on_disconnect(raw, chat.create_chat_completion(request))

    @app.post("/v1/embeddings")
    async def create_embedding(request: EmbeddingRequest, raw: Request):
        return await cancel_on_disconnect(raw, embeddings.create_embedding(request))

    @app.post("/pooling")
    async def create_pooling(request: PoolingRequest, raw: Request):
        return await cancel_on_disconnect(raw, embeddings.create_pooling(request))

    async def classify(request: ClassificationRequest, raw: Request):
        return await cancel_on_disconnect(raw, scores.create_classify(request))

    async def score(request: ScoreRequest, raw: Request):
        return await cancel_on_disconnect(raw, scores.create_score(request))

    async def rerank(request: RerankRequest, raw: Request):
        return await cancel_on_disconnect(raw, scores.create_rerank(request))

    # vLLM's paths: /classify, /score and /v1/score, /rerank and its Jina (v1) and Cohere (v2) ones.
    app.add_api_route("/classify", classify, methods=["POST"])
    for path in ("/score", "/v1/score"):
        app.add_api_route(path, score, methods=["POST"])
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.add_api_route(path, rerank, methods=["POST"])


DEV_MODE = ("JAXLLM_SERVER_DEV_MODE", "VLLM_SERVER_DEV_MODE")


def _dev_mode() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true") for name in DEV_MODE)


RUNTIME_LORA_UPDATING = ("JAXLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")


def _runtime_lora_updating() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true") for name in RUNTIME_LORA_UPDATING)


def _add_lora_routes(app: FastAPI, engine: AsyncLLMEngine, served: ServedModel) -> None:
    """vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, served only when
    ``JAXLLM_ALLOW_RUNTIME_LORA_UPDATING`` (or vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) is true."""
    lora_config = engine.engine.lora_config

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: LoadLoRAAdapterRequest):
        if lora_config is None:
            raise APIError("LoRA is not enabled: start the server with --enable-lora", param="lora_name")
        if served.loras.get(request.lora_name) is not None or request.lora_name == served.name:
            raise APIError(f"The lora adapter '{request.lora_name}' has already been loaded.", param="lora_name")
        lora = served.loras.add(request.lora_name, request.lora_path)
        try:  # read it once now (off the event loop), so that a bad adapter is a 400 here
            await asyncio.to_thread(load_adapter, lora, engine.engine.runner.cfg, lora_config.max_lora_rank)
        except ValueError as exc:
            served.loras.remove(request.lora_name)
            raise APIError(str(exc), param="lora_path") from exc
        return Response(f"Success: LoRA adapter '{request.lora_name}' added successfully.", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: UnloadLoRAAdapterRequest):
        # Requests already running with it finish with it; new ones naming it get a 404.
        if served.loras.remove(request.lora_name) is None:
            raise APIError(f"The lora adapter '{request.lora_name}' cannot be found.", status=404,
                           type="NotFoundError", param="lora_name")
        return Response(f"Success: LoRA adapter '{request.lora_name}' removed successfully.", media_type="text/plain")


def _add_utility_routes(app: FastAPI, engine: AsyncLLMEngine, served: ServedModel, metrics: ServerMetrics) -> None:
    tokenizer = engine.tokenizer

    @app.get("/health")
    async def health():
        if not engine.is_running:
            return _error("the engine is not running", 503, "ServiceUnavailableError")
        return Response(status_code=200)

    # vLLM's /ping (what SageMaker probes): /health under another name, for GET and POST.
    app.add_api_route("/ping", health, methods=["GET", "POST"])

    if _dev_mode():  # as vLLM's VLLM_SERVER_DEV_MODE: routes that change the whole engine
        @app.post("/sleep")
        async def sleep(level: int = 1):
            await engine.call(lambda e: e.sleep(level))
            return Response(status_code=200)

        @app.post("/wake_up")
        async def wake_up(tags: list[str] | None = Query(default=None)):  # noqa: B008 - FastAPI's idiom
            await engine.call(lambda e: e.wake_up(tags))
            return Response(status_code=200)

        @app.get("/is_sleeping")
        async def is_sleeping():
            return {"is_sleeping": await engine.call(lambda e: e.is_sleeping())}

        @app.post("/reset_prefix_cache")
        async def reset_prefix_cache():
            await engine.call(lambda e: e.reset_prefix_cache())
            return Response(status_code=200)

    if profiler_dir_from_env() is not None:  # as vLLM: only with the profiler's directory set
        @app.post("/start_profile")
        async def start_profile():
            PROFILER.start()
            return Response(status_code=200)

        @app.post("/stop_profile")
        async def stop_profile():
            await asyncio.to_thread(PROFILER.stop)  # waits for the device and writes the trace
            return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": jaxllm.__version__}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        if (request.prompt is None) == (request.messages is None):
            raise APIError("give exactly one of prompt and messages", param="prompt")
        if tokenizer is None:
            raise APIError("this server has no tokenizer (skip_tokenizer_init)", param="prompt")
        if request.messages is not None:
            ids = apply_chat_template(tokenizer, request.messages, request.add_generation_prompt,
                                      request.chat_template, None, request.continue_final_message,
                                      request.chat_template_kwargs)
        else:
            ids = list(tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens))
        return TokenizeResponse(count=len(ids), max_model_len=served.max_model_len, tokens=ids)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        if tokenizer is None:
            raise APIError("this server has no tokenizer (skip_tokenizer_init)", param="tokens")
        vocab = len(tokenizer)
        if any(t < 0 or t >= vocab for t in request.tokens):
            raise APIError(f"token ids must be in [0, {vocab})", param="tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(request.tokens))


def build_app(engine: AsyncLLMEngine, served: ServedModel, metrics: ServerMetrics,
              api_key: str | None = None) -> FastAPI:
    """The app over an engine; the engine thread starts with the app and stops when it shuts down."""

    @contextlib.asynccontextmanager
    async def lifespan(_):
        if not engine.is_running:
            engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="jaxllm", lifespan=lifespan)
    _add_error_handlers(app)
    _add_auth(app, api_key)
    _add_openai_routes(app, engine, served)
    if _runtime_lora_updating():
        _add_lora_routes(app, engine, served)
    _add_utility_routes(app, engine, served, metrics)
    return app


def build_async_engine(args: argparse.Namespace) -> tuple[AsyncLLMEngine, ServedModel, ServerMetrics]:
    """Load and compile the model (slow), and wrap it for serving."""
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise SystemExit("error: --enable-auto-tool-choice requires --tool-call-parser")
    engine_args = EngineArgs.from_cli_args(args)
    if args.lora_modules and not engine_args.enable_lora:
        raise SystemExit("error: --lora-modules requires --enable-lora")
    try:
        loras = LoRAModules(tuple(args.lora_modules or ()))
    except ValueError as exc:
        raise SystemExit(f"error: --lora-modules: {exc}") from None
    engine = LLMEngine.from_engine_args(engine_args)
    for lora in loras:  # each is read now: a bad adapter stops the server before it serves
        try:
            engine.add_lora(lora)
        except ValueError as exc:
            raise SystemExit(f"error: --lora-modules {lora.lora_name}: {exc}") from None
    name = args.served_model_name or engine_args.model or DEFAULT_MODEL_NAME
    config = engine.scheduler.config
    served = ServedModel(name=name, root=engine_args.model or DEFAULT_MODEL_NAME,
                         max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
                         scheduling_policy=config.scheduling_policy,
                         enable_prompt_tokens_details=args.enable_prompt_tokens_details,
                         return_tokens_as_token_ids=args.return_tokens_as_token_ids,
                         tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
                         reasoning_parser=args.reasoning_parser,
                         sampling_defaults=engine_args.sampling_defaults(), loras=loras)
    # The collector reads the stats the engine thread publishes, never the engine itself.
    holder: dict[str, AsyncLLMEngine] = {}
    metrics = ServerMetrics(name, lambda: holder["engine"].stats)
    holder["engine"] = AsyncLLMEngine(engine, args.max_waiting_requests, observer=metrics)
    return holder["engine"], served, metrics


def run_server(args: argparse.Namespace) -> int:
    """Build the engine, then serve until SIGINT/SIGTERM (uvicorn lets in-flight requests finish)."""
    engine, served, metrics = build_async_engine(args)
    app = build_app(engine, served, metrics, args.api_key)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.graceful_shutdown_timeout)
    logger.info("serving %s on http://%s:%d", served.name, args.host, args.port)
    uvicorn.Server(config).run()
    engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = cli_args.build_serve_parser(argparse.ArgumentParser(prog="jaxllm.entrypoints.openai.api_server"),
                                         positional_model=False)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return run_server(args)


if __name__ == "__main__":
    sys.exit(main())
