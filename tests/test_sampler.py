"""The on-device sampler: greedy, filters (top-k, top-p, min-p), per-request seeds."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.runner.sampler import MAX_BANNED_IDS, SamplingTensors, _filter, argmax, sample

PROBS = np.array([0.5, 0.3, 0.15, 0.05], np.float32)


def _tensors(n, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None, steps=0):
    full = lambda v, dt: jnp.full((n,), v, dt)  # noqa: E731
    seeds = jnp.arange(n, dtype=jnp.uint32) if seeds is None else jnp.asarray(seeds, jnp.uint32)
    return SamplingTensors(
        full(temperature, jnp.float32), full(top_k, jnp.int32), full(top_p, jnp.float32),
        full(min_p, jnp.float32), seeds, full(steps, jnp.int32), jnp.full((n, MAX_BANNED_IDS), 10**6, jnp.int32),
    )


def _kept(top_k=0, top_p=1.0, min_p=0.0, probs=PROBS) -> list[int]:
    logits = jnp.log(jnp.asarray(probs))[None, :]
    out = _filter(logits, jnp.array([top_k]), jnp.array([top_p], jnp.float32), jnp.array([min_p], jnp.float32))
    return np.flatnonzero(np.isfinite(np.asarray(out[0]))).tolist()


@pytest.mark.parametrize(
    "kwargs, kept",
    [
        (dict(top_k=1), [0]),
        (dict(top_k=3), [0, 1, 2]),
        (dict(top_k=-1), [0, 1, 2, 3]),
        (dict(top_p=0.5), [0]),  # the first token alone reaches 0.5
        (dict(top_p=0.7), [0, 1]),
        (dict(top_p=0.81), [0, 1, 2]),
        (dict(min_p=0.2), [0, 1, 2]),  # keeps p >= 0.2 * 0.5
        (dict(min_p=0.7), [0]),
        # top-p on the renormalised top-3 (0.526, 0.316, 0.158): token 2 has 0.842 above it.
        (dict(top_k=3, top_p=0.82), [0, 1]),
        (dict(top_k=2, top_p=0.6), [0]),  # renormalised top-2: 0.625 alone reaches 0.6
    ],
)
def test_filters_keep_exact_sets(kwargs, kept):
    assert _kept(**kwargs) == kept


def test_each_filter_applies_to_its_own_rows_only():
    # One batch: a top-k row, a top-p row, a min-p row and an unfiltered row. A filter whose
    # bisection runs for one row must leave the other rows as they would be alone.
    logits = jnp.tile(jnp.log(jnp.asarray(PROBS)), (4, 1))
    out = _filter(logits, jnp.array([1, 0, 0, 0]), jnp.array([1.0, 0.7, 1.0, 1.0], jnp.float32),
                  jnp.array([0.0, 0.0, 0.7, 0.0], jnp.float32))
    kept = [np.flatnonzero(np.isfinite(row)).tolist() for row in np.asarray(out)]
    assert kept == [[0], [0, 1], [0], [0, 1, 2, 3]]


def test_top_k_on_large_vocab_keeps_exactly_k():
    # Distinct values (random normals tie at float32 in 50k draws), spread like real logits.
    rng = np.random.default_rng(0)
    logits = jnp.asarray(np.stack([rng.permutation(50_000) for _ in range(3)]) / 5000.0, jnp.float32)
    out = _filter(logits, jnp.array([1, 40, 1000]), jnp.ones(3), jnp.zeros(3))
    assert np.isfinite(np.asarray(out)).sum(axis=1).tolist() == [1, 40, 1000]
    top40 = np.argsort(-np.asarray(logits[1]))[:40]
    assert set(np.flatnonzero(np.isfinite(np.asarray(out[1])))) == set(top40)


def test_greedy_rows_take_argmax_beside_sampled_rows():
    logits = jax.random.normal(jax.random.PRNGKey(1), (4, 100))
    st = _tensors(4, temperature=0.0)
    st = dataclasses.replace(st, temperature=jnp.array([0.0, 1.0, 0.0, 1.0]))
    out = np.asarray(sample(logits, st))
    assert out[0] == np.argmax(logits[0]) and out[2] == np.argmax(logits[2])


@pytest.mark.parametrize("vocab", [100, 256, 49152, 50257])  # one tile, exact tiles, padded last tile
def test_two_level_argmax_equals_argmax_with_ties(vocab):
    x = np.array(jax.random.normal(jax.random.PRNGKey(vocab), (5, vocab)))
    x[1, [7, vocab - 1]] = 10.0  # a tie: the first index wins
    x[2, vocab - 1] = 10.0  # the maximum in the padded tail
    x[3] = -np.inf  # nothing finite
    x[4, [300 % vocab, 40 % vocab]] = 9.0
    out = np.asarray(jax.jit(argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(out, np.argmax(x, axis=-1))
    assert out[1] == 7 and out[2] == vocab - 1 and out[3] == 0


def test_all_greedy_batch_equals_argmax_on_large_vocab():
    logits = jax.random.normal(jax.random.PRNGKey(3), (64, 49152))
    out = np.asarray(jax.jit(sample)(logits, _tensors(64, temperature=0.0)))
    np.testing.assert_array_equal(out, np.argmax(np.asarray(logits), axis=-1))


def test_sampling_frequencies_follow_filtered_distribution():
    n = 4000
    logits = jnp.tile(jnp.log(jnp.asarray(PROBS)), (n, 1))
    out = np.asarray(sample(logits, _tensors(n, top_k=3)))
    freq = np.bincount(out, minlength=4) / n
    expected = np.append(PROBS[:3] / PROBS[:3].sum(), 0.0)
    # 4000 draws: standard error of each frequency <= 0.008; 4 sigma.
    np.testing.assert_allclose(freq, expected, atol=0.032)
    assert freq[3] == 0.0


def test_seeded_row_is_independent_of_the_rest_of_the_batch():
    logits = jax.random.normal(jax.random.PRNGKey(2), (6, 1000))
    alone = sample(logits[2:3], _tensors(1, seeds=[1234], steps=5))
    mixed = sample(logits[jnp.array([0, 2, 1])], _tensors(3, seeds=[7, 1234, 9], steps=5))
    assert int(alone[0]) == int(mixed[1])
    other_step = [int(sample(logits[2:3], _tensors(1, seeds=[1234], steps=s))[0]) for s in range(8)]
    assert len(set(other_step)) > 1  # the step index changes the draw


def test_banned_ids_are_never_sampled_greedy_or_random():
    logits = jnp.tile(jnp.log(jnp.asarray(PROBS)), (200, 1))
    st = _tensors(200)
    banned = jnp.full((200, MAX_BANNED_IDS), 4, jnp.int32).at[:, 0].set(0).at[:, 1].set(2)
    out = np.asarray(sample(logits, dataclasses.replace(st, banned=banned)))
    assert set(out.tolist()) == {1, 3}
    greedy = dataclasses.replace(st, temperature=jnp.zeros(200), banned=banned)
    assert set(np.asarray(sample(logits, greedy)).tolist()) == {1}


def _keys(n, seed=0):
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.arange(n))


def test_categorical_frequencies_across_tiles():
    # 700 tokens = 3 tiles of 256 (the last padded); mass in every tile, one whole tile empty.
    V, n = 700, 20000
    probs = np.zeros(V, np.float32)
    probs[[3, 255, 256, 600, 699]] = [0.1, 0.2, 0.3, 0.25, 0.15]
    logits = jnp.tile(jnp.log(jnp.asarray(probs)), (n, 1))  # zeros -> -inf
    from jaxllm.runner.sampler import categorical

    out = np.asarray(categorical(_keys(n), logits, block=256))
    freq = np.bincount(out, minlength=V) / n
    assert set(np.flatnonzero(freq)) <= {3, 255, 256, 600, 699}
    # 20000 draws: standard error <= 0.0035; 4 sigma.
    np.testing.assert_allclose(freq, probs, atol=0.014)


def test_categorical_never_draws_masked_tokens_and_is_exact_for_one_survivor():
    from jaxllm.runner.sampler import categorical

    V, n = 1000, 512
    logits = np.full((n, V), -np.inf, np.float32)
    logits[:, 517] = 0.0  # rows 0..255: one survivor in the middle of a tile
    logits[256:, 40] = 30.0  # rows 256..: a huge logit and a tiny one in different tiles
    logits[256:, 999] = -30.0
    out = np.asarray(categorical(_keys(n, 1), jnp.asarray(logits), block=256))
    assert set(out[:256].tolist()) == {517}
    assert set(out[256:].tolist()) <= {40, 517, 999} and np.mean(out[256:] == 40) > 0.99
