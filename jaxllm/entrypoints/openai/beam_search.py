"""``use_beam_search`` in completions and chat: vLLM's beam search, run by the server.

The search is ``jaxllm.beam_search.BeamGroup``, the one ``LLM.beam_search`` runs, driven here
through :class:`AsyncLLMEngine` so that other clients' requests keep running beside it: each
iteration every live beam is a one-token request returning its next token's top
``2 * beam_width`` logprobs; new beams are forked from the retained requests of their parents
(sharing their KV blocks) and parents are released. ``n`` is the beam width, and the ``n`` best
sequences are the choices. A client that leaves aborts the beams in flight and releases every
retained one.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

from jaxllm.beam_search import BeamGroup, BeamSearchParams, step_params
from jaxllm.engine.async_engine import AsyncLLMEngine
from jaxllm.entrypoints.openai.serving_engine import Delta
from jaxllm.outputs import CompletionOutput, RequestOutput


async def beam_search_output(engine: AsyncLLMEngine, request_id: str, prompt: list[int],
                             params: BeamSearchParams, lora_request=None) -> RequestOutput:
    """The ``beam_width`` best continuations of ``prompt`` as one finished RequestOutput (with
    ``lora_request``'s adapter when given: forks inherit it)."""
    eos = engine.engine.scheduler.eos_token_ids
    group = BeamGroup(prompt, params, eos, (f"{request_id}-beam-{i}" for i in itertools.count()))
    one_token = step_params(params)
    first = group.first_request_id
    streams = {first: await engine.add_request(first, prompt, one_token, retain_blocks=True,
                                               lora_request=lora_request)}
    retained: set[str] = set()
    try:
        for iteration in range(params.max_tokens):
            results = {}
            for request, stream in streams.items():
                async for output in stream:
                    if output.finished:
                        results[request] = output.outputs[0].logprobs[0]
                retained.add(request)
            forks, released = group.advance(results, fork=iteration < params.max_tokens - 1)
            streams = {}
            for fork in forks:
                streams[fork.child] = await engine.fork_request(fork.parent, fork.child, fork.tokens, one_token)
            for request in released:
                engine.release(request)
                retained.discard(request)
    finally:
        for request in set(streams) | retained:  # left early: nothing may keep blocks
            engine.abort(request)
            engine.release(request)
    best = group.finish(None).sequences
    tokenizer = engine.tokenizer
    outputs = []
    for index, seq in enumerate(best):
        generated = seq.tokens[group.num_prompt_tokens:]
        shown = generated[:-1] if seq.finish_reason == "stop" else generated  # the eos is not text
        text = "" if tokenizer is None else tokenizer.decode(shown, skip_special_tokens=True)
        outputs.append(CompletionOutput(index=index, text=text,
                                        token_ids=generated, cumulative_logprob=seq.cum_logprob, logprobs=None,
                                        finish_reason=seq.finish_reason, stop_reason=None))
    return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=prompt, prompt_logprobs=None,
                         outputs=outputs, finished=True)


async def as_deltas(outputs: list[RequestOutput], n: int) -> AsyncIterator[Delta]:
    """Finished outputs as one delta per choice, for the streaming responses."""
    for prompt_index, output in enumerate(outputs):
        for c in output.outputs:
            yield Delta(prompt_index * n + c.index, prompt_index, c.text, list(c.token_ids), None, len(c.token_ids),
                        c.finish_reason, c.stop_reason, None)
