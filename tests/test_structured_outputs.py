"""Structured outputs: the regex automaton, token masks over a vocabulary, the device mask table,
the scheduler's plumbing, and constrained generation on SmolLM2."""

from __future__ import annotations

import json
import random
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from jaxllm import LLM, GuidedDecodingParams, SamplingParams, StructuredOutputsParams
from jaxllm.config import CacheConfig, SchedulerConfig
from jaxllm.engine.llm_engine import LLMEngine
from jaxllm.engine.messages import RunnerOutput, SamplingOptions, ScheduledSequence, SchedulerOutput
from jaxllm.runner.mask_table import DeviceMaskTable
from jaxllm.runner.sampler import apply_token_masks
from jaxllm.structured.regex import compile_regex, literal
from jaxllm.structured.token_masks import TokenDFA, TokenVocabulary

# -- the regex automaton ---------------------------------------------------------------------------
PATTERNS = [
    r"\d{3}-\d{4}", r"(a|b)*abb", r"[A-Z][a-z]+( [A-Z][a-z]+)?", r"(?:yes|no|maybe)", r"a{2,4}b?", r"[^ab]+c",
    r"\w+@\w+\.com", r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?",
    r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"', r"^ab$", r"x{,3}", r"(ab){2}|c+", r"[\d\s]+",
    r"[a-]z", r"\u00e9+\.", r"a.b", r"(?P<word>ab)+?", r"[\]a]+", r"a{2}{", r"\S\W\D", r"(?:)", r"a|",
]
ALPHABET = list('ab c-1230.eE+"\\/ufA@wxyz{}é\n_]')


@pytest.mark.parametrize("pattern", PATTERNS)
def test_regex_automaton_agrees_with_python_re(pattern):
    dfa, python = compile_regex(pattern), re.compile(pattern, re.ASCII)
    rng = random.Random(pattern)
    strings = ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 9))) for _ in range(3000)]
    strings += ["000-1234", "aabb", "Ada Lovelace", "maybe", "aaab", "ab", "xx", "abab", "ccc", "é.", "ab{"]
    for text in strings:
        assert dfa.fullmatch(text) == bool(python.fullmatch(text)), (pattern, text)


def test_dead_states_are_pruned_so_live_means_prefix_of_a_match():
    dfa = compile_regex(r"abc|abd")
    assert dfa.step(dfa.start, "ab") != dfa.dead and dfa.step(dfa.start, "ac") == dfa.dead
    end = dfa.step(dfa.start, "abd")
    assert dfa.accepting[end] and (dfa.transitions[end] == dfa.dead).all() and not dfa.accepting[dfa.start]
    assert compile_regex(r"a*").accepting[compile_regex(r"a*").start]


