"""The runner's LoRA adapters: host copies (an LRU of ``max_cpu_loras``) and device slots.

Each step's adapters get a slot of the device stacks (jaxllm/models/lora.py) before it runs: one
already holding the adapter, else a free slot, else the slot used least recently by other steps.
The scheduler never runs more than ``max_loras`` adapters at once, so a step always finds room.
Loading a slot writes new stacks (a step still running keeps the arrays it was given).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import LoRAConfig, ModelConfig
from jaxllm.lora.adapter import LoRAAdapter, check_lora_support, load_adapter, target_dims
from jaxllm.lora.request import LoRARequest
from jaxllm.models.lora import GROUPS
from pallas_kernels.cpu_matmul import PackedMatrix, pack

logger = logging.getLogger("jaxllm")


def _set_slot(stacks: dict, slot: jax.Array, adapter: dict, *, width: int, rank: int) -> dict:
    """``stacks`` with slot ``slot`` replaced by ``adapter`` (``a.<w> [L, in, R]`` and
    ``b.<w> [L, R, out]`` for every weight; zeros where it adapts nothing). ``width`` = M * R."""
    out = dict(stacks)
    for group, members in GROUPS.items():
        stack = out["a." + group]
        for j, weight in enumerate(members):
            piece = adapter["a." + weight].astype(stack.dtype)
            stack = jax.lax.dynamic_update_slice(stack, piece, (0, 0, j * width + slot * rank))
        out["a." + group] = stack
    for weight in (w for members in GROUPS.values() for w in members):
        stack = out["b." + weight]
        if isinstance(stack, PackedMatrix):  # K rows slot * R ..: row pairs for bfloat16 (R even)
            piece = pack(adapter["b." + weight].astype(jnp.bfloat16 if stack.bf16 else jnp.float32), 1, stacked=True)
            at = slot * rank // 2 if stack.bf16 else slot * rank
            data = jax.lax.dynamic_update_slice(stack.data, piece.data, (0, 0, at, 0))
            out["b." + weight] = dataclasses.replace(stack, data=data)
        else:
            out["b." + weight] = jax.lax.dynamic_update_slice(stack, adapter["b." + weight].astype(stack.dtype),
                                                              (0, slot * rank, 0))
    return out


class LoRASlots:
    """``pack_b``: the ``b`` stacks go to the CPU matmul kernel as :class:`PackedMatrix` stacks
    (the engine packs its weights for it; a bfloat16 one needs an even rank)."""

    def __init__(self, cfg: ModelConfig, config: LoRAConfig, dtype, pack_b: bool = False):
        check_lora_support(cfg)
        self.cfg, self.config = cfg, config
        self.max_loras, self.rank = config.max_loras, config.max_lora_rank
        L, width = cfg.num_layers, config.max_loras * config.max_lora_rank
        dtype = jnp.dtype(dtype)
        pack_b = pack_b and (dtype == jnp.float32 or (dtype == jnp.bfloat16 and self.rank % 2 == 0))
        dims = target_dims(cfg)
        self.stacks: dict[str, jax.Array | PackedMatrix] = {}
        for group, members in GROUPS.items():
            self.stacks["a." + group] = jnp.zeros((L, dims[members[0]][0], len(members) * width), dtype)
        for name, (_, d_out) in dims.items():
            b = jnp.zeros((L, width, d_out), dtype)
            self.stacks["b." + name] = pack(b, 1, stacked=True) if pack_b else b
        self._host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # loaded adapters, least recent first
        self._slot_ids: list[int | None] = [None] * config.max_loras  # lora_int_id held by each slot
        self._slot_used: list[int] = [0] * config.max_loras  # step counter of each slot's last use
        self._steps = 0
        self._jit_set = jax.jit(functools.partial(_set_slot, width=width, rank=self.rank))
        self.num_loads = 0  # adapters written into a slot (tests and stats)

    # -- host adapters -------------------------------------------------------------------------
    def add(self, request: LoRARequest) -> bool:
        """Read ``request``'s adapter now (ValueError if it does not fit this model); False if it
        was loaded already."""
        if request.lora_int_id in self._host:
            self._host.move_to_end(request.lora_int_id)
            return False
        self._host[request.lora_int_id] = load_adapter(request, self.cfg, self.rank)
        while len(self._host) > self.config.max_cpu_loras:
            evicted, _ = self._host.popitem(last=False)
            logger.info("LoRA adapter %d dropped from host memory (max_cpu_loras=%d)", evicted,
                        self.config.max_cpu_loras)
        return True

    def remove(self, lora_int_id: int) -> bool:
        """Forget a loaded adapter (host copy and slot); False if it was not loaded. Requests that
        still name it read it again."""
        slot = self._slot_of(lora_int_id)
        if slot is not None:
            self._slot_ids[slot] = None
        return self._host.pop(lora_int_id, None) is not None or slot is not None

    def ids(self) -> set[int]:
        return set(self._host) | {i for i in self._slot_ids if i is not None}

    # -- device slots --------------------------------------------------------------------------
    def _slot_of(self, lora_int_id: int) -> int | None:
        return self._slot_ids.index(lora_int_id) if lora_int_id in self._slot_ids else None

    def slots_for(self, requests: dict[int, LoRARequest]) -> dict[int, int]:
        """A slot for each of a step's adapters (by lora_int_id), loading those not in one."""
        if len(requests) > self.max_loras:
            raise ValueError(f"a step with {len(requests)} LoRA adapters; max_loras={self.max_loras}")
        self._steps += 1
        out = {i: s for i in requests if (s := self._slot_of(i)) is not None}
        for lora_id, request in requests.items():
            if lora_id not in out:
                free = [s for s in range(self.max_loras) if s not in out.values()]
                slot = min(free, key=lambda s: (self._slot_ids[s] is not None, self._slot_used[s]))
                self._load(slot, request)
                out[lora_id] = slot
        for slot in out.values():
            self._slot_used[slot] = self._steps
        return out

    def _load(self, slot: int, request: LoRARequest) -> None:
        self.add(request)  # read again if host memory dropped it
        adapter = self._host[request.lora_int_id]
        self.stacks = self._jit_set(self.stacks, jnp.int32(slot), self._padded(adapter))
        self._slot_ids[slot] = request.lora_int_id
        self.num_loads += 1

    def _padded(self, adapter: LoRAAdapter | None) -> dict[str, np.ndarray]:
        L, R = self.cfg.num_layers, self.rank
        out = {}
        for name, (d_in, d_out) in target_dims(self.cfg).items():
            a, b = np.zeros((L, d_in, R), np.float32), np.zeros((L, R, d_out), np.float32)
            if adapter is not None and name in adapter.weights:
                wa, wb = adapter.weights[name]
                a[:, :, : wa.shape[2]], b[:, : wb.shape[1], :] = wa, wb
            out["a." + name], out["b." + name] = a, b
        return out

    def warmup(self) -> int:
        """Compile the slot write (one fixed shape); returns the number of programs compiled."""
        self.stacks = self._jit_set(self.stacks, jnp.int32(0), self._padded(None))
        return 1
