"""The OpenAI-compatible server end to end: one `jaxllm serve` subprocess on loopback for the module,
driven with the official openai client and httpx."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxllm
from jaxllm.sampling_params import SamplingParams

API_KEY = "sk-jaxllm-test"
MODEL = "SmolLM2-135M-Instruct"
LIMITS = ["--max-model-len", "256", "--max-num-seqs", "16", "--max-num-batched-tokens", "64"]
SPECULATIVE_CONFIG = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}'
MAX_WAITING = 32
# What LLM.generate / LLM.chat return greedily with the same limits (computed once with
# LLM(None, max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64); test_llm.py checks
# that those equal transformers' tokens).
GREEDY_12 = {
    "The capital of France is": " Paris.\n\nThe answer is: 201",
    "def fibonacci(n):": "\n    if n == 0:\n        return 1\n   ",
}
CHAT = [{"role": "user", "content": "What is 2+2?"}]
CHAT_GREEDY_12 = "The answer to this classic math problem is 4."  # ends with eos after 12 tokens
# Logprobs from LLM.generate with the same limits: "The capital of France is", temperature 0,
# max_tokens=6, ignore_eos, logprobs=3, prompt_logprobs=3 (the prompt's first token has none).
# Across batch shapes float32 logits agree to ~1e-6, so 1e-4 leaves room and still catches a wrong token.
PARIS_TOKENS = [" Paris", ".", "\n", "\n", "The", " answer"]
PARIS_LOGPROBS = [-0.258084, -0.380135, -1.009353, -0.879294, -1.935998, -3.209410]
PARIS_PROMPT_TOKENS = ["The", " capital", " of", " France", " is"]
PARIS_PROMPT_LOGPROBS = [None, -11.539279, -0.337618, -2.438672, -0.450947]
PARIS_PROMPT_TOP_SIZES = [None, 4, 3, 3, 3]  # " capital" is not in its top 3, so it is added
# LLM.chat(CHAT), temperature 0, max_tokens=12, logprobs=2: the sampled tokens (the last is eos) and
# the first token's top 2.
CHAT_TOKENS = ["The", " answer", " to", " this", " classic", " math", " problem", " is", " ", "4", ".", "<|im_end|>"]
CHAT_LOGPROBS = [-1.571150, -0.531895, -0.470929, -0.569834, -0.218280, -0.725533, -0.893281, -0.631643,
                 -0.889624, -0.081823, -0.311995, -1.603931]
CHAT_FIRST_TOP = [("The", -1.571150), ("2", -2.394629)]
LOGPROB_TOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server not healthy after {timeout}s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def _serve(tmp_path_factory, *extra_args: str, env: dict | None = None):
    """A `jaxllm serve` subprocess with the module's limits (and ``extra_args``, and ``env`` added
    to the environment), stopped on exit."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "jaxllm.entrypoints.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--api-key", API_KEY, "--max-waiting-requests", str(MAX_WAITING), "--served-model-name", MODEL,
           "--compilation-cache-dir", "/tmp/jaxllm-test-xla-cache", "--log-level", "warning", *LIMITS, *extra_args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield {"url": url, "proc": proc, "log": log}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with _serve(tmp_path_factory) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server["url"], headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def metric(http: httpx.Client, name: str) -> float:
    text = http.get("/metrics").text
    match = re.search(rf"^jaxllm:{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert match, f"jaxllm:{name} missing from /metrics"
    return float(match.group(1))


def wait_idle(http: httpx.Client, timeout: float = 20.0) -> None:
    """Until no request runs or waits and no KV block is held."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        names = ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting")
        if all(metric(http, n) == 0 for n in names):
            return
        time.sleep(0.1)
    raise AssertionError(f"server not idle after {timeout}s: {http.get('/metrics').text[:2000]}")


# -- happy paths -----------------------------------------------------------------------------------
def test_health_models_and_metrics_need_no_key(server):
    assert httpx.get(f"{server['url']}/health").status_code == 200
    metrics = httpx.get(f"{server['url']}/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hit_rate",
                 "prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_bucket",
                 "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket", "engine_steps_total",
                 "overlapped_steps_total"):
        assert f"jaxllm:{name}" in metrics


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_greedy_completion_equals_llm_generate(client):
    prompts = list(GREEDY_12)
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [GREEDY_12[p] for p in prompts]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert out.usage.completion_tokens == 24 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + 24


def test_greedy_chat_equals_llm_chat(client):
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == CHAT_GREEDY_12
    assert out.choices[0].finish_reason == "stop"  # eos
    assert out.usage.completion_tokens == 12


def test_streaming_chat_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == CHAT_GREEDY_12
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_continuous_usage_stats_put_each_choices_usage_in_every_chunk(client):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries the usage of its choice so far."""
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = list(stream)
    prompt_tokens = chunks[-1].usage.prompt_tokens
    assert chunks[0].usage.completion_tokens == 0 and chunks[0].usage.prompt_tokens == prompt_tokens > 0
    counts = [c.usage.completion_tokens for c in chunks[:-1]]
    assert counts == sorted(counts) and counts[-1] == 12 == chunks[-1].usage.completion_tokens
    assert all(c.usage.total_tokens == prompt_tokens + c.usage.completion_tokens for c in chunks)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    stream = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True},
                                       stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = list(stream)
    lengths = [client.completions.create(model=MODEL, prompt=p, max_tokens=1).usage.prompt_tokens for p in prompts]
    seen = {0: 0, 1: 0}
    for c in chunks[:-1]:
        (choice,) = c.choices
        assert c.usage.prompt_tokens == lengths[choice.index]
        assert c.usage.completion_tokens > seen[choice.index] or choice.finish_reason is not None
        seen[choice.index] = c.usage.completion_tokens
    assert seen == {0: 5, 1: 5} and chunks[-1].usage.completion_tokens == 10
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
    assert all(c.usage is None for c in list(plain)[:-1])


def test_cache_salt_shares_prefix_blocks_only_within_a_salt(client, http):
    prompt = "Prefix caching shares whole blocks of sixteen tokens, so this prompt needs to be long enough."
    wait_idle(http)

    def hits_of(**extra) -> float:
        before = metric(http, "prefix_cache_hits_total")
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0, extra_body=extra)
        assert out.choices[0].text
        wait_idle(http)
        return metric(http, "prefix_cache_hits_total") - before

    first, again, other = hits_of(cache_salt="tenant-a"), hits_of(cache_salt="tenant-a"), hits_of(cache_salt="b")
    assert first == 0 and again >= 16 and other == 0
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, extra_body={"cache_salt": ""})
    assert err.value.body["param"] == "cache_salt"


BLOCK_SIZE = 16  # EngineArgs' default, which the servers here keep
USAGE_KEYS = {"prompt_tokens", "completion_tokens", "total_tokens"}
# Prompts of several whole KV blocks whose first blocks differ, so neither shares a cached block with the other.
# 53 tokens: a repeat finds its 3 whole blocks (48 tokens) cached.
LONG_PROMPT = ("Prefix caching keeps every full block of sixteen prompt tokens in a table keyed by a hash of that "
               "block and of all the blocks before it, so a later prompt that starts the same way skips computing "
               "them again and goes straight on to the tokens that differ.")
# 48 tokens, exactly 3 blocks: a repeat finds only 2 (32 tokens), as its last token is always recomputed.
OTHER_PROMPT = ("Seven green lizards sat on a warm rock by the river, counting the boats that drifted past until the "
                "sun went down behind the hills and the first stars came out over the quiet water, and then they all "
                "went home to sleep until morning.")
