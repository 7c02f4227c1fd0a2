"""Structured outputs: constrain sampling to a regex, a JSON schema or a set of choices (vLLM's guided decoding)."""
