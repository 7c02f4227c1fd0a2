"""``LLM.get_metrics()``: the engine's counters and gauges as plain objects (vLLM's
``vllm.v1.metrics.reader``), under the names the server's ``/metrics`` gives them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Metric:
    name: str  # e.g. "jaxllm:num_requests_running"
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    """A monotonically increasing count."""

    value: int


@dataclass
class Gauge(Metric):
    """A value that can go up or down."""

    value: float


@dataclass
class Vector(Metric):
    """A list of counters, e.g. accepted speculative tokens by position."""

    values: list[int]


def read_metrics(stats, model_name: str) -> list[Metric]:
    """The metrics of ``stats`` (an ``EngineStats``), as the server's collector exports them."""
    from jaxllm.entrypoints.openai.metrics import StatsCollector

    out: list[Metric] = []
    for family in StatsCollector(model_name, lambda: stats).collect():
        samples = [s for s in family.samples if not s.name.endswith("_created")]
        if family.name.endswith("_per_pos"):  # one counter per position (none before any proposal)
            labels = {k: v for k, v in samples[0].labels.items() if k != "position"} if samples else {
                "model_name": model_name}
            ordered = sorted(samples, key=lambda s: int(s.labels["position"]))
            out.append(Vector(family.name, labels, [int(s.value) for s in ordered]))
            continue
        for sample in samples:
            if family.type == "counter":
                out.append(Counter(family.name, dict(sample.labels), int(sample.value)))
            else:
                out.append(Gauge(family.name, dict(sample.labels), float(sample.value)))
    return out