LONG_CHAT = [{"role": "user", "content": LONG_PROMPT}]


def _sse_chunks(http: httpx.Client, path: str, body: dict) -> list[dict]:
    response = http.post(path, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    lines = [line for line in response.text.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def _cached_on_repeat(prompt_tokens: int) -> int:
    """What a repeated prompt finds in the prefix cache: its whole blocks, except that the block holding its
    last token is never taken (``KVCacheManager.get_computed_blocks`` recomputes that token to sample from)."""
    return (prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE


# SmolLM2-135M's shapes, for LoRA adapters of it.
SMOLLM2_SHAPES = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      num_hidden_layers=30)


@pytest.fixture(scope="module")
def lora_adapters(tmp_path_factory) -> dict[str, Path]:
    """Two random LoRA adapters of SmolLM2 in PEFT's layout."""
    from tiny_models import make_lora_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {name: make_lora_adapter(SMOLLM2_SHAPES, root / name, rank=4, seed=seed, std=0.06)
            for name, seed in (("sql", 1), ("poet", 2))}


@pytest.fixture(scope="module")
def details_http(tmp_path_factory, lora_adapters):
    """A second server, with --enable-prompt-tokens-details, --scheduling-policy priority,
    --return-tokens-as-token-ids, --enable-auto-tool-choice --tool-call-parser hermes, n-gram
    speculative decoding (outputs are the same with it), a LoRA adapter "sql" (and adapters loaded
    at run time), and a prefix cache of its own (empty: the test using it first sends the first
    prompt of >= 16 tokens)."""
    with (_serve(tmp_path_factory, "--enable-prompt-tokens-details", "--scheduling-policy", "priority",
                 "--return-tokens-as-token-ids", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                 "--speculative-config", SPECULATIVE_CONFIG, "--enable-lora", "--max-lora-rank", "8",
                 "--lora-modules", f"sql={lora_adapters['sql']}",
                 env={"JAXLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}) as running,
          httpx.Client(base_url=running["url"], headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c):
        yield c


def test_prompt_tokens_details_count_prefix_cache_hits(details_http):
    http = details_http
    body = {"max_tokens": 2, "temperature": 0, "ignore_eos": True}

    def usage(path: str, **fields) -> dict:
        response = http.post(path, json={**body, **fields})
        assert response.status_code == 200, response.text
        return response.json()["usage"]

    first = usage("/v1/completions", prompt=LONG_PROMPT)
    length = first["prompt_tokens"]
    hit = _cached_on_repeat(length)
    assert (length, hit) == (53, 48)
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}  # a fresh server: nothing cached yet
    assert usage("/v1/completions", prompt=LONG_PROMPT)["prompt_tokens_details"] == {"cached_tokens": hit}
    # The n choices share one prompt: counted once, as prompt_tokens counts it.
    n2 = usage("/v1/completions", prompt=LONG_PROMPT, n=2)
    assert n2["prompt_tokens"] == length and n2["prompt_tokens_details"] == {"cached_tokens": hit}
    # Several prompts: summed over them, as prompt_tokens is; OTHER_PROMPT is new the first time.
    both = usage("/v1/completions", prompt=[LONG_PROMPT, OTHER_PROMPT])
    other_hit = _cached_on_repeat(both["prompt_tokens"] - length)
    assert (both["prompt_tokens"] - length, other_hit) == (48, 32)
    assert both["prompt_tokens_details"] == {"cached_tokens": hit}
    again = usage("/v1/completions", prompt=[LONG_PROMPT, OTHER_PROMPT])
    assert again["prompt_tokens_details"] == {"cached_tokens": hit + other_hit}

    # Streams: every continuous-usage chunk carries its prompt's count, the final usage chunk the sum.
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = _sse_chunks(http, "/v1/completions", {**body, "prompt": [LONG_PROMPT, OTHER_PROMPT],
                                                   "stream_options": options})
    per_prompt = {0: hit, 1: other_hit}
    assert len(chunks) > 2 and chunks[-1]["choices"] == []
    for chunk in chunks[:-1]:
        [choice] = chunk["choices"]
        assert chunk["usage"]["prompt_tokens_details"] == {"cached_tokens": per_prompt[choice["index"]]}
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": hit + other_hit}
    final_only = _sse_chunks(http, "/v1/completions", {**body, "prompt": LONG_PROMPT,
                                                       "stream_options": {"include_usage": True}})
    assert all(c["usage"] is None for c in final_only[:-1])
    assert final_only[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": hit}

    # Chat: the first conversation through the chat template finds nothing; its repeat, its whole blocks.
    chat_first = usage("/v1/chat/completions", messages=LONG_CHAT)
    chat_hit = _cached_on_repeat(chat_first["prompt_tokens"])
    assert (chat_first["prompt_tokens"], chat_hit) == (83, 80)
    assert chat_first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usage("/v1/chat/completions", messages=LONG_CHAT)["prompt_tokens_details"] == {"cached_tokens": chat_hit}
    chunks = _sse_chunks(http, "/v1/chat/completions", {**body, "messages": LONG_CHAT, "stream_options": options})
    # The role chunk goes out before the engine has looked the prompt up: no count to give yet.
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and set(chunks[0]["usage"]) == USAGE_KEYS
    assert all(c["usage"]["prompt_tokens_details"] == {"cached_tokens": chat_hit} for c in chunks[1:])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


def _token_ids_shown(http: httpx.Client, tokens: list[str]) -> list[int]:
    assert all(t.startswith("token_id:") for t in tokens), tokens
    return [int(t.removeprefix("token_id:")) for t in tokens]


def _as_ids_matches_text(http: httpx.Client, as_text: dict, as_ids: dict) -> None:
    """Completions logprobs shown as "token_id:<id>" say what the same ones shown as text say."""
    ids = _token_ids_shown(http, as_ids["tokens"])
    texts = [http.post("/detokenize", json={"tokens": [i]}).json()["prompt"] for i in ids]
    assert texts == as_text["tokens"]
    assert as_ids["text_offset"] == as_text["text_offset"] and as_ids["token_logprobs"] == as_text["token_logprobs"]
    for top_ids, top_text in zip(as_ids["top_logprobs"], as_text["top_logprobs"], strict=True):
        assert list(top_ids.values()) == list(top_text.values())
        keys = _token_ids_shown(http, list(top_ids))
        assert [http.post("/detokenize", json={"tokens": [i]}).json()["prompt"] for i in keys] == list(top_text)


def test_return_tokens_as_token_ids(http, details_http):
    body = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "logprobs": 2,
            "ignore_eos": True}
    as_text = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert as_text["tokens"] == PARIS_TOKENS
    as_ids = http.post("/v1/completions", json={**body, "return_tokens_as_token_ids": True}).json()
    _as_ids_matches_text(http, as_text, as_ids["choices"][0]["logprobs"])
    # A stream: offsets continue across chunks from the tokens' text, not from "token_id:..".
    chunks = _sse_chunks(http, "/v1/completions", {**body, "return_tokens_as_token_ids": True})
    joined = {key: [x for c in chunks if c["choices"] for x in c["choices"][0]["logprobs"][key]]
              for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert joined == as_ids["choices"][0]["logprobs"]
    # The server's --return-tokens-as-token-ids is the default a request may override.
    default = details_http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    _as_ids_matches_text(http, as_text, default)
    off = details_http.post("/v1/completions", json={**body, "return_tokens_as_token_ids": False}).json()
    assert off["choices"][0]["logprobs"] == as_text
    chat = {"messages": CHAT, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    content = http.post("/v1/chat/completions", json=chat).json()["choices"][0]["logprobs"]["content"]
    body = {**chat, "return_tokens_as_token_ids": True}
    id_content = http.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == CHAT_TOKENS[:4]
    ids = _token_ids_shown(http, [c["token"] for c in id_content])
    assert [http.post("/detokenize", json={"tokens": [i]}).json()["prompt"] for i in ids] == CHAT_TOKENS[:4]
    for text_entry, id_entry in zip(content, id_content, strict=True):
        assert (id_entry["logprob"], id_entry["bytes"]) == (text_entry["logprob"], text_entry["bytes"])
        assert [t["logprob"] for t in id_entry["top_logprobs"]] == [t["logprob"] for t in text_entry["top_logprobs"]]
        assert id_entry["top_logprobs"][0]["token"] == id_entry["token"]  # greedy


def test_auto_tool_choice_with_the_hermes_parser(details_http):
    # The reply is forced into the hermes format (a regex), so the parser has a call to find.
    call = '<tool_call>{"name": "get_time", "arguments": {"timezone": "CET"}}</tool_call>'
    forced = re.escape("Let me look.") + re.escape(call)
    body = {"messages": ASK_WEATHER, "tools": TOOLS, "max_tokens": 120, "temperature": 0, "guided_regex": forced}
    response = details_http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["message"]["content"] == "Let me look." and choice["finish_reason"] == "tool_calls"
    assert [c["function"] for c in choice["message"]["tool_calls"]] == [
        {"name": "get_time", "arguments": '{"timezone": "CET"}'}]
    content, calls, finish = _streamed_calls(_sse_chunks(details_http, "/v1/chat/completions", body))
    assert content == "Let me look." and finish == "tool_calls"
    assert [calls[i]["function"] for i in sorted(calls)] == [c["function"] for c in choice["message"]["tool_calls"]]
    # A reply without a call is plain content, streamed or not.
    plain = {"messages": ASK_WEATHER, "tools": TOOLS, "max_tokens": 8, "temperature": 0}
    whole = details_http.post("/v1/chat/completions", json=plain).json()["choices"][0]
    assert whole["message"].get("tool_calls") is None and whole["finish_reason"] == "length"
    content, calls, finish = _streamed_calls(_sse_chunks(details_http, "/v1/chat/completions", plain))
    assert (content, calls, finish) == (whole["message"]["content"], {}, "length")


def test_priority_field_under_the_priority_policy(details_http):
    # Priority only reorders the queue: any value gives the same greedy text. (The order itself is
    # tested on the engine: tests/test_scheduler.py, tests/test_llm_engine_host.py.)
    body = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    texts = []
    for priority in (0, -3, 7):
        response = details_http.post("/v1/completions", json={**body, "priority": priority})
        assert response.status_code == 200, response.text
        texts.append(response.json()["choices"][0]["text"])
    assert texts[0] == texts[1] == texts[2] and len(texts[0]) > 0
    response = details_http.post("/v1/completions", json={**body, "priority": "high"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "priority"


def test_speculative_decoding_streams_the_same_text_several_tokens_at_a_time(http, details_http):
    """The details server verifies n-gram proposals; a copying reply streams as the plain server's
    whole reply, in fewer chunks than tokens, and the acceptance counters move."""
    passage = "The river rose after three days of rain, flooding the low fields and the old mill by the bridge."
    body = {"messages": [{"role": "user", "content": f"Repeat this text exactly:\n\n{passage}"}],
            "max_tokens": 40, "temperature": 0}
    whole = http.post("/v1/chat/completions", json=body)
    assert whole.status_code == 200, whole.text
    want = whole.json()["choices"][0]["message"]["content"]
    accepted = metric(details_http, "spec_decode_num_accepted_tokens_total")
    chunks = _sse_chunks(details_http, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    pieces = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    assert "".join(pieces) == want and passage[:40] in want
    assert len([p for p in pieces if p]) < chunks[-1]["usage"]["completion_tokens"]
    assert metric(details_http, "spec_decode_num_accepted_tokens_total") > accepted
    drafted = metric(details_http, "spec_decode_num_draft_tokens_total")
    assert drafted >= metric(details_http, "spec_decode_num_accepted_tokens_total")


def test_embeddings_equal_transformers_in_both_encodings(client, http, smollm2_hf):
    import base64

    import numpy as np
    import torch

    texts = ["The capital of France is Paris.", "def add(a, b):\n    return a + b"]
    ids = [http.post("/tokenize", json={"prompt": t}).json()["tokens"] for t in texts]
    with torch.no_grad():
        want = [smollm2_hf.model(torch.tensor([i])).last_hidden_state[0, -1].numpy() for i in ids]
    want = [w / np.linalg.norm(w) for w in want]
    # The official client asks for base64 and decodes it.
    res = client.embeddings.create(model=MODEL, input=texts)
    assert [d.index for d in res.data] == [0, 1] and res.model == MODEL
    assert res.usage.prompt_tokens == res.usage.total_tokens == sum(len(i) for i in ids)
    for d, w in zip(res.data, want, strict=True):
        np.testing.assert_allclose(np.asarray(d.embedding), w, atol=2e-4)
    as_floats = http.post("/v1/embeddings", json={"model": MODEL, "input": ids, "encoding_format": "float"}).json()
    as_b64 = http.post("/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"}).json()
    assert as_floats["object"] == "list" and as_floats["data"][0]["object"] == "embedding"
    np.testing.assert_allclose(as_floats["data"][1]["embedding"], want[1], atol=2e-4)
    decoded = np.frombuffer(base64.b64decode(as_b64["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(decoded, as_floats["data"][0]["embedding"], atol=1e-6)
    for body, param in [({"input": "x", "dimensions": 32}, "dimensions"), ({"input": []}, "input"),
                        ({"input": [[10**6]]}, "input"), ({"input": "word " * 300}, "input"),
                        ({"input": "x", "priority": 3}, "priority")]:
        response = http.post("/v1/embeddings", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (body, response.text)
    wait_idle(http)


def test_embeddings_of_a_conversation(http):
    """vLLM's chat form of /v1/embeddings: messages rendered by the chat template, with no
    generation prompt unless asked for."""
    import numpy as np

    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."}]
    for extra in ({}, {"add_generation_prompt": True}):
        ids = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False, **extra}).json()
        by_ids = http.post("/v1/embeddings", json={"input": ids["tokens"]}).json()
        by_messages = http.post("/v1/embeddings", json={"messages": messages, **extra}).json()
        assert by_messages["usage"]["prompt_tokens"] == ids["count"]
        np.testing.assert_allclose(by_messages["data"][0]["embedding"], by_ids["data"][0]["embedding"], atol=1e-6)
    for body, param in [({}, "input"), ({"input": "x", "messages": messages}, "input"),
                        ({"messages": []}, "messages")]:
        response = http.post("/v1/embeddings", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (body, response.text)
    wait_idle(http)


def test_score_and_rerank_by_embeddings_and_no_classify(http):
    """A causal LM scores pairs by the cosine of its embeddings, as vLLM's embedding models do."""
    import numpy as np

    query, docs = "Where is Paris?", ["Paris is in France.", "def add(a, b): return a + b", "Lyon is in France."]
    vectors = [np.asarray(d["embedding"]) for d in
               http.post("/v1/embeddings", json={"input": [query, *docs]}).json()["data"]]
    want = [float(vectors[0] @ v) for v in vectors[1:]]
    scores = http.post("/v1/score", json={"model": MODEL, "text_1": query, "text_2": docs}).json()
    np.testing.assert_allclose([d["score"] for d in scores["data"]], want, atol=1e-5)
    ranked = http.post("/rerank", json={"query": query, "documents": docs, "top_n": 2}).json()["results"]
    order = sorted(range(3), key=lambda i: -want[i])
    assert [r["index"] for r in ranked] == order[:2]
    response = http.post("/classify", json={"input": "x"})
    assert response.status_code == 400 and "does not support Classification API" in response.json()["error"]["message"]
    wait_idle(http)


def _greedy_ids(http: httpx.Client, model: str | None, prompt: list[int], path: str = "/v1/completions") -> list[int]:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    response = http.post(path, json=body if model is None else {**body, "model": model})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == (model or MODEL)
    return _token_ids_shown(http, response.json()["choices"][0]["logprobs"]["tokens"])


def _assert_not_found(response: httpx.Response, name: str) -> None:
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["type"] == "NotFoundError" and error["code"] == 404 and name in error["message"]


def test_lora_adapters_are_served_as_models_of_their_own(details_http, lora_adapters, smollm2_hf):
    """--lora-modules: the adapter is a model in /v1/models, and its completions are transformers'
    greedy ones on the merged weights; adapters loaded and unloaded at run time (vLLM's routes)."""
    import copy

    from conftest import hf_greedy
    from tiny_models import merge_lora

    http = details_http
    cards = http.get("/v1/models").json()["data"]
    assert [(c["id"], c["parent"]) for c in cards] == [(MODEL, None), ("sql", MODEL)]
    assert cards[1]["root"] == str(lora_adapters["sql"])
    prompt = [504, 3575, 282, 4649, 314]
    merged = merge_lora(copy.deepcopy(smollm2_hf), lora_adapters["sql"])
    want = hf_greedy(merged, prompt, 8)
    del merged
    base = _greedy_ids(http, None, prompt)
    assert _greedy_ids(http, "sql", prompt) == want != base
    assert base == hf_greedy(smollm2_hf, prompt, 8)
    chunks = _sse_chunks(http, "/v1/chat/completions", {"model": "sql", "messages": CHAT, "max_tokens": 4,
                                                        "stream": True})
    assert chunks and {c["model"] for c in chunks} == {"sql"}
    vectors = [http.post("/v1/embeddings", json={"input": "hello", **extra}).json() for extra in ({}, {"model": "sql"})]
    assert vectors[1]["model"] == "sql" and vectors[0]["data"][0]["embedding"] != vectors[1]["data"][0]["embedding"]
    _assert_not_found(http.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"}), "gpt-4")
    # Adapters at run time (JAXLLM_ALLOW_RUNTIME_LORA_UPDATING=1).
    poet = str(lora_adapters["poet"])
    response = http.post("/v1/load_lora_adapter", json={"lora_name": "poet", "lora_path": poet})
    assert response.status_code == 200 and "poet" in response.text
    assert [c["id"] for c in http.get("/v1/models").json()["data"]] == [MODEL, "sql", "poet"]
    assert _greedy_ids(http, "poet", prompt) not in (base, want)
    again = http.post("/v1/load_lora_adapter", json={"lora_name": "poet", "lora_path": poet})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    bad = http.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(lora_adapters["poet"].parent)})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora_path"
    assert "adapter_config.json" in bad.json()["error"]["message"]
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "poet"}).status_code == 200
    _assert_not_found(http.post("/v1/unload_lora_adapter", json={"lora_name": "poet"}), "poet")
    _assert_not_found(http.post("/v1/completions", json={"prompt": "x", "model": "poet"}), "poet")
    assert [c["id"] for c in http.get("/v1/models").json()["data"]] == [MODEL, "sql"]
    wait_idle(http)
    info = 'jaxllm:lora_requests_info{max_lora="1",running_lora_adapters="",waiting_lora_adapters=""}'
    assert info in http.get("/metrics").text


def test_lora_modules_flag_forms():
    from jaxllm.entrypoints.openai.cli_args import build_serve_parser

    parser = build_serve_parser()
    args = parser.parse_args(["--lora-modules", "a=/x", '{"name": "b", "path": "/y", "base_model_name": "m"}'])
    assert args.lora_modules == [("a", "/x", None), ("b", "/y", "m")]
    for bad in ("a", "=/x", '{"name": "b"}', '{"name": "b", "path": "/y", "rank": 4}', "{"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--lora-modules", bad])
    from jaxllm.entrypoints.openai.api_server import build_async_engine

    with pytest.raises(SystemExit, match="--lora-modules requires --enable-lora"):  # before loading anything
        build_async_engine(parser.parse_args(["--lora-modules", "a=/x"]))


def test_usage_has_no_prompt_tokens_details_without_the_flag(http):
    """The flag is off by default: usage keeps its three keys, even when the prefix cache was hit."""
    body = {"max_tokens": 2, "temperature": 0}
    for path, fields in (("/v1/completions", {"prompt": LONG_PROMPT}), ("/v1/chat/completions", {"messages": CHAT})):
        for _ in range(2):  # the repeat hits the prefix cache
            response = http.post(path, json={**body, **fields})
            assert response.status_code == 200, response.text
            assert set(response.json()["usage"]) == USAGE_KEYS
        options = {"include_usage": True, "continuous_usage_stats": True}
        chunks = _sse_chunks(http, path, {**body, **fields, "stream_options": options})
        assert chunks[-1]["choices"] == [] and all(set(c["usage"]) == USAGE_KEYS for c in chunks)


def test_ping_and_version(server):
    url = server["url"]
    for response in (httpx.get(f"{url}/ping"), httpx.post(f"{url}/ping")):  # no API key needed, as /health
        assert response.status_code == 200 and response.content == b""
    response = httpx.get(f"{url}/version")
    assert response.status_code == 200
    assert response.json() == {"version": jaxllm.__version__} == {"version": importlib.metadata.version("jaxllm")}


def test_ping_is_503_like_health_while_the_engine_is_down():
    from fastapi.testclient import TestClient

    from jaxllm.entrypoints.openai.api_server import build_app
    from jaxllm.entrypoints.openai.metrics import ServerMetrics
    from jaxllm.entrypoints.openai.serving_engine import ServedModel

    engine = types.SimpleNamespace(is_running=False, tokenizer=None)  # the lifespan never runs: no `with`
    app = build_app(engine, ServedModel(MODEL, MODEL, 256, 16), ServerMetrics(MODEL, lambda: None))
    client = TestClient(app)
    responses = [client.get("/health"), client.get("/ping"), client.post("/ping")]
    assert [r.status_code for r in responses] == [503, 503, 503]
    assert all(r.json()["error"]["type"] == "ServiceUnavailableError" for r in responses)
    assert client.get("/version").json() == {"version": jaxllm.__version__}


def test_unknown_request_fields_are_logged_as_ignored(client, server):
    """As vLLM: a field the server does not know is accepted and named in a warning, not dropped unseen."""
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2,
                                    extra_body={"made_up_field": 1, "kv_transfer_params": {"k": 1}})
    assert out.choices[0].finish_reason == "length"
    deadline = time.time() + 10
    expected = "request fields ['kv_transfer_params', 'made_up_field'] are not known to this server and were ignored"
    while expected not in server["log"].read_text() and time.time() < deadline:
        time.sleep(0.1)
    assert expected in server["log"].read_text()


def test_streaming_completion_equals_whole(client):
    prompt = "def fibonacci(n):"
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream if c.choices) == GREEDY_12[prompt]


def test_stop_string(client):
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
                                    stop=["\n"])
    assert out.choices[0].text == " Paris."
    assert out.choices[0].finish_reason == "stop"


def test_echo(client):
    prompt = "The capital of France is"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True)
    assert out.choices[0].text == prompt + " Paris.\n"


def test_chat_echo_puts_the_continued_assistant_message_first(http):
    partial = [*CHAT, {"role": "assistant", "content": "The answer is"}]
    body = {"messages": partial, "max_tokens": 4, "temperature": 0, "add_generation_prompt": False,
            "continue_final_message": True}
    plain = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    echoed = http.post("/v1/chat/completions", json={**body, "echo": True}).json()["choices"][0]["message"]["content"]
    assert echoed == "The answer is" + plain and len(plain) > 0
    chunks = _sse_chunks(http, "/v1/chat/completions", {**body, "echo": True})
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == echoed
    # The last message is the user's: nothing to echo.
    asked = {"messages": CHAT, "max_tokens": 4, "temperature": 0}
    assert (http.post("/v1/chat/completions", json={**asked, "echo": True}).json()["choices"][0]["message"]
            == http.post("/v1/chat/completions", json=asked).json()["choices"][0]["message"])


def test_seed_reproducible(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                         seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    assert sample(1234) == sample(1234)


def test_tokenize_detokenize_roundtrip(http):
    ids = http.post("/tokenize", json={"prompt": "The capital of France is"}).json()
    assert ids["count"] == len(ids["tokens"]) > 0 and ids["max_model_len"] == 256
    assert http.post("/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == "The capital of France is"
    chat = http.post("/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] > ids["count"]


# -- n > 1 ---------------------------------------------------------------------------------------
def _by_index(choices) -> list:
    return sorted(choices, key=lambda c: c.index)


def test_n2_greedy_choices_follow_their_prompt(client):
    prompts = list(GREEDY_12)
    out = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    # Choice i * n + j is completion j of prompt i (vLLM's numbering).
    assert [c.text for c in _by_index(out.choices)] == [GREEDY_12[p] for p in prompts for _ in range(2)]
    assert [c.index for c in _by_index(out.choices)] == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 4 * 12


def _seeded_n2(client, **fields) -> list[str]:
    out = client.completions.create(model=MODEL, prompt="Once upon a time", n=2, max_tokens=8, temperature=1.0,
                                    seed=1234, extra_body={"ignore_eos": True}, **fields)
    assert [c.index for c in _by_index(out.choices)] == [0, 1]
    assert all(c.finish_reason == "length" for c in out.choices) and out.usage.completion_tokens == 16
    return [c.text for c in _by_index(out.choices)]


def test_n2_completion_seeded_reproducible_and_streamed_alike(client):
    texts = _seeded_n2(client)
    assert texts[0] != texts[1]  # child i samples with seed + i
    assert _seeded_n2(client) == texts
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", n=2, max_tokens=8, temperature=1.0,
                                       seed=1234, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    streamed, finishes = ["", ""], [[], []]
    for chunk in chunks[:-1]:
        [choice] = chunk.choices
        streamed[choice.index] += choice.text
        finishes[choice.index].append(choice.finish_reason)
    assert streamed == texts
    assert [f[-1] for f in finishes] == ["length", "length"] and all(r is None for f in finishes for r in f[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_n2_chat_seeded_and_streamed(client, http):
    def chat(**fields):
        return client.chat.completions.create(model=MODEL, messages=CHAT, n=2, max_tokens=8, temperature=1.0,
                                              seed=7, extra_body={"ignore_eos": True}, **fields)

    out = chat()
    contents = [c.message.content for c in _by_index(out.choices)]
    assert [c.index for c in _by_index(out.choices)] == [0, 1] and contents[0] != contents[1]
    assert out.usage.completion_tokens == 16
    assert [c.message.content for c in _by_index(chat().choices)] == contents
    body = {"messages": CHAT, "n": 2, "max_tokens": 8, "temperature": 1.0, "seed": 7, "ignore_eos": True,
            "stream": True}
    lines = [line for line in http.post("/v1/chat/completions", json=body).text.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert [c["choices"][0]["delta"]["role"] for c in chunks[:2]] == ["assistant", "assistant"]
    streamed = ["", ""]
    for chunk in chunks:
        [choice] = chunk["choices"]
        streamed[choice["index"]] += choice["delta"].get("content") or ""
    assert streamed == contents


# -- logprobs ------------------------------------------------------------------------------------
def _check_paris_logprobs(lp, tokens: list[str], logprobs: list[float | None], top_sizes: list[int | None]):
    assert lp.tokens == tokens
    assert [x is None for x in lp.token_logprobs] == [x is None for x in logprobs]
    assert [x for x in lp.token_logprobs if x is not None] == pytest.approx(
        [x for x in logprobs if x is not None], abs=LOGPROB_TOL)
    assert [None if t is None else len(t) for t in lp.top_logprobs] == top_sizes
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top is None or top[token] == logprob
    assert lp.text_offset == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_completion_logprobs_equal_llm_generate(client):
    fields = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "logprobs": 3,
              "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**fields).choices[0]
    assert whole.text == "".join(PARIS_TOKENS)
    _check_paris_logprobs(whole.logprobs, PARIS_TOKENS, PARIS_LOGPROBS, [3] * 6)
    # A stream carries each chunk's tokens, with text offsets continuing across chunks.
    chunks = [c.choices[0].logprobs for c in client.completions.create(**fields, stream=True) if c.choices]
    joined = {key: [x for c in chunks for x in getattr(c, key)]
              for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert joined == whole.logprobs.model_dump()


def test_echo_with_logprobs_includes_the_prompt(client):
    prompt = "The capital of France is"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=3)
    choice = out.choices[0]
    assert choice.text == prompt + " Paris."
    _check_paris_logprobs(choice.logprobs, PARIS_PROMPT_TOKENS + PARIS_TOKENS[:2],
                          PARIS_PROMPT_LOGPROBS + PARIS_LOGPROBS[:2], PARIS_PROMPT_TOP_SIZES + [3, 3])


def test_chat_logprobs_equal_llm_chat(client):
    fields = {"model": MODEL, "messages": CHAT, "max_tokens": 12, "temperature": 0, "logprobs": True}
    content = client.chat.completions.create(**fields, top_logprobs=2).choices[0].logprobs.content
    assert [c.token for c in content] == CHAT_TOKENS
    assert [c.logprob for c in content] == pytest.approx(CHAT_LOGPROBS, abs=LOGPROB_TOL)
    assert all(c.bytes == list(c.token.encode()) for c in content)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token for c in content)  # greedy
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [
        (token, pytest.approx(logprob, abs=LOGPROB_TOL)) for token, logprob in CHAT_FIRST_TOP]
    streamed = [c for chunk in client.chat.completions.create(**fields, top_logprobs=2, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for c in chunk.choices[0].logprobs.content]
    assert streamed == content
    no_top = client.chat.completions.create(**fields).choices[0].logprobs.content
    assert [c.top_logprobs for c in no_top] == [[]] * 12
    assert client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2).choices[0].logprobs is None


# -- errors ----------------------------------------------------------------------------------------
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "x", "n": 0}, "n=0"),
    ("/v1/completions", {"prompt": "x", "n": 17}, "max_num_seqs=16"),
    ("/v1/completions", {"prompt": "x", "best_of": 2}, "best_of=2 is not supported yet"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "hello " * 300}, "max_model_len"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 256}, "max_model_len"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs=21"),
    ("/v1/completions", {"prompt": "x", "logprobs": -1}, "logprobs=-1"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"many": 1.0}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"10000000": 1.0}}, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 5.0}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, "prompt"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "needs logprobs=true"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs=21"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": -1}, "top_logprobs=-1"),
    ("/v1/chat/completions", {"messages": CHAT, "n": 17}, "max_num_seqs"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "top_p": 0}, "top_p"),
    # Known to vLLM, not built here: refused, never silently ignored.
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "xml"}}, "response_format type 'xml'"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_schema"}}, "needs a 'json_schema'"),
    ("/v1/completions", {"prompt": "x", "guided_grammar": "root ::= item"}, "guided_grammar: grammar: rule 'root' uses"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "a(?=b)"}, "guided_regex: regex 'a(?=b)': lookaround"),
    ("/v1/completions", {"prompt": "x", "guided_choice": []}, "non-empty list"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}, "give one structured-output"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regexp": "a"}}, "unexpected keyword"),
    ("/v1/completions", {"prompt": "x", "guided_json": {"type": "object", "patternProperties": {}}},
     "patternProperties"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix is not supported yet"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [TOOL]},
     '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser'),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}, "needs tools"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [TOOL], "tool_choice": {"type": "function",
                                                                                  "function": {"name": "fly"}}},
     "'fly', which is not in tools"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {}}]}, "tools[0]"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [TOOL], "tool_choice": "required", "guided_regex": "a"},
     "constrains the reply itself"),
    ("/v1/chat/completions", {"messages": CHAT, "functions": [TOOL["function"]]}, "functions"),
    ("/v1/completions", {"prompt": "x", "use_beam_search": True, "temperature": 0.7}, "temperature cannot be combined"),
    ("/v1/completions", {"prompt": "x", "use_beam_search": True, "logprobs": 1}, "logprobs cannot be combined"),
    ("/v1/completions", {"prompt": "x", "use_beam_search": True, "stop": ["."]}, "stop cannot be combined"),
    ("/v1/completions", {"prompt": "x", "use_beam_search": True, "echo": True}, "echo cannot be combined"),
    ("/v1/completions", {"prompt": "x", "use_beam_search": True, "n": 11}, "beam_width=11"),
    ("/v1/completions", {"prompt": "x", "length_penalty": 0.5}, "length_penalty only applies"),
    ("/v1/chat/completions", {"messages": CHAT, "use_beam_search": True, "tools": [TOOL], "tool_choice": "required"},
     "cannot be combined with use_beam_search"),
    ("/v1/completions", {"prompt": "x", "priority": 1}, "priority=1 needs the server started with --scheduling-policy"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True}, "not supported with stream"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs=21"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": []}, "allowed_token_ids=[]"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [10**7]}, "allowed_token_ids must be in"),
    ("/v1/completions", {"prompt": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens=0"),
    ("/v1/completions", {"prompt": "x", "truncate_prompt_tokens": 300}, "greater than max_model_len=256"),
    ("/v1/chat/completions", {"messages": CHAT, "add_special_tokens": True}, "add_special_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "continue_final_message": True}, "cannot both be true"),
    ("/v1/chat/completions", {"messages": CHAT, "add_generation_prompt": False, "continue_final_message": True},
     "end with an assistant message"),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template_kwargs": {"tokenize": False}},
     "chat_template_kwargs may not set ['tokenize']"),
]


@pytest.mark.parametrize("path,body,needle", BAD_REQUESTS, ids=[f"{p}-{list(b)[-1]}" for p, b, _ in BAD_REQUESTS])
def test_invalid_request_is_400_with_openai_error(http, path, body, needle):
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 400
    assert needle in error["message"]


def test_allowed_token_ids_truncation_and_prompt_logprobs_in_completions(http):
    paris = 7042  # " Paris"
    body = {"prompt": "def fibonacci(n):", "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "allowed_token_ids": [paris]}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == " Paris Paris Paris"
    # Left truncation: junk in front of the prompt is cut off, so the greedy text is the plain prompt's.
    ids = http.post("/tokenize", json={"prompt": "The capital of France is"}).json()["tokens"]
    body = {"prompt": [17, 42, 99, *ids], "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "truncate_prompt_tokens": len(ids), "prompt_logprobs": 3}
    out = http.post("/v1/completions", json=body).json()
    choice = out["choices"][0]
    assert choice["text"] == GREEDY_12["The capital of France is"] and out["usage"]["prompt_tokens"] == len(ids)
    # vLLM's prompt_logprobs: None for the first token, then {id: {logprob, rank, decoded_token}}.
    prompt_logprobs = choice["prompt_logprobs"]
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    for token_id, expected, size, entry in zip(ids[1:], PARIS_PROMPT_LOGPROBS[1:], PARIS_PROMPT_TOP_SIZES[1:],
                                               prompt_logprobs[1:], strict=True):
        assert len(entry) == size
        assert entry[str(token_id)]["logprob"] == pytest.approx(expected, abs=LOGPROB_TOL)
        ranks = sorted(e["rank"] for e in entry.values())
        assert ranks[:3] == [1, 2, 3]
    assert entry[str(ids[-1])]["decoded_token"] == " is"
    plain = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).json()
    assert plain["choices"][0]["prompt_logprobs"] is None
    streamed = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "prompt_logprobs": 0, "stream": True})
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")


