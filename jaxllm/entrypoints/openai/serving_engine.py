"""What completions and chat share: model names, errors, prompt limits, per-choice streams of deltas."""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel

from jaxllm.beam_search import BeamSearchParams
from jaxllm.engine.async_engine import AsyncLLMEngine, RequestStream
from jaxllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse, SamplingRequest, UsageInfo
from jaxllm.inputs import prompt_embeds_of
from jaxllm.lora.request import LoRARequest
from jaxllm.outputs import CompletionOutput, RequestOutput, WholeOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams, truncate_prompt
from jaxllm.structured.regex import compile_regex

logger = logging.getLogger("jaxllm")


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


class LoRAModules:
    """The LoRA adapters the server serves, by model name (``--lora-modules``, and
    ``/v1/load_lora_adapter`` at run time); each gets the next free ``lora_int_id``."""

    def __init__(self, modules: tuple[tuple[str, str, str | None], ...] = ()):
        self._by_name: dict[str, LoRARequest] = {}
        self._next_id = 1
        for name, path, base in modules:
            self.add(name, path, base)

    def add(self, name: str, path: str, base_model_name: str | None = None) -> LoRARequest:
        if name in self._by_name:
            raise ValueError(f"the LoRA adapter {name!r} has already been loaded")
        request = LoRARequest(name, self._next_id, path, base_model_name)
        self._next_id += 1
        self._by_name[name] = request
        return request

    def remove(self, name: str) -> LoRARequest | None:
        return self._by_name.pop(name, None)

    def get(self, name: str) -> LoRARequest | None:
        return self._by_name.get(name)

    def __iter__(self):
        return iter(list(self._by_name.values()))


@dataclass(frozen=True)
class ServedModel:
    name: str  # what clients put in "model"
    root: str  # the checkpoint it was loaded from
    max_model_len: int
    max_num_seqs: int  # the n completions of a request run side by side, so n can be no larger
    scheduling_policy: str = "fcfs"  # "priority": requests' ``priority`` field orders the queue
    # How the server answers (vLLM's flags): usage.prompt_tokens_details.cached_tokens; logprobs'
    # tokens as "token_id:<id>" for requests that do not say.
    enable_prompt_tokens_details: bool = False
    return_tokens_as_token_ids: bool = False
    tool_call_parser: str | None = None  # reads tool calls out of "auto" replies (--enable-auto-tool-choice)
    reasoning_parser: str | None = None  # splits chat replies' <think> part off (--reasoning-parser)
    # SamplingParams fields from the model's generation config, for requests that leave them out.
    sampling_defaults: dict = field(default_factory=dict)
    # LoRA adapters served under their own model names (--enable-lora --lora-modules).
    loras: LoRAModules = field(default_factory=LoRAModules)


@dataclass(frozen=True)
class Delta:
    """What one choice gained since the previous output of its request."""

    index: int  # the choice: prompt_index * n + completion index
    prompt_index: int  # which of the request's prompts
    text: str
    token_ids: list[int]  # the new tokens (their text may be held back: a possible stop string)
    logprobs: list | None  # one {token id: Logprob} per new token, when logprobs were asked for
    num_tokens: int  # cumulative generated tokens of this choice
    finish_reason: str | None
    stop_reason: int | str | None
    prompt_logprobs: list | None  # the request's, for echo
    num_cached_tokens: int = 0  # of its prompt, served from the prefix cache


