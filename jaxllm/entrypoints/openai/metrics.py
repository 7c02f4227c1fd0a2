"""Prometheus metrics with vLLM's names under the ``jaxllm:`` prefix.

Gauges and counters are read from the engine's latest ``EngineStats`` at scrape time; latency
histograms are observed on the engine thread as outputs are produced. Each server owns its own
registry, so several apps in one process (tests) do not collide.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jaxllm.engine.llm_engine import EngineStats
from jaxllm.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)


class StatsCollector(Collector):
    def __init__(self, model_name: str, stats: Callable[[], EngineStats]):
        self.model_name = model_name
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        yield self._gauge("num_requests_running", "Requests in the running batch.", s.num_running)
        yield self._gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield self._gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).", usage)
        yield self._gauge("prefix_cache_hit_rate", "Prefix-cache hits / queries, in tokens.", s.prefix_cache_hit_rate)
        yield self._counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                            s.prefix_cache_queries)
        yield self._counter("prefix_cache_hits", "Prompt tokens served from the prefix cache.", s.prefix_cache_hits)
        yield self._counter("prompt_tokens", "Prompt tokens of all requests.", s.num_prompt_tokens)
        yield self._counter("generation_tokens", "Generated tokens.", s.num_generated_tokens)
        yield self._counter("num_preemptions", "Preemptions of running requests.", s.num_preemptions)
        yield self._counter("engine_steps", "Engine steps run.", s.num_steps)
        yield self._counter("overlapped_steps", "Steps dispatched while the previous step still ran (async "
                            "scheduling).", s.num_overlapped_steps)
        if s.spec_decode is not None:  # vLLM's speculative decoding counters
            spec = s.spec_decode
            yield self._counter("spec_decode_num_drafts", "Sequence steps that verified proposed tokens.",
                                spec.num_drafts)
            yield self._counter("spec_decode_num_draft_tokens", "Proposed tokens verified.", spec.num_draft_tokens)
            yield self._counter("spec_decode_num_accepted_tokens", "Proposed tokens accepted.",
                                spec.num_accepted_tokens)
            per_position = CounterMetricFamily("jaxllm:spec_decode_num_accepted_tokens_per_pos",
                                               "Accepted proposed tokens, by position in the proposal.",
                                               labels=["model_name", "position"])
            for position, count in enumerate(spec.accepted_per_position):
                per_position.add_metric([self.model_name, str(position)], count)
            yield per_position
        if s.lora is not None:  # vLLM's gauge: the adapters in use, as labels; the value is the time
            info = GaugeMetricFamily("jaxllm:lora_requests_info", "Running stats on LoRA requests.",
                                     labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
            info.add_metric([str(s.lora.max_loras), ",".join(s.lora.running), ",".join(s.lora.waiting)], time.time())
            yield info

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        metric = GaugeMetricFamily(f"jaxllm:{name}", doc, labels=["model_name"])
        metric.add_metric([self.model_name], value)
        return metric

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        metric = CounterMetricFamily(f"jaxllm:{name}", doc, labels=["model_name"])
        metric.add_metric([self.model_name], value)
        return metric


class ServerMetrics:
    """The registry of one server, and the output observer that feeds its latency histograms."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry()
        self.registry.register(StatsCollector(model_name, stats))
        labels = {"labelnames": ["model_name"], "registry": self.registry, "buckets": _LATENCY_BUCKETS}
        # Children bound to the label now, so the series are exported (empty) before any request.
        self.ttft = Histogram("jaxllm:time_to_first_token_seconds", "Time to first token.", **labels).labels(model_name)
        self.itl = Histogram("jaxllm:inter_token_latency_seconds", "Time between consecutive tokens.",
                             **labels).labels(model_name)
        self.e2e = Histogram("jaxllm:e2e_request_latency_seconds", "Arrival to finish of a request.",
                             **labels).labels(model_name)
        self._last_token_time: dict[str, tuple[float, int]] = {}  # request id -> (time, tokens so far)

    def observe(self, output: RequestOutput, now: float) -> None:
        """Called on the engine thread for every output: a DELTA output (the server asks for them),
        whose completion 0, when it moved, carries only its new tokens."""
        if not isinstance(output, RequestOutput):  # a pooling request's vector: no tokens to time
            return
        previous = self._last_token_time.get(output.request_id)
        new_tokens = sum(len(c.token_ids) for c in output.outputs if c.index == 0)
        num_tokens = (previous[1] if previous else 0) + new_tokens
        arrival = output.metrics.arrival_time if output.metrics else now
        if previous is None and num_tokens:
            self.ttft.observe(now - arrival)
        elif previous is not None and num_tokens > previous[1]:
            gap = (now - previous[0]) / (num_tokens - previous[1])
            for _ in range(num_tokens - previous[1]):
                self.itl.observe(gap)
        if output.finished:
            self._last_token_time.pop(output.request_id, None)
            self.e2e.observe(now - arrival)
        elif new_tokens:
            self._last_token_time[output.request_id] = (now, num_tokens)

    def forget(self, request_id: str) -> None:
        self._last_token_time.pop(request_id, None)

    def render(self) -> bytes:
        return generate_latest(self.registry)
