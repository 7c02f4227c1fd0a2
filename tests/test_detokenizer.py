"""Incremental detokenization and stop strings, on tokenizers trained in memory (no downloads).

Two tokenizers cover the two hard cases: byte-level BPE splits an emoji over four tokens that each
decode to U+FFFD alone, and a sentencepiece-style Metaspace tokenizer drops the leading space of a
token decoded on its own.
"""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from jaxllm.engine.detokenizer import IncrementalDetokenizer, StopStringMatch
from jaxllm.sampling_params import SamplingParams

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "naïve café résumé 你好世界 🙂 emoji",
    "hello hello world world",
] * 20


@pytest.fixture(scope="module")
def byte_bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>"],
                                                        initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")


@pytest.fixture(scope="module")
def metaspace():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def feed(detok: IncrementalDetokenizer, token_ids) -> list[str]:
    texts = []
    for token_id in token_ids:
        detok.update([token_id])
        texts.append(detok.text)
    return texts


def test_byte_level_multibyte_characters_appear_only_when_complete(byte_bpe):
    prompt = byte_bpe.encode("Hello")
    output = byte_bpe.encode(" 你好 🙂 world naïve")
    assert len(output) > len(" 你好 🙂 world naïve".split())  # the emoji really is split over tokens
    texts = feed(IncrementalDetokenizer(byte_bpe, prompt, SamplingParams()), output)
    assert texts[-1] == " 你好 🙂 world naïve"
    assert all("\ufffd" not in t and texts[-1].startswith(t) for t in texts)
    assert " 你好 " in texts and " 你好 🙂" in texts


def test_sentencepiece_spaces_survive_token_by_token(metaspace):
    prompt = metaspace.encode("hello")
    output = metaspace.encode("world the lazy fox")
    texts = feed(IncrementalDetokenizer(metaspace, prompt, SamplingParams()), output)
    assert [metaspace.decode([t]) for t in output][:2] == ["world", "the"]  # alone, spaces are lost
    assert texts[-1] == " world the lazy fox"


@pytest.mark.parametrize("include, expected", [(False, "Hel"), (True, "Hello wo")])
def test_stop_string_spanning_two_tokens(byte_bpe, include, expected):
    output = byte_bpe.encode("Hello world, again")
    assert byte_bpe.convert_ids_to_tokens(output)[:3] == ["He", "llo", "Ġworld"]
    detok = IncrementalDetokenizer(byte_bpe, [5], SamplingParams(stop=["lo wo"], include_stop_str_in_output=include))
    assert detok.update(output[:2]) is None
    assert detok.update(output[2:3]) == StopStringMatch("lo wo")
    assert detok.text == expected
    assert detok.update(output[3:]) is None and detok.text == expected


def test_multibyte_stop_string_and_earliest_match_wins(byte_bpe):
    output = byte_bpe.encode(" 你好 🙂 world")
    detok = IncrementalDetokenizer(byte_bpe, [5], SamplingParams(stop=["world", "好 🙂"]))
    matches = [detok.update([t]) for t in output]
    assert [m for m in matches if m] == [StopStringMatch("好 🙂")]
    assert detok.text == " 你"


def test_running_text_holds_back_a_possible_stop_string_start(byte_bpe):
    detok = IncrementalDetokenizer(byte_bpe, [5], SamplingParams(stop=["world!"]))
    detok.update(byte_bpe.encode("Hello world"))
    assert detok.text == "Hello world"
    assert detok.output_text(finished=False) == "Hello "
    assert detok.output_text(finished=True) == "Hello world"


@pytest.mark.parametrize("skip, expected", [(True, "Hello world"), (False, "Hello<|eos|> world")])
def test_skip_special_tokens(byte_bpe, skip, expected):
    ids = byte_bpe.encode("Hello") + [byte_bpe.eos_token_id] + byte_bpe.encode(" world")
    detok = IncrementalDetokenizer(byte_bpe, [5], SamplingParams(skip_special_tokens=skip))
    feed(detok, ids)
    assert detok.text == expected


def test_detokenize_false_gives_no_text(byte_bpe):
    detok = IncrementalDetokenizer(byte_bpe, [5], SamplingParams(detokenize=False))
    assert detok.update(byte_bpe.encode("Hello world")) is None
    assert detok.output_text(finished=True) == ""


@pytest.mark.parametrize("skip", [True, False])
def test_every_added_special_token_is_skipped_as_transformers_skips_it(smollm2_model, skip):
    """SmolLM2 marks 17 added tokens special (<file_sep>, <jupyter_code>, ...) but names only three
    of them as its special tokens: skip_special_tokens leaves out all 17, as transformers' decode."""
    tok = smollm2_model.tokenizer
    output = tok.encode("a") + [5] + tok.encode(" b") + [13, 2]  # <file_sep>, <jupyter_code>, <|im_end|>
    assert {5, 13} - set(tok.all_special_ids) == {5, 13}
    detok = IncrementalDetokenizer(tok, tok.encode("Hi"), SamplingParams(skip_special_tokens=skip))
    assert feed(detok, output)[-1] == tok.decode(output, skip_special_tokens=skip)
    assert (detok.text == "a b") is skip
