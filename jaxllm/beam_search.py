"""Beam search over the engine, with beams sharing KV blocks through the block manager.

Each iteration, every live beam is a request that computes one token and returns the top
``2 * beam_width`` log-probabilities of the next one. Candidates (beam + token) are ranked by
score; the best ``beam_width`` that do not end in eos become the next beams. A new beam is forked
from its parent's retained request: it shares the parent's blocks (ref counts), copies the shared
partial block before writing into it, and a parent no beam continues is released (freed).

Semantics follow vLLM's ``LLM.beam_search``:
- score = cum_logprob / len(tokens) ** length_penalty, where tokens include the prompt and a
  final eos is not counted;
- a candidate ending in eos (unless ``ignore_eos``) is set aside as finished; it does not take a
  beam slot, and every such candidate among a beam's top 2 * beam_width is kept;
- the search runs ``max_tokens`` iterations (no early stopping); finished and live beams are then
  ranked together by score and the best ``beam_width`` returned.
transformers' ``generate(num_beams=...)`` differs: its length penalty divides by the number of
generated tokens (prompt excluded), a finished hypothesis takes one of ``num_beams`` slots in a
bounded heap, and ``early_stopping`` ends the search once enough hypotheses are finished. With no
eos in play (``ignore_eos=True``, or no eos among the candidates) all beams have the same length,
both rank by cum_logprob and they select the same sequences: the tests check that case.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.sampling_params import MAX_LOGPROBS, SamplingParams


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's BeamSearchParams. Only temperature 0 (the model's own log-probabilities) is supported:
    the engine returns raw log-probabilities, from which tempered ones over the whole vocabulary
    cannot be recovered."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self):
        if not isinstance(self.beam_width, int) or not 1 <= 2 * self.beam_width <= MAX_LOGPROBS:
            raise ValueError(f"beam_width={self.beam_width!r} must be an integer in [1, {MAX_LOGPROBS // 2}]")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an integer >= 1")
        if self.temperature != 0.0:
            raise ValueError(f"temperature={self.temperature} is not supported for beam search; use 0.0")


@dataclass
class BeamSearchSequence:
    """One hypothesis: prompt + generated tokens, their text, and the generated tokens' logprob sum."""

    tokens: list[int]
    cum_logprob: float = 0.0
    logprobs: list[dict] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None  # "stop" when it ended in eos, else "length"


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first


def beam_score(tokens: list[int], cum_logprob: float, eos_ids, length_penalty: float) -> float:
    length = len(tokens) - (1 if tokens and tokens[-1] in eos_ids else 0)
    return cum_logprob / (length**length_penalty)


@dataclass
class _Beam:
    seq: BeamSearchSequence
    request_id: str  # the retained request whose next-token logprobs extend this beam


@dataclass
class _Group:
    live: list[_Beam]
    completed: list[BeamSearchSequence] = field(default_factory=list)


class _Search:
    def __init__(self, engine: LLMEngine, params: BeamSearchParams):
        self.engine, self.params = engine, params
        self.eos = frozenset(engine.scheduler.eos_token_ids)
        self.step_params = SamplingParams(
            temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=2 * params.beam_width, detokenize=False
        )
        self._ids = (f"beam-{i}" for i in itertools.count())

    def run(self, prompts: list[list[int]]) -> list[BeamSearchOutput]:
        groups = [_Group([_Beam(BeamSearchSequence(list(p)), next(self._ids))]) for p in prompts]
        for g in groups:
            self.engine.add_request(g.live[0].request_id, g.live[0].seq.tokens, self.step_params, retain_blocks=True)
        for iteration in range(self.params.max_tokens):
            results = self._run_engine()
            last = iteration == self.params.max_tokens - 1
            for g in groups:
                self._advance(g, results, fork=not last)
        return [self._finish(g) for g in groups]

    def _run_engine(self) -> dict[str, dict]:
        results = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out.outputs[0].logprobs[0]
        return results

    def _advance(self, g: _Group, results: dict[str, dict], fork: bool) -> None:
        candidates = []
        for beam in g.live:
            for token, lp in results[beam.request_id].items():
                seq = BeamSearchSequence(beam.seq.tokens + [token], beam.seq.cum_logprob + lp.logprob,
                                         beam.seq.logprobs + [results[beam.request_id]])
                if token in self.eos and not self.params.ignore_eos:
                    g.completed.append(seq)
                else:
                    candidates.append((seq, beam.request_id))
        candidates.sort(key=lambda c: self._score(c[0]), reverse=True)
        parents = [b.request_id for b in g.live]
        g.live = [self._fork(seq, parent, fork) for seq, parent in candidates[: self.params.beam_width]]
        for parent in parents:  # children hold their own references to the shared blocks now
            self.engine.release_request(parent)

    def _fork(self, seq: BeamSearchSequence, parent: str, fork: bool) -> _Beam:
        beam = _Beam(seq, next(self._ids))
        if fork:
            self.engine.fork_request(parent, beam.request_id, seq.tokens, self.step_params)
        return beam

    def _score(self, seq: BeamSearchSequence) -> float:
        return beam_score(seq.tokens, seq.cum_logprob, self.eos, self.params.length_penalty)

    def _finish(self, g: _Group) -> BeamSearchOutput:
        for beam in g.live:
            beam.seq.finish_reason = "length"
        for seq in g.completed:
            seq.finish_reason = "stop"
        best = sorted(g.completed + [b.seq for b in g.live], key=self._score, reverse=True)
        best = best[: self.params.beam_width]
        tokenizer = self.engine.tokenizer
        for seq in best:
            seq.text = None if tokenizer is None else tokenizer.decode(seq.tokens, skip_special_tokens=True)
        return BeamSearchOutput(best)


def beam_search(engine: LLMEngine, prompts: list[list[int]], params: BeamSearchParams) -> list[BeamSearchOutput]:
    """Beam search for each prompt (token ids) on an idle engine; see the module docstring."""
    if engine.has_unfinished_requests():
        raise ValueError("beam_search needs an idle engine: finish or abort the running requests first")
    return _Search(engine, params).run(prompts)