@pytest.mark.parametrize("pattern, message", [
    ("a(?=b)", "lookaround"), (r"\1", "backreferences"), ("a**", "multiple repeat"), ("(a", "missing ')'"),
    ("a)", "unbalanced"), ("[z-a]", "bad character range"), (r"\b", r"escape \b"), ("a^b", "'^' is only"),
    ("(?i)a", "inline flags"), ("*a", "nothing to repeat"), ("a++", "possessive"), ("[ab", "unterminated"),
    (r"\x4", "hex digits"), ("a{3,2}", "bad repeat"), ("[^\\x00-\\U0010ffff]", "matches nothing"),
])
def test_unsupported_or_malformed_patterns_are_named(pattern, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        compile_regex(pattern)


def test_literal_escapes_metacharacters():
    for text in ["a.b", "(x|y)*", "[1]{2}", "c++ \\ $^", "é?"]:
        dfa = compile_regex(literal(text))
        assert dfa.fullmatch(text) and not dfa.fullmatch(text + "x") and not dfa.fullmatch(text[:-1])


# -- token masks -----------------------------------------------------------------------------------
CORPUS = ["Paris London Berlin Rome yes no maybe 0123456789 - {}[]\":,", "naïve café 🙂 über"] * 30


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")


def test_token_bytes_spell_any_text(tokenizer, smollm2_model):
    for tok in (tokenizer, smollm2_model.tokenizer):
        vocab = TokenVocabulary(tok, len(tok))
        for text in ["Paris, London!", " naïve café 🙂 über", "你好, 世界", "{\"a\": [1, 2]}\n\t"]:
            ids = tok.encode(text, add_special_tokens=False)
            assert b"".join(vocab.token_bytes[i] for i in ids) == text.encode()
        assert vocab.token_bytes[tok.eos_token_id] is None  # special tokens are never spelled


def test_masks_allow_exactly_the_tokens_that_keep_a_choice_reachable(tokenizer):
    choices = ["Paris", " London", "naïve café", "no", "nope", "🙂!", "你好"]
    vocab = TokenVocabulary(tokenizer, len(tokenizer))
    eos = tokenizer.eos_token_id
    token_dfa = TokenDFA(compile_regex("|".join(literal(c) for c in choices)), vocab, (eos,))
    spelled = vocab.token_bytes
    encoded = [c.encode() for c in choices]
    partial = [i for i, b in enumerate(spelled) if b and any(e.startswith(b) and len(b) < len(e) for e in encoded)
               and b.decode(errors="replace").count("\ufffd")]
    assert partial, "some allowed tokens hold part of a character's bytes"
    for prefix in [b"", b"Pa", b" Lon", b"na", "naï".encode(), b"no", b"Paris", b"x", "🙂".encode()[:2], b"\xe4"]:
        state = token_dfa.dfa.step(token_dfa.start, prefix)
        want = {i for i, b in enumerate(spelled) if b and any(e.startswith(prefix + b) for e in encoded)}
        if prefix in encoded or state == token_dfa.dfa.dead:
            want.add(eos)
        assert set(np.flatnonzero(token_dfa.allowed(state))) == want, prefix
        words = token_dfa.mask_words(state)
        unpacked = np.unpackbits(words.view(np.uint8), bitorder="little")[: len(tokenizer)]
        assert set(np.flatnonzero(unpacked)) == want


def test_apply_token_masks_on_device_matches_the_bitmask():
    rng = np.random.default_rng(0)
    V, S = 70, 5
    allowed = rng.random((3, V)) < 0.3
    table = np.stack([np.packbits(np.pad(a, (0, 96 - V)), bitorder="little").view("<u4") for a in allowed])
    logits = rng.standard_normal((S, V)).astype(np.float32)
    rows = np.array([0, -1, 2, 1, 0], np.int32)
    out = np.asarray(apply_token_masks(jnp.asarray(logits), jnp.asarray(rows), jnp.asarray(table.astype(np.uint32))))
    for i, r in enumerate(rows):
        want = logits[i] if r < 0 else np.where(allowed[r], logits[i], -np.inf)
        np.testing.assert_array_equal(out[i], want)


class _FakeDFA:
    """Stands in for a TokenDFA: state s allows token s."""

    def __init__(self, V):
        self.V = V

    def mask_words(self, state):
        bits = np.zeros(-(-self.V // 32) * 32, bool)
        bits[state] = True
        return np.packbits(bits, bitorder="little").view("<u4").astype(np.uint32)


def _sched(keys):
    return SchedulerOutput(tuple(ScheduledSequence(f"r{i}", (1,), 0, (1,), True, SamplingOptions(), 0,
                                                   token_mask_key=key) for i, key in enumerate(keys)))


def test_device_mask_table_writes_each_state_once_and_reuses_rows_least_recently_used():
    table, dfa = DeviceMaskTable(vocab_size=40, capacity=3), _FakeDFA(40)
    assert table.rows_for(_sched([(dfa, 5), None, (dfa, 7)])) == {"r0": 0, "r2": 1}
    assert table.rows_for(_sched([(dfa, 7), (dfa, 5)])) == {"r0": 1, "r1": 0} and table.num_writes == 2
    assert table.rows_for(_sched([(dfa, 9)])) == {"r0": 2}
    # Full: the next new state takes the least recently used row (state 7's, row 1), not one in use.
    assert table.rows_for(_sched([(dfa, 5), (dfa, 11)])) == {"r0": 0, "r1": 1} and table.num_writes == 4
    words = np.asarray(table.table)
    for row, state in [(0, 5), (1, 11), (2, 9)]:
        assert np.flatnonzero(np.unpackbits(words[row].view(np.uint8), bitorder="little")).tolist() == [state]
    with pytest.raises(RuntimeError, match="more than 3"):
        table.rows_for(_sched([(dfa, 1), (dfa, 2), (dfa, 3), (dfa, 4)]))


# -- the engine's plumbing, on a fake runner that honours the masks --------------------------------
class LowestAllowedRunner:
    """Samples the lowest token id a sequence's mask allows (any token when unconstrained)."""

    num_compiles = 0

    def __init__(self, free_token):
        self.free_token = free_token
        self.num_masked = 0

    def execute(self, out) -> RunnerOutput:
        sampled = {}
        for seq in out.sequences:
            for i, sid in enumerate(seq.sample_ids):
                if seq.token_mask_key is None:
                    sampled[sid] = self.free_token
                    continue
                token_dfa, state = seq.token_mask_key
                self.num_masked += 1
                allowed = np.flatnonzero(token_dfa.allowed(state))
                sampled[sid] = int(allowed[min(i, len(allowed) - 1)])  # forks take the next ones
        return RunnerOutput(sampled)


def _engine(tokenizer, runner, num_blocks=64):
    return LLMEngine(tokenizer, runner, SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128),
                     CacheConfig(block_size=4), num_kv_blocks=num_blocks, eos_token_ids=(tokenizer.eos_token_id,),
                     vocab_size=len(tokenizer))


def _run(engine):
    final = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                final[output.request_id] = output
    return final


def test_engine_constrains_each_request_and_its_forks_and_leaves_others_free(tokenizer):
    free = tokenizer.encode("yes")[0]
    runner = LowestAllowedRunner(free)
    engine = _engine(tokenizer, runner)
    choices = ["Paris", "Rome", "no"]
    so = StructuredOutputsParams(choice=choices)
    engine.add_request("c", "The capital", SamplingParams(max_tokens=20, structured_outputs=so))
    engine.add_request("f", "The capital", SamplingParams(max_tokens=3, ignore_eos=True))
    engine.add_request("n", "The capital", SamplingParams(n=2, max_tokens=20, structured_outputs=so))
    engine.add_request("r", "Call", SamplingParams(max_tokens=20, guided_decoding=GuidedDecodingParams(regex=r"\d-\d")))
    final = _run(engine)
    texts = {rid: [c.text for c in o.outputs] for rid, o in final.items()}
    assert texts["f"] == ["yesyesyes"]
    assert all(t in choices for t in texts["c"] + texts["n"]), texts
    assert len(set(texts["n"])) == 2  # the fork sampled other tokens from its own copy of the state
    assert re.fullmatch(r"\d-\d", texts["r"][0])
    assert all(o.outputs[0].finish_reason == "stop" for rid, o in final.items() if rid != "f")
    assert runner.num_masked > 0 and engine.num_overlapped_steps == 0  # masks need the last token first


def test_structured_requests_survive_preemption(tokenizer):
    def generate(num_blocks):
        engine = _engine(tokenizer, LowestAllowedRunner(tokenizer.encode("no")[0]), num_blocks=num_blocks)
        for i in range(4):
            so = StructuredOutputsParams(regex=r"[0-9]{6,9}") if i % 2 else None
            engine.add_request(str(i), "Paris London Berlin" * (i + 1), SamplingParams(max_tokens=9, structured_outputs=so))
        return {rid: o.outputs[0].text for rid, o in _run(engine).items()}, engine.stats.num_preemptions

    (big, none), (tiny, some) = generate(64), generate(12)
    assert none == 0 and some > 0 and big == tiny
    assert re.fullmatch(r"[0-9]{6,9}", big["1"]) and re.fullmatch(r"[0-9]{6,9}", big["3"])


SQL_GRAMMAR = r"""
root ::= select_statement
select_statement ::= "SELECT " column " from " table " where " condition
column ::= "col_1 " | "col_2 "
table ::= "table_1 " | "table_2 "
condition ::= column "= " number
number ::= "1 " | "2 "
"""
EXPR_GRAMMAR = r"""
root ::= expr   # arithmetic, nested by parentheses
expr ::= term (("+" | "-") term)*
term ::= factor (('*' | '/') factor)*
factor ::= [0-9]+ | "(" expr ")"
"""


@pytest.mark.parametrize("grammar, good, bad", [
    (SQL_GRAMMAR, ["SELECT col_1  from table_2  where col_2 = 1 "], ["SELECT col_3  from table_1  where col_1 = 1 ",
                                                                     "SELECT col_1  from table_2  where col_2 = 1"]),
    (EXPR_GRAMMAR, ["1+2*(3-4)", "((((7))))", "12/3-4*5"], ["(((((7)))))", "1+", "(1", "1+-2", ""]),
    # Escapes, classes, repetition bounds, a body over several lines, left recursion.
    (r"""root ::= greeting{1,2} name
         greeting ::= "hi\t" | 'yo\n'
         name ::= [A-Z] [a-z]{2,} "\x21"?""", ["hi\tAnn", "yo\nhi\tBob!"], ["Ann", "hi\thi\thi\tAnn", "hi\tAn"]),
    ("root ::= list\nlist ::= list \",\" item | item\nitem ::= [a-z]", ["a", "a,b,c,d,e"], ["a,b,c,d,e,f", "a,"]),
])
def test_grammars_compile_to_automata_of_exactly_their_outputs(grammar, good, bad):
    dfa = compile_regex(StructuredOutputsParams(grammar=grammar).pattern())
    assert [dfa.fullmatch(t) for t in good] == [True] * len(good)
    assert [dfa.fullmatch(t) for t in bad] == [False] * len(bad)


def test_a_grammar_too_large_to_unroll_as_asked_is_unrolled_as_deep_as_fits(caplog):
    """A JSON-like grammar: each level of nesting multiplies the pattern by 4, so 6 levels are far
    past the automaton's limits; it is unrolled to the deepest that fits (4), and says so."""
    from jaxllm.structured.grammar import grammar_regex

    grammar = r"""
    root ::= object
    object ::= "{" ( pair ( "," pair )* )? "}"
    pair ::= string ":" value
    value ::= object | array | string | "-"? [0-9]+ ("." [0-9]+)? | "true" | "false" | "null"
    array ::= "[" ( value ( "," value )* )? "]"
    string ::= "\"" [a-z]* "\""
    """
    with caplog.at_level("WARNING", logger="jaxllm"):
        dfa = compile_regex(grammar_regex(grammar, max_depth=6))
    assert "grammar: recursion unrolled to 4 levels; 5 would exceed" in caplog.text
    # object re-entered 4 times while expanding itself, not 5
    assert dfa.fullmatch('{"a":{"b":{"c":{"d":{"e":[]}}}},"f":[-2.5,true]}')
    assert not dfa.fullmatch('{"a":{"b":{"c":{"d":{"e":{}}}}}}')
    assert not dfa.fullmatch('{"a":[1,]}')


@pytest.mark.parametrize("grammar, message", [
    ("expr ::= 'a'", "no 'root' rule"),
    ("root ::= item", "rule 'root' uses 'item', which is not defined"),
    ("root ::= 'a'\nroot ::= 'b'", "defined twice"),
    ("root ::= ('a'", "is not closed"),
    ("root ::= 'a", "unexpected"),
    ("root ::= 'a' {3,1}", "max < min"),
    ("root ::= '\\q'", "unknown escape"),
    ("root ::= root 'a'", "'root' never ends within 4 levels"),
    ("root ::= 'a' = 'b'", "unexpected \"= 'b'\" at offset 13"),
    ("  ", "non-empty string"),
    ("root ::= [a-z]{500} [0-9]{500}{300}", "too large to unroll even once"),
])
def test_bad_grammars_are_named(grammar, message):
    with pytest.raises(ValueError, match=re.escape(message) if "'" in message else message):
        StructuredOutputsParams(grammar=grammar).pattern()


def test_structured_outputs_params_are_validated():
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="grammar=3 must be a string of EBNF rules"):
        StructuredOutputsParams(grammar=3)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="not both"):
        SamplingParams(structured_outputs=StructuredOutputsParams(regex="a"), guided_decoding=GuidedDecodingParams(regex="b"))
    with pytest.raises(ValueError, match="unexpected keyword"):
        SamplingParams(structured_outputs={"regexp": "a"})
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs.regex == "a+"
    assert SamplingParams(guided_decoding=GuidedDecodingParams(choice=["x"])).structured_outputs.choice == ["x"]


