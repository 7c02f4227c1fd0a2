"""Custom logits processors (vLLM's ``LLM(logits_processors=[...])``, JAX processors compiled into
the step) and the ``SamplingParams.extra_args`` / ``vllm_xargs`` that drive them: only the rows
of requests that ask are changed, in the same batch as requests that do not, without recompiles."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import make_tiny_checkpoint, make_tiny_tokenizer

from jaxllm import LLM, LogitsProcessor, SamplingParams

VOCAB = 320
LIMITS = dict(max_model_len=96, max_num_seqs=8, max_num_batched_tokens=32, num_kv_blocks=48)
PROMPTS = ["The capital of France is", "A paged KV cache", "def add(a, b):", "Once upon a time"]
GREEDY = dict(temperature=0.0, max_tokens=8, ignore_eos=True)


class OnlyToken(LogitsProcessor):
    """vLLM's example processor: a request with extra_args target_token samples only that token."""

    state_dtype = np.int32

    @classmethod
    def validate_params(cls, params):
        token = (params.extra_args or {}).get("target_token")
        if token is not None and (not isinstance(token, int) or not 0 <= token < VOCAB):
            raise ValueError(f"extra_args target_token={token!r} must be a token id below {VOCAB}")

    def row_state(self, params):
        return (params.extra_args or {}).get("target_token")

    def apply(self, logits, state):
        keep = jnp.arange(logits.shape[-1])[None, :] == state[:, None]
        return jnp.where(keep, logits, -jnp.inf)


class Boost(LogitsProcessor):
    """A vector state: extra_args boost = [token, amount] adds amount to that token's logit."""

    state_shape = (2,)

    def row_state(self, params):
        return (params.extra_args or {}).get("boost")

    def apply(self, logits, state):
        hit = jnp.arange(logits.shape[-1])[None, :] == state[:, :1].astype(jnp.int32)
        return logits + jnp.where(hit, state[:, 1:], 0.0)


class BanClaimingInvariance(LogitsProcessor):
    """Bans extra_args ban, yet declares itself argmax-invariant: greedy rows must skip it."""

    state_dtype = np.int32

    def is_argmax_invariant(self):
        return True

    def row_state(self, params):
        return (params.extra_args or {}).get("ban")

    def apply(self, logits, state):
        return jnp.where(jnp.arange(logits.shape[-1])[None, :] == state[:, None], -jnp.inf, logits)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("lp")
    make_tiny_checkpoint("llama", path, seed=5, config_overrides={"vocab_size": VOCAB})
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def plain(model):
    llm = LLM(str(model), **LIMITS, warmup=False, compilation_cache_dir=None)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SamplingParams(**GREEDY), use_tqdm=False)]


@pytest.fixture(scope="module")
def llm(model):
    # One processor by class, one by name, as `jaxllm serve --logits-processors` gives them.
    return LLM(str(model), **LIMITS, logits_processors=[OnlyToken, "test_logits_processors:Boost",
                                                        BanClaimingInvariance])


def test_only_the_rows_that_ask_are_changed(llm, plain):
    compiles = llm.llm_engine.stats.num_compiles
    params = [SamplingParams(**GREEDY, extra_args={"target_token": 7}),
              SamplingParams(**GREEDY),
              SamplingParams(**dict(GREEDY, temperature=1.0), seed=3, extra_args={"target_token": 11}),
              SamplingParams(**GREEDY, extra_args={"unrelated": "x"})]
    out = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    assert out[0] == [7] * 8 and out[2] == [11] * 8
    assert out[1] == plain[1] and out[3] == plain[3]
    # n > 1: the forks keep the request's state.
    forks = llm.generate(PROMPTS[0], SamplingParams(**dict(GREEDY, temperature=1.0), n=3, seed=1,
                                                    extra_args={"target_token": 5}), use_tqdm=False)[0]
    assert [c.token_ids for c in forks.outputs] == [[5] * 8] * 3
    assert llm.llm_engine.stats.num_compiles == compiles


