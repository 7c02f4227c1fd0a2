"""POST /v1/chat/completions: messages -> the tokenizer's chat template -> one engine request."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from jaxllm.entrypoints.openai.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatStreamChoice,
    DeltaMessage,
    UsageInfo,
    random_id,
)
from jaxllm.entrypoints.openai.serving_engine import SSE_DONE, APIError, Delta, OpenAIServing, merged_deltas, sse


def apply_chat_template(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True,
                        chat_template: str | None = None) -> list[int]:
    """Token ids of a conversation; any failure of the template is the client's error (400)."""
    try:
        ids = tokenizer.apply_chat_template(
            [m.template_dict() for m in messages], chat_template=chat_template,
            add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False,
        )
    except Exception as exc:  # noqa: BLE001 - jinja raises many types for a bad conversation or template
        raise APIError(f"could not apply the chat template: {exc}", param="messages") from exc
    return list(ids)


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, request: ChatCompletionRequest) -> ChatCompletionResponse | StreamingResponse:
        self.check_model(request.model)
        prompt_ids = apply_chat_template(self.tokenizer, request.messages, request.add_generation_prompt,
                                         request.chat_template)
        params = self.sampling_params(request, prompt_ids)
        request_id = random_id("chatcmpl")
        streams = await self.start([request_id], [prompt_ids], params)
        deltas = merged_deltas(self.engine, streams)
        if request.stream:
            body = self._stream(request, request_id, deltas, len(prompt_ids))
            return StreamingResponse(body, media_type="text/event-stream")
        return await self._collect(request_id, deltas, len(prompt_ids))

    async def _collect(self, request_id: str, deltas: AsyncIterator[Delta], num_prompt_tokens: int):
        text, last = "", None
        async for delta in deltas:
            text += delta.text
            last = delta
        choice = ChatChoice(index=0, message=DeltaMessage(role="assistant", content=text),
                            finish_reason=last.finish_reason, stop_reason=last.stop_reason)
        return ChatCompletionResponse(id=request_id, model=self.served.name, choices=[choice],
                                      usage=UsageInfo.of(num_prompt_tokens, last.num_tokens))

    async def _stream(self, request: ChatCompletionRequest, request_id: str, deltas: AsyncIterator[Delta],
                      num_prompt_tokens: int) -> AsyncIterator[str]:
        num_tokens = 0
        try:
            # OpenAI's first chunk carries the role alone.
            yield sse(self._chunk(request_id, ChatStreamChoice(index=0, delta=DeltaMessage(role="assistant",
                                                                                            content=""))))
            async for delta in deltas:
                num_tokens = delta.num_tokens
                if not delta.text and delta.finish_reason is None:
                    continue  # text held back (a possible stop string or an incomplete character)
                choice = ChatStreamChoice(index=0, delta=DeltaMessage(content=delta.text),
                                          finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)
                yield sse(self._chunk(request_id, choice))
            if request.include_usage:
                usage = UsageInfo.of(num_prompt_tokens, num_tokens)
                yield sse(ChatCompletionChunk(id=request_id, model=self.served.name, choices=[], usage=usage))
        except Exception as exc:  # noqa: BLE001 - headers are sent: the error can only go in the stream
            yield sse(APIError(str(exc), status=500, type="InternalServerError").response_body())
        yield SSE_DONE

    def _chunk(self, request_id: str, choice: ChatStreamChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, model=self.served.name, choices=[choice])