def test_engine_refuses_a_bad_pattern_and_queues_nothing(tokenizer):
    engine = _engine(tokenizer, LowestAllowedRunner(0))
    with pytest.raises(ValueError, match=r"structured_outputs \(regex\): .*lookaround"):
        engine.add_request("x", "hi", SamplingParams(structured_outputs=StructuredOutputsParams(regex="a(?!b)")))
    assert not engine.has_unfinished_requests()


# -- SmolLM2 end to end -------------------------------------------------------------------------------
LIMITS = dict(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def llm(smollm2_model):
    return LLM(smollm2_model, **LIMITS)


def test_smollm2_follows_choices_and_regexes_and_free_neighbours_keep_their_greedy_tokens(
        llm, smollm2_expected_greedy):
    from conftest import GREEDY_MAX_TOKENS, GREEDY_PROMPTS

    compiles = llm.llm_engine.stats.num_compiles
    greedy = SamplingParams(temperature=0.0, max_tokens=GREEDY_MAX_TOKENS, ignore_eos=True)

    def constrained(**kind):
        return SamplingParams(temperature=0.0, max_tokens=24, structured_outputs=StructuredOutputsParams(**kind))

    prompts = ["The capital of France is", "Phone: ", "Is the sky blue? Answer:", "Today's date (YYYY-MM-DD):",
               "Hello in Chinese is"]
    greetings = [" 你好", " 您好", " 早上好"]  # SmolLM2 spells these with tokens holding parts of characters
    params = [constrained(choice=[" Paris", " London", " Berlin"]), constrained(regex=r"\(\d{3}\) \d{3}-\d{4}"),
              constrained(choice=[" yes", " no"]), constrained(regex=r" \d{4}-\d{2}-\d{2}"),
              constrained(choice=greetings)]
    n = len(prompts)
    outputs = llm.generate(prompts + GREEDY_PROMPTS, params + [greedy] * len(GREEDY_PROMPTS), use_tqdm=False)
    texts = [o.outputs[0].text for o in outputs]
    assert texts[0] == " Paris" and texts[2] in (" yes", " no") and texts[4] in greetings
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", texts[1]) and re.fullmatch(r" \d{4}-\d{2}-\d{2}", texts[3])
    assert all(o.outputs[0].finish_reason == "stop" for o in outputs[:n])
    assert [o.outputs[0].token_ids for o in outputs[n:]] == smollm2_expected_greedy
    # The same requests again give the same tokens (greedy), with no new program compiled.
    again = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outputs[:n]]
    assert llm.llm_engine.stats.num_compiles == compiles


