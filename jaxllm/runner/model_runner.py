"""Device side of the engine: SchedulerOutput -> padded batch -> one compiled step -> RunnerOutput.

Every (tokens, blocks-per-sequence) bucket is compiled ahead of time; ``num_compiles`` counts
compilations so tests can assert a warmed-up engine never compiles again. The KV pool is
donated to each call and replaced by the result, so it is updated in place, never copied.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import CacheConfig, LoRAConfig, ModelConfig, SchedulerConfig
from jaxllm.engine.messages import RunnerOutput, SamplingOptions, ScheduledSequence, SchedulerOutput
from jaxllm.models import model_module
from jaxllm.models.attention import AttentionFn, KVPool
from jaxllm.models.kv_quant import kv_storage_dtype
from jaxllm.models.layers import pack_params
from jaxllm.models.layout import HEAD_PARAMS, check_params, param_shapes
from jaxllm.models.lora import token_mask
from jaxllm.runner import kv_pool, parallel
from jaxllm.runner.batch import Buckets, SampleRow, StepBatch, build_batch, sample_rows
from jaxllm.runner.logprobs import (
    LOGPROBS_MODES,
    host_prompt_logprobs,
    host_sample_logprobs,
    logprobs_if,
    prompt_logprobs_if,
)
from jaxllm.runner.lora_slots import LoRASlots
from jaxllm.runner.mask_table import DeviceMaskTable
from jaxllm.runner.sampler import sample
from jaxllm.runner.swap import HostSwapSpace, num_swap_slots
from pallas_kernels.cpu_matmul import PackedMatrix

logger = logging.getLogger("jaxllm")

_COPY_SLOTS = 64  # block copies per call, padded with the null block copying onto itself


def _step(params, kv: KVPool, batch: StepBatch, prev_tokens, mask_table, lora_stacks, *, cfg: ModelConfig,
          attend: AttentionFn, lora_shape: tuple[int, int] | None = None, processors: tuple = (),
          logprobs_mode: str = "raw_logprobs"):
    """One engine step. ``prev_tokens`` [max_num_rows] are the previous step's sampled tokens, still
    on the device: positions with ``feed_rows >= 0`` take their input from there. The sampled
    tokens come back padded to the same fixed length, to feed the next step. ``mask_table``:
    structured outputs' allowed-token bitmasks (``DeviceMaskTable``), indexed by
    ``batch.sampling.mask_rows``. ``lora_stacks``: the LoRA slots (``LoRASlots.stacks``) of
    ``lora_shape`` = (max_loras, max_lora_rank), or None when the engine serves no adapters.
    ``processors``: the engine's custom logits processors, compiled into the sampler.
    ``logprobs_mode``: vLLM's (see jaxllm.runner.logprobs.LOGPROBS_MODES)."""
    model = model_module(cfg)
    token_ids = jnp.where(batch.feed_rows >= 0, prev_tokens[jnp.maximum(batch.feed_rows, 0)], batch.token_ids)
    lora = None
    if lora_stacks is not None:
        dtype = next(iter(lora_stacks.values())).dtype
        lora = (lora_stacks, token_mask(batch.lora_slots, *lora_shape, dtype))
    embeds = None if batch.input_embeds is None else (batch.input_embeds, batch.use_embeds)
    hidden, kv = model.forward(params, cfg, kv, token_ids, batch.md, attend, lora, embeds)
    logits = model.logits(params, cfg, hidden[batch.logits_indices], batch.num_rows)
    as_logits = logprobs_mode.endswith("_logits")
    plain = functools.partial(sample, logits, batch.sampling, mask_table, processors)
    if logprobs_mode.startswith("processed"):  # the processed logits only in steps that return logprobs
        tokens, chosen_from = jax.lax.cond(batch.want_logprobs, lambda: plain(processed=True),
                                           lambda: (plain(), logits))
    else:
        tokens, chosen_from = plain(), logits
    sample_lp = logprobs_if(batch.want_logprobs, chosen_from, tokens, as_logits)
    logits_fn = functools.partial(model.logits, params, cfg)
    prompt_lp = prompt_logprobs_if(batch.want_prompt_logprobs, logits_fn, hidden, batch.next_token_ids, as_logits)
    pooled = jax.lax.cond(batch.want_pooling, _pool, _no_pool, hidden, batch)
    padded = jnp.zeros(prev_tokens.shape, tokens.dtype).at[: tokens.shape[0]].set(tokens)
    return (padded, sample_lp, prompt_lp, pooled), kv