def test_a_vector_state_and_the_processors_in_order(llm, plain):
    boosted = llm.generate(PROMPTS[1], SamplingParams(**GREEDY, extra_args={"boost": [42, 1e4]}),
                           use_tqdm=False)[0].outputs[0].token_ids
    assert boosted == [42] * 8
    # OnlyToken runs first: Boost cannot bring back a token it removed.
    both = llm.generate(PROMPTS[1], SamplingParams(**GREEDY, extra_args={"boost": [42, 1e4], "target_token": 9}),
                        use_tqdm=False)[0].outputs[0].token_ids
    assert both == [9] * 8
    small = llm.generate(PROMPTS[1], SamplingParams(**GREEDY, extra_args={"boost": [42, 0.0]}),
                         use_tqdm=False)[0].outputs[0].token_ids
    assert small == plain[1]


def test_argmax_invariant_processors_skip_greedy_rows(llm, plain):
    first = plain[0][0]
    greedy = llm.generate(PROMPTS[0], SamplingParams(**GREEDY, extra_args={"ban": first}),
                          use_tqdm=False)[0].outputs[0].token_ids
    assert greedy == plain[0]  # its claim of invariance is taken at its word
    drawn = llm.generate(PROMPTS[0], SamplingParams(**dict(GREEDY, temperature=1e-3, max_tokens=1), seed=0,
                                                    extra_args={"ban": first}), use_tqdm=False)[0].outputs[0]
    assert drawn.token_ids[0] != first  # a near-greedy draw without the banned token


def test_bad_arguments_are_refused_before_the_queue(llm, model):
    engine = llm.llm_engine
    with pytest.raises(ValueError, match="extra_args target_token='a' must be a token id"):
        engine.add_request("bad", PROMPTS[0], SamplingParams(extra_args={"target_token": "a"}))
    with pytest.raises(ValueError, match=r"logits processor Boost: row_state gave shape \(3,\), its state_shape is "
                                         r"\(2,\)"):
        engine.add_request("bad", PROMPTS[0], SamplingParams(extra_args={"boost": [1, 2, 3]}))
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="extra_args=.* must be a dict with str keys"):
        SamplingParams(extra_args={1: 2})
    with pytest.raises(ValueError, match="'no_such_module:X' cannot be imported"):
        LLM(str(model), **LIMITS, logits_processors=["no_such_module:X"])
    with pytest.raises(ValueError, match="must be a subclass of jaxllm.LogitsProcessor"):
        LLM(str(model), **LIMITS, logits_processors=[dict])
    with pytest.raises(ValueError, match="logits_processors must be a list"):
        LLM(str(model), **LIMITS, logits_processors=OnlyToken)


def test_the_server_passes_vllm_xargs(llm, plain):
    import argparse

    from server_client import client_for

    from jaxllm.engine_args import EngineArgs

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = EngineArgs.from_cli_args(parser.parse_args(["--logits-processors", "test_logits_processors:OnlyToken",
                                                       "test_logits_processors:Boost"]))
    assert args.logits_processors == ["test_logits_processors:OnlyToken", "test_logits_processors:Boost"]

    want = llm.generate(PROMPTS[0], SamplingParams(**dict(GREEDY, max_tokens=4)), use_tqdm=False)[0].outputs[0]
    assert want.token_ids == plain[0][:4]
    tok = make_tiny_tokenizer()
    with client_for(llm.llm_engine, LIMITS["max_model_len"], LIMITS["max_num_seqs"]) as client:  # the server's now
        body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        hit = client.post("/v1/completions", json={**body, "vllm_xargs": {"target_token": 7}}).json()
        assert hit["choices"][0]["text"] == tok.decode([7] * 4)
        miss = client.post("/v1/completions", json=body).json()
        assert miss["choices"][0]["text"] == want.text
        bad = client.post("/v1/completions", json={**body, "vllm_xargs": {"target_token": "a"}})
        assert bad.status_code == 400 and "target_token='a'" in bad.json()["error"]["message"]
        old = client.post("/v1/completions", json={**body, "logits_processors": ["x.y"]})
        assert old.status_code == 400 and old.json()["error"]["param"] == "logits_processors"