def test_smollm2_seeded_sampling_under_a_constraint_is_valid_and_reproducible(llm):
    so = StructuredOutputsParams(regex=r"[A-Z][a-z]{2,8}( [A-Z][a-z]{2,8}){0,2}")
    params = SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=30, structured_outputs=so)
    first = llm.generate("A famous person:", params, use_tqdm=False)[0]
    second = llm.generate(["A famous person:", "Another prompt"], [params, SamplingParams(max_tokens=5)],
                          use_tqdm=False)[0]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in second.outputs]
    for c in first.outputs:
        assert re.fullmatch(r"[A-Z][a-z]{2,8}( [A-Z][a-z]{2,8}){0,2}", c.text), c.text


_PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                            "age": {"type": "integer", "minimum": 0},
                                            "city": {"type": "string", "enum": ["Paris", "London", "Rome"]}},
           "required": ["name", "age", "city"]}


def test_smollm2_json_schema_and_json_object(llm):
    so = StructuredOutputsParams(json=_PERSON)
    prompt = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "Describe a person living in Paris as JSON with name, age and city."}],
        tokenize=False, add_generation_prompt=True)
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=so),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop", out.text
    value = json.loads(out.text)
    jsonschema.validate(value, _PERSON)
    obj = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=80,
                                              structured_outputs=StructuredOutputsParams(json_object=True)),
                       use_tqdm=False)[0].outputs[0]
    assert obj.finish_reason == "stop", obj.text
    assert isinstance(json.loads(obj.text), dict)


