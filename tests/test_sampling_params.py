"""SamplingParams: vLLM defaults, validation naming the field, unsupported features refused."""

import pytest

from jaxllm.engine.messages import SamplingOptions
from jaxllm.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, None, 1.0, 1.0, 0, 0.0, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids) == (16, 0, [], [])
    assert (p.ignore_eos, p.include_stop_str_in_output, p.logprobs, p.prompt_logprobs) == (False, False, None, None)
    assert (p.detokenize, p.skip_special_tokens, p.spaces_between_special_tokens) == (True, True, True)
    assert (p.bad_words, p.logit_bias, p.allowed_token_ids, p.truncate_prompt_tokens) == (None, None, None, None)


def test_stop_normalised_to_lists():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    assert SamplingParams(stop=["ab", "abcd"]).max_stop_str_len == 4


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens"),
        (dict(n=0), "n"),
        (dict(seed=1.5), "seed"),
        (dict(seed=True), "seed"),
        (dict(stop_token_ids=[1, "x"]), "stop_token_ids"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(stop=[""]), "stop"),
        (dict(stop=5), "stop"),
        (dict(stop_token_ids=2.5), "stop_token_ids"),
        (dict(bad_words=7), "bad_words"),
        (dict(stop=["x"], detokenize=False), "stop"),
        (dict(allowed_token_ids=[]), "allowed_token_ids"),
        (dict(allowed_token_ids=[3, -1]), "allowed_token_ids"),
        (dict(allowed_token_ids="3"), "allowed_token_ids"),
        (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
        (dict(truncate_prompt_tokens=-2), "truncate_prompt_tokens"),
        (dict(truncate_prompt_tokens=2.5), "truncate_prompt_tokens"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}="):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(best_of=2),
    ],
)
def test_unimplemented_features_are_refused(kwargs):
    (field,) = kwargs
    with pytest.raises(ValueError, match=rf"^{field}=.* is not supported yet"):
        SamplingParams(**kwargs)


def test_sampling_options():
    p = SamplingParams(temperature=0.0, top_p=0.9, top_k=-1, min_p=0.1, seed=7)
    assert p.sampling_options((2,)) == SamplingOptions(temperature=0.0, top_p=0.9, top_k=0, min_p=0.1, seed=7)
    masked = SamplingParams(min_tokens=3, stop_token_ids=[5, 2]).sampling_options((2, 9))
    assert (masked.min_tokens, masked.min_tokens_masked_ids) == (3, (2, 9, 5))
    assert SamplingParams(min_tokens=3, ignore_eos=True).sampling_options((2,)).min_tokens_masked_ids == ()


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("value", [-1, 21, 1.5, True])
def test_logprob_counts_are_validated(field, value):
    with pytest.raises(ValueError, match=rf"^{field}="):
        SamplingParams(**{field: value})


def test_logprobs_and_n_are_accepted():
    p = SamplingParams(n=3, logprobs=5, prompt_logprobs=0)
    assert (p.n, p.logprobs, p.prompt_logprobs) == (3, 5, 0)


def test_allowed_token_ids_are_deduplicated_capped_and_checked_against_the_vocabulary():
    from jaxllm.engine.messages import MAX_ALLOWED_TOKEN_IDS

    p = SamplingParams(allowed_token_ids=[7, 3, 7])
    assert p.allowed_token_ids == [7, 3] and p.sampling_options().allowed_token_ids == (7, 3)
    assert SamplingParams().sampling_options().allowed_token_ids == ()
    with pytest.raises(ValueError, match=rf"allowed_token_ids has {MAX_ALLOWED_TOKEN_IDS + 1} distinct ids"):
        SamplingParams(allowed_token_ids=list(range(MAX_ALLOWED_TOKEN_IDS + 1)))
    p.check_vocabulary(8)
    with pytest.raises(ValueError, match=r"allowed_token_ids has token ids \[7\] outside the vocabulary of 7"):
        p.check_vocabulary(7)


def test_truncate_prompt_tokens_keeps_the_last_k():
    from jaxllm.sampling_params import truncate_prompt

    ids = [1, 2, 3, 4, 5]
    assert truncate_prompt(ids, None, 4) == ids
    assert truncate_prompt(ids, 2, 4) == [4, 5]
    assert truncate_prompt(ids, -1, 4) == [2, 3, 4, 5]
    assert truncate_prompt(ids, 4, 8) == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="truncate_prompt_tokens=5 is greater than max_model_len=4"):
        truncate_prompt(ids, 5, 4)
    assert SamplingParams(truncate_prompt_tokens=3).truncated_prompt(ids, 8) == [3, 4, 5]


def test_max_tokens_none_and_clone():
    p = SamplingParams(max_tokens=None, min_tokens=3, stop=["x"])
    assert p.max_tokens is None
    q = p.clone()
    q.stop.append("y")
    assert (q == SamplingParams(max_tokens=None, min_tokens=3, stop=["x", "y"])) and p.stop == ["x"]
