"""Build a Hugging Face fast tokenizer from a GGUF file's metadata, without torch.

transformers' own GGUF tokenizer path imports torch; jaxllm's runtime must not need it. GGUF
byte-level BPE vocabularies ("gpt2" model) are spelled in the byte-to-unicode alphabet like
tokenizer.json, so tokens and merges load straight into a ``tokenizers`` BPE model. How text is
split before BPE depends on ``tokenizer.ggml.pre``; other tokenizer kinds fall back to
transformers when torch is installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

if TYPE_CHECKING:
    from converters.gguf_file import GGUFFile

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

# Llama 3's split (tiktoken cl100k style): contractions, letters, 1-3 digit numbers, punctuation, spaces.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str | None):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in (None, "default", "gpt2"):
        return byte_level
    if pre == "smollm":  # SmolLM's tokenizer.json: every digit alone, then GPT-2's byte-level split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama3", "llama-bpe", "llama-v3"):
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return None


def _byte_level_bpe(reader: GGUFFile, pre_tokenizer) -> Tokenizer:
    tokens: list[str] = reader.field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in reader.field("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    types = reader.field("tokenizer.ggml.token_type", [])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=False) if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types, strict=False) if k == _USER_DEFINED])
    bos_id = reader.field("tokenizer.ggml.bos_token_id")
    if reader.field("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tok


def _special_token_names(reader: GGUFFile, tokens: list[str]) -> dict[str, str]:
    names = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        index = reader.field(f"tokenizer.ggml.{key}_token_id")
        if index is not None and 0 <= index < len(tokens):
            names[name] = tokens[index]
    return names


def load_gguf_tokenizer(reader: GGUFFile, path) -> Any:
    """A transformers ``PreTrainedTokenizerFast`` for the GGUF file read by ``reader``."""
    from transformers import PreTrainedTokenizerFast

    model = reader.field("tokenizer.ggml.model")
    pre = reader.field("tokenizer.ggml.pre")
    pre_tokenizer = _pre_tokenizer(pre) if model == "gpt2" else None
    if pre_tokenizer is None:
        return _transformers_fallback(path, model, pre)
    tokens = reader.field("tokenizer.ggml.tokens")
    return PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_bpe(reader, pre_tokenizer),
        chat_template=reader.field("tokenizer.chat_template"),
        **_special_token_names(reader, tokens),
    )


def _transformers_fallback(path, model, pre) -> Any:
    try:
        import torch  # noqa: F401  (transformers' GGUF tokenizer path imports it)
    except ImportError as err:
        raise ValueError(
            f"GGUF tokenizer model={model!r} pre={pre!r} is only supported through transformers, "
            "which needs torch here: pip install torch"
        ) from err
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
