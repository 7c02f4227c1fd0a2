"""Pooling requests (LLM.embed / LLM.encode, PoolingParams): the prompt's final hidden states,
pooled LAST / MEAN / CLS and normalised, equal transformers' on the same weights, however the
engine chunks, caches or preempts them, and beside generation requests."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.config import PoolerConfig
from jaxllm.pooling_params import PoolingParams

# 128 blocks (2k tokens) instead of the CPU default of 1 GiB: small pools keep the suite's memory down.
LIMITS = dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64, num_kv_blocks=128)
TEXTS = [
    "The capital of France is Paris.",
    "A paged KV cache stores keys and values in fixed-size blocks, so that sequences of any length share one pool "
    "of memory without fragmentation, and equal prefixes can share blocks.",
    "def add(a, b):\n    return a + b",
]


def test_pooler_config_and_pooling_params_errors():
    assert PoolerConfig.from_dict(None) == PoolerConfig("LAST", True)
    assert PoolerConfig.from_dict({"pooling_type": "mean"}) == PoolerConfig("MEAN", True)
    for bad, match in [({"pooling_type": "MAX"}, "pooling_type='MAX' must be one of"),
                       ({"normalise": True}, r"unknown key\(s\) \['normalise'\]"),
                       ({"normalize": "yes"}, "normalize='yes' must be a bool"), ([1], "must be a dict")]:
        with pytest.raises(ValueError, match=match):
            PoolerConfig.from_dict(bad)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"dimensions={bad!r} must be a positive integer"):
            PoolingParams(dimensions=bad)
    with pytest.raises(ValueError, match="truncate_prompt_tokens=0"):
        PoolingParams(truncate_prompt_tokens=0)
    from jaxllm.engine_args import EngineArgs

    with pytest.raises(ValueError, match="runner='embed' must be one of"):
        EngineArgs(runner="embed")
    with pytest.raises(ValueError, match="pooling_type='MAX'"):
        EngineArgs(pooler_config={"pooling_type": "MAX"})


def _reference(hf_model, tokenizer, texts, kind: str, normalize: bool = True) -> list[np.ndarray]:
    """transformers' base model's last_hidden_state (after the final norm), pooled."""
    import torch

    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer.encode(text)
            h = hf_model.model(torch.tensor([ids])).last_hidden_state[0].numpy()
            v = {"LAST": h[-1], "MEAN": h.mean(axis=0), "CLS": h[0]}[kind]
            out.append(v / np.linalg.norm(v) if normalize else v)
    return out


@pytest.fixture(scope="module")
def llm(smollm2_model):
    from jaxllm import LLM

    return LLM(smollm2_model, **LIMITS)


def _assert_close(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert a.shape == b.shape == (576,)
        np.testing.assert_allclose(a, b, atol=2e-4 * max(1.0, float(np.abs(b).max())))


def test_embed_equals_transformers_last_token_normalised(llm, smollm2_hf, smollm2_model):
    compiles = llm.llm_engine.stats.num_compiles
    outputs = llm.embed(TEXTS, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == [smollm2_model.tokenizer.encode(t) for t in TEXTS]
    _assert_close([o.outputs.embedding for o in outputs], _reference(smollm2_hf, smollm2_model.tokenizer, TEXTS, "LAST"))
    assert all(abs(np.linalg.norm(o.outputs.embedding) - 1) < 1e-5 for o in outputs)
    raw = llm.encode(TEXTS[:1], PoolingParams(normalize=False), use_tqdm=False)[0].outputs.data
    _assert_close([raw], _reference(smollm2_hf, smollm2_model.tokenizer, TEXTS[:1], "LAST", normalize=False))
    # Again: the prompts' full blocks now come from the prefix cache; the last token is recomputed.
    hits = llm.llm_engine.stats.prefix_cache_hits
    again = llm.embed(TEXTS, use_tqdm=False)
    assert llm.llm_engine.stats.prefix_cache_hits > hits
    _assert_close([o.outputs.embedding for o in again], [o.outputs.embedding for o in outputs])
    stats = llm.llm_engine.stats
    assert stats.num_compiles == compiles and stats.kv_blocks_used == 0
    assert stats.num_generated_tokens == 0  # a pooling request's one sampled token is not an output


@pytest.mark.parametrize("kind", ["MEAN", "CLS"])
def test_mean_and_cls_pooling_through_chunked_prefill_and_preemption(smollm2_model, smollm2_hf, kind):
    from jaxllm import LLM

    # 16-token chunks split the long prompt; 4 usable blocks of 16 tokens make requests wait.
    llm = LLM(smollm2_model, pooler_config={"pooling_type": kind}, max_model_len=128, max_num_seqs=4,
              max_num_batched_tokens=16, num_kv_blocks=5)
    outputs = llm.embed(TEXTS * 2, use_tqdm=False)
    _assert_close([o.outputs.embedding for o in outputs],
                  _reference(smollm2_hf, smollm2_model.tokenizer, TEXTS * 2, kind))
    stats = llm.llm_engine.stats
    assert stats.prefix_cache_hits == 0  # every prompt position is needed: no cache
    assert stats.kv_blocks_used == 0


def test_pooling_and_generation_requests_share_steps(llm, smollm2_expected_greedy, smollm2_hf, smollm2_model):
    from conftest import GREEDY_MAX_TOKENS, GREEDY_PROMPTS

    from jaxllm import SamplingParams
    from jaxllm.outputs import PoolingRequestOutput

    engine = llm.llm_engine
    greedy = SamplingParams(temperature=0.0, max_tokens=GREEDY_MAX_TOKENS, ignore_eos=True)
    for i, prompt in enumerate(GREEDY_PROMPTS):
        engine.add_request(f"gen{i}", prompt, greedy)
        engine.add_request(f"emb{i}", TEXTS[i % len(TEXTS)], PoolingParams())
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert [done[f"gen{i}"].outputs[0].token_ids for i in range(4)] == smollm2_expected_greedy
    pooled = [done[f"emb{i}"] for i in range(4)]
    assert all(isinstance(o, PoolingRequestOutput) for o in pooled)
    texts = [TEXTS[i % len(TEXTS)] for i in range(4)]
    _assert_close([o.outputs.data for o in pooled], _reference(smollm2_hf, smollm2_model.tokenizer, texts, "LAST"))


def test_mean_pooling_sums_each_position_once_and_restarts_after_a_preemption():
    from jaxllm.engine.messages import RunnerOutput, SamplingOptions, ScheduledSequence
    from jaxllm.engine.request import Request
    from jaxllm.engine.scheduler import Scheduler
    from jaxllm.sampling_params import SamplingParams

    request = Request("r", list(range(1, 41)), SamplingParams(max_tokens=1), 0.0, pooling=("MEAN", True))

    def chunk(start, n, value):
        seq = ScheduledSequence("r", tuple(range(n)), start, (1,), False, SamplingOptions(), 0, pooling="MEAN")
        Scheduler._record_pooled(request, seq, RunnerOutput(pooled={"r": (start, np.full(2, value, np.float32))}))

    chunk(0, 16, 1.0)
    chunk(16, 16, 2.0)
    chunk(16, 16, 5.0)  # the same positions again (never added twice)
    assert request.num_pooled_tokens == 32 and request.pooled.tolist() == [3.0, 3.0]
    chunk(0, 16, 10.0)  # preempted and recomputed from the start
    chunk(16, 16, 20.0)
    chunk(32, 8, 30.0)
    assert request.num_pooled_tokens == 40 and request.pooled.tolist() == [60.0, 60.0]


def test_encode_argument_errors(llm):
    with pytest.raises(ValueError, match=r"pooling_task=.classify. is not supported by this model; .*needs a \*ForSequence"):
        llm.encode("x", pooling_task="classify")
    with pytest.raises(ValueError, match="got 2 pooling_params for 1 prompts"):
        llm.embed(["x"], [PoolingParams(), PoolingParams()])
    with pytest.raises(ValueError, match="must be a SamplingParams or PoolingParams"):
        llm.llm_engine.add_request("bad", "x", {"normalize": True})
    assert not llm.llm_engine.has_unfinished_requests()


def test_score_with_an_embedding_model_is_the_cosine_of_the_embeddings(llm):
    embeddings = [np.asarray(o.outputs.embedding) for o in llm.embed(TEXTS, use_tqdm=False)]
    scores = llm.score(TEXTS[0], TEXTS, use_tqdm=False)
    want = [float(embeddings[0] @ e) for e in embeddings]  # unit vectors
    np.testing.assert_allclose([s.outputs.score for s in scores], want, atol=1e-5)
    assert abs(scores[0].outputs.score - 1) < 1e-5 and max(want[1:]) < 0.99
    pairwise = llm.score(TEXTS[1:], TEXTS[:2], use_tqdm=False)
    np.testing.assert_allclose([s.outputs.score for s in pairwise],
                               [float(embeddings[1] @ embeddings[0]), float(embeddings[2] @ embeddings[1])], atol=1e-5)
    tok = llm.get_tokenizer()
    assert pairwise[0].prompt_token_ids == tok.encode(TEXTS[1]) + tok.encode(TEXTS[0])
    with pytest.raises(ValueError, match="data_1 has 2 texts and data_2 3"):
        llm.score(TEXTS[:2], TEXTS, use_tqdm=False)


def test_a_pooling_prompt_may_fill_max_model_len(llm, smollm2_hf, smollm2_model):
    """The one token a pooling request samples is never an output and takes no position, so a
    prompt of max_model_len tokens pools (as vLLM's); one more is refused."""
    tok = smollm2_model.tokenizer
    ids = (tok.encode(TEXTS[1]) * 20)[:256]
    out = llm.encode([{"prompt_token_ids": ids}], PoolingParams(normalize=False), use_tqdm=False)[0]
    import torch

    with torch.no_grad():
        want = smollm2_hf.model(torch.tensor([ids])).last_hidden_state[0, -1].numpy()
    _assert_close([out.outputs.data], [want])
    truncated = llm.embed([{"prompt_token_ids": ids + ids[:10]}], PoolingParams(truncate_prompt_tokens=-1),
                          use_tqdm=False)[0]
    assert truncated.prompt_token_ids == (ids + ids[:10])[-256:]
    with pytest.raises(ValueError, match=r"the prompt \(257 tokens\) exceeds max_model_len=256"):
        llm.embed([{"prompt_token_ids": ids + ids[:1]}], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
