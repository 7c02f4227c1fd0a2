"""What completions and chat share: model names, errors, prompt limits, streams of deltas."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import BaseModel

from jaxllm.engine.async_engine import AsyncLLMEngine, RequestStream
from jaxllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse, SamplingRequest
from jaxllm.outputs import RequestOutput


class APIError(Exception):
    """An error the client should see in OpenAI's error shape with this HTTP status."""

    def __init__(self, message: str, status: int = 400, type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param = message, status, type, param

    def response_body(self) -> dict:
        return error_body(self.message, self.status, self.type, self.param)


def error_body(message: str, status: int, type: str, param: str | None = None) -> dict:
    info = ErrorInfo(message=message, type=type, param=param, code=status)
    return ErrorResponse(error=info).model_dump()


@dataclass(frozen=True)
class ServedModel:
    name: str  # what clients put in "model"
    root: str  # the checkpoint it was loaded from
    max_model_len: int


@dataclass
class Delta:
    """The new text and token ids of one output since the previous one of the same request."""

    index: int
    text: str
    num_tokens: int  # cumulative generated tokens
    finish_reason: str | None
    stop_reason: int | str | None


class DeltaTracker:
    """Turns one request's cumulative outputs into deltas."""

    def __init__(self, index: int):
        self.index = index
        self._text_len = 0

    def delta(self, output: RequestOutput) -> Delta:
        completion = output.outputs[0]
        text = completion.text[self._text_len:]
        self._text_len = len(completion.text)
        return Delta(self.index, text, len(completion.token_ids), completion.finish_reason, completion.stop_reason)


class OpenAIServing:
    """Base of the completion and chat handlers."""

    def __init__(self, engine: AsyncLLMEngine, served: ServedModel):
        self.engine = engine
        self.served = served
        self.tokenizer = engine.tokenizer

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served.name:
            raise APIError(f"The model `{model}` does not exist; this server serves `{self.served.name}`",
                           status=400, type="NotFoundError", param="model")

    def sampling_params(self, request: SamplingRequest, prompt_ids: list[int]):
        if len(prompt_ids) >= self.served.max_model_len:
            raise APIError(f"the prompt has {len(prompt_ids)} tokens; max_model_len={self.served.max_model_len} "
                           "leaves no room for a completion", param="prompt")
        vocab = len(self.tokenizer)
        if any(not 0 <= t < vocab for t in request.stop_token_ids or ()):
            raise APIError(f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        try:
            params = request.to_sampling_params(self.served.max_model_len - len(prompt_ids))
        except ValueError as exc:
            raise APIError(str(exc)) from exc
        # The engine may honour these before the responses can carry them: refuse rather than drop.
        if params.n != 1:
            raise APIError(f"n={params.n} is not supported yet by the server; only n=1", param="n")
        if params.logprobs is not None:
            raise APIError(f"logprobs={params.logprobs} is not supported yet by the server", param="logprobs")
        return params

    async def start(self, request_ids: list[str], prompts: list[list[int]], params) -> list[RequestStream]:
        """Add all requests or none: a refused one aborts those already added."""
        streams: list[RequestStream] = []
        try:
            for request_id, prompt in zip(request_ids, prompts, strict=True):
                streams.append(await self.engine.add_request(request_id, prompt, params))
        except BaseException:
            for stream in streams:
                self.engine.abort(stream.request_id)
            raise
        return streams


async def merged_deltas(engine: AsyncLLMEngine, streams: list[RequestStream]) -> AsyncIterator[Delta]:
    """Deltas of several requests as they come; leaving early aborts every unfinished one."""
    if len(streams) == 1:  # the common case needs no tasks
        tracker = DeltaTracker(0)
        try:
            async for output in streams[0]:
                yield tracker.delta(output)
        finally:
            _abort_unfinished(engine, streams)
        return
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(i, s, queue)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                remaining -= 1
                continue
            yield item
    finally:
        for task in tasks:
            task.cancel()
        _abort_unfinished(engine, streams)


async def _pump(index: int, stream: RequestStream, queue: asyncio.Queue) -> None:
    tracker = DeltaTracker(index)
    try:
        async for output in stream:
            queue.put_nowait(tracker.delta(output))
    except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
        queue.put_nowait(exc)
        return
    queue.put_nowait(None)


def _abort_unfinished(engine: AsyncLLMEngine, streams: list[RequestStream]) -> None:
    for stream in streams:
        if not stream.finished:
            engine.abort(stream.request_id)


def sse(payload: BaseModel | dict | str) -> str:
    if isinstance(payload, BaseModel):
        payload = payload.model_dump_json(exclude_unset=False)
    elif isinstance(payload, dict):
        payload = json.dumps(payload)
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"
