"""Penalties, logit bias and bad words: the device function against a numpy reference, the
host-side pieces (validation, bad-word tokenization, token history), and end to end on SmolLM2
against transformers' repetition penalty."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.engine.messages import (
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORD_TOKENS,
    MAX_LOGIT_BIAS,
    SamplingOptions,
    ScheduledSequence,
)
from jaxllm.engine.request import Request
from jaxllm.engine.token_history import TokenHistories
from jaxllm.runner.penalties import apply_penalties, penalty_tensors

V = 40
W = 16


def _seq(history, num_prompt, **options) -> ScheduledSequence:
    opts = SamplingOptions(**options)
    history = np.asarray(history, np.int32)
    return ScheduledSequence("r", (int(history[-1]),), len(history) - 1, (1,), True, opts, len(history) - num_prompt,
                             num_prompt_tokens=num_prompt, token_history=history)


def reference(logits: np.ndarray, seq: ScheduledSequence) -> np.ndarray:
    """vLLM's order for one row: bad words, logit bias, repetition, frequency, presence."""
    o, out = seq.sampling, logits.astype(np.float32).copy()
    hist, n_prompt = list(seq.token_history), seq.num_prompt_tokens
    outputs = hist[n_prompt:]
    if o.allowed_token_ids:
        out[np.setdiff1d(np.arange(V), o.allowed_token_ids)] = -np.inf
    for word in o.bad_words_token_ids:
        prefix = list(word[:-1])
        if len(prefix) <= len(outputs) and (not prefix or outputs[-len(prefix):] == prefix):
            out[word[-1]] = -np.inf
    for token, bias in o.logit_bias:
        out[token] += np.float32(bias)
    r = np.float32(o.repetition_penalty)
    for token in set(hist):
        out[token] = out[token] / r if out[token] > 0 else out[token] * r
    counts = np.bincount(outputs, minlength=V).astype(np.float32)
    out -= np.float32(o.frequency_penalty) * counts
    out -= np.float32(o.presence_penalty) * (counts > 0).astype(np.float32)
    return out


def _apply(logits, seqs, S=None):
    pt = penalty_tensors(seqs, S or len(seqs), W, V)
    return np.asarray(jax.jit(apply_penalties)(np.asarray(logits, np.float32), pt))


ROWS = [
    dict(repetition_penalty=1.3),
    dict(presence_penalty=0.7, frequency_penalty=-0.4),
    dict(frequency_penalty=1.5, repetition_penalty=0.8, logit_bias=((3, 2.5), (39, -1.0))),
    dict(bad_words_token_ids=((5,), (7, 8), (9, 10, 11), (12, 13))),
    dict(),
]


def test_matches_numpy_reference_row_by_row():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(ROWS) + 1, V)).astype(np.float32) * 3
    histories = [[1, 2, 3, 4, 2, 5, 3, 3], [6, 7, 8, 7, 8, 8], [3, 3, 20, 21, 3, 39], [9, 10, 12, 7, 9, 10], [1, 2]]
    prompts = [3, 2, 4, 3, 1]
    seqs = [_seq(h, p, **kw) for h, p, kw in zip(histories, prompts, ROWS, strict=True)]
    got = _apply(logits, seqs, S=len(ROWS) + 1)  # plus a padding row, left untouched
    for i, seq in enumerate(seqs):
        # XLA may fuse ``x - f * count`` into one multiply-subtract: at most one float32 ulp apart.
        np.testing.assert_allclose(got[i], reference(logits[i], seq), rtol=2.5e-7, atol=0, err_msg=f"row {i}")
    np.testing.assert_array_equal(got[-1], logits[-1])


