"""The OpenAI server in process, for route tests: a TestClient over an engine's app, and the
check of an error body in OpenAI's shape."""

from __future__ import annotations


def client_for(llm_engine, max_model_len: int, max_num_seqs: int, name: str = "m"):
    """A TestClient of the app serving ``llm_engine`` as model ``name`` (enter it with ``with`` to
    run the app's lifespan: the engine loop; the engine is the server's from then on)."""
    from fastapi.testclient import TestClient

    from jaxllm.engine.async_engine import AsyncLLMEngine
    from jaxllm.entrypoints.openai.api_server import build_app
    from jaxllm.entrypoints.openai.metrics import ServerMetrics
    from jaxllm.entrypoints.openai.serving_engine import ServedModel

    engine = AsyncLLMEngine(llm_engine)
    served = ServedModel(name, name, max_model_len, max_num_seqs)
    return TestClient(build_app(engine, served, ServerMetrics(name, lambda: engine.stats)))


def assert_error(response, status: int, match: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert match in error["message"] and error["code"] == status
    if param is not None:
        assert error["param"] == param
