"""Prompt dicts with vLLM's names (``vllm.inputs``): ``LLM.generate`` and ``LLMEngine.add_request``
take these or plain strings (and ``generate`` lists of either)."""

from __future__ import annotations

import hashlib
from typing import Any, NotRequired, TypedDict

import numpy as np


class TextPrompt(TypedDict):
    """A prompt as text, tokenized by the engine. ``cache_salt``: only requests with the same salt
    share prefix-cache blocks (vLLM's)."""

    prompt: str
    cache_salt: NotRequired[str]


class TokensPrompt(TypedDict):
    """A prompt as token ids, used as given; ``cache_salt`` as in TextPrompt."""

    prompt_token_ids: list[int]
    cache_salt: NotRequired[str]


class EmbedsPrompt(TypedDict):
    """A prompt as input embeddings [num_tokens, hidden_size] (numpy, a JAX array or a torch
    tensor) that take the place of the embedding table's rows; needs ``enable_prompt_embeds``.
    ``cache_salt`` as in TextPrompt."""

    prompt_embeds: Any
    cache_salt: NotRequired[str]


PromptType = str | TextPrompt | TokensPrompt | EmbedsPrompt


def prompt_input(prompt: PromptType) -> str | list[int]:
    """The text or token ids of a prompt (a str or a prompt dict); ValueError for anything else."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        # vLLM's prompt dicts carry more (multi_modal_data, mm_processor_kwargs, ...): refused
        # rather than dropped, so a request never runs without what it asked for.
        unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids", "prompt_embeds", "cache_salt"})
        if unknown:
            raise ValueError(f"prompt keys {unknown} are not supported; a prompt dict holds 'prompt', "
                             "'prompt_token_ids' or 'prompt_embeds', and optionally 'cache_salt'")
        if "prompt_embeds" in prompt:
            raise ValueError("a prompt_embeds prompt has no text or token ids: it goes to LLM.generate or "
                             "LLMEngine.add_request of an engine with enable_prompt_embeds=True")
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


def prompt_embeds_of(prompt) -> np.ndarray | None:
    """An EmbedsPrompt's embeddings as a float32 numpy array [num_tokens, hidden_size] (None for
    any other prompt); ValueError for a malformed one."""
    if not isinstance(prompt, dict) or "prompt_embeds" not in prompt:
        return None
    if "prompt" in prompt or "prompt_token_ids" in prompt:
        raise ValueError("give prompt_embeds or prompt / prompt_token_ids, not both")
    value = prompt["prompt_embeds"]
    if hasattr(value, "detach"):  # a torch tensor (any dtype, any device)
        value = value.detach().float().cpu().numpy()
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"prompt_embeds must be an array of floats: {exc}") from exc
    if array.ndim == 3 and array.shape[0] == 1:  # a batch of one, as an embedding layer returns it
        array = array[0]
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"prompt_embeds must have shape [num_tokens > 0, hidden_size], got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("prompt_embeds hold NaN or infinite values")
    return array


def embeds_cache_salt(cache_salt: str | None, embeds: np.ndarray) -> str:
    """The cache salt of a prompt_embeds request: its ids are placeholders, so its blocks may only
    be shared with requests of the same embeddings (and the same salt)."""
    digest = hashlib.sha256(np.ascontiguousarray(embeds, np.float32).tobytes()).hexdigest()
    return f"{cache_salt or ''}\0prompt_embeds {embeds.shape[1]} {digest}"