class DeltaTracker:
    """Turns one request's outputs into per-choice deltas.

    The server asks the engine for ``RequestOutputKind.DELTA`` outputs: each carries only what is
    new, for the completions that moved, so a step costs the server the new tokens, not the whole
    output so far. This keeps the running counts the chunks need.
    """

    def __init__(self, prompt_index: int, n: int):
        self.prompt_index = prompt_index
        self.first_index = prompt_index * n
        self._num_tokens: dict[int, int] = {}  # completion index -> tokens handed out
        self._finished: set[int] = set()
        self._prompt_logprobs: list | None = None  # all of the request's so far
        self._num_cached_tokens = 0

    def deltas(self, output: RequestOutput) -> list[Delta]:
        """The choices that changed: new text or tokens, or a finish not yet reported."""
        self._num_cached_tokens = output.num_cached_tokens
        if output.prompt_logprobs:
            self._prompt_logprobs = self._prompt_logprobs or []
            self._prompt_logprobs.extend(output.prompt_logprobs)
        return [d for c in output.outputs if (d := self._delta(c)) is not None]

    def _delta(self, completion: CompletionOutput) -> Delta | None:
        i = completion.index
        newly_finished = completion.finish_reason is not None and i not in self._finished
        if not completion.text and not completion.token_ids and not newly_finished:
            return None
        if newly_finished:
            self._finished.add(i)
        num_tokens = self._num_tokens.get(i, 0) + len(completion.token_ids)
        self._num_tokens[i] = num_tokens
        return Delta(self.first_index + i, self.prompt_index, completion.text, completion.token_ids,
                     completion.logprobs, num_tokens, completion.finish_reason, completion.stop_reason,
                     self._prompt_logprobs, self._num_cached_tokens)


