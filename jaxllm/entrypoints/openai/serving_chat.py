"""POST /v1/chat/completions: messages -> the tokenizer's chat template -> one engine request (n choices)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from jaxllm.entrypoints.chat_utils import ChatTemplateError, render_chat
from jaxllm.entrypoints.openai.beam_search import as_deltas, beam_search_output
from jaxllm.entrypoints.openai.logprobs import chat_logprobs
from jaxllm.entrypoints.openai.protocol import (
    ChatChoice,
    ChatChoiceLogProbs,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatStreamChoice,
    DeltaMessage,
    UsageInfo,
    random_id,
)
from jaxllm.entrypoints.openai.reasoning import ReasoningSplitter
from jaxllm.entrypoints.openai.serving_engine import (
    SSE_DONE,
    APIError,
    Delta,
    OpenAIServing,
    final_outputs,
    merged_deltas,
    prompt_logprobs_body,
    sse,
)
from jaxllm.entrypoints.openai.tool_calls import TOOL_CALL_PARSER_TABLE, StreamedReply, ToolChoice, parse_reply
from jaxllm.outputs import RequestOutput


def _finish_reason(choice: ToolChoice, finish_reason: str | None, called: bool) -> str | None:
    """vLLM's: "tool_calls" when auto's parser found calls, or a required reply ended normally."""
    if called and (choice.mode == "auto" or (choice.mode == "required" and finish_reason == "stop")):
        return "tool_calls"
    return finish_reason


def _named_piece(reply: StreamedReply, text: str) -> dict:
    """A streamed piece of a named call's arguments; the first one carries its id and name."""
    if not reply.named_sent:
        reply.named_sent = True
        return {"index": 0, "id": reply.call_id, "type": "function",
                "function": {"name": reply.choice.name, "arguments": text}}
    return {"index": 0, "function": {"arguments": text}}