def test_smollm2_follows_a_grammar(llm):
    """vLLM's documented example: a simplified SQL grammar, and a recursive arithmetic one."""
    sql = llm.generate("Generate an SQL query to show the 'username' and 'email' from the 'users' table.",
                       SamplingParams(temperature=0.0, max_tokens=40,
                                      structured_outputs=StructuredOutputsParams(grammar=SQL_GRAMMAR)),
                       use_tqdm=False)[0].outputs[0]
    assert sql.finish_reason == "stop"
    assert re.fullmatch(r"SELECT col_[12]  from table_[12]  where col_[12] = [12] ", sql.text), sql.text
    params = SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=30,
                            structured_outputs=StructuredOutputsParams(grammar=EXPR_GRAMMAR))
    dfa = compile_regex(StructuredOutputsParams(grammar=EXPR_GRAMMAR).pattern())
    for c in llm.generate("An arithmetic expression with parentheses: ", params, use_tqdm=False)[0].outputs:
        # Cut by max_tokens or finished, the text is always a prefix the grammar can complete.
        state = dfa.step(dfa.start, c.text)
        assert (dfa.accepting[state] if c.finish_reason == "stop" else state != dfa.dead), c.text


def test_smollm2_follows_the_same_grammar_written_in_lark(llm):
    lark = r"""
    ?start: select_statement
    select_statement: "SELECT " column " from " table " where " condition
    column: "col_1 " | "col_2 "
    table: "table_1 " | "table_2 "
    condition: column "= " NUMBER
    NUMBER: "1".."2" " "
    """
    prompt = "Generate an SQL query to show the 'username' and 'email' from the 'users' table."
    outs = [llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=40,
                                                structured_outputs=StructuredOutputsParams(grammar=g)),
                         use_tqdm=False)[0].outputs[0] for g in (lark, SQL_GRAMMAR)]
    assert outs[0].finish_reason == "stop" and outs[0].token_ids == outs[1].token_ids, outs[0].text


