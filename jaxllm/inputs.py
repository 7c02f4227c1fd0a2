"""Prompt dicts with vLLM's names (``vllm.inputs``): ``LLM.generate`` and ``LLMEngine.add_request``
take these or plain strings (and ``generate`` lists of either)."""

from __future__ import annotations

from typing import NotRequired, TypedDict


class TextPrompt(TypedDict):
    """A prompt as text, tokenized by the engine. ``cache_salt``: only requests with the same salt
    share prefix-cache blocks (vLLM's)."""

    prompt: str
    cache_salt: NotRequired[str]


class TokensPrompt(TypedDict):
    """A prompt as token ids, used as given; ``cache_salt`` as in TextPrompt."""

    prompt_token_ids: list[int]
    cache_salt: NotRequired[str]


PromptType = str | TextPrompt | TokensPrompt


def prompt_input(prompt: PromptType) -> str | list[int]:
    """The text or token ids of a prompt (a str or a prompt dict); ValueError for anything else."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        # vLLM's prompt dicts carry more (multi_modal_data, mm_processor_kwargs, ...): refused
        # rather than dropped, so a request never runs without what it asked for.
        unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids", "cache_salt"})
        if unknown:
            raise ValueError(f"prompt keys {unknown} are not supported; a prompt dict holds 'prompt' or "
                             "'prompt_token_ids', and optionally 'cache_salt'")
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
    raise ValueError(f"prompt must be a str or a dict with 'prompt_token_ids' or 'prompt', got {prompt!r}")


def prompt_cache_salt(prompt: PromptType | list[int]) -> str | None:
    """A prompt dict's ``cache_salt`` (None without one); ValueError unless a non-empty str."""
    if not isinstance(prompt, dict) or "cache_salt" not in prompt:
        return None
    salt = prompt["cache_salt"]
    if not isinstance(salt, str) or not salt:
        raise ValueError(f"cache_salt must be a non-empty string, got {salt!r}")
    return salt
