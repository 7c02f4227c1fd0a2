"""vLLM's ``return_token_ids`` request field: completions and chat answers carry the prompt's token
ids and each choice's generated ids beside the text; a stream sends the prompt's in its first chunk
and each chunk's new ids, which join to the whole answer's."""

from __future__ import annotations

import json

import pytest
from server_client import client_for

from jaxllm import LLM, SamplingParams

LIMITS = dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64)  # test_llm's: its programs
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MESSAGES = [{"role": "user", "content": "What is 12 times 7?"}]


@pytest.fixture(scope="module")
def served(smollm2_model):
    """Outputs of LLM.generate / LLM.chat, then a client of the same engine (the server's from then on)."""
    llm = LLM(smollm2_model, **LIMITS)
    tok = llm.get_tokenizer()
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    sampled = SamplingParams(temperature=0.9, seed=11, n=2, max_tokens=10, ignore_eos=True)
    stopped = SamplingParams(temperature=0.0, max_tokens=24, stop=["\n"])
    expected = {
        "greedy": [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)],
        "sampled": [[c.token_ids for c in o.outputs] for o in llm.generate(PROMPTS, sampled, use_tqdm=False)],
        "stopped": [o.outputs[0] for o in llm.generate(PROMPTS, stopped, use_tqdm=False)],
        "chat": llm.chat(MESSAGES, greedy, use_tqdm=False)[0],
        "prompts": [tok.encode(p) for p in PROMPTS],
    }
    with client_for(llm.llm_engine, LIMITS["max_model_len"], LIMITS["max_num_seqs"]) as client:
        yield client, expected


def events(response) -> list[dict]:
    assert response.status_code == 200, response.text
    lines = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


GREEDY = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}
SAMPLED = {"temperature": 0.9, "seed": 11, "n": 2, "max_tokens": 10, "ignore_eos": True}


def test_completions_return_prompt_and_generated_ids(served):
    client, expected = served
    body = client.post("/v1/completions", json={"prompt": PROMPTS, **GREEDY, "return_token_ids": True}).json()
    assert [c["token_ids"] for c in body["choices"]] == expected["greedy"]
    assert [c["prompt_token_ids"] for c in body["choices"]] == expected["prompts"]
    # n = 2 per prompt: choice i * n + j, each with its prompt's ids
    body = client.post("/v1/completions", json={"prompt": PROMPTS, **SAMPLED, "return_token_ids": True}).json()
    assert [c["token_ids"] for c in body["choices"]] == [ids for per in expected["sampled"] for ids in per]
    assert [c["prompt_token_ids"] for c in body["choices"]] == [p for p in expected["prompts"] for _ in range(2)]
    # echo shows the prompt in the text; token_ids stay the generated ones
    body = client.post("/v1/completions", json={"prompt": PROMPTS[0], **GREEDY, "echo": True,
                                                "return_token_ids": True}).json()
    [choice] = body["choices"]
    assert choice["text"].startswith(PROMPTS[0])
    assert choice["token_ids"] == expected["greedy"][0] and choice["prompt_token_ids"] == expected["prompts"][0]


def test_without_the_field_answers_carry_no_ids(served):
    client, _ = served
    for value in (None, False):
        extra = {} if value is None else {"return_token_ids": value}
        body = client.post("/v1/completions", json={"prompt": PROMPTS[0], **GREEDY, **extra}).json()
        assert "token_ids" not in body["choices"][0] and "prompt_token_ids" not in body["choices"][0]
        body = client.post("/v1/chat/completions", json={"messages": MESSAGES, **GREEDY, **extra}).json()
        assert "token_ids" not in body["choices"][0] and "prompt_token_ids" not in body
        chunks = events(client.post("/v1/completions", json={"prompt": PROMPTS[0], **GREEDY, **extra,
                                                             "stream": True}))
        assert not any("token_ids" in c or "prompt_token_ids" in c for chunk in chunks for c in chunk["choices"])


