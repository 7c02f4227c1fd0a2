"""OpenAI's logprobs shapes from the engine's per-token ``{token id: Logprob}`` dicts.

The engine puts the top-k entries first, in rank order, then the sampled token when it is not among
them; both shapes below are built from that order, as vLLM builds them.
"""

from __future__ import annotations

import itertools

from jaxllm.entrypoints.openai.protocol import ChatChoiceLogProbs, ChatLogProb, ChatLogProbsContent, CompletionLogProbs
from jaxllm.outputs import Logprob

_MIN_LOGPROB = -9999.0  # -inf is not valid JSON; vLLM clamps to the same value

TokenLogprobs = dict[int, Logprob] | None  # None: a position without logprobs (the first prompt token)


def completion_logprobs(token_ids: list[int], logprobs: list[TokenLogprobs], tokenizer,
                        initial_offset: int = 0) -> CompletionLogProbs:
    """The legacy completions shape: every entry of each token's dict goes into ``top_logprobs``.

    Args:
        token_ids: the tokens, echoed prompt tokens first.
        logprobs: one entry per token of ``token_ids``.
        tokenizer: decodes tokens whose entry carries no text.
        initial_offset: ``text_offset`` of the first token (text already sent, in a stream).
    """
    out = CompletionLogProbs()
    offset = initial_offset
    for token_id, entry in zip(token_ids, logprobs, strict=True):
        chosen = entry.get(token_id) if entry else None
        token = _token_text(token_id, chosen, tokenizer)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(token)
        out.token_logprobs.append(None if chosen is None else _clamp(chosen.logprob))
        out.top_logprobs.append(None if chosen is None else {
            _token_text(tid, lp, tokenizer): _clamp(lp.logprob) for tid, lp in entry.items()
        })
    return out


def next_text_offset(logprobs: CompletionLogProbs, initial_offset: int) -> int:
    """Where the token after ``logprobs``' tokens starts (continues offsets across stream chunks)."""
    if not logprobs.tokens:
        return initial_offset
    return logprobs.text_offset[-1] + len(logprobs.tokens[-1])


def chat_logprobs(token_ids: list[int], logprobs: list[TokenLogprobs], num_top: int,
                  tokenizer) -> ChatChoiceLogProbs:
    """The chat shape: per token its logprob and bytes, and the ``num_top`` most likely tokens."""
    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=True):
        chosen = entry.get(token_id) if entry else None
        token = _token_text(token_id, chosen, tokenizer)
        if chosen is None:
            content.append(ChatLogProbsContent(token=token, bytes=_utf8(token)))
            continue
        top = [_chat_logprob(tid, lp, tokenizer) for tid, lp in itertools.islice(entry.items(), num_top)]
        content.append(ChatLogProbsContent(token=token, logprob=_clamp(chosen.logprob), bytes=_utf8(token),
                                           top_logprobs=top))
    return ChatChoiceLogProbs(content=content)


def _chat_logprob(token_id: int, logprob: Logprob, tokenizer) -> ChatLogProb:
    token = _token_text(token_id, logprob, tokenizer)
    return ChatLogProb(token=token, logprob=_clamp(logprob.logprob), bytes=_utf8(token))


def _token_text(token_id: int, logprob: Logprob | None, tokenizer) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id])


def _clamp(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


def _utf8(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))
