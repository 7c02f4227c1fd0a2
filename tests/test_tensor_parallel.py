"""Tensor parallelism (``tensor_parallel_size``): a model split over devices gives the outputs it
gives on one device. Three CPU devices stand in for GPUs: tensor_parallel_worker.py runs the
engines in a process started with ``--xla_force_host_platform_device_count=3`` and writes what
they return; each test here checks one case of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("tensor_parallel")
    out = work / "results.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=3", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "tensor_parallel_worker.py"), str(out), str(work)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def case(results, name):
    got = results[name]
    assert not (isinstance(got, dict) and "error" in got), got
    return got


def assert_same(one: dict, split: dict, atol: float = 2e-5) -> None:
    """Equal tokens and (where asked) logprobs within float32 rounding: the all-reduces sum the
    heads' and the FFN's partial products in another order."""
    assert split["tokens"] == one["tokens"]
    for a, b in zip(one["logprobs"], split["logprobs"], strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(y, x, rtol=0, atol=atol)
    assert split["new_compiles"] == 0 and one["new_compiles"] == 0  # every bucket compiled at warm-up


def test_the_worker_sees_three_devices(results):
    assert results["devices"] == 3


def test_split_llama_equals_one_device_under_chunked_prefill_and_preemption(results):
    got = case(results, "llama_preempt")
    assert_same(got["1"], got["2"])
    assert got["2"]["preemptions"] == got["1"]["preemptions"] == 3
    # recomputed requests find their own blocks in the prefix cache
    assert got["2"]["prefix_hits"] == got["1"]["prefix_hits"] == 72
    assert all(len(lp[0]) == 12 for lp in got["2"]["logprobs"])


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_every_attention_backend_runs_on_each_devices_heads(results, backend):
    one = case(results, "llama_preempt")["1"]  # the "cpu" backend on one device
    split = case(results, f"llama_{backend}")["2"]
    n = len(split["tokens"])  # pallas: the first two prompts
    assert_same({**one, "tokens": one["tokens"][:n], "logprobs": one["logprobs"][:n]}, split, atol=1e-4)


def test_seeded_sampling_with_n_2_is_the_same_split(results):
    got = case(results, "llama_sampled")
    assert got["2"]["tokens"] == got["1"]["tokens"]
    assert all(len(r) == 2 and r[0] != r[1] for r in got["2"]["tokens"])


@pytest.mark.parametrize("name", ["llama_fp8", "llama_bf16", "qwen3", "gpt2"])
def test_families_and_dtypes_split_equal_one_device(results, name):
    got = case(results, name)
    # bfloat16 rounds each partial sum: its logprobs agree to bfloat16's precision only
    assert_same(got["1"], got["2"], atol=5e-2 if name == "llama_bf16" else 2e-5)


def test_swapped_out_blocks_of_a_split_pool_come_back(results):
    one = case(results, "llama_preempt")["1"]
    split = case(results, "llama_swap")["2"]
    assert split["preemptions"] > 0
    assert_same(one, split)


def test_lora_adapters_apply_on_a_split_model(results):
    got = case(results, "lora")
    assert_same(got["1"], got["2"])
    assert got["2"]["tokens"] != case(results, "llama_preempt")["2"]["tokens"]  # the adapter changes outputs


def test_a_draft_model_splits_with_its_target(results):
    # proposals never change outputs: those of the target alone on one device
    assert_same(case(results, "llama_preempt")["1"], case(results, "draft")["2"])


def test_embeddings_of_a_split_model(results):
    got = case(results, "embed")
    np.testing.assert_allclose(np.array(got["2"]), np.array(got["1"]), rtol=0, atol=1e-5)


def test_weights_and_pool_are_split_by_heads_and_ffn_width(results):
    got = case(results, "shardings")
    # tiny llama: 2 layers, D 64, 4 query heads and 2 kv heads of 16, FFN 96
    assert got["wq_shape"] == [2, 64, 4, 16]
    assert got["wq_shard_shapes"] == [[2, 64, 2, 16]] * 2
    assert got["w_down_shard_shapes"] == [[2, 48, 64]] * 2
    assert got["embed_shard_shapes"] == [[160, 64]] * 2  # replicated
    assert got["kv_shard_shapes"] == [[2, got["kv_shape"][1], 8, 1, 16]] * 2
    assert got["kv_devices"] == [0, 1]
    # a 1 MiB per-device budget: each device keeps 1 of the 2 kv heads of a block (K and V, 2 layers,
    # 8 tokens, 16 float32 values), so twice the blocks of one device
    assert got["num_blocks"] == (1 << 20) // (2 * 2 * 8 * 1 * 16 * 4) == 512
    # per layer: attention output and MLP (the layer loop holds one of each), nothing else
    assert got["all_reduces"] == 2
    assert got["other_collectives"] == {"all-gather": 0, "all-to-all": 0, "collective-permute": 0, "reduce-scatter": 0}
    assert got["activation_peak"] > 0


def test_sleep_wake_up_and_weight_updates_keep_the_split(results):
    got = case(results, "sleep_and_update")
    one, split = got["1"], got["2"]
    assert split["before"] == split["after_wake"] == one["before"]
    assert split["updated"] == one["updated"] != one["before"]
    assert split["spec_after_wake"] == split["spec_after_update"] == [None, None, "tp"]


def test_smollm2_on_three_devices_equals_transformers(results, smollm2_expected_greedy):
    got = case(results, "smollm2_tp3")
    assert [t[0] for t in got["tokens"]] == smollm2_expected_greedy
    assert got["new_compiles"] == 0


def test_bad_sizes_are_refused_by_name(results):
    got = case(results, "errors")
    assert "tensor_parallel_size=3 must divide the model's num_attention_heads=4" in got["tp3_on_4_heads"]
    assert "tensor_parallel_size=4 needs 4 devices; 3 cpu device(s) are visible" in got["tp4_on_3_devices"]
    assert "tensor_parallel_size=0 must be a positive integer" in got["tp0"]
    assert "pipeline_parallel_size=2" in got["pp2"]
    assert "draft_tensor_parallel_size=1 must equal tensor_parallel_size=2" in got["draft_tp1"]

