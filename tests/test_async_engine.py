"""AsyncLLMEngine when its engine thread dies: every request ends with EngineDeadError, including
one sent while the thread was dying, instead of waiting forever."""

import asyncio

import pytest

from jaxllm.config import CacheConfig, SchedulerConfig
from jaxllm.engine.async_engine import AsyncLLMEngine, EngineDeadError
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.sampling_params import SamplingParams


class CrashingRunner:
    num_compiles = 0

    def execute(self, out):
        raise RuntimeError("device lost")


def _engine() -> AsyncLLMEngine:
    engine = LLMEngine(None, CrashingRunner(), SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16,
                                                               max_model_len=64),
                       CacheConfig(block_size=4), num_kv_blocks=32, eos_token_ids=(0,), async_scheduling=False)
    return AsyncLLMEngine(engine)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_requests_end_with_engine_dead_error_when_the_engine_thread_crashes():
    async def main():
        engine = _engine()
        engine.start()
        stream = await engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=4))
        with pytest.raises(EngineDeadError, match="device lost"):
            async for _ in stream:
                pass
        engine._thread.join(5)
        with pytest.raises(EngineDeadError, match="not running"):
            await engine.add_request("b", [1, 2], SamplingParams())

    asyncio.run(main())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_request_sent_while_the_thread_dies_is_not_left_waiting(monkeypatch):
    async def main():
        engine = _engine()
        engine.start()
        stream = await engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=4))
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        engine._thread.join(5)
        # The race: the liveness check passed just before the thread died, so the command is never taken.
        monkeypatch.setattr(AsyncLLMEngine, "is_running", property(lambda self: True))
        with pytest.raises(EngineDeadError, match="before it took the request"):
            await asyncio.wait_for(engine.add_request("b", [1, 2], SamplingParams()), 5)

    asyncio.run(main())
