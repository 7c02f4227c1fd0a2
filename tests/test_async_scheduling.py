"""Async scheduling: the engine schedules and dispatches step k+1 before it waits for step k.

``DeviceSimRunner`` is the simulated pool of test_scheduler/test_swap behind the runner's
dispatch/fetch interface: a placeholder input is read from the previous step's samples at
dispatch (as the device would), and the host sees a step's tokens only at fetch. Wrong
placeholder handling, a write into a freed block or a result applied to the wrong request all
change the generated tokens or break the pool's accounting.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from test_scheduler import BS, EOS, VOCAB, reference_output
from test_sharing_accounting import fork_reference
from test_swap import SwapSimRunner, check_accounting

from jaxllm.config import CacheConfig, SchedulerConfig
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.engine.messages import RunnerOutput, SchedulerOutput
from jaxllm.engine.scheduler import PLACEHOLDER
from jaxllm.sampling_params import RequestOutputKind, SamplingParams


@dataclasses.dataclass
class Handle:
    sched: SchedulerOutput
    sampled: dict
    fetched: bool = False


class DeviceSimRunner(SwapSimRunner):
    def __init__(self, num_blocks, engine_scheduler, num_slots):
        super().__init__(num_blocks, engine_scheduler, num_slots)
        self.last: Handle | None = None
        self.events: list[tuple[str, int]] = []
        self.num_fed = 0
        self.fed_ids: set[str] = set()

    def dispatch(self, sched, prev=None):
        assert prev is None or prev is self.last, "prev must be the step dispatched just before"
        sequences = []
        for seq in sched.sequences:
            assert PLACEHOLDER not in seq.token_ids[:-1], "only a request's last token may be a placeholder"
            if seq.token_ids[-1] == PLACEHOLDER:
                assert prev is not None and not prev.fetched, "a placeholder needs the step still in flight"
                seq = dataclasses.replace(seq, token_ids=(*seq.token_ids[:-1], prev.sampled[seq.request_id]))
                self.num_fed += 1
                self.fed_ids.add(seq.request_id)
            sequences.append(seq)
        sampled = dict(super().execute(dataclasses.replace(sched, sequences=tuple(sequences))).sampled)
        for seq in sched.sequences:  # parallel-sampling children diverge as in test_sharing_accounting
            for i, fork_id in enumerate(seq.fork_ids, 1):
                sampled[fork_id] = (sampled[seq.request_id] + i) % VOCAB
        self.last = Handle(sched, sampled)
        if not sched.is_empty:
            self.events.append(("dispatch", len(self.events)))
        return self.last

    def fetch(self, handle: Handle) -> RunnerOutput:
        assert not handle.fetched
        handle.fetched = True
        if not handle.sched.is_empty:
            self.events.append(("fetch", len(self.events)))
        return RunnerOutput(handle.sampled)

    def execute(self, sched):
        return self.fetch(self.dispatch(sched))


def make_engine(num_blocks=24, num_slots=0, budget=16, max_num_seqs=4, caching=True, async_scheduling=True):
    mode = "swap" if num_slots else "recompute"
    engine = LLMEngine(
        None, None,
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=256),
        CacheConfig(block_size=BS, enable_prefix_caching=caching, preemption_mode=mode),
        num_kv_blocks=num_blocks, eos_token_ids=(EOS,), num_swap_blocks=num_slots, async_scheduling=False,
    )
    engine.runner = DeviceSimRunner(num_blocks, engine.scheduler, num_slots)
    engine.async_scheduling = async_scheduling
    return engine


def drain(engine, check=None, on_step=None, max_steps=5000) -> dict:
    final = {}
    for step in range(max_steps):
        if not engine.has_unfinished_requests():
            return final
        for output in engine.step():
            assert output.request_id not in final, "output after finish"
            assert all(t >= 0 for c in output.outputs for t in c.token_ids), "a placeholder reached the user"
            if output.finished:
                final[output.request_id] = output
        if check:
            check(engine.scheduler)
        if on_step:
            on_step(step)
    raise AssertionError("requests did not finish")


def test_next_step_is_dispatched_before_the_previous_is_fetched():
    engine = make_engine()
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True))
    outputs = [[len(o.outputs[0].token_ids) for o in engine.step()] for _ in range(7)]
    # Step 1 (the prompt) is dispatched; each call then dispatches the next step and returns the
    # previous one's token. The last token (max_tokens) is known to end the request: nothing
    # is scheduled after it, so the last call only fetches.
    assert outputs == [[], [1], [2], [3], [4], [5], [6]]
    kinds = [kind for kind, _ in engine.runner.events]
    assert kinds == ["dispatch"] + ["dispatch", "fetch"] * 5 + ["fetch"]
    assert engine.num_overlapped_steps == 5 and engine.runner.num_fed == 5
    assert (engine.stats.num_overlapped_steps, engine.stats.num_steps) == (5, 6)
    final = engine.step()
    assert final == [] and not engine.has_unfinished_requests()
    assert engine.stats.kv_blocks_used == 0


def test_sync_mode_never_overlaps():
    engine = make_engine(async_scheduling=False)
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True))
    out = drain(engine)["a"].outputs[0].token_ids
    assert out == reference_output([5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True))
    kinds = [kind for kind, _ in engine.runner.events]
    assert kinds == ["dispatch", "fetch"] * 6 and engine.num_overlapped_steps == 0


def test_a_stop_token_wastes_one_step_and_frees_everything():
    prompt = [3, 1, 4, 1, 5]
    greedy = reference_output(prompt, SamplingParams(max_tokens=40, ignore_eos=True))
    stop = greedy[3]
    params = SamplingParams(max_tokens=40, stop_token_ids=[stop], ignore_eos=True)
    expected = reference_output(prompt, params)
    assert expected == greedy[: expected.index(stop) + 1]
    engine = make_engine()
    engine.add_request("a", prompt, params)
    final = drain(engine, check=check_accounting)["a"].outputs[0]
    assert final.token_ids == expected and (final.finish_reason, final.stop_reason) == ("stop", stop)
    # The step after the stop token was already on the device: it ran, and was dropped.
    assert engine.stats.num_steps == len(expected) + 1
    assert engine.stats.kv_blocks_used == 0


def test_abort_and_reused_id_while_a_step_is_in_flight():
    engine = make_engine()
    engine.add_request("a", [9, 8, 7, 6], SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()
    engine.step()  # a's second token is now being computed
    engine.abort_request("a")
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    engine.add_request("a", [1, 2, 3], params)  # same id, a different request
    final = drain(engine, check=check_accounting)
    assert final["a"].outputs[0].token_ids == reference_output([1, 2, 3], params)
    assert engine.stats.kv_blocks_used == 0


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("options", [dict(repetition_penalty=1.3), dict(n=2)])
def test_requests_needing_their_tokens_on_the_host_run_synchronously(options, async_scheduling):
    engine = make_engine(async_scheduling=async_scheduling)
    engine.add_request("p", [4, 4, 2], SamplingParams(max_tokens=5, ignore_eos=True, **options))
    engine.add_request("q", [7, 1], SamplingParams(max_tokens=12, ignore_eos=True))
    final = drain(engine, check=check_accounting)
    if not async_scheduling:
        assert engine.num_overlapped_steps == 0 and not engine.runner.fed_ids
    assert final["q"].outputs[0].token_ids == reference_output([7, 1], SamplingParams(max_tokens=12, ignore_eos=True))
    if "n" in options:
        params = SamplingParams(max_tokens=5, ignore_eos=True)
        assert [c.token_ids for c in final["p"].outputs] == [fork_reference([4, 4, 2], params, i) for i in (0, 1)]
        # Forking happens on the host when the prompt is done: that step is fetched before the
        # next is scheduled; later decode steps of the children overlap again.
        kinds = [kind for kind, _ in engine.runner.events]
        assert kinds[:2] == ["dispatch", "fetch"] and (engine.num_overlapped_steps > 0) is async_scheduling
    else:
        assert "p" not in engine.runner.fed_ids and ("q" in engine.runner.fed_ids) is async_scheduling


@pytest.mark.parametrize("seed", range(8))
def test_random_workload_matches_the_reference_and_keeps_exact_accounting(seed):
    """Shared prefixes, chunked prefill, a pool small enough to preempt (recompute or swap),
    stop tokens, eos, min_tokens, aborts and new arrivals between steps."""
    rng = random.Random(seed)
    engine = make_engine(num_blocks=rng.choice([14, 20, 40]), num_slots=rng.choice([0, 0, 8, 24]),
                         budget=rng.choice([8, 16, 32]), caching=rng.random() < 0.7)
    prefixes = [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(2, 10))] for _ in range(3)]
    expected, aborted, counter = {}, set(), iter(range(10_000))

    def add():
        rid = f"r{next(counter)}"
        prompt = rng.choice(prefixes) + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 14))]
        max_tokens = rng.randrange(1, 24)
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=rng.random() < 0.5,
                                min_tokens=min(rng.choice([0, 0, 3]), max_tokens),
                                stop_token_ids=rng.sample(range(1, VOCAB), 2))
        engine.add_request(rid, prompt, params)
        expected[rid] = reference_output(prompt, params)

    def on_step(step):
        if step < 60 and rng.random() < 0.3:
            add()
        live = [rid for rid in expected if rid not in aborted and engine.scheduler.requests.get(rid)]
        if live and rng.random() < 0.05:
            victim = rng.choice(live)
            engine.abort_request(victim)
            aborted.add(victim)

    for _ in range(6):
        add()
    final = drain(engine, check=check_accounting, on_step=on_step)
    assert set(final) == set(expected) - aborted
    for rid, output in final.items():
        assert output.outputs[0].token_ids == expected[rid], rid
    assert engine.stats.kv_blocks_used == 0
    assert engine.num_overlapped_steps > engine.stats.num_steps // 2


def test_jitted_runner_gives_the_same_tokens_with_and_without_async_scheduling(tmp_path):
    """The real runner: placeholder inputs read on the device from the previous step's output.
    Greedy and seeded rows, logprobs, a penalised request (synchronous steps), n=2, chunked
    prefill and a pool small enough to preempt."""
    from tiny_models import make_tiny_checkpoint

    import jaxllm
    from jaxllm import LLM

    model = jaxllm.load_model(str(make_tiny_checkpoint("llama", tmp_path)), dtype="float32")
    prompts = [{"prompt_token_ids": ([3 + i, 5, 7 + i, 11][: 2 + i % 3] * 6)[: 5 + 3 * i]} for i in range(8)]
    params = [
        SamplingParams(max_tokens=6 + 3 * i, temperature=0.0 if i % 2 else 0.8, seed=i, ignore_eos=True,
                       logprobs=2 if i == 3 else None, repetition_penalty=1.2 if i == 4 else 1.0, n=2 if i == 5 else 1)
        for i in range(8)
    ]
    runs = {}
    for mode in (True, False):
        llm = LLM(model, async_scheduling=mode, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=16,
                  num_kv_blocks=7, compilation_cache_dir=None)
        engine = llm.llm_engine
        compiles = engine.stats.num_compiles
        out = llm.generate(prompts, params, use_tqdm=False)
        runs[mode] = [[(c.token_ids, c.cumulative_logprob) for c in o.outputs] for o in out]
        stats = engine.stats
        assert stats.num_compiles == compiles and stats.num_preemptions > 0 and stats.kv_blocks_used == 0
        assert (engine.num_overlapped_steps > stats.num_steps // 2) is mode
    # GPU pool sizing compiles the largest bucket with the same step signature.
    assert engine.runner._activation_peak() > 0
    assert runs[True] == runs[False]
    assert [len(c[0]) for c in runs[True][5]] == [21, 21] and runs[True][3][0][1] is not None



@pytest.mark.parametrize("async_scheduling", [True, False])
def test_delta_outputs_add_up_to_the_cumulative_ones(async_scheduling):
    """A penalised request's steps run synchronously: when it joins, the step resolves the
    request in flight and then the same request again in the synchronous step. Its two deltas
    come out joined, one output per request per step; n=2 children report only when they move."""

    def run(kind):
        engine = make_engine(async_scheduling=async_scheduling)
        engine.add_request("q", [7, 1], SamplingParams(max_tokens=12, ignore_eos=True, output_kind=kind))
        engine.add_request("n", [3, 9, 9], SamplingParams(max_tokens=6, n=2, ignore_eos=True, output_kind=kind))
        steps = [engine.step() for _ in range(3)]
        engine.add_request("p", [4, 4, 2], SamplingParams(max_tokens=5, ignore_eos=True, repetition_penalty=1.2,
                                                          output_kind=kind))
        while engine.has_unfinished_requests():
            steps.append(engine.step())
        return steps

    cumulative = run(RequestOutputKind.CUMULATIVE)
    final = {o.request_id: [c.token_ids for c in o.outputs] for step in cumulative for o in step if o.finished}
    joined: dict[str, dict[int, list[int]]] = {}
    multi_token = 0
    for step in run(RequestOutputKind.DELTA):
        assert len({o.request_id for o in step}) == len(step)
        for o in step:
            for c in o.outputs:
                assert c.token_ids or c.finish_reason, "a completion that did not move"
                joined.setdefault(o.request_id, {}).setdefault(c.index, []).extend(c.token_ids)
                multi_token += len(c.token_ids) > 1
    assert {rid: [v[i] for i in sorted(v)] for rid, v in joined.items()} == final
    assert (multi_token > 0) is async_scheduling
