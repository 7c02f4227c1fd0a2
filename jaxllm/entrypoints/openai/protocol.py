"""Request and response bodies of the OpenAI API, with the extra sampling fields vLLM accepts.

Requests only check types here; values are checked by ``SamplingParams`` so that the server and the
offline API refuse the same things with the same message. The exception is chat's ``top_logprobs``,
checked here so that the message names the field the client sent.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from jaxllm.entrypoints.openai.tool_calls import ToolChoice, constraint, resolve_tool_choice
from jaxllm.sampling_params import MAX_LOGPROBS, SamplingParams, StructuredOutputsParams

_INT32_MAX = 2**31 - 1


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    # vLLM accepts (and logs) fields it does not know; refusing them would break clients that
    # send newer OpenAI fields. Fields it knows but cannot honour are refused by SamplingParams.
    model_config = ConfigDict(extra="ignore")


class RequestModel(OpenAIModel):
    """A request body: unknown top-level fields are kept (``model_extra``) so that the server can
    log them as ignored, as vLLM does, rather than drop them without a word."""

    model_config = ConfigDict(extra="allow")

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or ())


def _response_format_params(response_format: dict[str, Any], whitespace: dict) -> StructuredOutputsParams | None:
    """OpenAI's ``response_format``: text (no constraint), json_object, json_schema, or vLLM's
    structural_tag (``structures`` and ``triggers`` beside the type)."""
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True, **whitespace)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ValueError("response_format json_schema needs a 'json_schema' object with a 'schema'")
        return StructuredOutputsParams(json=spec["schema"], **whitespace)
    if kind == "structural_tag":
        return StructuredOutputsParams(structural_tag=dict(response_format), **whitespace)
    raise ValueError(f"response_format type {kind!r} is not supported; use 'text', 'json_object', 'json_schema' or "
                     "'structural_tag'")


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingRequest(RequestModel):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, le=_INT32_MAX)  # the sampler holds it as int32
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # JSON keys are strings; SamplingParams makes them ids
    bad_words: str | list[str] | None = None
    best_of: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None  # the prompt's last k tokens; -1: the last max_model_len
    prompt_logprobs: int | None = None
    cache_salt: str | None = Field(None, min_length=1)  # only requests with the same salt share cached blocks
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Structured outputs (see structured_outputs_params): OpenAI's response_format, vLLM's
    # structured_outputs and its older guided_* fields. One of them per request.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    # vLLM's beam search: n is the beam width; the n best sequences are the choices (beam_search.py).
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # vLLM's custom arguments: SamplingParams.extra_args, read by the server's --logits-processors.
    vllm_xargs: dict[str, str | int | float | bool | list[str | int | float | bool]] | None = None
    # Fields vLLM honours that this engine cannot yet: refused (see ``unsupported``), never ignored.
    # (vLLM's earlier per-request processors: qualified names of functions the server would import.)
    logits_processors: list[Any] | None = None
    # vLLM's: logprobs show tokens as "token_id:<id>"; None: the server's --return-tokens-as-token-ids.
    return_tokens_as_token_ids: bool | None = None
    # vLLM's: the prompt's and each choice's token ids beside the text (a stream sends the prompt's
    # in its first chunk, and each chunk's new tokens).
    return_token_ids: bool | None = None
    # vLLM's: lower is scheduled sooner; needs --scheduling-policy priority, else a non-zero one is a 400.
    priority: int = 0

    def structured_outputs_params(self) -> tuple[StructuredOutputsParams | None, str | None]:
        """The request's structured-output constraint and the field that gave it; ValueError
        names a malformed one, or two fields asking at once."""
        found: list[tuple[StructuredOutputsParams, str]] = []
        whitespace = {"whitespace_pattern": self.guided_whitespace_pattern} if self.guided_whitespace_pattern else {}
        if self.response_format is not None:
            params = _response_format_params(self.response_format, whitespace)
            if params is not None:
                found.append((params, "response_format"))
        if self.structured_outputs is not None:
            try:
                found.append((StructuredOutputsParams(**self.structured_outputs), "structured_outputs"))
            except TypeError as exc:
                raise ValueError(f"structured_outputs: {exc}") from exc
        guided = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
        for name, kind in guided.items():
            if getattr(self, name) is not None:
                found.append((StructuredOutputsParams(**{kind: getattr(self, name)}, **whitespace), name))
        if len(found) > 1:
            raise ValueError(f"give one structured-output field, not {[name for _, name in found]}")
        return found[0] if found else (None, None)

    def unsupported(self) -> tuple[str, str] | None:
        """(message, field) when the request asks for a feature the engine does not have yet."""
        if self.logits_processors:
            return ("per-request logits_processors are not supported; the server's --logits-processors apply to "
                    "requests that pass their arguments in vllm_xargs"), "logits_processors"
        if self.use_beam_search:
            found = self._beam_search_conflict()
            if found is not None:
                return found
        elif self.length_penalty != 1.0:
            return "length_penalty only applies with use_beam_search=true", "length_penalty"

        if self.prompt_logprobs and self.stream:  # as vLLM: 0 asks for nothing a stream would carry
            return "prompt_logprobs > 0 is not supported with stream=true", "prompt_logprobs"
        return None

    # Fields beam search cannot honour (it ranks the model's own log-probabilities), at their neutral values.
    _BEAM_NEUTRAL = {"temperature": (None, 0.0), "top_p": (None, 1.0), "top_k": (None, 0, -1), "min_p": (None, 0.0),
                     "presence_penalty": (None, 0.0), "frequency_penalty": (None, 0.0),
                     "repetition_penalty": (None, 1.0), "logit_bias": (None, {}), "bad_words": (None, [], ""),
                     "stop": (None, [], ""), "stop_token_ids": (None, []), "min_tokens": (0,),
                     "allowed_token_ids": (None,), "prompt_logprobs": (None,)}

    def _beam_search_conflict(self) -> tuple[str, str] | None:
        for name, neutral in self._BEAM_NEUTRAL.items():
            if getattr(self, name) not in neutral:
                return f"{name} cannot be combined with use_beam_search", name
        if self.requested_logprobs() is not None:
            return "logprobs cannot be combined with use_beam_search", "logprobs"
        _, field = SamplingRequest.structured_outputs_params(self)  # chat's tool choices are checked apart
        if field is not None:
            return f"{field} (structured outputs) cannot be combined with use_beam_search", field
        return None

    def requested_max_tokens(self) -> int | None:
        raise NotImplementedError

    def requested_logprobs(self) -> int | None:
        raise NotImplementedError

    def requested_prompt_logprobs(self) -> int | None:
        return self.prompt_logprobs

    def to_sampling_params(self, default_max_tokens: int, defaults: dict | None = None) -> SamplingParams:
        """Raises ValueError, with SamplingParams' message, for values the engine cannot honour.

        ``defaults`` (the model's generation config) fill the sampling fields the request leaves
        out, and cap the default max_tokens, as vLLM.
        """
        defaults = defaults or {}
        max_tokens = self.requested_max_tokens()
        if max_tokens is None and "max_tokens" in defaults:
            default_max_tokens = min(default_max_tokens, defaults["max_tokens"])
        optional = {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
        }
        optional = {name: defaults.get(name) if value is None else value for name, value in optional.items()}
        structured, _ = self.structured_outputs_params()
        return SamplingParams(
            n=self.n,
            structured_outputs=structured,
            best_of=self.best_of,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            allowed_token_ids=self.allowed_token_ids,
            max_tokens=default_max_tokens if max_tokens is None else max_tokens,
            logprobs=self.requested_logprobs(),
            prompt_logprobs=self.requested_prompt_logprobs(),
            logit_bias=self.logit_bias or None,
            bad_words=self.bad_words,
            extra_args=self.vllm_xargs,
            **{name: value for name, value in optional.items() if value is not None},
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """vLLM's ``continuous_usage_stats``: every chunk carries its choice's usage so far (only
        with ``include_usage``, as in vLLM)."""
        return self.include_usage and self.stream_options.continuous_usage_stats


class CompletionRequest(SamplingRequest):
    # One of prompt and prompt_embeds at least (vLLM's: embeddings prompts come first).
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    # vLLM's --enable-prompt-embeds inputs: base64 of torch.save(tensor [num_tokens, hidden_size]),
    # or of numpy's .npy bytes (read without torch).
    prompt_embeds: str | list[str] | None = None
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    add_special_tokens: bool = True  # e.g. the BOS token in front of a text prompt

    def unsupported(self) -> tuple[str, str] | None:
        found = super().unsupported()
        if found is None and self.suffix:
            return "suffix is not supported yet", "suffix"
        if found is None and self.use_beam_search and self.echo:
            return "echo cannot be combined with use_beam_search", "echo"
        if found is None and self.prompt_embeds:
            for name in ("echo", "use_beam_search"):
                if getattr(self, name):
                    return f"{name} cannot be combined with prompt_embeds (the prompt has no tokens)", name
        return found

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def requested_prompt_logprobs(self) -> int | None:
        # Echoed prompt tokens carry logprobs like the generated ones (vLLM's rule), unless
        # prompt_logprobs asks for a number of its own.
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        return self.logprobs if self.echo else None


class ContentPart(OpenAIModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIModel):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls (a conversation's history)
    tool_call_id: str | None = None  # a "tool" message: the call it answers

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it: content a plain string; an assistant's
        ``tool_calls`` with each function's JSON ``arguments`` string parsed into an object, as
        vLLM hands them over (templates write ``arguments | tojson``), and a tool message's
        ``tool_call_id``."""
        content = self.content
        if isinstance(content, list):
            non_text = sorted({p.type for p in content if p.type != "text"})
            if non_text:
                raise ValueError(f"content parts of type {non_text} are not supported; only 'text'")
            content = "\n".join(p.text or "" for p in content)
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls is not None:
            message["tool_calls"] = [_tool_call_for_template(call, i) for i, call in enumerate(self.tool_calls)]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _tool_call_for_template(call: dict[str, Any], index: int) -> dict[str, Any]:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f"tool_calls[{index}].function must be an object with a string 'name'")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"tool_calls[{index}].function.arguments is not valid JSON: {exc}") from exc
    return {**call, "function": {**function, "arguments": arguments}}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the last (assistant) message left open, to be continued
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the template
    echo: bool = False
    add_special_tokens: bool = False
    # Tools reach the chat template; tool_choice "none", a named function, "required", or "auto"
    # (with a tool-call parser: --enable-auto-tool-choice --tool-call-parser); see tool_calls.py.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None  # OpenAI's deprecated form of tools
    function_call: str | dict[str, Any] | None = None
    include_reasoning: bool = True  # with --reasoning-parser: False leaves the reasoning out

    def unsupported(self) -> tuple[str, str] | None:
        found = super().unsupported()
        if found is not None:
            return found
        if self.add_special_tokens:
            return ("add_special_tokens=true is not supported for chat completions; the chat template "
                    "writes the special tokens"), "add_special_tokens"
        if self.functions is not None or self.function_call is not None:
            return "functions and function_call (OpenAI's deprecated forms) are not supported; send tools", "functions"
        try:
            choice = self.resolved_tool_choice()
        except ValueError as exc:
            return str(exc), "tools" if str(exc).startswith("tools") else "tool_choice"
        if self.use_beam_search and choice.mode != "none":
            return f"tool_choice={choice.mode!r} cannot be combined with use_beam_search", "tool_choice"
        return None

    def echoed_content(self) -> str:
        """vLLM's chat ``echo``: the last message's text when it is the assistant's (the reply
        continues it), put in front of each choice's content; else nothing."""
        if not self.echo or not self.messages or self.messages[-1].role != "assistant":
            return ""
        return self.messages[-1].template_dict()["content"]

    def resolved_tool_choice(self) -> ToolChoice:
        return resolve_tool_choice(self.tools, self.tool_choice)

    def structured_outputs_params(self) -> tuple[StructuredOutputsParams | None, str | None]:
        """As for completions, plus the constraint a named or required tool choice imposes."""
        found, field = super().structured_outputs_params()
        whitespace = {"whitespace_pattern": self.guided_whitespace_pattern} if self.guided_whitespace_pattern else {}
        tool_constraint = constraint(self.tools, self.resolved_tool_choice(), **whitespace)
        if tool_constraint is None:
            return found, field
        if found is not None:
            raise ValueError(f"tool_choice={self.tool_choice!r} constrains the reply itself; {field} cannot too")
        return tool_constraint, "tool_choice"

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        top = self.top_logprobs
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise ValueError(f"top_logprobs={top} must be in [0, {MAX_LOGPROBS}]")
        if not self.logprobs:
            if top:  # 0 asks for nothing, so vLLM lets it pass
                raise ValueError(f"top_logprobs={top} needs logprobs=true")
            return None
        return top or 0


