"""16-bit float models on XLA:CPU: packed layer weights, a uint16 (bfloat16 bits) or float32 pool,
no widened stacks.

XLA:CPU widens bfloat16 scatters and loop slices to float32 around the op and hoists the
convert out of the layer loop, so a naive bfloat16 step converted every weight and the whole KV
pool to float32 and back (a 16-token step took 1.5 s instead of 50 ms). The runner avoids it
(``pack_params``, ``kv_storage_dtype``); these tests pin both the numbers and the compiled
program.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from tiny_models import make_tiny_checkpoint

import jaxllm
from jaxllm import LLM, SamplingParams
from jaxllm.models import model_module
from jaxllm.models.attention import AttentionMetadata, get_attention_backend
from jaxllm.models.kv_quant import BF16_BITS, kv_storage_dtype
from jaxllm.models.layers import output_head, pack_params
from jaxllm.runner import kv_pool

BLOCK = 4
HALF = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _chunks(model, params, pool_dtype, ids, split):
    """Logits of ids run as two chunks (the second reads the first's K/V back from the pool)."""
    cfg, module = model.config, model_module(model.config)
    kv = kv_pool.allocate(cfg, 8, BLOCK, pool_dtype)
    nan = 0x7FC0 if np.dtype(pool_dtype) == BF16_BITS else jnp.nan  # a bfloat16 NaN's bits
    kv = tuple(jnp.full_like(x, nan) for x in kv)  # unwritten slots must never be read
    table = np.arange(1, 8, dtype=np.int32)[None, :]
    out = []
    for lo, hi in ((0, split), (split, len(ids))):
        pos = np.arange(lo, hi, dtype=np.int32)
        md = AttentionMetadata(*(jnp.asarray(np.asarray(x, np.int32)) for x in (
            pos, table[0, pos // BLOCK] * BLOCK + pos % BLOCK, np.zeros(hi - lo), table, [0, hi - lo], [hi])))
        hidden, kv = jax.jit(module.forward, static_argnums=(1, 5))(
            params, cfg, kv, jnp.asarray(ids[lo:hi], jnp.int32), md, get_attention_backend("xla"))
        out.append(np.asarray(module.logits(params, cfg, hidden)))
    return np.concatenate(out)


@pytest.mark.parametrize("family,dtype", [("smollm2", "bfloat16"), ("gpt2", "bfloat16"), ("llama", "float16")])
def test_packed_params_and_float32_pool_keep_the_numbers(family, dtype, tmp_path):
    model = jaxllm.load_model(str(make_tiny_checkpoint(family, tmp_path)), dtype=dtype)
    ids = list(range(3, 23))
    plain = _chunks(model, model.params, HALF[dtype], ids, split=11)
    assert np.isfinite(plain).all()
    packed_params = pack_params(model.params, model.config.tie_word_embeddings, "cpu")
    assert {x.dtype for x in jax.tree.leaves(packed_params["layers"])} == {np.dtype(np.uint16)}
    assert packed_params["lm_head"].shape[1] == model.config.vocab_size  # a tied model's: embed.T, stored
    np.testing.assert_array_equal(_chunks(model, packed_params, HALF[dtype], ids, split=11), plain)
    # The K/V a 16-bit model writes are exact in float32; attention then accumulates in float32
    # either way, in an order that may differ. Against the same weights in float32 throughout,
    # the float32 pool is no less accurate than the 16-bit one.
    wide = _chunks(model, packed_params, np.float32, ids, split=11)
    truth = _chunks(model, jax.tree.map(lambda x: x.astype(jnp.float32), model.params), np.float32, ids, split=11)
    err_wide, err_half = np.abs(wide - truth).mean(), np.abs(plain - truth).mean()
    assert err_wide <= 1.05 * err_half, (err_wide, err_half)
    if family == "smollm2":
        np.testing.assert_array_equal(wide, plain)  # llama's attention happens to sum in the same order
    if dtype == "bfloat16":  # the CPU pool of a bfloat16 model: the values' bits, the same numbers
        np.testing.assert_array_equal(_chunks(model, packed_params, BF16_BITS, ids, split=11), plain)


def test_output_head_is_the_embedding_transposed_when_tied(tmp_path):
    model = jaxllm.load_model(str(make_tiny_checkpoint("smollm2", tmp_path)), dtype="bfloat16")
    packed = pack_params(model.params, True, "cpu")
    np.testing.assert_array_equal(np.asarray(output_head(packed, True)), np.asarray(model.params["embed"]).T)
    assert "lm_head" not in pack_params(model.params, True, "gpu")  # GPU dots take embed.T as is
    assert "lm_head" not in pack_params(jax.tree.map(lambda x: x.astype(jnp.float32), model.params), True, "cpu")


def test_kv_storage_dtype_per_platform():
    assert kv_storage_dtype("auto", jnp.bfloat16, "cpu") == BF16_BITS == np.uint16
    assert kv_storage_dtype("auto", jnp.float16, "cpu") == np.float32
    assert kv_storage_dtype("auto", jnp.bfloat16, "gpu") == jnp.bfloat16
    assert kv_storage_dtype("auto", jnp.float32, "cpu") == np.float32
    assert kv_storage_dtype("int8", jnp.bfloat16, "cpu") == np.int8


def _materialised_float32_shapes(hlo: str) -> set[tuple[int, ...]]:
    """Shapes of float32 arrays the program writes to memory: results of the instructions of the
    entry computation and of loop bodies, not values computed element by element inside a
    fusion (a fused convert of a gathered row converts that row only)."""
    shapes, inside_fusion = set(), False
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) ", line)
        if header and line.rstrip().endswith("{"):
            inside_fusion = header.group(1).startswith(("fused_computation", "wrapped_"))
        elif not inside_fusion and (m := re.match(r"^\s+(?:ROOT )?%\S+ = f32\[([0-9,]*)\]", line)):
            shapes.add(tuple(int(d) for d in m.group(1).split(",") if d))
    return shapes


def test_bfloat16_step_converts_no_weight_stack_and_matches_greedy_reference(tmp_path):
    path = str(make_tiny_checkpoint("smollm2", tmp_path))
    llm = LLM(model=path, dtype="bfloat16", warmup=False, max_model_len=64, max_num_seqs=4,
              max_num_batched_tokens=32, num_kv_blocks=24)
    runner = llm.llm_engine.runner
    assert runner.kv_dtype == np.uint16 and runner.kv[0].dtype == np.uint16  # bfloat16 bits
    hlo = runner._lower(*runner.buckets.shapes()[-1]).compile().as_text()
    model = jaxllm.load_model(path, dtype="bfloat16")
    # A float32 copy of any stacked layer weight, of the embedding or of the pool means XLA widened it.
    stacks = {tuple(x.shape) for x in jax.tree.leaves(model.params["layers"])} | {tuple(model.params["embed"].shape)}
    stacks.add(tuple(runner.kv[0].shape))
    widened = stacks & _materialised_float32_shapes(hlo)
    assert not widened, f"bfloat16 weights or pool widened to float32 in the step: {sorted(widened)}"
    # The uint16 pool is written in place (donated) by the scatters: nothing else makes one.
    pool = ",".join(map(str, runner.kv[0].shape))
    made = re.findall(rf"%([\w.\-]+) = u16\[{pool}\]\S* (\w[\w-]*)\(", hlo)
    copies = [(name, op) for name, op in made if op in ("copy", "convert", "copy-start")
              or (op == "fusion" and not name.startswith("wrapped_scatter"))]
    assert any(op == "scatter" for _, op in made) and not copies, copies

    # The engine (packed weights, uint16 pool, chunked prefill) agrees with re-running the whole
    # sequence through the plain research forward pass at every step.
    prompts = [list(range(5, 45)), list(range(60, 67))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        seq = list(prompt)
        for _ in range(6):
            seq.append(int(np.argmax(np.asarray(model.forward(seq))[-1])))
        assert list(out.outputs[0].token_ids) == seq[len(prompt):]
    # The cpu backend runs the bfloat16 matmuls through the packed kernel.
    assert llm.llm_engine.runner.params["layers"]["wq"].bf16
    # A loaded model is used as it is: another dtype asked for is an error, not ignored.
    with pytest.raises(ValueError, match=r"dtype='float32': the model was loaded in bfloat16"):
        LLM(model, dtype="float32")
    with pytest.raises(ValueError, match=r"dtype='half-ish'"):
        LLM(model, dtype="half-ish")