def test_smollm2_constrained_outputs_are_the_same_under_preemption_and_chunked_prefill(llm, smollm2_model):
    """Masks follow each request through preemption (recompute), chunked prefill, prefix-cache hits and
    parallel-sampling forks: the tight engine's tokens equal the roomy one's."""
    def params(so, **kw):  # ignore_eos: a finished pattern repeats eos, so every request grows to 40 tokens
        return SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, structured_outputs=so, **kw)

    requests = [
        ("Describe Paris as JSON:", params(StructuredOutputsParams(json=_PERSON))),
        ("A list of three fruits as JSON:", params(StructuredOutputsParams(json_object=True))),
        ("My phone number is", params(StructuredOutputsParams(regex=r" \(\d{3}\) \d{3}-\d{4}"))),
        ("Describe Paris as JSON:", params(None)),
        ("The capital of France is", params(StructuredOutputsParams(choice=[" Paris", " Lyon"]))),
        ("Name two colors:", SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=20, ignore_eos=True,
                                            structured_outputs=StructuredOutputsParams(regex=r" [a-z]{3,8}, [a-z]{3,8}"))),
    ]
    prompts, sampling = [p for p, _ in requests], [s for _, s in requests]
    want = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, sampling, use_tqdm=False)]
    tight = LLM(smollm2_model, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=16, num_kv_blocks=7)
    got = tight.generate(prompts, sampling, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in got] == want
    assert tight.llm_engine.stats.num_preemptions > 0 and tight.llm_engine.stats.kv_blocks_used == 0
    assert re.fullmatch(r" \(\d{3}\) \d{3}-\d{4}", got[2].outputs[0].text)  # eos tokens are not text
    assert all(re.fullmatch(r" [a-z]{3,8}, [a-z]{3,8}", c.text) for c in got[5].outputs)
    jsonschema.validate(json.loads(got[0].outputs[0].text), _PERSON)