class PromptTokenUsageInfo(OpenAIModel):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


class _OmitsAbsent(OpenAIModel):
    """A response object whose ``OMITTED_WHEN_NONE`` fields are left out of the JSON while None
    (optional parts of OpenAI's shapes, absent unless asked for)."""

    OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _without_absent(self, handler):
        data = handler(self)
        for name in self.OMITTED_WHEN_NONE:
            if data.get(name) is None:
                data.pop(name, None)
        return data


class UsageInfo(_OmitsAbsent):
    # Without --enable-prompt-tokens-details usage keeps its three keys.
    OMITTED_WHEN_NONE = ("prompt_tokens_details",)

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # Only with ``--enable-prompt-tokens-details``; otherwise left out of the JSON altogether.
    prompt_tokens_details: PromptTokenUsageInfo | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> UsageInfo:
        """``cached_tokens``: None leaves ``prompt_tokens_details`` out."""
        details = None if cached_tokens is None else PromptTokenUsageInfo(cached_tokens=cached_tokens)
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details)


FinishReason = Literal["stop", "length", "abort", "tool_calls"] | None


class CompletionLogProbs(OpenAIModel):
    """Legacy completions' logprobs: parallel lists with one entry per token."""

    text_offset: list[int] = Field(default_factory=list)  # of each token in the choice's text
    token_logprobs: list[float | None] = Field(default_factory=list)  # None: first prompt token (echo)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)  # token text -> logprob


