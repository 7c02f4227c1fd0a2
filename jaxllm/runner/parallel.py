"""Tensor parallelism (vLLM's ``tensor_parallel_size``): one model split over the devices of a mesh.

Megatron's split, written as shardings of the weights and the KV pool; XLA's SPMD partitioner
turns the replicated program into one per device and adds the all-reduces:

- ``wq``, ``wk``, ``wv`` (and their biases) are split by heads, ``wo`` by its input heads: each
  device computes its heads' attention and a partial output projection; one all-reduce sums them.
- ``w_gate`` and ``w_up`` are split by the FFN width, ``w_down`` by its input rows: one
  all-reduce per MLP.
- The KV pool ``[L, num_blocks, block_size, K, H]`` is split by kv heads: every device holds its
  heads' K/V of every block, so block ids, block tables, slots (and with them the scheduler,
  prefix caching, copy-on-write and swapping) are exactly those of one device.
- Attention runs under ``shard_map`` on each device's own heads, so every backend (the C++ CPU
  kernel, Pallas, Triton, Mosaic GPU) computes a one-device problem with fewer heads.
- Embeddings, norms, the output head, the sampler and everything the step returns are
  replicated: each device computes the same tokens.

The C++ CPU matmul kernel's packed panels are not split: under tensor parallelism the matmuls are
XLA's dots, which the partitioner splits.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm.config import ModelConfig

AXIS = "tp"

# Per-layer weights (stacked: axis 0 is the layer) and the axis each is split along.
_LAYER_SPLIT_AXIS = {
    "wq": 2, "wk": 2, "wv": 2, "bq": 1, "bk": 1, "bv": 1, "wo": 1,
    "w_gate": 2, "w_up": 2, "b_gate": 1, "b_up": 1, "w_down": 1,
}


def make_mesh(tensor_parallel_size: int) -> Mesh | None:
    """The first ``tensor_parallel_size`` devices (a positive integer: EngineArgs checks it) as a
    one-axis mesh; None for one device."""
    if tensor_parallel_size == 1:
        return None
    devices = jax.devices()
    if tensor_parallel_size > len(devices):
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs {tensor_parallel_size} devices; "
                         f"{len(devices)} {devices[0].platform} device(s) are visible")
    return Mesh(np.array(devices[:tensor_parallel_size]), (AXIS,))


def mesh_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape[AXIS]


def check_model(cfg: ModelConfig, mesh: Mesh | None, what: str = "the model") -> None:
    """ValueError unless ``cfg``'s heads and FFN width split evenly over ``mesh``."""
    tp = mesh_size(mesh)
    sizes = {"num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
             "intermediate_size": cfg.intermediate_size}
    for name, value in sizes.items():
        if value % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide {what}'s {name}={value} "
                             f"({cfg.architecture}): each device holds an equal share")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def kv_sharding(mesh: Mesh) -> NamedSharding:
    """Every KV pool array (values [L, blocks, block_size, K, H], fp8/int8 scales [L, blocks,
    block_size, K]) split along its kv-head axis."""
    return NamedSharding(mesh, P(None, None, None, AXIS))


def param_shardings(params: dict, mesh: Mesh) -> dict:
    """A sharding for each leaf of the step's parameter pytree (``pack_params``' output)."""
    def layer_spec(name: str):
        axis = _LAYER_SPLIT_AXIS.get(name)
        return P() if axis is None else P(*([None] * axis), AXIS)

    out = {name: replicated(mesh) for name in params if name != "layers"}
    out["layers"] = {name: NamedSharding(mesh, layer_spec(name)) for name in params["layers"]}
    return out


def shard_attention(attend, mesh: Mesh):
    """``attend`` run on each device's own heads: q [T, N, H] and the pool split by heads, the
    metadata replicated; the backend's flags (``one_block_bucket``) carried over."""
    heads = P(None, AXIS)

    def sharded(q, kv, layer, md, window):
        def local(q, kv, layer, md):
            return attend(q, kv, layer, md, window)

        return jax.shard_map(local, mesh=mesh, in_specs=(heads, P(None, None, None, AXIS), P(), P()),
                             out_specs=heads, check_vma=False)(q, kv, layer, md)

    sharded.one_block_bucket = getattr(attend, "one_block_bucket", False)
    sharded.__name__ = f"tensor_parallel_{getattr(attend, '__name__', 'attention')}"
    return sharded


def bytes_per_device(params: dict, tp: int) -> int:
    """Bytes of a parameter pytree (the layout's names; host or device arrays) that one device of
    ``tp`` holds: the split weights' share and every replicated one whole."""
    total = 0
    for name, leaf in params.items():
        if name == "layers":
            total += sum(_nbytes(w) // (tp if n in _LAYER_SPLIT_AXIS else 1) for n, w in leaf.items())
        else:
            total += _nbytes(leaf)
    return total


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))