class OpenAIServing:
    """Base of the completion and chat handlers."""

    def __init__(self, engine: AsyncLLMEngine, served: ServedModel):
        self.engine = engine
        self.served = served
        self.tokenizer = engine.tokenizer

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None) -> UsageInfo:
        """A response's usage; ``prompt_tokens_details.cached_tokens`` only with
        ``--enable-prompt-tokens-details`` and a known count (None: not scheduled yet)."""
        if not self.served.enable_prompt_tokens_details:
            cached_tokens = None
        return UsageInfo.of(prompt_tokens, completion_tokens, cached_tokens)

    @property
    def vocab_size(self) -> int:
        """Token ids a request may name: the tokenizer's, or without one (skip_tokenizer_init) the model's."""
        return len(self.tokenizer) if self.tokenizer is not None else self.engine.engine.vocab_size

    def as_token_ids(self, request: SamplingRequest) -> bool:
        """Whether logprobs show tokens as ``"token_id:<id>"``: the request's choice, else the server's;
        always without a tokenizer (skip_tokenizer_init), which leaves no token text to show."""
        if self.tokenizer is None:
            return True
        chosen = request.return_tokens_as_token_ids
        return self.served.return_tokens_as_token_ids if chosen is None else chosen

    def beam_search_params(self, request: SamplingRequest, params: SamplingParams) -> BeamSearchParams:
        """``use_beam_search``: ``n`` beams, the request's max_tokens, ignore_eos and length_penalty."""
        try:
            self.engine.engine.check_beam_search()
        except ValueError as exc:
            raise APIError(str(exc), param="use_beam_search") from exc
        try:
            return BeamSearchParams(beam_width=params.n, max_tokens=params.max_tokens, ignore_eos=params.ignore_eos,
                                    length_penalty=request.length_penalty)
        except ValueError as exc:
            raise APIError(f"use_beam_search: {exc}", param="n" if "beam_width" in str(exc) else None) from exc

    def check_model(self, model: str | None) -> LoRARequest | None:
        """The LoRA adapter a request's ``model`` names (None: the base model); 404 for a name
        the server does not serve (as vLLM)."""
        if model is None or model == self.served.name:
            return None
        lora = self.served.loras.get(model)
        if lora is None:
            served = [self.served.name, *(r.lora_name for r in self.served.loras)]
            raise APIError(f"The model `{model}` does not exist; this server serves {served}",
                           status=404, type="NotFoundError", param="model")
        return lora

    def model_name(self, model: str | None) -> str:
        """What responses say in ``model``: the adapter's name for a LoRA request, else the server's."""
        return model if model is not None and self.served.loras.get(model) is not None else self.served.name

    async def check_supported(self, request: SamplingRequest) -> None:
        ignored = request.ignored_fields()
        if ignored:
            logger.warning("request fields %s are not known to this server and were ignored", ignored)
        found = request.unsupported()
        if found is not None:
            message, param = found
            raise APIError(message, param=param)
        fields = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                  "guided_grammar", "guided_whitespace_pattern")
        try:
            params, field = request.structured_outputs_params()
        except ValueError as exc:
            raise APIError(str(exc), param=next((f for f in fields if getattr(request, f) is not None), None)) from exc
        if params is not None:  # compiling a large pattern takes a while: not on the event loop
            await asyncio.to_thread(self._check_pattern, params, field)

    @staticmethod
    def _check_pattern(params: StructuredOutputsParams, field: str) -> None:
        """A 400 naming the field for a constraint the engine would refuse (an unsupported schema
        keyword or regex construct, one too large), before anything is queued. The pattern and its
        automaton are cached, so the engine thread does not build them again."""
        try:
            compile_regex(params.pattern())
        except ValueError as exc:
            raise APIError(f"{field}: {exc}", param=field) from exc

    def truncated(self, request: SamplingRequest, prompt_ids: list[int]) -> list[int]:
        """The prompt's ids after ``truncate_prompt_tokens`` (vLLM's left truncation)."""
        try:
            return truncate_prompt(prompt_ids, request.truncate_prompt_tokens, self.served.max_model_len)
        except ValueError as exc:
            raise APIError(str(exc), param="truncate_prompt_tokens") from exc

    def truncated_embeds(self, request: SamplingRequest, embeds: np.ndarray) -> np.ndarray:
        """The embeddings' last rows, as ``truncated`` keeps a prompt's last ids."""
        return embeds[len(embeds) - len(self.truncated(request, [0] * len(embeds))):]

    def sampling_params(self, request: SamplingRequest, prompt_ids: list[int]) -> SamplingParams:
        if len(prompt_ids) >= self.served.max_model_len:
            raise APIError(f"the prompt has {len(prompt_ids)} tokens; max_model_len={self.served.max_model_len} "
                           "leaves no room for a completion", param="prompt")
        vocab = self.vocab_size
        for name in ("stop_token_ids", "allowed_token_ids"):
            if any(not 0 <= t < vocab for t in getattr(request, name) or ()):
                raise APIError(f"{name} must be in [0, {vocab})", param=name)
        try:
            params = request.to_sampling_params(self.served.max_model_len - len(prompt_ids),
                                                self.served.sampling_defaults)
        except ValueError as exc:
            raise APIError(str(exc)) from exc
        if params.n > self.served.max_num_seqs:  # the scheduler would never admit it
            raise APIError(f"n={params.n} must be <= max_num_seqs={self.served.max_num_seqs}", param="n")
        self.check_priority(request.priority)
        # Only what is new each step (DeltaTracker, WholeOutput): never the whole output so far.
        return dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)

    def check_priority(self, priority: int) -> None:
        if priority != 0 and self.served.scheduling_policy != "priority":
            raise APIError(f"priority={priority} needs the server started with --scheduling-policy priority",
                           param="priority")

    def prompt_token_lists(self, value, add_special_tokens: bool = True, param: str = "prompt") -> list[list[int]]:
        """OpenAI's prompt / input forms (a string, token ids, or a list of either) as token id lists;
        an empty one or an id outside the vocabulary is a 400 naming ``param``."""
        if isinstance(value, str) or (value and all(isinstance(t, int) for t in value)):
            value = [value]
        else:
            value = list(value)
        if not value:
            raise APIError(f"{param} must not be empty", param=param)
        vocab = self.vocab_size
        out = []
        for item in value:
            if isinstance(item, str) and self.tokenizer is None:
                raise APIError(f"{param} is text, but this server has no tokenizer (skip_tokenizer_init): give token "
                               "ids", param=param)
            if isinstance(item, str):
                ids = list(self.tokenizer.encode(item, add_special_tokens=add_special_tokens))
            else:
                ids = list(item)
                if any(t < 0 or t >= vocab for t in ids):
                    raise APIError(f"{param} token ids must be in [0, {vocab})", param=param)
            if not ids:
                raise APIError(f"{param} must not be empty", param=param)
            out.append(ids)
        return out

    async def start(self, request_ids: list[str], prompts: list[list[int]], params,
                    cache_salt: str | None = None, priority: int = 0,
                    lora_request: LoRARequest | None = None, embeds: list | None = None) -> list[RequestStream]:
        """Add all requests or none: a refused one aborts those already added. ``cache_salt``:
        vLLM's, only requests with the same salt share cached prefix blocks; ``priority``: lower
        is scheduled sooner (``--scheduling-policy priority``); ``lora_request``: the adapter the
        request's ``model`` names; ``embeds``: the prompt embeddings of the first prompts (whose
        ids are placeholders)."""
        streams: list[RequestStream] = []
        embeds = embeds or []
        try:
            for i, (request_id, prompt) in enumerate(zip(request_ids, prompts, strict=True)):
                engine_prompt = ({"prompt_embeds": embeds[i]} if i < len(embeds) else {"prompt_token_ids": prompt})
                if cache_salt is not None:
                    engine_prompt["cache_salt"] = cache_salt
                streams.append(await self.engine.add_request(request_id, engine_prompt, params, priority,
                                                             lora_request=lora_request))
        except BaseException:
            for stream in streams:
                self.engine.abort(stream.request_id)
            raise
        return streams


