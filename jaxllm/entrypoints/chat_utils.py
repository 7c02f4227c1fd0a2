"""Conversations -> prompt token ids through the tokenizer's chat template, for ``LLM.chat`` and
the server alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jaxllm.entrypoints.openai.protocol import ChatMessage

# apply_chat_template's own arguments, which chat_template_kwargs may not replace.
_RESERVED = frozenset({"conversation", "messages", "chat_template", "tools", "tokenize", "add_generation_prompt",
                       "continue_final_message", "return_dict", "documents"})


class ChatTemplateError(ValueError):
    """The conversation, template or its variables could not be rendered."""


def render_chat(tokenizer, messages: Sequence[ChatMessage | dict], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False, chat_template: str | None = None,
                tools: list[dict] | None = None, chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids of one conversation.

    Messages are read as the server reads them (``ChatMessage``): text content parts joined, an
    assistant's ``tool_calls`` with their JSON ``arguments`` parsed, a tool message's
    ``tool_call_id`` kept. ``continue_final_message`` leaves the last message open (no end-of-turn),
    for the model to continue it, as vLLM; it excludes ``add_generation_prompt``.
    ``chat_template_kwargs`` become template variables (Qwen3's ``enable_thinking``, say).

    Raises:
        ValueError: a malformed message, or ``chat_template_kwargs`` naming an argument above.
        ChatTemplateError: the template failed on this conversation.
    """
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be true; set "
                         "add_generation_prompt=False to continue the last message")
    extra = dict(chat_template_kwargs or {})
    reserved = sorted(extra.keys() & _RESERVED)
    if reserved:
        raise ValueError(f"chat_template_kwargs may not set {reserved}")
    conversation = [(m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m)).template_dict()
                    for m in messages]
    if continue_final_message and (not conversation or conversation[-1]["role"] != "assistant"):
        raise ValueError("continue_final_message needs the conversation to end with an assistant message")
    try:
        ids = tokenizer.apply_chat_template(
            conversation, chat_template=chat_template, tools=tools, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tokenize=True, return_dict=False, **extra,
        )
    except Exception as exc:  # noqa: BLE001 - jinja raises many types for a bad conversation or template
        raise ChatTemplateError(f"could not apply the chat template: {exc}") from exc
    return list(ids)