def test_allowed_token_ids_mask_every_other_token_of_their_row_only():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, V)).astype(np.float32) * 3
    rows = [
        dict(allowed_token_ids=(3, 17, 39)),
        dict(allowed_token_ids=(5, 6), logit_bias=((6, 2.0), (7, 5.0)), repetition_penalty=1.5),
        dict(allowed_token_ids=tuple(range(MAX_ALLOWED_TOKEN_IDS)[:V])),  # all of this small vocabulary
        dict(),
    ]
    seqs = [_seq([1, 2, 6, 6], 2, **kw) for kw in rows]
    got = _apply(logits, seqs)
    for i, seq in enumerate(seqs):
        np.testing.assert_allclose(got[i], reference(logits[i], seq), rtol=2.5e-7, atol=0, err_msg=f"row {i}")
    assert np.flatnonzero(np.isfinite(got[0])).tolist() == [3, 17, 39]
    assert np.flatnonzero(np.isfinite(got[1])).tolist() == [5, 6]
    np.testing.assert_array_equal(got[2], logits[2])
    np.testing.assert_array_equal(got[3], logits[3])


def test_bad_words_follow_vllm_rules():
    # Outputs are [12, 7, 9, 10] (prompt 9, 10): "9 10 11" matches, "12 13" no longer does, and
    # "7 8" does not; the single-token word 5 is always banned.
    seq = _seq([9, 10, 12, 7, 9, 10], 2, bad_words_token_ids=((5,), (7, 8), (9, 10, 11), (12, 13)))
    banned = np.flatnonzero(np.isinf(_apply(np.zeros((1, V)), [seq])[0])).tolist()
    assert banned == [5, 11]
    # A prefix matched only inside the prompt does not count: the outputs are just [10].
    seq = _seq([1, 9, 10], 2, bad_words_token_ids=((9, 10, 11), (10, 12)))
    assert np.flatnonzero(np.isinf(_apply(np.zeros((1, V)), [seq])[0])).tolist() == [12]


def test_no_penalised_row_leaves_logits_exactly_as_they_were():
    logits = np.random.default_rng(1).normal(size=(4, V)).astype(np.float32)
    np.testing.assert_array_equal(_apply(logits, [_seq([1, 2, 3], 1)], S=4), logits)


def test_token_history_grows_by_appending():
    histories = TokenHistories()
    request = Request("a", list(range(300)), SamplingParams(), 0.0)
    assert histories.view(request).tolist() == list(range(300))
    request.output_token_ids += [7, 8]
    view = histories.view(request)
    assert view.tolist() == [*range(300), 7, 8] and not view.flags.writeable
    histories.drop("a")
    assert histories.view(request).tolist() == [*range(300), 7, 8]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-2.1), "frequency_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
        (dict(logit_bias={1: float("nan")}), "logit_bias"),
        (dict(logit_bias=[1, 2]), "logit_bias"),
        (dict(logit_bias={i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}), "logit_bias"),
        (dict(bad_words=[""]), "bad_words"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_logit_bias_is_normalised_like_vllm():
    assert SamplingParams(logit_bias={"5": 300, 7: -0.5}).logit_bias == {5: 100.0, 7: -0.5}


def test_bad_words_tokenize_with_and_without_a_leading_space(smollm2_model):
    tok = smollm2_model.tokenizer
    p = SamplingParams(bad_words=["Paris", "hello world"])
    with pytest.raises(ValueError, match="bad_words"):
        p.sampling_options()  # not tokenized yet
    p.update_from_tokenizer(tok)
    words = p.sampling_options().bad_words_token_ids
    assert tuple(tok.encode("Paris")) in words and tuple(tok.encode(" Paris")) in words
    assert tuple(tok.encode(" hello world")) in words
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={len(tok): 1.0}).update_from_tokenizer(tok)
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=["x" * 40 + " y" * MAX_BAD_WORD_TOKENS]).update_from_tokenizer(tok)


# -- end to end on SmolLM2 -----------------------------------------------------------------------

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):"]
MAX_TOKENS = 24
LIMITS = dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def llm(smollm2_model):
    return LLM(smollm2_model, **LIMITS)


