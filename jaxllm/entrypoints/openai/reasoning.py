"""Reasoning parsers (``--reasoning-parser``, vLLM's): a reasoning model's ``<think> ... </think>``
part of a chat reply goes to the message's ``reasoning`` (and its older name
``reasoning_content``), the rest to ``content``.

- ``deepseek_r1``: the reply is reasoning from its start (DeepSeek-R1's template opens the
  ``<think>`` in the prompt; one the model writes itself is dropped) up to ``</think>``; a reply
  without ``</think>`` is all reasoning.
- ``qwen3``: the reply is reasoning only when it opens with ``<think>`` (Qwen3's template lets the
  model write it; with ``enable_thinking=False`` it does not), up to ``</think>``.

The tags are matched in the text, so any tokenizer works (vLLM requires them to be single tokens).
Streamed replies are split by the same rule as whole ones, so their pieces join to the whole
reply's fields; a possible start of a tag is held back until it is decided.
"""

from __future__ import annotations

REASONING_PARSERS = ("deepseek_r1", "qwen3")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """One choice's reply, fed piece by piece: ``feed`` returns the (reasoning, content) text that
    may go out now, ``finish`` the rest. ``split`` does a whole reply at once."""

    def __init__(self, parser: str):
        if parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning parser {parser!r} is not supported; supported: {REASONING_PARSERS}")
        self.parser = parser
        self.text = ""
        self._phase = "start"  # start -> reasoning -> content (qwen3 may go start -> content)
        self._sent = 0  # characters of ``text`` already given out (or dropped, for tags)

    @classmethod
    def split(cls, parser: str, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole reply; None for an empty part."""
        splitter = cls(parser)
        reasoning, content = splitter.feed(text)
        more_reasoning, more_content = splitter.finish()
        return (reasoning + more_reasoning) or None, (content + more_content) or None

    def feed(self, piece: str) -> tuple[str, str]:
        self.text += piece
        reasoning = content = ""
        if self._phase == "start":
            if len(self.text) < len(THINK_OPEN) and THINK_OPEN.startswith(self.text):
                return "", ""  # may still open with <think>
            if self.text.startswith(THINK_OPEN):
                self._sent, self._phase = len(THINK_OPEN), "reasoning"
            else:
                self._phase = "reasoning" if self.parser == "deepseek_r1" else "content"
        if self._phase == "reasoning":
            end = self.text.find(THINK_CLOSE, self._sent)
            if end < 0:
                stop = len(self.text) - _held_prefix(self.text[self._sent:], THINK_CLOSE)
                reasoning, self._sent = self.text[self._sent:stop], stop
                return reasoning, ""
            reasoning = self.text[self._sent:end]
            self._sent, self._phase = end + len(THINK_CLOSE), "content"
        content, self._sent = self.text[self._sent:], len(self.text)
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is still held back, at the end of the reply."""
        rest, self._sent = self.text[self._sent:], len(self.text)
        if self._phase == "start":  # the whole reply is a proper start of "<think>"
            return ("", rest) if self.parser == "qwen3" else (rest, "")
        return (rest, "") if self._phase == "reasoning" else ("", rest)
