"""POST /v1/embeddings: each input -> one pooling request (``PoolingParams``) -> its vector."""

from __future__ import annotations

import asyncio
import base64

import numpy as np

from jaxllm.engine.async_engine import RequestStream
from jaxllm.entrypoints.openai.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, UsageInfo, random_id
from jaxllm.entrypoints.openai.serving_engine import APIError, OpenAIServing, logger
from jaxllm.outputs import PoolingRequestOutput
from jaxllm.pooling_params import PoolingParams


class OpenAIServingEmbedding(OpenAIServing):
    async def create_embedding(self, request: EmbeddingRequest) -> EmbeddingResponse:
        self.check_model(request.model)
        if request.priority != 0 and self.served.scheduling_policy != "priority":
            raise APIError(f"priority={request.priority} needs the server started with --scheduling-policy priority",
                           param="priority")
        ignored = request.ignored_fields()
        if ignored:
            logger.warning("request fields %s are not known to this server and were ignored", ignored)
        try:
            params = PoolingParams(dimensions=request.dimensions, normalize=request.normalize,
                                   truncate_prompt_tokens=request.truncate_prompt_tokens)
        except ValueError as exc:
            param = next((n for n in ("dimensions", "normalize", "truncate_prompt_tokens") if n in str(exc)), None)
            raise APIError(str(exc), param=param) from exc
        prompts = [self._checked(params.truncated_prompt(ids, self.served.max_model_len))
                   for ids in self._token_inputs(request)]
        request_id = random_id("embd")
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        streams = await self.start(ids, prompts, params, priority=request.priority)
        outputs = await _final_pooled(self.engine, streams)
        data = [EmbeddingData(index=i, embedding=_encoded(out.outputs.data, request.encoding_format))
                for i, out in enumerate(outputs)]
        num_tokens = sum(len(p) for p in prompts)
        return EmbeddingResponse(id=request_id, model=self.served.name, data=data, usage=UsageInfo.of(num_tokens, 0))

    def _token_inputs(self, request: EmbeddingRequest) -> list[list[int]]:
        value = request.input
        if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)):
            value = [value]
        if not value:
            raise APIError("input must not be empty", param="input")
        out = []
        for item in value:
            ids = list(self.tokenizer.encode(item, add_special_tokens=request.add_special_tokens)) \
                if isinstance(item, str) else list(item)
            if not ids:
                raise APIError("an input has no tokens", param="input")
            if min(ids) < 0 or max(ids) >= len(self.tokenizer):
                raise APIError(f"input token ids must lie in [0, {len(self.tokenizer)})", param="input")
            out.append(ids)
        return out

    def _checked(self, ids: list[int]) -> list[int]:
        # A pooling request runs as one of a single output token, which needs a position too.
        if len(ids) >= self.served.max_model_len:
            raise APIError(f"an input has {len(ids)} tokens; this server takes at most "
                           f"{self.served.max_model_len - 1} (max_model_len={self.served.max_model_len})",
                           param="input")
        return ids


def _encoded(vector, encoding_format: str) -> list[float] | str:
    array = np.asarray(vector, np.float32)
    if encoding_format == "base64":
        return base64.b64encode(array.astype("<f4").tobytes()).decode("ascii")
    return array.tolist()


async def _final_pooled(engine, streams: list[RequestStream]) -> list[PoolingRequestOutput]:
    async def final(stream: RequestStream) -> PoolingRequestOutput:
        last = None
        async for output in stream:
            last = output
        if last is None:
            raise RuntimeError(f"request {stream.request_id} ended without an output")
        return last

    tasks = [asyncio.ensure_future(final(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            if not stream.finished:
                engine.abort(stream.request_id)
