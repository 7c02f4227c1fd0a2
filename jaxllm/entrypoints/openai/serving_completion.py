"""POST /v1/completions: one engine request per prompt, answered whole or as server-sent events."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from jaxllm.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    random_id,
)
from jaxllm.entrypoints.openai.serving_engine import SSE_DONE, APIError, Delta, OpenAIServing, merged_deltas, sse


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest) -> CompletionResponse | StreamingResponse:
        self.check_model(request.model)
        if request.suffix:
            raise APIError("suffix is not supported yet", param="suffix")
        prompts = self._prompt_ids(request.prompt)
        params = [self.sampling_params(request, ids) for ids in prompts]
        if len({p.max_tokens for p in params}) > 1:
            # One SamplingParams per request keeps the API simple; prompts of different lengths
            # only differ when max_tokens was left to its default, so fill it from the longest.
            params = [self.sampling_params(request, max(prompts, key=len))] * len(prompts)
        base_id = random_id("cmpl")
        streams = await self.start([f"{base_id}-{i}" for i in range(len(prompts))], prompts, params[0])
        echoes = [self._decode(ids) if request.echo else "" for ids in prompts]
        num_prompt_tokens = sum(len(ids) for ids in prompts)
        deltas = merged_deltas(self.engine, streams)
        if request.stream:
            body = self._stream(request, base_id, deltas, echoes, num_prompt_tokens)
            return StreamingResponse(body, media_type="text/event-stream")
        return await self._collect(base_id, deltas, echoes, num_prompt_tokens)

    def _prompt_ids(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError("prompt must not be empty", param="prompt")
        return [self._encode(p) for p in prompts]

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = list(self.tokenizer.encode(prompt))
        else:
            ids = list(prompt)
            vocab = len(self.tokenizer)
            if any(t < 0 or t >= vocab for t in ids):
                raise APIError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if not ids:
            raise APIError("prompt must not be empty", param="prompt")
        return ids

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    async def _collect(self, request_id: str, deltas: AsyncIterator[Delta], echoes: list[str],
                       num_prompt_tokens: int) -> CompletionResponse:
        texts = list(echoes)
        last: dict[int, Delta] = {}
        async for delta in deltas:
            texts[delta.index] += delta.text
            last[delta.index] = delta
        choices = [
            CompletionChoice(index=i, text=texts[i], finish_reason=last[i].finish_reason,
                             stop_reason=last[i].stop_reason)
            for i in range(len(texts))
        ]
        completion_tokens = sum(d.num_tokens for d in last.values())
        return CompletionResponse(id=request_id, model=self.served.name, choices=choices,
                                  usage=UsageInfo.of(num_prompt_tokens, completion_tokens))

    async def _stream(self, request: CompletionRequest, request_id: str, deltas: AsyncIterator[Delta],
                      echoes: list[str], num_prompt_tokens: int) -> AsyncIterator[str]:
        num_tokens: dict[int, int] = {}
        try:
            for index, echo in enumerate(echoes):
                if echo:
                    yield sse(self._chunk(request_id, CompletionChoice(index=index, text=echo)))
            async for delta in deltas:
                num_tokens[delta.index] = delta.num_tokens
                if not delta.text and delta.finish_reason is None:
                    continue  # text held back (a possible stop string or an incomplete character)
                choice = CompletionChoice(index=delta.index, text=delta.text, finish_reason=delta.finish_reason,
                                          stop_reason=delta.stop_reason)
                yield sse(self._chunk(request_id, choice))
            if request.include_usage:
                usage = UsageInfo.of(num_prompt_tokens, sum(num_tokens.values()))
                yield sse(CompletionResponse(id=request_id, model=self.served.name, choices=[], usage=usage))
        except Exception as exc:  # noqa: BLE001 - headers are sent: the error can only go in the stream
            yield sse(APIError(str(exc), status=500, type="InternalServerError").response_body())
        yield SSE_DONE

    def _chunk(self, request_id: str, choice: CompletionChoice) -> CompletionResponse:
        return CompletionResponse(id=request_id, model=self.served.name, choices=[choice])
