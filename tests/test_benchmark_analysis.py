"""The arithmetic behind benchmarks/roofline.py and step_profile.py's wall-time breakdown."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

_BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(_BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_benchmark", _BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(_BENCHMARKS))


def test_roofline_work_counts_flops_and_bytes():
    roofline = _load("roofline")
    cfg = SimpleNamespace(hidden_size=4, num_heads=2, num_kv_heads=1, head_dim=2, intermediate_size=8,
                          num_layers=3, vocab_size=10, tie_word_embeddings=True)
    # Prompt of 3, 2 output tokens: positions 0..3 go through the layers (the last token is
    # never fed), 2 logit rows, and one decode token (position 3) reads a context of 4.
    need = roofline.work(cfg, roofline.throughput.Workload([[1, 2, 3]], [2]))
    layer_params = 4 * 2 * 2 + 2 * 4 * 1 * 2 + 2 * 2 * 4 + 3 * 4 * 8  # q, k+v, o, gate+up+down
    assert layer_params == 144
    assert need["layer_tokens"] == 4 and need["logit_rows"] == 2
    assert need["dense_flops"] == 2 * 144 * 3 * 4 + 2 * 4 * 10 * 2
    assert need["attention_flops"] == 4 * 2 * 2 * 3 * (1 + 2 + 3 + 4)
    assert need["kv_read_bytes"] == 2 * 1 * 2 * 4 * 3 * 4
    assert need["weight_bytes"] == 4 * (3 * 144 + 10 * 4)
    assert need["min_steps"] == 2 and need["bytes"] == 2 * need["weight_bytes"] + need["kv_read_bytes"]
    untied = roofline.work(SimpleNamespace(**{**vars(cfg), "tie_word_embeddings": False}),
                           roofline.throughput.Workload([[1, 2, 3]], [2]))
    assert untied["weight_bytes"] == need["weight_bytes"] + 4 * 10 * 4


def test_wall_shares_split_each_instant_among_running_ops():
    step_profile = _load("step_profile")
    names = {
        "mlp_dot": "jit(_step)/while/body/closed_call/mlp/dot_general",
        "slice": "jit(_step)/while/body/jit(dynamic_index_in_dim)/dynamic_slice",
        "gather": "jit(_step)/while/body/closed_call/attention/while/body/gather",
        "head": "jit(_step)/dot_general",
    }
    events = [
        {"name": "mlp_dot", "tid": 1, "ts": 0, "dur": 10},
        {"name": "slice", "tid": 1, "ts": 1, "dur": 2},  # nested: the innermost op takes the time
        {"name": "gather", "tid": 2, "ts": 5, "dur": 10},
        {"name": "head", "tid": 1, "ts": 20, "dur": 5},  # after 5 us with nothing running
    ]
    wall, shares = step_profile._wall_shares(events, names)
    assert wall == 25
    assert shares == pytest.approx({
        "mlp matmuls": 3 + 2.5,  # 0-1 and 3-5 alone, 5-10 shared with the gather
        "per-layer weight slices (scan)": 2,
        "attention: cached-context loop": 2.5 + 5,
        "idle": 5,
        "logits matmul": 5,
    })
    assert step_profile._categorise("jit(_step)/while/body/closed_call/attention/td,dnh->tnh/dot_general") == \
        "attention: q/k/v/o projections"
    assert step_profile._categorise("jit(_step)/while/body/closed_call/attention/tkgh,skh->tkgs/dot_general") == \
        "attention: this step's tokens, merge, RoPE, KV write"
    assert step_profile._categorise("jit(_step)/cond/argmax") == "sampler, embedding, batch set-up"


def test_throughput_counts_the_fastest_of_repeated_runs():
    throughput = _load("roofline").throughput  # imported by its own name (dataclasses need that)
    runs = [({"elapsed_s": 10.0, "tag": "a"}, "ids-a"), ({"elapsed_s": 9.0, "tag": "b"}, "ids-b"),
            ({"elapsed_s": 9.5, "tag": "c"}, "ids-c")]
    result, outputs = throughput._fastest(runs)
    assert result == {"elapsed_s": 9.0, "tag": "b", "elapsed_s_runs": [10.0, 9.0, 9.5]} and outputs == "ids-b"


def test_throughput_workload_description_is_json():
    """The report's workload part (SamplingParams fields included, enums by name) serializes."""
    import json

    throughput = _load("roofline").throughput
    workload = throughput.make_workload(4, 0, 1000, set())
    described = json.loads(json.dumps(throughput._describe(workload, 0)))
    assert described["num_prompts"] == 4 and described["sampling"]["output_kind"] == "CUMULATIVE"
    assert described["sampling"]["temperature"] == 0.0 and described["sampling"]["max_tokens"] == "per request"
