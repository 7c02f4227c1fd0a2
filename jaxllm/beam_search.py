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


@dataclass(frozen=True)
class Fork:
    """A new beam: request ``child`` of ``tokens`` continues the retained request ``parent``."""

    parent: str
    child: str
    tokens: list[int]


class BeamGroup:
    """One prompt's search, apart from how its requests run (``LLM.beam_search`` drives the engine
    itself; the server drives it through ``AsyncLLMEngine``).

    Each iteration every live beam's request returns the top ``2 * beam_width`` logprobs of its
    next token; :meth:`advance` ranks the candidates and says which new requests to fork from
    which retained ones, and which retained ones to release.
    """

    def __init__(self, prompt: list[int], params: BeamSearchParams, eos_ids, ids):
        self.params, self.eos, self._ids = params, frozenset(eos_ids), ids
        self.num_prompt_tokens = len(prompt)
        self.live = [_Beam(BeamSearchSequence(list(prompt)), next(ids))]
        self.completed: list[BeamSearchSequence] = []

    @property
    def first_request_id(self) -> str:
        return self.live[0].request_id

    def advance(self, results: dict[str, dict], fork: bool) -> tuple[list[Fork], list[str]]:
        """Rank the candidates of ``results`` (request id -> {token: Logprob}); returns the forks
        to queue (none when ``fork`` is False: the last iteration) and the parents to release
        after them (children hold their own references to the shared blocks by then)."""
        candidates = []
        for beam in self.live:
            for token, lp in results[beam.request_id].items():
                seq = BeamSearchSequence(beam.seq.tokens + [token], beam.seq.cum_logprob + lp.logprob,
                                         beam.seq.logprobs + [results[beam.request_id]])
                if token in self.eos and not self.params.ignore_eos:
                    self.completed.append(seq)
                else:
                    candidates.append((seq, beam.request_id))
        candidates.sort(key=lambda c: self._score(c[0]), reverse=True)
        parents = [b.request_id for b in self.live]
        self.live = [_Beam(seq, next(self._ids)) for seq, _ in candidates[: self.params.beam_width]]
        forks = [Fork(parent, beam.request_id, beam.seq.tokens)
                 for beam, (_, parent) in zip(self.live, candidates, strict=False)] if fork else []
        return forks, parents

    def _score(self, seq: BeamSearchSequence) -> float:
        return beam_score(seq.tokens, seq.cum_logprob, self.eos, self.params.length_penalty)

    def finish(self, tokenizer) -> BeamSearchOutput:
        """The best ``beam_width`` of the finished and live beams, their texts decoded."""
        for beam in self.live:
            beam.seq.finish_reason = "length"
        for seq in self.completed:
            seq.finish_reason = "stop"
        best = sorted(self.completed + [b.seq for b in self.live], key=self._score, reverse=True)
        best = best[: self.params.beam_width]
        for seq in best:
            seq.text = None if tokenizer is None else tokenizer.decode(seq.tokens, skip_special_tokens=True)
        return BeamSearchOutput(best)


def step_params(params: BeamSearchParams) -> SamplingParams:
    """What each beam's one-token request asks for: its next token's top 2 * beam_width logprobs."""
    return SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=2 * params.beam_width,
                          detokenize=False)


class _Search:
    def __init__(self, engine: LLMEngine, params: BeamSearchParams, lora_request=None):
        self.engine, self.params, self.lora_request = engine, params, lora_request
        self.eos = frozenset(engine.scheduler.eos_token_ids)
        self.step_params = step_params(params)
        self._ids = (f"beam-{i}" for i in itertools.count())

    def run(self, prompts: list[list[int]]) -> list[BeamSearchOutput]:
        groups = [BeamGroup(p, self.params, self.eos, self._ids) for p in prompts]
        for g in groups:
            self.engine.add_request(g.first_request_id, g.live[0].seq.tokens, self.step_params, retain_blocks=True,
                                    lora_request=self.lora_request)  # forks inherit it
        for iteration in range(self.params.max_tokens):
            results = self._run_engine()
            last = iteration == self.params.max_tokens - 1
            for g in groups:
                forks, released = g.advance(results, fork=not last)
                for f in forks:
                    self.engine.fork_request(f.parent, f.child, f.tokens, self.step_params)
                for parent in released:
                    self.engine.release_request(parent)
        return [g.finish(self.engine.tokenizer) for g in groups]

    def _run_engine(self) -> dict[str, dict]:
        results = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out.outputs[0].logprobs[0]
        return results


def beam_search(engine: LLMEngine, prompts: list[list[int]], params: BeamSearchParams,
                lora_request=None) -> list[BeamSearchOutput]:
    """Beam search for each prompt (token ids) on an idle engine, with ``lora_request``'s adapter
    when given; see the module docstring."""
    engine.check_beam_search()
    if engine.has_unfinished_requests():
        raise ValueError("beam_search needs an idle engine: finish or abort the running requests first")
    return _Search(engine, params, lora_request).run(prompts)