# vLLM's prompt_logprobs in a response: per prompt token None (the first) or
# {token id: {"logprob", "rank", "decoded_token"}}.
PromptLogprobs = list[dict[int, dict[str, Any]] | None]


class CompletionChoice(_OmitsAbsent):
    OMITTED_WHEN_NONE = ("prompt_token_ids", "token_ids")

    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: FinishReason = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None
    # With return_token_ids: the prompt's ids (a stream: in each choice's first chunk) and the
    # generated ones (a stream: each chunk's new ones).
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatLogProb(OpenAIModel):
    token: str
    logprob: float = -9999.0  # what vLLM reports for a token without a logprob
    bytes: list[int] | None = None  # UTF-8 of token


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatChoiceLogProbs(OpenAIModel):
    content: list[ChatLogProbsContent] | None = None


class DeltaMessage(_OmitsAbsent):
    OMITTED_WHEN_NONE = ("tool_calls", "reasoning", "reasoning_content")

    role: str | None = None
    content: str | None = None
    # With --reasoning-parser: the reply's <think> part (vLLM's field, and its older name).
    reasoning: str | None = None
    reasoning_content: str | None = None
    # OpenAI's tool calls: {"id", "type": "function", "function": {"name", "arguments"}} in a
    # message; in a stream's delta each also has its "index" and later pieces only what is new.
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(_OmitsAbsent):
    OMITTED_WHEN_NONE = ("token_ids",)

    index: int
    message: DeltaMessage
    logprobs: ChatChoiceLogProbs | None = None
    finish_reason: FinishReason = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # with return_token_ids: the generated ids