def apply_chat_template(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True,
                        chat_template: str | None = None, tools: list[dict] | None = None,
                        continue_final_message: bool = False,
                        chat_template_kwargs: dict | None = None) -> list[int]:
    """Token ids of a conversation (``render_chat``); any failure is the client's error (400)."""
    if tokenizer is None:
        raise APIError("this server has no tokenizer (skip_tokenizer_init), and messages need the model's chat "
                       "template: send token ids to /v1/completions", param="messages")
    try:
        return render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message, chat_template=chat_template,
                           tools=tools, chat_template_kwargs=chat_template_kwargs)
    except ChatTemplateError as exc:
        raise APIError(str(exc), param="messages") from exc
    except ValueError as exc:
        param = next((name for name in ("chat_template_kwargs", "continue_final_message") if name in str(exc)),
                     "messages")
        raise APIError(str(exc), param=param) from exc


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, request: ChatCompletionRequest) -> ChatCompletionResponse | StreamingResponse:
        lora = self.check_model(request.model)
        await self.check_supported(request)
        choice = request.resolved_tool_choice()
        if choice.mode == "auto" and self.served.tool_call_parser is None:
            raise APIError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                           param="tool_choice")
        prompt_ids = apply_chat_template(self.tokenizer, request.messages, request.add_generation_prompt,
                                         request.chat_template, request.tools, request.continue_final_message,
                                         request.chat_template_kwargs)
        prompt_ids = self.truncated(request, prompt_ids)
        params = self.sampling_params(request, prompt_ids)
        parser = TOOL_CALL_PARSER_TABLE.get(self.served.tool_call_parser)
        if choice.mode == "auto" and parser is not None and parser.keeps_special_tokens:
            params = dataclasses.replace(params, skip_special_tokens=False)  # its markers are special tokens
        request_id = random_id("chatcmpl")
        if request.use_beam_search:
            output = await beam_search_output(self.engine, request_id, prompt_ids, self.beam_search_params(request, params),
                                              lora)
            if request.stream:
                return StreamingResponse(self._stream(request, request_id, as_deltas([output], params.n), params.n,
                                                      prompt_ids, choice), media_type="text/event-stream")
            return self._response(request, request_id, output, choice)
        streams = await self.start([request_id], [prompt_ids], params, request.cache_salt, request.priority, lora)
        if request.stream:
            body = self._stream(request, request_id, merged_deltas(self.engine, streams, params.n), params.n,
                                prompt_ids, choice)
            return StreamingResponse(body, media_type="text/event-stream")
        [output] = await final_outputs(self.engine, streams)
        return self._response(request, request_id, output, choice)

    def _reasoning_parser(self, request: ChatCompletionRequest, choice: ToolChoice) -> str | None:
        """The server's reasoning parser, unless the reply is constrained from its first token
        (a named or required tool call, structured outputs): such a reply has no reasoning part."""
        constrained = choice.mode in ("named", "required") or request.structured_outputs_params()[0] is not None
        return None if constrained else self.served.reasoning_parser

    def _response(self, request: ChatCompletionRequest, request_id: str, output: RequestOutput,
                  choice: ToolChoice) -> ChatCompletionResponse:
        choices = []
        echoed = request.echoed_content()
        parser = self._reasoning_parser(request, choice)
        for c in output.outputs:
            reasoning, text = ReasoningSplitter.split(parser, c.text) if parser else (None, c.text)
            reply = parse_reply(text or "", choice, self.served.tool_call_parser)
            content = reply.content if reply.content is None else echoed + reply.content
            if text is None and not echoed:  # all of it was reasoning
                content = None
            shown = reasoning if request.include_reasoning else None
            message = DeltaMessage(role="assistant", content=content, tool_calls=reply.tool_calls or None,
                                   reasoning=shown, reasoning_content=shown)
            choices.append(ChatChoice(index=c.index, message=message,
                                      logprobs=self._logprobs(request, c.token_ids, c.logprobs),
                                      finish_reason=_finish_reason(choice, c.finish_reason, bool(reply.tool_calls)),
                                      stop_reason=c.stop_reason,
                                      token_ids=list(c.token_ids) if request.return_token_ids else None))
        usage = self.usage(len(output.prompt_token_ids), sum(len(c.token_ids) for c in output.outputs),
                           output.num_cached_tokens)
        prompt_logprobs = prompt_logprobs_body(output.prompt_logprobs) if request.prompt_logprobs is not None else None
        return ChatCompletionResponse(id=request_id, model=self.model_name(request.model), choices=choices, usage=usage,
                                      prompt_logprobs=prompt_logprobs,
                                      prompt_token_ids=list(output.prompt_token_ids) if request.return_token_ids else None)

    def _logprobs(self, request: ChatCompletionRequest, token_ids: list[int],
                  logprobs: list | None) -> ChatChoiceLogProbs | None:
        if not request.logprobs or logprobs is None:
            return None
        return chat_logprobs(token_ids, logprobs, request.top_logprobs or 0, self.tokenizer, self.as_token_ids(request))

    async def _stream(self, request: ChatCompletionRequest, request_id: str, deltas: AsyncIterator[Delta], n: int,
                      prompt_ids: list[int], choice: ToolChoice) -> AsyncIterator[str]:
        num_prompt_tokens = len(prompt_ids)
        num_tokens: dict[int, int] = {}  # choice -> generated tokens
        cached_tokens = 0  # of the prompt, served from the prefix cache
        replies = {index: StreamedReply(choice, self.served.tool_call_parser) for index in range(n)}
        parser = self._reasoning_parser(request, choice)
        splitters = {index: ReasoningSplitter(parser) if parser else None for index in range(n)}
        echoed = request.echoed_content()
        try:
            for index in range(n):  # OpenAI's first chunk of each choice carries the role alone
                role = ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
                # Sent before the engine has scheduled the request: its cache hits are not known yet.
                chunk = self._chunk(request, request_id, role, self._usage(request, num_prompt_tokens, 0, None))
                if request.return_token_ids and index == 0:  # the stream's first chunk
                    chunk.prompt_token_ids = list(prompt_ids)
                yield sse(chunk)
                if echoed:
                    echo = ChatStreamChoice(index=index, delta=DeltaMessage(content=echoed))
                    yield sse(self._chunk(request, request_id, echo, self._usage(request, num_prompt_tokens, 0, None)))
            async for delta in deltas:
                num_tokens[delta.index] = delta.num_tokens
                cached_tokens = delta.num_cached_tokens
                chunk_choice = self._stream_choice(request, delta, replies[delta.index], splitters[delta.index])
                if chunk_choice is not None:
                    usage = self._usage(request, num_prompt_tokens, delta.num_tokens, cached_tokens)
                    yield sse(self._chunk(request, request_id, chunk_choice, usage))
            if request.include_usage:
                usage = self.usage(num_prompt_tokens, sum(num_tokens.values()), cached_tokens)
                yield sse(ChatCompletionChunk(id=request_id, model=self.model_name(request.model), choices=[], usage=usage))
        except Exception as exc:  # noqa: BLE001 - headers are sent: the error can only go in the stream
            yield sse(APIError(str(exc), status=500, type="InternalServerError").response_body())
        yield SSE_DONE

    def _stream_choice(self, request: ChatCompletionRequest, delta: Delta, reply: StreamedReply,
                       splitter: ReasoningSplitter | None = None) -> ChatStreamChoice | None:
        """None: nothing to send (text held back for a possible stop string, an incomplete
        character, a possible tool call or reasoning tag, and no logprobs to carry)."""
        reasoning, text = splitter.feed(delta.text) if splitter is not None else ("", delta.text)
        if splitter is not None and delta.finish_reason is not None:
            more_reasoning, more_text = splitter.finish()
            reasoning, text = reasoning + more_reasoning, text + more_text
        reasoning = reasoning if request.include_reasoning else ""
        content = reply.content_delta(text)
        calls: list[dict] = []
        if reply.choice.mode == "named" and (delta.text or (delta.finish_reason and not reply.text)):
            calls = [_named_piece(reply, delta.text)]
        finish_reason = delta.finish_reason
        if finish_reason is not None:
            rest, parsed = reply.finish()
            content += rest
            calls += [{"index": i, **call} for i, call in enumerate(parsed)]
            finish_reason = _finish_reason(reply.choice, finish_reason, bool(parsed))
        carries_ids = (request.logprobs or request.return_token_ids) and delta.token_ids
        if not content and not calls and not reasoning and finish_reason is None and not carries_ids:
            return None
        message = DeltaMessage(content=content if content or not (calls or reasoning) else None,
                               tool_calls=calls or None, reasoning=reasoning or None, reasoning_content=reasoning or None)
        return ChatStreamChoice(index=delta.index, delta=message,
                                logprobs=self._logprobs(request, delta.token_ids, delta.logprobs),
                                finish_reason=finish_reason, stop_reason=delta.stop_reason,
                                token_ids=list(delta.token_ids) if request.return_token_ids else None)

    def _chunk(self, request: ChatCompletionRequest, request_id: str, choice: ChatStreamChoice,
               usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, model=self.model_name(request.model), choices=[choice], usage=usage)

    def _usage(self, request: ChatCompletionRequest, num_prompt_tokens: int, num_tokens: int,
               cached_tokens: int | None) -> UsageInfo | None:
        """A chunk's usage under ``continuous_usage_stats``: its choice's tokens so far."""
        return self.usage(num_prompt_tokens, num_tokens, cached_tokens) if request.continuous_usage else None