def hf_greedy_penalised(hf_model, prompt_ids, repetition_penalty):
    import torch

    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False,
            pad_token_id=0, repetition_penalty=repetition_penalty,
        )
    return out[0, len(prompt_ids):].tolist()


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_repetition_penalty_equals_transformers(llm, smollm2_hf):
    from conftest import hf_greedy

    tok = llm.get_tokenizer()
    compiles = llm.llm_engine.stats.num_compiles
    penalised = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, repetition_penalty=1.5)
    plain = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    want = [hf_greedy_penalised(smollm2_hf, tok.encode(p), 1.5) for p in PROMPTS]
    want_plain = hf_greedy(smollm2_hf, tok.encode(PROMPTS[1]), MAX_TOKENS)
    assert want[1] != want_plain  # the penalty changes this continuation
    # Penalised and plain requests share the batch; each row gets only its own penalty.
    outputs = llm.generate([*PROMPTS, PROMPTS[1]], [penalised] * len(PROMPTS) + [plain], use_tqdm=False)
    assert _tokens(outputs) == [*want, want_plain]
    assert llm.llm_engine.stats.num_compiles == compiles


def test_logit_bias_forces_a_token_and_bad_words_never_appear(llm):
    tok = llm.get_tokenizer()
    compiles = llm.llm_engine.stats.num_compiles
    forced = tok.encode(" banana")[0]
    biased = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={forced: 100})
    assert _tokens(llm.generate(PROMPTS[0], biased, use_tqdm=False)) == [[forced] * 8]

    plain = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    text = llm.generate(PROMPTS[1], plain, use_tqdm=False)[0].outputs[0].text
    words = [text.split(",")[1].strip(), "6"]  # "5" then "6" in the greedy count
    banned = SamplingParams(temperature=0.8, max_tokens=MAX_TOKENS, ignore_eos=True, bad_words=words)
    out = llm.generate([PROMPTS[1]] * 4, banned, use_tqdm=False)
    banned.update_from_tokenizer(tok)  # LLM.generate tokenized a copy: the caller's params stay as given
    sequences = banned.sampling_options().bad_words_token_ids
    for completion in _tokens(out):
        for word in sequences:
            n = len(word)
            assert all(tuple(completion[i : i + n]) != word for i in range(len(completion) - n + 1)), word
    assert llm.llm_engine.stats.num_compiles == compiles


def test_allowed_token_ids_restrict_greedy_and_sampled_tokens(llm, smollm2_model):
    """Greedy over the allowed set equals the argmax of the model's logits over that set, step by
    step; seeded rows only draw allowed ids; a plain request in the same batch is unaffected."""
    tok = llm.get_tokenizer()
    compiles = llm.llm_engine.stats.num_compiles
    prompt = tok.encode(PROMPTS[0])
    allowed = sorted({tok.encode(w)[0] for w in (" London", " Rome", ".", " the", " a", "\n")})
    want, ids = [], list(prompt)
    for _ in range(8):
        logits = np.asarray(smollm2_model.forward(np.asarray(ids, np.int32)))[-1]
        ids.append(allowed[int(np.argmax(logits[allowed]))])
        want.append(ids[-1])
    restricted = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, allowed_token_ids=allowed)
    sampled = SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, allowed_token_ids=allowed[:3])
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = _tokens(llm.generate(PROMPTS[0], plain, use_tqdm=False))
    out = _tokens(llm.generate([PROMPTS[0]] * 3, [restricted, sampled, plain], use_tqdm=False))
    assert out[0] == want and want != alone[0]
    assert set(out[1]) <= set(allowed[:3]) and len(set(out[1])) > 1
    assert out[2] == alone[0]
    assert llm.llm_engine.stats.num_compiles == compiles
    with pytest.raises(ValueError, match="allowed_token_ids has token ids"):
        llm.generate(PROMPTS[0], SamplingParams(allowed_token_ids=[len(tok)]), use_tqdm=False)
