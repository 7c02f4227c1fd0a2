"""The jitted engine under a random mixed workload equals each request run alone.

Per seed: a tiny random checkpoint, a dozen requests (prompts sharing prefixes, greedy, seeded
top-k/top-p/min-p, n=2, logprobs, penalties, stop ids with min_tokens), an engine with a random
small pool, token budget, block size, async scheduling, prefix caching and preemption mode, and
aborts at random steps. Every request that is not aborted must finish with the tokens, finish
and stop reasons and cumulative logprob it gets alone in a large pool; the pool ends empty.
"""

from __future__ import annotations

import random

import pytest

from jaxllm import LLM, SamplingParams

VOCAB = 160  # tiny_models' vocabulary


def _workload(rng: random.Random) -> list[tuple[list[int], SamplingParams]]:
    shared = [rng.randrange(3, VOCAB) for _ in range(40)]
    requests = []
    for _ in range(rng.randint(8, 12)):
        if rng.random() < 0.5:
            prompt = shared[: rng.randint(4, 40)] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(0, 20))]
        else:
            prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 60))]
        kw = dict(max_tokens=rng.randint(1, 30), ignore_eos=rng.random() < 0.7)
        kind = rng.choice(["greedy", "seeded", "n2", "logprobs", "penalties", "stop", "min_p"])
        if kind == "greedy":
            kw.update(temperature=0.0)
        elif kind == "seeded":
            kw.update(temperature=0.9, top_k=rng.choice([0, 5, 20]), top_p=rng.choice([1.0, 0.8]), seed=rng.randint(0, 99))
        elif kind == "n2":
            kw.update(temperature=1.0, n=2, seed=rng.randint(0, 99))
        elif kind == "logprobs":
            kw.update(temperature=0.0, logprobs=2)
        elif kind == "penalties":
            kw.update(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5)
        elif kind == "stop":
            kw.update(temperature=0.0, stop_token_ids=[rng.randrange(3, VOCAB) for _ in range(5)],
                      min_tokens=min(kw["max_tokens"], rng.randint(0, 3)))
        else:
            kw.update(temperature=0.7, min_p=0.05, seed=rng.randint(0, 99))
        requests.append((prompt, SamplingParams(**kw)))
    return requests


def _summary(output):
    return [(c.token_ids, c.finish_reason, c.stop_reason) for c in output.outputs]


@pytest.mark.parametrize("family, seed", [("llama", 3), ("mistral", 7)])
def test_random_workload_equals_each_request_alone(tmp_path, family, seed):
    from tiny_models import make_tiny_checkpoint

    import jaxllm

    model = jaxllm.load_model(str(make_tiny_checkpoint(family, tmp_path)), dtype="float32")
    rng = random.Random(seed)
    requests = _workload(rng)
    alone = LLM(model, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, num_kv_blocks=64,
                enable_prefix_caching=False, compilation_cache_dir=None)
    expected = [alone.generate([{"prompt_token_ids": p}], [sp], use_tqdm=False)[0] for p, sp in requests]

    config = dict(max_model_len=128, max_num_seqs=rng.choice([4, 8]), max_num_batched_tokens=rng.choice([16, 32]),
                  num_kv_blocks=rng.choice([10, 12]), async_scheduling=rng.random() < 0.6,
                  enable_prefix_caching=rng.random() < 0.7, block_size=rng.choice([4, 16]))
    if rng.random() < 0.5:
        config.update(preemption_mode="swap", swap_space=0.001)
    if config["block_size"] == 4:
        config["num_kv_blocks"] *= 3
    engine = LLM(model, compilation_cache_dir=None, **config).llm_engine
    compiles = engine.stats.num_compiles
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, params)
    final, aborted = {}, set()
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                final[output.request_id] = output
        if rng.random() < 0.03:
            live = [i for i in range(len(requests)) if f"r{i}" not in final and i not in aborted]
            if live:
                victim = rng.choice(live)
                aborted.add(victim)
                engine.abort_request(f"r{victim}")
    stats = engine.stats
    assert stats.kv_blocks_used == 0 and stats.num_compiles == compiles, config
    assert stats.num_preemptions > 0 and aborted, (config, aborted)  # the seeds are chosen to have both
    assert set(final) == {f"r{i}" for i in range(len(requests))} - {f"r{i}" for i in aborted}
    for i in range(len(requests)):
        if i in aborted:
            continue
        got, want = final[f"r{i}"], expected[i]
        assert _summary(got) == _summary(want), (i, requests[i][1], config)
        lp, want_lp = got.outputs[0].cumulative_logprob, want.outputs[0].cumulative_logprob
        assert (lp is None) == (want_lp is None) and (lp is None or abs(lp - want_lp) < 1e-3), i