def test_chat_continue_final_message_template_kwargs_and_prompt_logprobs(http):
    # The assistant's partial reply is continued (no end of turn after it): greedy goes on as it
    # would have after generating "The answer" itself.
    messages = [*CHAT, {"role": "assistant", "content": "The answer"}]
    body = {"messages": messages, "max_tokens": 10, "temperature": 0, "add_generation_prompt": False,
            "continue_final_message": True}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert "The answer" + response.json()["choices"][0]["message"]["content"] == CHAT_GREEDY_12
    tokenized = http.post("/tokenize", json={k: body[k] for k in ("messages", "add_generation_prompt",
                                                                  "continue_final_message")}).json()
    assert response.json()["usage"]["prompt_tokens"] == tokenized["count"]
    template = "{% for m in messages %}{{ m.content }}{% endfor %}{{ tail }}"
    body = {"messages": CHAT, "max_tokens": 2, "chat_template": template, "chat_template_kwargs": {"tail": " XYZ"},
            "prompt_logprobs": 0}
    out = http.post("/v1/chat/completions", json=body).json()
    count = http.post("/tokenize", json={"prompt": CHAT[0]["content"] + " XYZ"}).json()["count"]
    assert out["usage"]["prompt_tokens"] == count
    assert http.post("/tokenize", json={k: body[k] for k in ("messages", "chat_template", "chat_template_kwargs")}
                     ).json()["count"] == count
    assert len(out["prompt_logprobs"]) == count and out["prompt_logprobs"][0] is None
    assert all(len(entry) == 1 for entry in out["prompt_logprobs"][1:])  # 0: just the prompt's own token


