"""POST /v1/embeddings: each input -> one pooling request (``PoolingParams``) -> its vector; and
vLLM's POST /pooling, the same for any pooling task (per-token outputs included)."""

from __future__ import annotations

import base64

import numpy as np

from jaxllm.engine.async_engine import RequestStream
from jaxllm.entrypoints.openai.protocol import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    PoolingInputRequest,
    PoolingRequest,
    PoolingResponse,
    PoolingResponseData,
    UsageInfo,
    random_id,
)
from jaxllm.entrypoints.openai.serving_chat import apply_chat_template
from jaxllm.entrypoints.openai.serving_engine import APIError, OpenAIServing, final_outputs, logger
from jaxllm.lora.request import LoRARequest
from jaxllm.outputs import PoolingRequestOutput
from jaxllm.pooling_params import PoolingParams


class OpenAIServingEmbedding(OpenAIServing):
    async def create_embedding(self, request: EmbeddingRequest) -> EmbeddingResponse:
        lora = self._accepted(request)
        try:
            params = PoolingParams(dimensions=request.dimensions, normalize=request.normalize,
                                   truncate_prompt_tokens=request.truncate_prompt_tokens, task="embed")
        except ValueError as exc:
            param = next((n for n in ("dimensions", "normalize", "truncate_prompt_tokens") if n in str(exc)), None)
            raise APIError(str(exc), param=param) from exc
        request_id, prompts, outputs = await self._pooled(request, params, "embd", lora)
        data = [EmbeddingData(index=i, embedding=_encoded(out.outputs.data, request.encoding_format))
                for i, out in enumerate(outputs)]
        return EmbeddingResponse(id=request_id, model=self.model_name(request.model), data=data,
                                 usage=UsageInfo.of(sum(map(len, prompts)), 0))

    async def create_pooling(self, request: PoolingRequest) -> PoolingResponse:
        lora = self._accepted(request)
        engine = self.engine.engine
        task = request.task or next(t for t in engine.supported_tasks if t.startswith("token_"))
        if task not in engine.supported_tasks:
            raise APIError(f"task={task!r} is not supported by this model, which serves "
                           f"{[t for t in engine.supported_tasks if t != 'generate']}", param="task")
        fields = ("dimensions", "normalize", "truncate_prompt_tokens", "use_activation", "activation")
        try:
            params = PoolingParams(**{name: getattr(request, name) for name in fields}, task=task)
        except ValueError as exc:
            raise APIError(str(exc), param=next((n for n in fields if str(exc).startswith(f"{n}=")), None)) from exc
        request_id, prompts, outputs = await self._pooled(request, params, "pool", lora)
        data = [PoolingResponseData(index=i, data=_encoded(out.outputs.data, request.encoding_format))
                for i, out in enumerate(outputs)]
        return PoolingResponse(id=request_id, model=self.model_name(request.model), data=data,
                               usage=UsageInfo.of(sum(map(len, prompts)), 0))

    def _accepted(self, request) -> LoRARequest | None:
        """The adapter the request's model names, once its model, priority and fields are checked."""
        lora = self.check_model(request.model)
        self.check_priority(request.priority)
        ignored = request.ignored_fields()
        if ignored:
            logger.warning("request fields %s are not known to this server and were ignored", ignored)
        return lora

    async def _pooled(self, request: PoolingInputRequest, params: PoolingParams, prefix: str,
                      lora: LoRARequest | None) -> tuple[str, list[list[int]], list[PoolingRequestOutput]]:
        """(response id, the prompts' token ids, their outputs) of one pooling request per input."""
        try:
            self.engine.engine.check_pooling_params(params)
        except ValueError as exc:
            raise APIError(str(exc), param=next((n for n in ("dimensions", "task") if str(exc).startswith(f"{n}=")),
                                                None)) from exc
        prompts = [self._checked(params.truncated_prompt(ids, self.served.max_model_len))
                   for ids in self._token_lists(request)]
        request_id = random_id(prefix)
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        streams = await self.start(ids, prompts, params, priority=request.priority, lora_request=lora)
        return request_id, prompts, await final_outputs(self.engine, streams, _last_output)

    def _token_lists(self, request: PoolingInputRequest) -> list[list[int]]:
        """The request's inputs as token ids: ``input``, or the conversation in ``messages``."""
        if (request.input is None) == (request.messages is None):
            raise APIError("give either input or messages (a conversation), not both and not neither", param="input")
        if request.messages is None:
            return self.prompt_token_lists(request.input, request.add_special_tokens, "input")
        if not request.messages:
            raise APIError("messages must not be empty", param="messages")
        return [apply_chat_template(self.tokenizer, request.messages, request.add_generation_prompt,
                                    request.chat_template, continue_final_message=request.continue_final_message,
                                    chat_template_kwargs=request.chat_template_kwargs)]

    def _checked(self, ids: list[int], param: str = "input") -> list[int]:
        if len(ids) > self.served.max_model_len:
            raise APIError(f"an input ({param}) has {len(ids)} tokens; this server takes at most "
                           f"max_model_len={self.served.max_model_len}", param=param)
        return ids


def _encoded(vector, encoding_format: str) -> list | str:
    """A vector (or one per token) as JSON floats, or base64 of its little-endian float32 values."""
    array = np.asarray(vector, np.float32)
    if encoding_format == "base64":
        return base64.b64encode(array.astype("<f4").tobytes()).decode("ascii")
    return array.tolist()


async def _last_output(stream: RequestStream) -> PoolingRequestOutput:
    last = None
    async for output in stream:  # a pooling request has one output, when it finishes
        last = output
    if last is None:
        raise RuntimeError(f"request {stream.request_id} ended without an output")
    return last