def _no_pool(hidden, batch: StepBatch):
    S, R, D = batch.md.cu_q_lens.shape[0] - 1, batch.logits_indices.shape[0], hidden.shape[1]
    zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
    return zeros((S, D)), zeros((S, D)), zeros((R, D)), jnp.zeros_like(hidden)


def _pool(hidden, batch: StepBatch):
    """Pooling requests' parts of the final hidden states (after the model's last norm): per
    sequence the sum over its real tokens [S, D] and its first token's [S, D]; per sampling row the
    hidden state it samples after [R, D] (float32); and every token's [T, D] (the model's dtype:
    the token tasks' rows)."""
    h = hidden.astype(jnp.float32)
    md = batch.md
    real = jnp.arange(h.shape[0]) < md.cu_q_lens[-1]
    num_seqs = md.cu_q_lens.shape[0] - 1
    sums = jax.ops.segment_sum(jnp.where(real[:, None], h, 0.0), md.seq_ids, num_segments=num_seqs)
    first = h[jnp.minimum(md.cu_q_lens[:-1], h.shape[0] - 1)]
    return sums, first, h[batch.logits_indices], hidden


@dataclass
class InFlightStep:
    """A dispatched step whose results are still on the device (see ``ModelRunner.dispatch``)."""

    sched: SchedulerOutput
    rows: list[SampleRow] = field(default_factory=list)
    tokens: jax.Array | None = None  # [max_num_rows] sampled token of each row, padded
    sample_lp: object = None
    prompt_lp: object = None
    want_logprobs: bool = False
    want_prompt_logprobs: bool = False
    pooled: object = None  # (sums [S, D], first [S, D], rows [R, D], all [T, D]) when a pooling request is in it

    @property
    def row_of(self) -> dict[str, int]:
        return {r.sample_id: i for i, r in enumerate(self.rows)}


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        params: dict,
        cache: CacheConfig,
        sched: SchedulerConfig,
        attend: AttentionFn,
        seed: int = 0,
        num_speculative_tokens: int = 0,
        lora_config: LoRAConfig | None = None,
        shared_pool_bytes: tuple[int, int] = (0, 0),
        logits_processors: tuple = (),
        enable_prompt_embeds: bool = False,
        logprobs_mode: str = "raw_logprobs",
        mesh=None,
    ):
        """``shared_pool_bytes``: (weight bytes, KV bytes per block) of a draft model whose pool
        shares this one's block ids, taken out of the KV budget when the pool is sized.
        ``logits_processors``: custom ones (jaxllm.logits_processor), compiled into every step.
        ``enable_prompt_embeds``: steps may take prompt positions' inputs as embeddings (vLLM's
        prompt_embeds): each bucket is compiled with those inputs too. ``logprobs_mode``: vLLM's,
        what returned logprobs are (LOGPROBS_MODES). ``mesh``: the devices to split the model over
        (tensor parallelism, ``parallel.make_mesh``); None: one device."""
        self.cfg, self.cache = cfg, cache
        self.mesh = mesh
        parallel.check_model(cfg, mesh)
        self.dtype = np.dtype(params["embed"].dtype)
        platform = jax.devices()[0].platform
        # Packed panels are not split over devices: under tensor parallelism the matmuls are XLA's.
        self._cpu_matmul = getattr(attend, "cpu_matmul", False) and mesh is None
        if mesh is not None:
            attend = parallel.shard_attention(attend, mesh)
        self.params = self._device_params(params)
        self._host_params = None  # the weights while asleep at level 1 (see sleep)
        self.lora = None
        if lora_config is not None:  # LoRA's b stacks go to the cpu matmul kernel too when the weights do
            packed = isinstance(self.params["layers"].get("wq"), PackedMatrix)
            self.lora = LoRASlots(cfg, lora_config, self.dtype, pack_b=packed)
            self.lora.stacks = self._replicate(self.lora.stacks)
        self.kv_dtype = kv_storage_dtype(cache.kv_cache_dtype, self.dtype, platform)  # fp8/int8 carry scales
        self.buckets = Buckets.make(
            sched.max_num_batched_tokens, sched.max_num_seqs, -(-sched.max_model_len // cache.block_size),
            one_block_bucket=getattr(attend, "one_block_bucket", False),
            num_speculative_tokens=num_speculative_tokens,  # a verifying sequence samples 1 + k rows
        )
        self._rng = np.random.default_rng(seed)
        self._no_tokens = self._replicate(jnp.zeros(self.buckets.max_num_rows, jnp.int32))  # no previous step to feed
        lora_shape = None if self.lora is None else (self.lora.max_loras, self.lora.rank)
        self.logits_processors = tuple(logits_processors)
        self.enable_prompt_embeds = enable_prompt_embeds
        self._logits_specs = tuple((tuple(p.state_shape), np.dtype(p.state_dtype)) for p in self.logits_processors)
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode={logprobs_mode!r} must be one of {LOGPROBS_MODES}")
        # Under tensor parallelism the results are replicated and the pool keeps its split.
        split = {} if mesh is None else {"out_shardings": (parallel.replicated(mesh), parallel.kv_sharding(mesh))}
        self._jit_step = jax.jit(functools.partial(_step, cfg=cfg, attend=attend, lora_shape=lora_shape,
                                                   processors=self.logits_processors, logprobs_mode=logprobs_mode),
                                 donate_argnums=1, **split)
        self._jit_copy = jax.jit(kv_pool.copy_blocks, donate_argnums=0,
                                 **({} if mesh is None else {"out_shardings": parallel.kv_sharding(mesh)}))
        # (T, B, with LoRA, with prompt embeddings): a LoRA engine has each bucket twice, so that
        # steps without adapter tokens run the plain program (no LoRA terms, the same numbers as an
        # engine without LoRA); so has one with enable_prompt_embeds.
        self._compiled: dict[tuple[int, int, bool, bool], object] = {}
        self.num_compiles = 0
        self.num_blocks = self._size_pool(sched.max_model_len, *shared_pool_bytes)
        self.kv = self._allocate_kv()
        self.num_swap_blocks = num_swap_slots(cache, cfg, self.kv_dtype)
        self._swap = HostSwapSpace(self.kv, self.num_swap_blocks) if self.num_swap_blocks else None
        # Each step's rows refer to at most max_num_rows masks; twice that keeps recent ones.
        self.masks = DeviceMaskTable(cfg.vocab_size, capacity=2 * self.buckets.max_num_rows)
        self.masks.table = self._replicate(self.masks.table)

    # -- set-up --------------------------------------------------------------------------------
    def _size_pool(self, max_model_len: int, other_weights: int = 0, other_bytes_per_block: int = 0) -> int:
        # Per device: its share of the weights, of each block and of the activation peak.
        device = jax.devices()[0]
        weights = parallel.bytes_per_device(self.params, parallel.mesh_size(self.mesh)) + other_weights
        peak = self._activation_peak() if device.platform == "gpu" and self.cache.num_kv_blocks is None else 0
        budget = kv_pool.kv_budget_bytes(self.cache, device, weights, peak)
        blocks = kv_pool.num_blocks_for(self.cache, self.cfg, self.kv_dtype, budget, other_bytes_per_block,
                                        shards=parallel.mesh_size(self.mesh))
        kv_pool.log_capacity(blocks, self.cache.block_size, max_model_len)
        return blocks

    def _activation_peak(self) -> int:
        """Scratch memory of the largest bucket, compiled against a 2-block pool."""
        T, B = self.buckets.token_buckets[-1], self.buckets.block_buckets[-1]
        kv = jax.eval_shape(lambda: kv_pool.allocate(self.cfg, 2, self.cache.block_size, self.kv_dtype))
        if self.mesh is not None:
            split = parallel.kv_sharding(self.mesh)
            kv = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=split), kv)
        stacks = None if self.lora is None else self.lora.stacks
        compiled = self._jit_step.lower(self.params, kv, self._dummy_batch(T, B, self.enable_prompt_embeds),
                                        self._no_tokens, self.masks.table, stacks).compile()
        return int(compiled.memory_analysis().temp_size_in_bytes)

    def _dummy_batch(self, T: int, B: int, embeds: bool = False) -> StepBatch:
        n = min(T, B * self.cache.block_size)
        rows = np.zeros((n, self.embeds_dim), np.float32) if embeds else None
        seq = ScheduledSequence("warmup", (0,) * n, 0, (0,) * B, True, SamplingOptions(), 0, prompt_embeds=rows)
        return self._build(SchedulerOutput((seq,)), shape=(T, B))

    @property
    def embeds_dim(self) -> int:
        """The width of the input embeddings (before OPT's project_in)."""
        return self.cfg.word_embed_proj_dim or self.cfg.hidden_size

    def _build(self, sched: SchedulerOutput, **kwargs) -> StepBatch:
        return build_batch(sched, self.buckets, self.cache.block_size, self._rng, self.cfg.vocab_size,
                           logits_specs=self._logits_specs, embeds_dtype=self.dtype, **kwargs)

    def warmup(self) -> None:
        """Compile every bucket now, so serving never stops to compile."""
        start = time.perf_counter()
        # Tracing holds the GIL, XLA's compile does not: lower in order, compile in parallel.
        loras = (False, True) if self.lora is not None else (False,)
        embeds = (False, True) if self.enable_prompt_embeds else (False,)
        keys = [(T, B, lora, e) for lora in loras for e in embeds for T, B in self.buckets.shapes()]
        lowered = {key: self._lower(*key) for key in keys if key not in self._compiled}
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            compiled = dict(zip(lowered, pool.map(lambda lw: lw.compile(), lowered.values()), strict=True))
        self._compiled.update(compiled)
        self.num_compiles += len(compiled)
        pad = jnp.zeros(_COPY_SLOTS, jnp.int32)
        self.kv = self._jit_copy(self.kv, pad, pad)  # its one fixed shape, compiled here
        self.masks.warmup()  # the mask table's row write: one fixed shape too
        self.num_compiles += 2
        if self.lora is not None:
            self.num_compiles += self.lora.warmup()  # the LoRA slot write: one fixed shape
        if self._swap is not None:
            self.kv = self._swap.warmup(self.kv)  # swap-out and swap-in: one fixed shape each
            self.num_compiles += 2
        logger.info("warm-up: %d programs compiled in %.1f s", self.num_compiles, time.perf_counter() - start)

    def _lower(self, T: int, B: int, lora: bool = False, embeds: bool = False):
        return self._jit_step.lower(self.params, self.kv, self._dummy_batch(T, B, embeds), self._no_tokens,
                                    self.masks.table, self.lora.stacks if lora else None)

    def _executable(self, T: int, B: int, lora: bool = False, embeds: bool = False):
        """The compiled step of bucket (T, B), with the LoRA terms or without, with prompt
        embeddings as inputs or without."""
        key = (T, B, lora, embeds)
        if key not in self._compiled:
            self._compiled[key] = self._lower(*key).compile()
            self.num_compiles += 1
        return self._compiled[key]

    # -- the step ----------------------------------------------------------------------------------
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one step and wait for its tokens."""
        return self.fetch(self.dispatch(sched))

    def dispatch(self, sched: SchedulerOutput, prev: InFlightStep | None = None) -> InFlightStep:
        """Start a step on the device and return without waiting for it. Placeholder tokens in
        ``sched`` are the tokens ``prev`` (the step dispatched just before) samples."""
        # Swap-outs first: their blocks may be the targets of this step's copies and swap-ins.
        if sched.swap_out:
            self._swap.swap_out(self.kv, sched.swap_out)
        if sched.block_copies:
            self._copy_blocks(sched.block_copies)
        if sched.swap_in:
            self.kv = self._swap.swap_in(self.kv, sched.swap_in)
        if sched.is_empty:
            return InFlightStep(sched)
        prev_rows = prev.row_of if prev is not None and prev.tokens is not None else None
        lora_slots = self._lora_slots_for(sched)
        batch = self._build(sched, prev_rows=prev_rows, mask_slots=self.masks.rows_for(sched), lora_slots=lora_slots)
        T, B = batch.token_ids.shape[0], batch.md.block_tables.shape[1]
        prev_tokens = self._no_tokens if prev_rows is None else prev.tokens
        lora = bool(lora_slots)  # adapter tokens in this step
        embeds = batch.input_embeds is not None  # prompt_embeds positions in this step
        if embeds and not self.enable_prompt_embeds:
            raise ValueError("a step with prompt_embeds on a runner built without enable_prompt_embeds")
        (tokens, sample_lp, prompt_lp, pooled), self.kv = self._executable(T, B, lora, embeds)(
            self.params, self.kv, batch, prev_tokens, self.masks.table, self.lora.stacks if lora else None)
        return InFlightStep(sched, sample_rows(sched), tokens, sample_lp, prompt_lp,
                            bool(batch.want_logprobs), bool(batch.want_prompt_logprobs),
                            pooled if batch.want_pooling else None)

    def fetch(self, step: InFlightStep) -> RunnerOutput:
        """Wait for a dispatched step; its sampled tokens are the only device -> host copy
        (logprobs only when asked)."""
        if step.tokens is None:
            return RunnerOutput()
        ids = np.asarray(step.tokens)
        rows = step.rows
        return RunnerOutput(
            sampled={r.sample_id: int(ids[i]) for i, r in enumerate(rows)},
            logprobs=host_sample_logprobs(rows, step.sample_lp, ids) if step.want_logprobs else {},
            prompt_logprobs=host_prompt_logprobs(step.sched, step.prompt_lp) if step.want_prompt_logprobs else {},
            pooled=_host_pooled(step) if step.pooled is not None else {},
        )

    def _lora_slots_for(self, sched: SchedulerOutput) -> dict[int, int]:
        """lora_int_id -> device slot of the step's adapters (loaded into slots as needed)."""
        wanted = {s.lora_request.lora_int_id: s.lora_request for s in sched.sequences if s.lora_request is not None}
        if not wanted:
            return {}
        if self.lora is None:
            raise ValueError("a LoRA request reached a runner built without enable_lora")
        return self.lora.slots_for(wanted)

    # -- LoRA adapters (LLMEngine.add_lora / remove_lora / list_loras) ----------------------------
    def add_lora(self, lora_request) -> bool:
        if self.lora is None:
            raise ValueError(f"lora_request {lora_request.lora_name!r}: LoRA is not enabled (enable_lora=True)")
        return self.lora.add(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.lora is not None and self.lora.remove(lora_int_id)

    def list_loras(self) -> set[int]:
        return set() if self.lora is None else self.lora.ids()

    # -- sleep mode and weight updates (LLM.sleep / wake_up / update_weights) ---------------------
    def sleep(self, level: int) -> None:
        """Free the device's weights and KV pool (vLLM's sleep levels): level 1 keeps a host copy of
        the weights to wake up with; level 2 keeps none (``update_weights`` brings new ones)."""
        if level not in (1, 2):
            raise ValueError(f"level={level!r} must be 1 (weights kept on the host) or 2 (weights discarded)")
        if self.params is not None:
            self._host_params = jax.device_get(self.params) if level == 1 else None
            _delete(self.params)
            self.params = None
        if self.kv is not None:
            _delete(self.kv)
            self.kv = None

    def wake_up(self, tags: tuple[str, ...]) -> None:
        """Put back what ``sleep`` freed: "weights" from the host copy, "kv_cache" a zeroed pool."""
        if "weights" in tags and self.params is None:
            if self._host_params is None:
                raise ValueError("wake_up(['weights']) after sleep(level=2): the weights were discarded; "
                                 "update_weights(params) first")
            self.params, self._host_params = self._put_params(self._host_params), None
        if "kv_cache" in tags and self.kv is None:
            self.kv = self._allocate_kv()

    @property
    def is_sleeping(self) -> bool:
        return self.params is None or self.kv is None

    def update_weights(self, params: dict) -> None:
        """New weights in the model's layout (``layout.param_shapes``; as ``load_model`` gives them),
        cast to the engine's dtype, packed and put on the device in place of the old ones."""
        shapes = {name: shape for name, shape in param_shapes(self.cfg).items() if name not in HEAD_PARAMS}
        checked = check_params(params, shapes, "update_weights params")
        packed = self._device_params(jax.tree.map(lambda x: x.astype(self.dtype, copy=False), checked))
        if self.params is not None:
            _delete(self.params)
        self.params, self._host_params = packed, None

    def _device_params(self, params: dict) -> dict:
        """``params`` laid out for the step (``pack_params``: see there), on the device."""
        return self._put_params(pack_params(params, self.cfg.tie_word_embeddings, jax.devices()[0].platform,
                                            cpu_matmul=self._cpu_matmul, hidden_act=self.cfg.hidden_act))

    def _put_params(self, packed: dict) -> dict:
        """Step-layout weights on the device, or split over the mesh (``parallel.param_shardings``)."""
        if self.mesh is None:
            return jax.device_put(packed)
        return jax.device_put(packed, parallel.param_shardings(packed, self.mesh))

    def _replicate(self, tree):
        """``tree`` on every device of the mesh (unchanged on one device)."""
        return tree if self.mesh is None or tree is None else jax.device_put(tree, parallel.replicated(self.mesh))

    def _allocate_kv(self) -> KVPool:
        """A zeroed pool; under tensor parallelism each device allocates only its heads' part."""
        make = functools.partial(kv_pool.allocate, self.cfg, self.num_blocks, self.cache.block_size, self.kv_dtype)
        if self.mesh is None:
            return make()
        return jax.jit(make, out_shardings=parallel.kv_sharding(self.mesh))()

    def _copy_blocks(self, copies) -> None:
        pairs = np.asarray(copies, np.int32).reshape(-1, 2)
        for i in range(0, len(pairs), _COPY_SLOTS):
            chunk = np.zeros((_COPY_SLOTS, 2), np.int32)
            chunk[: len(pairs[i : i + _COPY_SLOTS])] = pairs[i : i + _COPY_SLOTS]
            self.kv = self._jit_copy(self.kv, chunk[:, 0], chunk[:, 1])



def _delete(tree) -> None:
    """Free a pytree's device buffers now (not when Python drops the last reference)."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            leaf.delete()


def _host_pooled(step: InFlightStep) -> dict:
    """Each pooling sequence's part of its vector (see ``RunnerOutput.pooled``)."""
    sums, first, rows = (np.asarray(x) for x in step.pooled[:3])
    every = None  # [T, D], read only for the token tasks
    row_of = step.row_of
    out = {}
    offset = 0  # sequences lie one after another in the flat batch
    for i, seq in enumerate(step.sched.sequences):
        own = slice(offset, offset + len(seq.token_ids))
        offset = own.stop
        if seq.pooling == "ALL":
            every = np.asarray(step.pooled[3]) if every is None else every
            out[seq.request_id] = (seq.start_pos, every[own].astype(np.float32))
        elif seq.pooling == "MEAN":
            out[seq.request_id] = (seq.start_pos, sums[i].copy())
        elif seq.pooling == "CLS" and seq.start_pos == 0:
            out[seq.request_id] = (0, first[i].copy())
        elif seq.pooling == "LAST" and seq.sample:
            out[seq.request_id] = (seq.start_pos, rows[row_of[seq.request_id]].copy())
    return out