class ChatCompletionResponse(_OmitsAbsent):
    OMITTED_WHEN_NONE = ("prompt_token_ids",)

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids: the rendered conversation's ids


class ChatStreamChoice(_OmitsAbsent):
    OMITTED_WHEN_NONE = ("token_ids",)

    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogProbs | None = None
    finish_reason: FinishReason = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # with return_token_ids: the chunk's new ids


class ChatCompletionChunk(_OmitsAbsent):
    OMITTED_WHEN_NONE = ("prompt_token_ids",)

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids: in the stream's first chunk


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "jaxllm"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's: the base model it runs on
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoRAAdapterRequest(OpenAIModel):
    """vLLM's ``/v1/load_lora_adapter`` body."""

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(OpenAIModel):
    """vLLM's ``/v1/unload_lora_adapter`` body."""

    lora_name: str
    lora_int_id: int | None = None


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(OpenAIModel):
    prompt: str


class PoolingInputRequest(RequestModel):
    """The inputs of a pooling route (embeddings, classification). As in vLLM, a conversation in
    ``messages`` (rendered by the chat template, without a generation prompt by default) may stand
    in for ``input``: one of the two."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]] | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    user: str | None = None
    priority: int = 0


class EmbeddingRequest(PoolingInputRequest):
    """POST /v1/embeddings (OpenAI's, with vLLM's extra fields)."""

    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    normalize: bool | None = None  # vLLM's: None leaves it to --pooler-config


class EmbeddingData(OpenAIModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # a base64 string of little-endian float32 with encoding_format="base64"


DataT = TypeVar("DataT")


class ListResponse(OpenAIModel, Generic[DataT]):
    """A pooling route's response: one ``data`` entry per input (embeddings, classes, scores)."""

    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[DataT]
    usage: UsageInfo


