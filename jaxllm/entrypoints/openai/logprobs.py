"""OpenAI's logprobs shapes from the engine's per-token ``{token id: Logprob}`` dicts.

The engine puts the top-k entries first, in rank order, then the sampled token when it is not among
them; both shapes below are built from that order, as vLLM builds them.

``as_token_ids`` (vLLM's ``return_tokens_as_token_ids``) shows each token as ``"token_id:<id>"``
instead of its text, for tokens whose text alone is not valid UTF-8 (part of a character). Text
offsets and ``bytes`` still describe the token's text.
"""

from __future__ import annotations

import itertools

from jaxllm.entrypoints.openai.protocol import ChatChoiceLogProbs, ChatLogProb, ChatLogProbsContent, CompletionLogProbs
from jaxllm.outputs import Logprob

_MIN_LOGPROB = -9999.0  # -inf is not valid JSON; vLLM clamps to the same value

TokenLogprobs = dict[int, Logprob] | None  # None: a position without logprobs (the first prompt token)


def completion_logprobs(token_ids: list[int], logprobs: list[TokenLogprobs], tokenizer,
                        initial_offset: int = 0, as_token_ids: bool = False) -> tuple[CompletionLogProbs, int]:
    """The legacy completions shape: every entry of each token's dict goes into ``top_logprobs``.
    Returns it and the text offset after its last token (where a stream's next chunk starts).

    Args:
        token_ids: the tokens, echoed prompt tokens first.
        logprobs: one entry per token of ``token_ids``.
        tokenizer: decodes tokens whose entry carries no text.
        initial_offset: ``text_offset`` of the first token (text already sent, in a stream).
        as_token_ids: tokens shown as ``"token_id:<id>"``.
    """
    out = CompletionLogProbs()
    offset = initial_offset
    for token_id, entry in zip(token_ids, logprobs, strict=True):
        chosen = entry.get(token_id) if entry else None
        text = _token_text(token_id, chosen, tokenizer)
        out.tokens.append(_shown(token_id, text, as_token_ids))
        out.text_offset.append(offset)
        offset += len(text)
        out.token_logprobs.append(None if chosen is None else _clamp(chosen.logprob))
        out.top_logprobs.append(None if chosen is None else {
            _shown(tid, _token_text(tid, lp, tokenizer), as_token_ids): _clamp(lp.logprob) for tid, lp in entry.items()
        })
    return out, offset


def chat_logprobs(token_ids: list[int], logprobs: list[TokenLogprobs], num_top: int,
                  tokenizer, as_token_ids: bool = False) -> ChatChoiceLogProbs:
    """The chat shape: per token its logprob and bytes, and the ``num_top`` most likely tokens."""
    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=True):
        chosen = entry.get(token_id) if entry else None
        text = _token_text(token_id, chosen, tokenizer)
        token = _shown(token_id, text, as_token_ids)
        if chosen is None:
            content.append(ChatLogProbsContent(token=token, bytes=_utf8(text)))
            continue
        top = [_chat_logprob(tid, lp, tokenizer, as_token_ids) for tid, lp in itertools.islice(entry.items(), num_top)]
        content.append(ChatLogProbsContent(token=token, logprob=_clamp(chosen.logprob), bytes=_utf8(text),
                                           top_logprobs=top))
    return ChatChoiceLogProbs(content=content)


def _chat_logprob(token_id: int, logprob: Logprob, tokenizer, as_token_ids: bool) -> ChatLogProb:
    text = _token_text(token_id, logprob, tokenizer)
    return ChatLogProb(token=_shown(token_id, text, as_token_ids), logprob=_clamp(logprob.logprob), bytes=_utf8(text))


def _token_text(token_id: int, logprob: Logprob | None, tokenizer) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return "" if tokenizer is None else tokenizer.decode([token_id])  # no tokenizer: no text


def _shown(token_id: int, text: str, as_token_ids: bool) -> str:
    return f"token_id:{token_id}" if as_token_ids else text


def _clamp(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


def _utf8(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))