def test_generation_config_defaults_fill_only_what_a_request_leaves_out():
    from jaxllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest

    defaults = {"temperature": 0.6, "top_k": 20, "max_tokens": 30}
    chat = ChatCompletionRequest(messages=CHAT)
    params = chat.to_sampling_params(100, defaults)
    assert (params.temperature, params.top_k, params.top_p, params.max_tokens) == (0.6, 20, 1.0, 30)
    assert chat.to_sampling_params(10, defaults).max_tokens == 10  # what max_model_len leaves
    own = ChatCompletionRequest(messages=CHAT, temperature=0.0, top_k=0, max_tokens=50).to_sampling_params(100, defaults)
    assert (own.temperature, own.top_k, own.max_tokens) == (0.0, 0, 50)
    # Completions default to OpenAI's max_tokens=16, which the generation config does not change.
    assert CompletionRequest(prompt="x").to_sampling_params(100, defaults).max_tokens == 16
    assert ChatCompletionRequest(messages=CHAT).to_sampling_params(100).temperature == 1.0


def test_structured_outputs_through_each_field(client, http):
    import jsonschema

    ask = [{"role": "user", "content": "Is Paris in France? Answer yes or no."}]
    chat = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=5, temperature=0,
                                          extra_body={"guided_choice": ["yes", "no"]})
    assert chat.choices[0].message.content in ("yes", "no") and chat.choices[0].finish_reason == "stop"
    body = {"prompt": "My phone number is", "max_tokens": 16, "temperature": 0}
    for fields in ({"guided_regex": r" \d{3}-\d{4}"}, {"structured_outputs": {"regex": r" \d{3}-\d{4}"}}):
        text = http.post("/v1/completions", json={**body, **fields}).json()["choices"][0]["text"]
        assert re.fullmatch(r" \d{3}-\d{4}", text), text
    chunks = _sse_chunks(http, "/v1/completions", {**body, "guided_regex": r" \d{3}-\d{4}"})
    assert re.fullmatch(r" \d{3}-\d{4}", "".join(c["choices"][0]["text"] for c in chunks if c["choices"]))
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "country": {"type": "string", "enum": ["France", "Italy"]}},
              "required": ["city", "country"]}
    ask = [{"role": "user", "content": "Name a city in France as JSON."}]
    answer = client.chat.completions.create(
        model=MODEL, messages=ask, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
    free = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=60, temperature=0,
                                          response_format={"type": "json_object"})
    assert isinstance(json.loads(free.choices[0].message.content), dict)
    error = http.post("/v1/completions", json={**body, "guided_regex": "a(?=b)"}).json()["error"]
    assert error["param"] == "guided_regex"


