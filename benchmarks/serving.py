"""Serving benchmark against a running jaxllm (or any OpenAI-compatible) server, after vLLM's
benchmark_serving: a sweep over client concurrency, streaming /v1/completions requests with a
fixed output length, reporting request throughput, output tokens/s, and TTFT / TPOT / ITL / E2E
percentiles.

    jaxllm serve --port 8000 &
    python benchmarks/serving.py --url http://127.0.0.1:8000 --concurrency 1 4 16 --num-requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

RESULTS = Path(__file__).parent / "results"
PROMPTS = [
    "Write a short story about a lighthouse keeper who",
    "Explain how a hash table works to a new programmer:",
    "The three most important inventions of the twentieth century are",
    "def quicksort(xs):",
    "A recipe for a simple tomato soup:",
    "In the year 2050, cities will",
]


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0  # seconds to the first streamed text
    e2e: float = 0.0
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)  # gaps between streamed chunks
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


async def _one_request(client: httpx.AsyncClient, model: str | None, prompt: str, max_tokens: int) -> RequestResult:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    start = time.perf_counter()
    result, last = RequestResult(ok=False), None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return RequestResult(ok=False, error=f"{response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk, now = json.loads(line[6:]), time.perf_counter()
            if chunk.get("usage"):
                result.output_tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                if last is None:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
    result.e2e, result.ok = time.perf_counter() - start, True
    return result


async def run_level(url: str, model: str | None, concurrency: int, num_requests: int, max_tokens: int,
                    api_key: str | None) -> dict:
    """``num_requests`` requests, at most ``concurrency`` in flight; returns the summary of the level."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def task(i: int) -> RequestResult:
            async with limit:
                return await _one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(task(i) for i in range(num_requests)))
        duration = time.perf_counter() - start
    return summarize(results, concurrency, duration)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values) * 1000.0  # ms
    return {"mean_ms": float(arr.mean()), **{f"p{q}_ms": float(np.percentile(arr, q)) for q in (50, 90, 99)}}


def summarize(results: list[RequestResult], concurrency: int, duration: float) -> dict:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "concurrency": concurrency,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput_rps": len(ok) / duration,
        "output_throughput_tok_s": output_tokens / duration,
        "total_output_tokens": output_tokens,
        "ttft": _percentiles([r.ttft for r in ok]),
        "tpot": _percentiles([r.tpot for r in ok if r.tpot is not None]),
        "itl": _percentiles([gap for r in ok for gap in r.itls]),
        "e2e": _percentiles([r.e2e for r in ok]),
    }


def _print_level(level: dict) -> None:
    ttft, tpot = level["ttft"], level["tpot"]
    print(f"concurrency {level['concurrency']:>3}: {level['completed']} ok / {level['failed']} failed, "
          f"{level['request_throughput_rps']:.2f} req/s, {level['output_throughput_tok_s']:.1f} out tok/s, "
          f"TTFT p50/p90/p99 {ttft.get('p50_ms', 0):.0f}/{ttft.get('p90_ms', 0):.0f}/{ttft.get('p99_ms', 0):.0f} ms, "
          f"TPOT p50/p90/p99 {tpot.get('p50_ms', 0):.1f}/{tpot.get('p90_ms', 0):.1f}/{tpot.get('p99_ms', 0):.1f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="the served model name; default: the server's only one")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--num-requests", type=int, default=64, help="per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--warmup-requests", type=int, default=2)
    parser.add_argument("--tag", default="local", help="goes into the results file name")
    args = parser.parse_args(argv)
    asyncio.run(run_level(args.url, args.model, 1, args.warmup_requests, args.max_tokens, args.api_key))
    levels = []
    for concurrency in args.concurrency:
        levels.append(asyncio.run(run_level(args.url, args.model, concurrency, args.num_requests, args.max_tokens,
                                            args.api_key)))
        _print_level(levels[-1])
    report = {"url": args.url, "model": args.model, "max_tokens": args.max_tokens, "num_requests": args.num_requests,
              "host": platform.node(), "machine": platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "levels": levels}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"serving_{args.tag}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
