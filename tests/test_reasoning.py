"""Reasoning parsers (--reasoning-parser): whole replies split as vLLM's deepseek_r1 / qwen3 parsers
do, and streamed replies, cut anywhere, give pieces that join to the whole reply's parts."""

import random

import pytest

from jaxllm.entrypoints.openai.reasoning import ReasoningSplitter


@pytest.mark.parametrize(("parser", "text", "expected"), [
    ("deepseek_r1", "Let me see.</think>It is 4.", ("Let me see.", "It is 4.")),
    ("deepseek_r1", "<think>Let me see.</think>\n\nIt is 4.", ("Let me see.", "\n\nIt is 4.")),
    ("deepseek_r1", "Still thinking", ("Still thinking", None)),  # cut before </think>: all reasoning
    ("deepseek_r1", "</think>Just the answer", (None, "Just the answer")),
    ("deepseek_r1", "Done.</think>", ("Done.", None)),
    ("deepseek_r1", "<thi", ("<thi", None)),
    ("deepseek_r1", "", (None, None)),
    ("qwen3", "<think>Let me see.</think>It is 4.", ("Let me see.", "It is 4.")),
    ("qwen3", "It is 4.", (None, "It is 4.")),  # enable_thinking=False: no <think>, all content
    ("qwen3", "<think>Cut short", ("Cut short", None)),
    ("qwen3", "Answer <think>x</think> y", (None, "Answer <think>x</think> y")),  # only at the start
    ("qwen3", "<thi", (None, "<thi")),
    ("qwen3", "<think></think>It is 4.", (None, "It is 4.")),
])
def test_whole_replies(parser, text, expected):
    assert ReasoningSplitter.split(parser, text) == expected


@pytest.mark.parametrize("parser", ["deepseek_r1", "qwen3"])
def test_streamed_pieces_join_to_the_whole_split(parser):
    rng = random.Random(0)
    parts = ["<think>", "</think>", "<", "</", "think", ">", "a", "b c", "\n", "<th", "</thi"]
    for _ in range(2000):
        text = "".join(rng.choice(parts) for _ in range(rng.randrange(0, 8)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(0, 5))))
        splitter, reasoning, content = ReasoningSplitter(parser), "", ""
        for start, stop in zip([0, *cuts], [*cuts, len(text)], strict=True):
            r, c = splitter.feed(text[start:stop])
            reasoning, content = reasoning + r, content + c
        r, c = splitter.finish()
        whole = ReasoningSplitter.split(parser, text)
        assert ((reasoning + r) or None, (content + c) or None) == whole, (text, cuts)


def test_a_possible_tag_is_held_back_until_decided():
    splitter = ReasoningSplitter("deepseek_r1")
    assert splitter.feed("<th") == ("", "")  # may be the opening tag
    assert splitter.feed("ink>Hmm </thi") == ("Hmm ", "")  # may be the closing tag
    assert splitter.feed("nk>Four.") == ("", "Four.")
    assert splitter.finish() == ("", "")
    qwen = ReasoningSplitter("qwen3")
    assert qwen.feed("<") == ("", "") and qwen.feed("b>") == ("", "<b>")


def test_unknown_parser():
    with pytest.raises(ValueError, match="reasoning parser 'granite' is not supported"):
        ReasoningSplitter("granite")


# -- through the server, in process, on a runner that writes a fixed reply ----------------------

class ScriptRunner:
    """Each request's i-th output token is ``script[i]`` (the last one, eos, repeats)."""

    num_compiles = 0

    def __init__(self, script):
        self.script = script

    def execute(self, out):
        from jaxllm.engine.messages import RunnerOutput

        def token(i):
            return self.script[min(i, len(self.script) - 1)]

        return RunnerOutput({sid: token(s.num_generated) for s in out.sequences for sid in s.sample_ids})


def _client(tokenizer, parser: str | None, reply: str, **served):
    from fastapi.testclient import TestClient

    from jaxllm.config import CacheConfig, SchedulerConfig
    from jaxllm.engine.async_engine import AsyncLLMEngine
    from jaxllm.engine.llm_engine import LLMEngine
    from jaxllm.entrypoints.openai.api_server import build_app
    from jaxllm.entrypoints.openai.metrics import ServerMetrics
    from jaxllm.entrypoints.openai.serving_engine import ServedModel

    script = tokenizer.encode(reply) + [tokenizer.eos_token_id]
    engine = LLMEngine(tokenizer, ScriptRunner(script),
                       SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256),
                       CacheConfig(block_size=16), num_kv_blocks=64, eos_token_ids=(tokenizer.eos_token_id,))
    async_engine = AsyncLLMEngine(engine)
    served = ServedModel("m", "m", 256, 4, reasoning_parser=parser, **served)
    return TestClient(build_app(async_engine, served, ServerMetrics("m", lambda: async_engine.stats)))


