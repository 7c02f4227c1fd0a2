"""Prompt dicts with vLLM's names (``vllm.inputs``): ``LLM.generate`` takes these, plain strings,
or lists of either."""

from __future__ import annotations

from typing import TypedDict


class TextPrompt(TypedDict):
    """A prompt as text, tokenized by the engine."""

    prompt: str


class TokensPrompt(TypedDict):
    """A prompt as token ids, used as given."""

    prompt_token_ids: list[int]


PromptType = str | TextPrompt | TokensPrompt