async def merged_deltas(engine: AsyncLLMEngine, streams: list[RequestStream], n: int) -> AsyncIterator[Delta]:
    """Per-choice deltas of several requests (one per prompt) as they come; leaving early aborts
    every unfinished one."""
    if len(streams) == 1:  # the common case needs no tasks
        tracker = DeltaTracker(0, n)
        try:
            async for output in streams[0]:
                for delta in tracker.deltas(output):
                    yield delta
        finally:
            _abort_unfinished(engine, streams)
        return
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(DeltaTracker(i, n), s, queue)) for i, s in enumerate(streams)]
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


async def _pump(tracker: DeltaTracker, stream: RequestStream, queue: asyncio.Queue) -> None:
    try:
        async for output in stream:
            for delta in tracker.deltas(output):
                queue.put_nowait(delta)
    except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
        queue.put_nowait(exc)
        return
    queue.put_nowait(None)


async def final_outputs(engine: AsyncLLMEngine, streams: list[RequestStream], collect=None) -> list:
    """The whole (finished) output of every request (``collect(stream)`` reads one; default: joins
    a generation request's DELTA outputs); leaving early aborts every unfinished one."""
    tasks = [asyncio.ensure_future((collect or _whole_output)(stream)) for stream in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        _abort_unfinished(engine, streams)


async def _whole_output(stream: RequestStream) -> RequestOutput:
    whole = WholeOutput()
    async for output in stream:  # the engine runs all requests meanwhile; their outputs queue up
        whole.add(output)
    result = whole.result()
    if result is None:
        raise RuntimeError(f"request {stream.request_id} was read twice")
    return result


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


def prompt_logprobs_body(prompt_logprobs: list | None) -> list | None:
    """vLLM's JSON for prompt logprobs: per prompt token None or {id: {logprob, rank, decoded_token}}."""
    if prompt_logprobs is None:
        return None
    return [None if d is None else {tid: {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
                                    for tid, lp in d.items()}
            for d in prompt_logprobs]


def decode_prompt_embeds(value: str | list[str] | None) -> list[np.ndarray]:
    """vLLM's ``prompt_embeds`` field: base64 of ``torch.save(tensor)`` (read with torch, when the
    server has it) or of numpy's ``.npy`` bytes; each float32 [num_tokens, hidden_size]."""
    if value is None:
        return []
    out = []
    for data in [value] if isinstance(value, str) else value:
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise APIError(f"prompt_embeds must be base64: {exc}", param="prompt_embeds") from exc
        try:
            if raw.startswith(b"\x93NUMPY"):
                array = np.load(io.BytesIO(raw), allow_pickle=False)
            else:
                array = _torch_load(raw)
            array = prompt_embeds_of({"prompt_embeds": array})
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001 - any unreadable payload is the client's 400
            raise APIError(f"prompt_embeds could not be read: {exc}", param="prompt_embeds") from exc
        out.append(array)
    return out


def _torch_load(raw: bytes):
    try:
        import torch
    except ImportError as exc:
        raise APIError("prompt_embeds in torch.save format need torch on the server; send numpy's .npy bytes "
                       "(base64) instead", param="prompt_embeds") from exc
    return torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
