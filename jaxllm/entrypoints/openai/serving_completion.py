"""POST /v1/completions: one engine request per prompt (n choices each), answered whole or as
server-sent events. Choice ``i * n + j`` is completion j of prompt i, as in vLLM."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from jaxllm.entrypoints.openai.beam_search import as_deltas, beam_search_output
from jaxllm.entrypoints.openai.logprobs import completion_logprobs
from jaxllm.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    random_id,
)
from jaxllm.entrypoints.openai.serving_engine import (
    SSE_DONE,
    APIError,
    Delta,
    OpenAIServing,
    decode_prompt_embeds,
    final_outputs,
    merged_deltas,
    prompt_logprobs_body,
    sse,
)
from jaxllm.outputs import CompletionOutput, RequestOutput
from jaxllm.sampling_params import SamplingParams


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest) -> CompletionResponse | StreamingResponse:
        lora = self.check_model(request.model)
        await self.check_supported(request)
        embeds = [self.truncated_embeds(request, e) for e in decode_prompt_embeds(request.prompt_embeds)]
        if request.prompt is None and not embeds:
            raise APIError("give prompt (or prompt_embeds)", param="prompt")
        texts = [] if request.prompt is None else self.prompt_token_lists(request.prompt, request.add_special_tokens)
        # An embeddings prompt's ids are placeholders: they count its tokens, nothing reads them
        # (and return_token_ids shows none).
        prompts = [[0] * len(e) for e in embeds] + [self.truncated(request, ids) for ids in texts]
        shown = [None] * len(embeds) + [list(ids) for ids in prompts[len(embeds):]]
        shown = shown if request.return_token_ids else [None] * len(prompts)
        params = self._params(request, prompts)
        base_id = random_id("cmpl")
        if request.use_beam_search:
            beams = self.beam_search_params(request, params)
            outputs = list(await asyncio.gather(*(beam_search_output(self.engine, f"{base_id}-{i}", ids, beams, lora)
                                                  for i, ids in enumerate(prompts))))
            if request.stream:
                body = self._stream(request, base_id, prompts, as_deltas(outputs, params.n), shown)
                return StreamingResponse(body, media_type="text/event-stream")
            return self._response(request, base_id, prompts, outputs, shown)
        streams = await self.start([f"{base_id}-{i}" for i in range(len(prompts))], prompts, params,
                                  request.cache_salt, request.priority, lora, embeds)
        if request.stream:
            body = self._stream(request, base_id, prompts, merged_deltas(self.engine, streams, params.n), shown)
            return StreamingResponse(body, media_type="text/event-stream")
        return self._response(request, base_id, prompts, await final_outputs(self.engine, streams), shown)

    def _params(self, request: CompletionRequest, prompts: list[list[int]]) -> SamplingParams:
        params = [self.sampling_params(request, ids) for ids in prompts]
        if len({p.max_tokens for p in params}) > 1:
            # One SamplingParams per request keeps the API simple; prompts of different lengths
            # only differ when max_tokens was left to its default, so fill it from the longest.
            return self.sampling_params(request, max(prompts, key=len))
        return params[0]

    # -- whole responses -------------------------------------------------------------------------
    def _response(self, request: CompletionRequest, request_id: str, prompts: list[list[int]],
                  outputs: list[RequestOutput], shown: list[list[int] | None]) -> CompletionResponse:
        """``shown``: each prompt's ids for return_token_ids (None: not asked, or an embeddings prompt,
        whose ids are placeholders)."""
        n = len(outputs[0].outputs)
        choices = [
            self._choice(request, i * n + c.index, prompt, output.prompt_logprobs, c, shown[i])
            for i, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)) for c in output.outputs
        ]
        completion_tokens = sum(len(c.token_ids) for output in outputs for c in output.outputs)
        # Per prompt, as prompt_tokens: its n choices share one prompt (and its cached blocks).
        cached_tokens = sum(output.num_cached_tokens for output in outputs)
        usage = self.usage(sum(len(ids) for ids in prompts), completion_tokens, cached_tokens)
        return CompletionResponse(id=request_id, model=self.model_name(request.model), choices=choices, usage=usage)

    def _choice(self, request: CompletionRequest, index: int, prompt: list[int], prompt_logprobs: list | None,
                completion: CompletionOutput, shown_prompt: list[int] | None) -> CompletionChoice:
        text, token_ids, logprobs = completion.text, completion.token_ids, completion.logprobs
        if request.echo:
            text, token_ids, logprobs = self._echoed(prompt, prompt_logprobs, text, token_ids, logprobs)
        return CompletionChoice(index=index, text=text, logprobs=self._logprobs(request, token_ids, logprobs),
                                finish_reason=completion.finish_reason, stop_reason=completion.stop_reason,
                                prompt_logprobs=prompt_logprobs_body(prompt_logprobs)
                                if request.prompt_logprobs is not None else None,
                                prompt_token_ids=shown_prompt,
                                token_ids=list(completion.token_ids) if request.return_token_ids else None)

    def _echoed(self, prompt: list[int], prompt_logprobs: list | None, text: str, token_ids: list[int],
                logprobs: list | None) -> tuple[str, list[int], list | None]:
        """The prompt put in front of the text, tokens and (when asked for) logprobs."""
        if logprobs is not None:
            logprobs = [*(prompt_logprobs or [None] * len(prompt)), *logprobs]
        prompt_text = "" if self.tokenizer is None else self.tokenizer.decode(prompt)  # no tokenizer: no text
        return prompt_text + text, [*prompt, *token_ids], logprobs

    def _logprobs(self, request: CompletionRequest, token_ids: list[int], logprobs: list | None,
                  text_offsets: dict[int, int] | None = None, index: int = 0) -> CompletionLogProbs | None:
        """``text_offsets``: a stream's offset after each choice's tokens so far, advanced here."""
        if request.logprobs is None or logprobs is None:
            return None
        offset = 0 if text_offsets is None else text_offsets.get(index, 0)
        out, end = completion_logprobs(token_ids, logprobs, self.tokenizer, offset,
                                       self.as_token_ids(request))
        if text_offsets is not None:
            text_offsets[index] = end
        return out

    # -- streams ---------------------------------------------------------------------------------
    async def _stream(self, request: CompletionRequest, request_id: str, prompts: list[list[int]],
                      deltas: AsyncIterator[Delta], shown: list[list[int] | None]) -> AsyncIterator[str]:
        num_tokens: dict[int, int] = {}  # choice -> generated tokens
        cached_tokens: dict[int, int] = {}  # prompt -> its tokens served from the prefix cache
        text_offsets: dict[int, int] = {}  # choice -> characters its logprobs' tokens covered so far
        try:
            async for delta in deltas:
                first = delta.index not in num_tokens
                num_tokens[delta.index] = delta.num_tokens
                cached_tokens[delta.prompt_index] = delta.num_cached_tokens
                choice = self._stream_choice(request, prompts, delta, first, text_offsets, shown)
                if choice is not None:
                    usage = (self.usage(len(prompts[delta.prompt_index]), delta.num_tokens, delta.num_cached_tokens)
                             if request.continuous_usage else None)
                    yield sse(CompletionResponse(id=request_id, model=self.model_name(request.model), choices=[choice], usage=usage))
            if request.include_usage:
                usage = self.usage(sum(len(ids) for ids in prompts), sum(num_tokens.values()),
                                   sum(cached_tokens.values()))
                yield sse(CompletionResponse(id=request_id, model=self.model_name(request.model), choices=[], usage=usage))
        except Exception as exc:  # noqa: BLE001 - headers are sent: the error can only go in the stream
            yield sse(APIError(str(exc), status=500, type="InternalServerError").response_body())
        yield SSE_DONE

    def _stream_choice(self, request: CompletionRequest, prompts: list[list[int]], delta: Delta, first: bool,
                       text_offsets: dict[int, int], shown: list[list[int] | None]) -> CompletionChoice | None:
        """The chunk of one delta; the first of each choice carries the echoed prompt. None: nothing to send
        (text held back for a possible stop string or an incomplete character, and no logprobs)."""
        text, token_ids, logprobs = delta.text, delta.token_ids, delta.logprobs
        if request.echo and first:
            prompt = prompts[delta.prompt_index]
            text, token_ids, logprobs = self._echoed(prompt, delta.prompt_logprobs, text, token_ids, logprobs)
        carries_ids = (request.logprobs is not None or request.return_token_ids) and token_ids
        if not text and delta.finish_reason is None and not carries_ids and not (first and request.return_token_ids):
            return None
        choice_logprobs = self._logprobs(request, token_ids, logprobs, text_offsets, delta.index)
        return CompletionChoice(index=delta.index, text=text, logprobs=choice_logprobs,
                                finish_reason=delta.finish_reason, stop_reason=delta.stop_reason,
                                prompt_token_ids=shown[delta.prompt_index] if first else None,
                                token_ids=list(delta.token_ids) if request.return_token_ids else None)
