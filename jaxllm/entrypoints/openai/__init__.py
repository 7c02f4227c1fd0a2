"""The OpenAI-compatible server: ``jaxllm serve`` / ``python -m jaxllm.entrypoints.openai.api_server``."""