def test_profile_routes_exist_only_with_the_profiler_directory(smollm2_model, tmp_path, monkeypatch):
    """vLLM's /start_profile and /stop_profile, served when JAXLLM_PROFILER_DIR is set."""
    for name in ("JAXLLM_PROFILER_DIR", "VLLM_TORCH_PROFILER_DIR"):
        monkeypatch.delenv(name, raising=False)
    with _client(smollm2_model.tokenizer, None, "Hi.") as client:
        assert client.post("/start_profile").status_code == 404
    monkeypatch.setenv("JAXLLM_PROFILER_DIR", str(tmp_path))
    with _client(smollm2_model.tokenizer, None, "Hi.") as client:
        assert client.post("/start_profile").status_code == 200
        again = client.post("/start_profile")
        assert again.status_code == 400 and "already being recorded" in again.json()["error"]["message"]
        assert client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2}).status_code == 200
        assert client.post("/stop_profile").status_code == 200
        assert client.post("/stop_profile").status_code == 400
    assert len(list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))) == 1


REPLY = "<think>Two and two make four.</think>The answer is 4."
BODY = {"model": "m", "messages": [{"role": "user", "content": "What is 2+2?"}], "temperature": 0}


def _stream(client, body):
    import json

    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize(("parser", "reply", "reasoning", "content"), [
    ("deepseek_r1", REPLY, "Two and two make four.", "The answer is 4."),
    ("qwen3", REPLY, "Two and two make four.", "The answer is 4."),
    ("deepseek_r1", "Hmm, two and two.</think>Four.", "Hmm, two and two.", "Four."),
    ("qwen3", "Four, no thinking.", None, "Four, no thinking."),
    ("deepseek_r1", "Still thinking about it", "Still thinking about it", None),
    ("deepseek_r1", "Cut off at </thi", "Cut off at </thi", None),  # held back, then flushed at the end
    (None, REPLY, None, REPLY),
])
def test_chat_replies_carry_reasoning_apart_whole_and_streamed(smollm2_model, parser, reply, reasoning, content):
    with _client(smollm2_model.tokenizer, parser, reply) as client:
        response = client.post("/v1/chat/completions", json=BODY)
        assert response.status_code == 200, response.text
        message = response.json()["choices"][0]["message"]
        assert message.get("reasoning") == reasoning and message.get("reasoning_content") == reasoning
        assert message["content"] == content
        if reasoning is None:
            assert "reasoning" not in message and "reasoning_content" not in message
        chunks = _stream(client, BODY)
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        streamed_reasoning = "".join(d.get("reasoning") or "" for d in deltas)
        assert streamed_reasoning == (reasoning or "")
        assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
        assert "".join(d.get("content") or "" for d in deltas) == (content or "")
        # include_reasoning=false: the same content, no reasoning at all.
        hidden = client.post("/v1/chat/completions", json={**BODY, "include_reasoning": False}).json()
        assert hidden["choices"][0]["message"]["content"] == content
        assert "reasoning" not in hidden["choices"][0]["message"]
        streamed = _stream(client, {**BODY, "include_reasoning": False})
        assert not any("reasoning" in c["choices"][0]["delta"] for c in streamed if c["choices"])


def test_constrained_replies_are_not_split(smollm2_model):
    """A reply constrained from its first token (structured outputs, a named or required tool call)
    has no reasoning part: the parser leaves it alone. (The runner here ignores the constraint.)"""
    with _client(smollm2_model.tokenizer, "deepseek_r1", REPLY) as client:
        body = {**BODY, "structured_outputs": {"regex": "[<>/a-zA-Z .0-9]+"}}
        message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert message["content"] == REPLY and "reasoning" not in message


def test_reasoning_parser_flag():
    from jaxllm.entrypoints.openai.cli_args import build_serve_parser

    parser = build_serve_parser()
    assert parser.parse_args(["--reasoning-parser", "qwen3"]).reasoning_parser == "qwen3"
    assert parser.parse_args([]).reasoning_parser is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--reasoning-parser", "granite"])
