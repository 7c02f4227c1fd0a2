"""The embedded SmolLM2-135M-Instruct Q4_1 GGUF against transformers' own GGUF loader."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import make_tiny_checkpoint

import converters
from converters import orbax_cache
from converters.checkpoint import Checkpoint
from converters.convert import convert
from converters.gguf_loader import unpermute_rows
from converters.sources import DictSource
from jaxllm.models.layout import param_shapes

PROMPT = "What is the capital of France?"
# transformers 5.23's GGUF tokenizer (AutoTokenizer.from_pretrained(dir, gguf_file=...)) on PROMPT.
PROMPT_IDS = [1780, 314, 260, 3575, 282, 4649, 47]


@pytest.fixture(scope="module")
def ours() -> Checkpoint:
    return converters.load_checkpoint(None)  # None is the embedded GGUF


def _shapes(tree: dict) -> dict:
    return {k: _shapes(v) if isinstance(v, dict) else v.shape for k, v in tree.items()}


def test_resolves_the_embedded_file(smollm2_path):
    assert smollm2_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert converters.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == smollm2_path


def test_every_tensor_equals_transformers_gguf_loader(ours, smollm2_hf):
    """Both dequantise the same blocks with gguf and undo the same Q/K permutation: exact."""
    state = {k: v.detach().numpy() for k, v in smollm2_hf.state_dict().items()}
    theirs = convert(ours.config, DictSource(state, "float32"), np.float32)
    assert _shapes(ours.params) == param_shapes(ours.config) == _shapes(theirs)
    for name in ("embed", "final_norm"):
        np.testing.assert_array_equal(ours.params[name], theirs[name], err_msg=name)
    for name, value in ours.params["layers"].items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, theirs["layers"][name], err_msg=name)
    assert ours.source_dtype == "Q4_1"


def test_config_equals_transformers_config(ours, smollm2_hf):
    hf, c = smollm2_hf.config, ours.config
    rope_theta = getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]
    assert (c.architecture, c.family) == ("LlamaForCausalLM", "llama")
    assert (c.vocab_size, c.hidden_size, c.num_layers) == (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
    assert (c.intermediate_size, c.max_position_embeddings) == (hf.intermediate_size, hf.max_position_embeddings)
    assert (c.norm_eps, c.rope_theta, c.rope_scaling) == (hf.rms_norm_eps, rope_theta, None)
    assert (c.tie_word_embeddings, c.bos_token_id, c.eos_token_ids) == (hf.tie_word_embeddings, hf.bos_token_id,
                                                                         (hf.eos_token_id,))
    # The numbers themselves, so a change on both sides still shows.
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads) == (49152, 576, 30, 9, 3)
    assert (c.tie_word_embeddings, c.bos_token_id, c.eos_token_ids, c.rope_theta) == (True, 1, (2,), 100000.0)


def test_tokenizer_and_chat_template(ours):
    tok = ours.tokenizer
    assert tok(PROMPT).input_ids == PROMPT_IDS
    assert len(tok) == ours.config.vocab_size
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    assert text.endswith(f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") == ours.config.eos_token_ids[0]


def test_tokenizer_survives_the_orbax_cache(ours, tmp_path):
    tiny = converters.load_checkpoint(make_tiny_checkpoint("smollm2", tmp_path / "hf"))
    orbax_cache.save(Checkpoint(tiny.config, tiny.params, ours.tokenizer, "Q4_1"), tmp_path / "saved")
    back = orbax_cache.load(tmp_path / "saved").tokenizer
    assert back(PROMPT).input_ids == PROMPT_IDS
    assert back.chat_template == ours.tokenizer.chat_template


def test_hf_directory_tokenizer_is_loaded(ours, tmp_path):
    path = make_tiny_checkpoint("smollm2", tmp_path)
    assert converters.load_checkpoint(path).tokenizer is None
    ours.tokenizer.save_pretrained(path)
    assert converters.load_checkpoint(path).tokenizer(PROMPT).input_ids == PROMPT_IDS


@pytest.mark.parametrize("num_heads", [1, 3])
def test_unpermute_inverts_llama_cpp_permute(num_heads):
    """llama.cpp's convert_hf_to_gguf permute: (heads, 2, H/2) row order -> (heads, H/2, 2)."""
    hf = np.arange(num_heads * 8 * 5, dtype=np.float32).reshape(num_heads * 8, 5)
    gguf = hf.reshape(num_heads, 2, 4, 5).swapaxes(1, 2).reshape(hf.shape)
    assert not np.array_equal(gguf, hf)
    np.testing.assert_array_equal(unpermute_rows(gguf, num_heads), hf)
    np.testing.assert_array_equal(unpermute_rows(gguf[:, 0], num_heads), hf[:, 0])  # biases too


TEXTS = [
    "What is the capital of France?",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)",
    "Ünïcödé façade — 東京 🙂",
    "<|im_start|>user\nHi<|im_end|>",
]


def test_tokenizer_equals_transformers_gguf_tokenizer(ours, smollm2_path):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    for text in TEXTS:
        assert ours.tokenizer.encode(text) == theirs.encode(text), text
        assert ours.tokenizer.decode(ours.tokenizer.encode(text)) == text
    assert ours.tokenizer.eos_token == "<|im_end|>" and ours.tokenizer.bos_token == "<|im_start|>"


def test_smollm_tokenizer_splits_digits_like_the_original(ours):
    # SmolLM2's own tokenizer.json splits every digit: "12345" is five tokens.
    assert len(ours.tokenizer.encode("12345")) == 5


def test_gguf_tokenizer_loads_without_torch(smollm2_path):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "from pathlib import Path\n"
        "from converters.gguf_file import GGUFFile\n"
        "from converters.gguf_tokenizer import load_gguf_tokenizer\n"
        f"p = Path({str(smollm2_path)!r}); tok = load_gguf_tokenizer(GGUFFile(p), p)\n"
        f"assert tok.encode({PROMPT!r}) == {PROMPT_IDS!r}, tok.encode({PROMPT!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_our_reader_equals_gguf_py_reader(smollm2_path):
    """Every metadata value and every tensor's type, shape and bytes, as gguf-py reads them."""
    from gguf import GGUFReader

    from converters.gguf_file import GGUFFile

    ours, theirs = GGUFFile(smollm2_path), GGUFReader(smollm2_path)
    assert ours.version == 3
    assert list(ours.fields) == [k for k in theirs.fields if not k.startswith("GGUF.")]
    for key, value in ours.fields.items():
        assert value == theirs.fields[key].contents(), key
    assert ours.fields["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(ours.tensors) == len(theirs.tensors) == 272
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type, a.shape) == (b.name, b.tensor_type, tuple(b.shape.tolist()))
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        assert np.array_equal(a.data, b.data), a.name


def test_reader_refuses_what_is_not_gguf(tmp_path):
    from converters.gguf_file import GGUFFile

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGML" + bytes(28))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(bad)
    bad.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(16))
    with pytest.raises(ValueError, match="version 1"):
        GGUFFile(bad)