class EmbeddingResponse(ListResponse[EmbeddingData]):
    pass


class ActivationFields(RequestModel):
    """Whether a classifier's activation applies (classify, cross-encoder scores)."""

    use_activation: bool | None = None
    activation: bool | None = None  # vLLM's earlier name of use_activation


class ClassificationRequest(PoolingInputRequest, ActivationFields):
    """POST /classify (vLLM's): each input's class probabilities from a sequence classifier."""


class ClassificationData(OpenAIModel):
    index: int
    label: str | None  # id2label of the most probable class
    probs: list[float]
    num_classes: int


class ClassificationResponse(ListResponse[ClassificationData]):
    pass


class PoolingRequest(PoolingInputRequest, ActivationFields):
    """POST /pooling (vLLM's): each input's pooled output for ``task`` (see ``LLM.encode``); None:
    the model's per-token task (token_classify for a classifier, token_embed otherwise)."""

    task: Literal["embed", "classify", "token_embed", "token_classify"] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    normalize: bool | None = None


class PoolingResponseData(OpenAIModel):
    index: int
    object: Literal["pooling"] = "pooling"
    # A vector, one per token (the token tasks), or the base64 of the float32 values, row after row.
    data: list[list[float]] | list[float] | str


class PoolingResponse(ListResponse[PoolingResponseData]):
    pass


class ScoringRequest(ActivationFields):
    """What /score and /rerank share."""

    model: str | None = None
    truncate_prompt_tokens: int | None = None
    priority: int = 0


class ScoreRequest(ScoringRequest):
    """POST /score and /v1/score (vLLM's): text_1 (one text, or one per text_2 text) against text_2."""

    text_1: str | list[str]
    text_2: str | list[str]


class ScoreResponseData(OpenAIModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(ListResponse[ScoreResponseData]):
    pass


class RerankRequest(ScoringRequest):
    """POST /rerank, /v1/rerank and /v2/rerank (vLLM's, the Jina and Cohere shape): documents by
    their relevance to the query, most relevant first; ``top_n`` keeps that many (0: all)."""

    query: str
    documents: list[str]
    top_n: int = 0


class RerankDocument(OpenAIModel):
    text: str


class RerankResult(OpenAIModel):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankUsage(OpenAIModel):
    total_tokens: int


class RerankResponse(OpenAIModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]