def test_tools_with_tool_choice_none_and_text_response_format_are_served(http):
    template = "{% for t in tools or [] %}{{ t.function.name }} {% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    body = {"messages": CHAT, "max_tokens": 3, "temperature": 0, "response_format": {"type": "text"},
            "chat_template": template}
    plain = http.post("/v1/chat/completions", json=body)
    assert plain.status_code == 200, plain.text
    with_tools = http.post("/v1/chat/completions", json={**body, "tools": [TOOL], "tool_choice": "none"})
    assert with_tools.status_code == 200, with_tools.text
    # The tools reach the chat template, which writes their names before the messages.
    contents = "".join(m["content"] for m in CHAT)
    for response, text in ((plain, contents), (with_tools, "get_weather " + contents)):
        count = http.post("/tokenize", json={"prompt": text}).json()["count"]
        assert response.json()["usage"]["prompt_tokens"] == count


WEATHER_ARGS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_ARGS}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"timezone": {"enum": ["UTC", "CET"]}}, "required": ["timezone"]}}}]
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def _streamed_calls(chunks: list[dict]) -> tuple[str, dict[int, dict], str | None]:
    """A streamed choice 0's content, its tool calls joined from their pieces, and its finish reason."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            for piece in delta.get("tool_calls") or []:
                call = calls.setdefault(piece["index"], {"function": {"name": "", "arguments": ""}})
                call.update({k: v for k, v in piece.items() if k in ("id", "type")})
                call["function"]["name"] += piece["function"].get("name") or ""
                call["function"]["arguments"] += piece["function"].get("arguments") or ""
            finish = choice["finish_reason"] or finish
    return content, calls, finish


def test_named_and_required_tool_calls(client, http):
    import jsonschema

    named = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=TOOLS, max_tokens=40, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0]
    [call] = named.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-") and call.type == "function"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_ARGS)
    assert named.message.content is None and named.finish_reason == "stop"
    body = {"messages": ASK_WEATHER, "tools": TOOLS, "max_tokens": 40, "temperature": 0,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    content, calls, finish = _streamed_calls(_sse_chunks(http, "/v1/chat/completions", body))
    assert content == "" and finish == "stop" and list(calls) == [0]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": call.function.arguments}
    required = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=TOOLS, max_tokens=80,
                                              temperature=0, tool_choice="required").choices[0]
    assert required.finish_reason == "tool_calls" and required.message.content is None
    assert len(required.message.tool_calls) >= 1
    for c in required.message.tool_calls:
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == c.function.name)
        jsonschema.validate(json.loads(c.function.arguments), schema)
    content, calls, finish = _streamed_calls(_sse_chunks(http, "/v1/chat/completions",
                                                         {**body, "max_tokens": 80, "tool_choice": "required"}))
    assert finish == "tool_calls" and content == ""
    assert [calls[i]["function"] for i in sorted(calls)] == [
        {"name": c.function.name, "arguments": c.function.arguments} for c in required.message.tool_calls]


def test_use_beam_search_equals_llm_beam_search(http, smollm2_model):
    from jaxllm import LLM, BeamSearchParams
    from jaxllm.entrypoints.chat_utils import render_chat

    llm = LLM(smollm2_model, max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64)
    tokenizer = llm.get_tokenizer()
    prompts = ["The capital of France is", "def fibonacci(n):"]
    ids = [http.post("/tokenize", json={"prompt": p}).json()["tokens"] for p in prompts]
    want = llm.beam_search([{"prompt_token_ids": i} for i in ids], BeamSearchParams(beam_width=3, max_tokens=8))
    want_texts = [tokenizer.decode(s.tokens[len(i):], skip_special_tokens=True) for i, out in zip(ids, want, strict=True)
                  for s in out.sequences]
    body = {"prompt": prompts, "n": 3, "max_tokens": 8, "use_beam_search": True}
    response = http.post("/v1/completions", json=body).json()
    assert [c["text"] for c in response["choices"]] == want_texts
    assert [c["index"] for c in response["choices"]] == list(range(6))
    assert [c["finish_reason"] for c in response["choices"]] == [
        s.finish_reason for out in want for s in out.sequences]
    assert response["usage"]["completion_tokens"] == sum(len(s.tokens) - len(i) for i, out in zip(ids, want, strict=True)
                                                         for s in out.sequences)
    streamed = _sse_chunks(http, "/v1/completions", body)
    texts = {}
    for chunk in streamed:
        for c in chunk["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert [texts[i] for i in range(6)] == want_texts
    chat = {"messages": CHAT, "n": 2, "max_tokens": 6, "use_beam_search": True, "length_penalty": 0.5}
    conversation = render_chat(tokenizer, CHAT, add_generation_prompt=True)  # what the server renders
    want_chat = llm.beam_search([{"prompt_token_ids": conversation}],
                                BeamSearchParams(beam_width=2, max_tokens=6, length_penalty=0.5))[0].sequences
    got = http.post("/v1/chat/completions", json=chat).json()["choices"]
    assert [c["message"]["content"] for c in got] == [
        tokenizer.decode(s.tokens[len(conversation):], skip_special_tokens=True) for s in want_chat]
    wait_idle(http, timeout=10)  # every beam's retained blocks are released (the engine thread's next commands)


TOOL_HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def test_tool_call_history_reaches_the_chat_template(http):
    # An assistant's earlier tool calls and the tool's answer are part of the conversation: the
    # template sees the calls with their JSON arguments parsed (as vLLM passes them) and the id.
    template = ("{% for m in messages %}{{ m.role }}:{{ m.content }}"
                "{% for c in m.tool_calls or [] %}[{{ c.id }} {{ c.function.name }} {{ c.function.arguments.city }}]{% endfor %}"
                "{% if m.tool_call_id %}<{{ m.tool_call_id }}>{% endif %};{% endfor %}")
    body = {"messages": TOOL_HISTORY, "max_tokens": 2, "temperature": 0, "chat_template": template}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    text = "user:Weather in Paris?;assistant:[call_1 get_weather Paris];tool:sunny<call_1>;"
    assert response.json()["usage"]["prompt_tokens"] == http.post("/tokenize", json={"prompt": text}).json()["count"]
    history = [*TOOL_HISTORY[:1], {**TOOL_HISTORY[1], "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris"}}]}]
    bad = http.post("/v1/chat/completions", json={**body, "messages": history})
    assert bad.status_code == 400, bad.text
    error = bad.json()["error"]
    assert error["param"] == "messages" and "tool_calls[0].function.arguments is not valid JSON" in error["message"]


def _engine_refuses(**fields) -> str | None:
    try:
        SamplingParams(**fields)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
def test_penalties_are_applied_or_refused_never_ignored(client, field):
    refusal = _engine_refuses(**{field: 0.5})
    if refusal is not None:  # not implemented by the engine: the server passes its message on
        with pytest.raises(openai.BadRequestError, match=re.escape(refusal)):
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, **{field: 0.5})
    else:  # implemented: a strong penalty changes the greedy text
        out = client.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True}, **{field: 2.0})
        assert out.choices[0].text != GREEDY_12["def fibonacci(n):"]


def test_logit_bias_and_bad_words_are_applied_or_refused(client):
    paris = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 2, "temperature": 0}
    for fields in ({"logit_bias": {"7042": -100}}, {"extra_body": {"bad_words": ["Paris"]}}):  # 7042: " Paris"
        extra = fields.get("extra_body", {})
        refusal = _engine_refuses(logit_bias={7042: -100}) if "logit_bias" in fields else _engine_refuses(**extra)
        if refusal is not None:
            with pytest.raises(openai.BadRequestError, match=re.escape(refusal)):
                client.completions.create(**paris, **fields)
        else:
            assert "Paris" not in client.completions.create(**paris, **fields).choices[0].text


def test_malformed_json_is_400(http):
    response = http.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="top_logprobs=21"):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, logprobs=True, top_logprobs=21)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_missing_or_wrong_key_is_401(server, headers):
    response = httpx.post(f"{server['url']}/v1/completions", json={"prompt": "x"}, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == 401
    assert httpx.get(f"{server['url']}/v1/models", headers=headers).status_code == 401


def test_unknown_route_is_404(http):
    response = http.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == 404


async def _post_many(url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    limit = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as c:
        async def post(body):
            async with limit:
                return await c.post("/v1/completions", json=body)

        return await asyncio.gather(*(post(b) for b in bodies))


def test_full_waiting_queue_is_503_and_others_succeed(server, http):
    bodies = [{"prompt": f"Count to ten: {i}", "max_tokens": 32, "ignore_eos": True} for i in range(80)]
    responses = asyncio.run(_post_many(server["url"], bodies, concurrency=80))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert 503 in codes and codes.count(200) >= 16
    overloaded = next(r for r in responses if r.status_code == 503).json()["error"]
    assert overloaded["code"] == 503 and "overloaded" in overloaded["message"]
    assert all(r.json()["usage"]["completion_tokens"] == 32 for r in responses if r.status_code == 200)
    wait_idle(http)


# -- disconnects and load --------------------------------------------------------------------------
def test_disconnect_mid_stream_frees_blocks(server, http):
    body = {"messages": CHAT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data:")
            if seen >= 3:
                break
        assert metric(http, "num_requests_running") == 1 and metric(http, "kv_cache_usage_perc") > 0
    wait_idle(http, timeout=10)


def test_disconnect_during_beam_search_releases_every_beam(server, http):
    body = {"prompt": "Once upon a time", "max_tokens": 200, "n": 4, "use_beam_search": True, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body, timeout=1.5)
    wait_idle(http, timeout=10)
    assert metric(http, "kv_cache_usage_perc") == 0  # retained beams too, which no running request holds


def test_disconnect_while_waiting_for_whole_response_frees_blocks(server, http):
    body = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body, timeout=1.5)
    wait_idle(http, timeout=10)


def test_load_many_concurrent_clients(server, http):
    generated = metric(http, "generation_tokens_total")
    bodies = [{"prompt": f"Tell me about the number {i}.", "max_tokens": 6, "ignore_eos": True} for i in range(128)]
    responses = asyncio.run(_post_many(server["url"], bodies, concurrency=MAX_WAITING))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    assert all(r.json()["usage"]["completion_tokens"] == 6 for r in responses)
    wait_idle(http)
    assert metric(http, "generation_tokens_total") == generated + 6 * len(bodies)


# -- the request schema never produces a 500 -------------------------------------------------------
JSON_LEAF = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
             | st.text(max_size=12))
JSON = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                              max_size=3), max_leaves=8)
# Never null: a missing max_tokens means "up to max_model_len", too slow for 60 examples on a CPU.
SMALL = st.integers(-1, 3) | st.text(max_size=3) | st.floats(-1, 3)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"]) | JSON_LEAF},
                                optional={"content": st.text(max_size=20) | JSON})
BODY = st.fixed_dictionaries(
    {"max_tokens": SMALL, "max_completion_tokens": SMALL},
    optional={
        "model": st.sampled_from([MODEL, "other"]) | JSON_LEAF,
        "prompt": st.text(max_size=30) | st.lists(st.integers(-5, 60000), max_size=5) | JSON,
        "messages": st.lists(MESSAGE, max_size=3) | JSON,
        "tokens": st.lists(st.integers(-5, 60000), max_size=5) | JSON,
        "temperature": JSON_LEAF, "top_p": JSON_LEAF, "top_k": JSON_LEAF, "min_p": JSON_LEAF, "n": JSON_LEAF,
        "stop": JSON, "stop_token_ids": JSON, "seed": JSON_LEAF, "stream": st.booleans() | JSON_LEAF,
        "stream_options": JSON, "logprobs": JSON_LEAF, "top_logprobs": JSON_LEAF, "echo": JSON_LEAF,
        "presence_penalty": JSON_LEAF, "frequency_penalty": JSON_LEAF, "min_tokens": SMALL, "user": JSON_LEAF,
        "ignore_eos": JSON_LEAF,
    },
)
PATHS = st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=PATHS, body=BODY | JSON)
def test_random_bodies_never_500(http, path, body):
    response = http.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    assert response.status_code in (200, 400), (response.status_code, response.text)
    if response.status_code == 400:
        assert response.json()["error"]["code"] == 400
    elif body.get("stream") is True and path.startswith("/v1"):
        assert response.text.rstrip().endswith("data: [DONE]")


# -- shutdown: must stay the last test, it stops the module's server ---------------------------------
def test_sigterm_lets_in_flight_requests_finish(server, client):
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, stream=True,
                                       extra_body={"ignore_eos": True})
    first = next(iter(stream))
    server["proc"].send_signal(signal.SIGTERM)
    rest = list(stream)
    assert first.choices and rest[-1].choices[0].finish_reason == "length"
    # uvicorn re-raises the captured signal after its graceful shutdown.
    assert server["proc"].wait(30) in (0, -signal.SIGTERM)