def test_completion_streams_send_the_prompt_first_and_each_chunks_new_ids(served):
    client, expected = served
    for params, want in ((GREEDY, [[ids] for ids in expected["greedy"]]), (SAMPLED, expected["sampled"])):
        chunks = events(client.post("/v1/completions", json={"prompt": PROMPTS, **params, "stream": True,
                                                             "return_token_ids": True}))
        n = len(want[0])
        ids: dict[int, list[int]] = {}
        prompts: dict[int, list[list[int]]] = {}
        for chunk in chunks:
            [choice] = chunk["choices"]
            index = choice["index"]
            if index not in ids:  # a choice's first chunk carries its prompt's ids
                prompts[index] = [choice["prompt_token_ids"]]
            else:
                assert "prompt_token_ids" not in choice
            ids.setdefault(index, []).extend(choice["token_ids"])
        assert ids == {i * n + j: want[i][j] for i in range(len(PROMPTS)) for j in range(n)}
        assert prompts == {i * n + j: [expected["prompts"][i]] for i in range(len(PROMPTS)) for j in range(n)}


def test_ids_of_text_held_back_or_cut_by_a_stop_string_still_arrive(served):
    client, expected = served
    body = {"prompt": PROMPTS, "temperature": 0, "max_tokens": 24, "stop": ["\n"], "return_token_ids": True}
    whole = client.post("/v1/completions", json=body).json()["choices"]
    assert [c["token_ids"] for c in whole] == [o.token_ids for o in expected["stopped"]]
    assert [c["finish_reason"] for c in whole] == [o.finish_reason for o in expected["stopped"]]
    assert any(o.finish_reason == "stop" for o in expected["stopped"])  # a stop string cut one
    ids: dict[int, list[int]] = {}
    for chunk in events(client.post("/v1/completions", json={**body, "stream": True})):
        for c in chunk["choices"]:
            ids.setdefault(c["index"], []).extend(c.get("token_ids", []))
    assert [ids[i] for i in range(len(PROMPTS))] == [o.token_ids for o in expected["stopped"]]


def test_chat_returns_the_rendered_conversations_ids(served):
    client, expected = served
    chat = expected["chat"]
    body = client.post("/v1/chat/completions", json={"messages": MESSAGES, **GREEDY, "return_token_ids": True}).json()
    assert body["prompt_token_ids"] == chat.prompt_token_ids
    assert body["choices"][0]["token_ids"] == chat.outputs[0].token_ids
    assert body["choices"][0]["message"]["content"] == chat.outputs[0].text
    chunks = events(client.post("/v1/chat/completions", json={"messages": MESSAGES, **GREEDY, "stream": True,
                                                              "return_token_ids": True}))
    assert chunks[0]["prompt_token_ids"] == chat.prompt_token_ids
    assert not any("prompt_token_ids" in chunk for chunk in chunks[1:])
    streamed = [i for chunk in chunks for c in chunk["choices"] for i in c.get("token_ids", [])]
    assert streamed == chat.outputs[0].token_ids


def test_a_server_without_a_tokenizer_serves_token_ids(tmp_path):
    """vLLM's skip_tokenizer_init serving: token ids in, token ids out (the RL loop's way); logprobs
    name tokens by id; what needs text is refused by name."""
    from server_client import assert_error
    from tiny_models import make_tiny_checkpoint

    path = make_tiny_checkpoint("llama", tmp_path / "tiny")  # no tokenizer files
    llm = LLM(str(path), max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=32, block_size=8)
    assert llm.get_tokenizer() is None
    prompt = [5, 6, 7, 8]
    want = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    body = {"prompt": prompt, "temperature": 0, "max_tokens": 5, "ignore_eos": True, "return_token_ids": True}
    with client_for(llm.llm_engine, 64, 4) as client:
        [choice] = client.post("/v1/completions", json={**body, "logprobs": 1}).json()["choices"]
        assert choice["token_ids"] == want and choice["prompt_token_ids"] == prompt and choice["text"] == ""
        assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in want]
        streamed = [i for chunk in events(client.post("/v1/completions", json={**body, "stream": True}))
                    for c in chunk["choices"] for i in c["token_ids"]]
        assert streamed == want
        assert_error(client.post("/v1/completions", json={**body, "stop": ["a"]}), 400, "no tokenizer", "stop")
        assert_error(client.post("/v1/completions", json={**body, "prompt": "text"}), 400, "no tokenizer", "prompt")
        assert_error(client.post("/v1/completions", json={**body, "prompt": [5, 160]}), 400,
                     "prompt token ids must be in [0, 160)", "prompt")
        assert_error(client.post("/v1/chat/completions", json={"messages": MESSAGES}), 400, "no tokenizer",
                     "messages")
        assert_error(client.post("/tokenize", json={"prompt": "hi"}), 400, "no tokenizer", "prompt")
        assert_error(client.post("/detokenize", json={"tokens": [5]}), 400, "no tokenizer", "tokens")
