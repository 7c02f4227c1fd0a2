"""Build the padded flat batch of one step in numpy from the scheduler's output.

Shapes are padded to buckets so a running engine reuses a few compiled programs: T tokens
from ``token_buckets``, S = min(T, max_num_seqs) sequences, B blocks per sequence from
``block_buckets``. Padding tokens sit at position 0 of sequence row 0 and write into the null
block 0, which no real block table reaches below its sequence's length.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import NamedTuple

import jax
import numpy as np

from jaxllm.engine.messages import ScheduledSequence, SchedulerOutput, draft_sample_id
from jaxllm.models.attention import AttentionMetadata
from jaxllm.runner.penalties import penalty_tensors
from jaxllm.runner.sampler import MAX_BANNED_IDS, SamplingTensors


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepBatch:
    token_ids: np.ndarray  # [T] int32
    md: AttentionMetadata
    logits_indices: np.ndarray  # [R] int32 flat index of the token each sampling row samples after
    sampling: SamplingTensors
    want_logprobs: np.ndarray  # [] bool: some row asked for logprobs
    want_prompt_logprobs: np.ndarray  # [] bool: some sequence asked for prompt_logprobs
    next_token_ids: np.ndarray  # [T] int32 the token after each position when known, else -1
    # [T] int32: for a position whose input is a token the previous step sampled and has not yet
    # copied to the host (a scheduler PLACEHOLDER), that step's sampling row; else -1.
    feed_rows: np.ndarray
    num_rows: np.ndarray  # [] int32 sampling rows in use; the rest of the R rows are padding
    want_pooling: np.ndarray  # [] bool: some sequence is a pooling request's (LLM.embed)
    lora_slots: np.ndarray  # [T] int32 the LoRA slot each token's adapter is in; -1: none
    # vLLM's prompt_embeds: [T, D] inputs that replace the embedding table's rows where [T] bool
    # says so; both None in steps without such positions (the plain program).
    input_embeds: np.ndarray | None = None
    use_embeds: np.ndarray | None = None


class SampleRow(NamedTuple):
    """One sampled token of a step: a sequence's own, a parallel-sampling fork's, or the one
    after a speculative decoding draft."""

    sample_id: str
    sequence: ScheduledSequence
    fork_index: int  # 0 for the request itself
    draft_index: int = 0  # j > 0: sampled after the sequence's j-th draft token

    @property
    def token_offset(self) -> int:
        """Where the row samples: this many tokens before the sequence's last one."""
        return self.sequence.num_draft_tokens - self.draft_index


def sample_rows(sched: SchedulerOutput) -> list[SampleRow]:
    rows = []
    for s in sched.sequences:
        if not s.sample:
            continue
        rows.append(SampleRow(s.request_id, s, 0))
        for i, fork_id in enumerate(s.fork_ids, 1):
            rows.append(SampleRow(fork_id, s, i))
        for j in range(1, s.num_draft_tokens + 1):
            rows.append(SampleRow(draft_sample_id(s.request_id, j), s, 0, j))
    return rows


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    out, n = [], lo
    while n < hi:
        out.append(n)
        n *= 2
    return (*out, hi)


@dataclass(frozen=True)
class Buckets:
    """The padded shapes the runner compiles for."""

    token_buckets: tuple[int, ...]
    block_buckets: tuple[int, ...]
    max_num_seqs: int
    max_num_rows: int = 0  # sampling rows: max_num_seqs, times 1 + k with k speculative tokens

    def __post_init__(self):
        if self.max_num_rows < self.max_num_seqs:
            object.__setattr__(self, "max_num_rows", self.max_num_seqs)

    @classmethod
    def make(cls, max_num_batched_tokens: int, max_num_seqs: int, max_blocks_per_seq: int,
             one_block_bucket: bool = False, num_speculative_tokens: int = 0) -> Buckets:
        """Powers of two from 16 tokens and 4 blocks up to the limits.

        ``one_block_bucket``: every step gets the full block-table width (for attention backends
        whose cost does not grow with it), so each token bucket is one compiled program, and the
        token buckets below 64 are the multiples of 8 (as vLLM's CUDA-graph sizes): decode steps,
        one token per sequence, then pad to at most 7 rows of matmul work.
        """
        tokens = _powers_of_two(min(16, max_num_batched_tokens), max_num_batched_tokens)
        if one_block_bucket:
            blocks = (max_blocks_per_seq,)
            tokens = tuple(sorted({*tokens, *range(8, min(64, max_num_batched_tokens), 8)}))
        else:
            blocks = _powers_of_two(min(4, max_blocks_per_seq), max_blocks_per_seq)
        return cls(tokens, blocks, max_num_seqs, max_num_seqs * (1 + num_speculative_tokens))

    def num_seqs(self, num_tokens_bucket: int) -> int:
        return min(num_tokens_bucket, self.max_num_seqs)

    def num_rows(self, num_tokens_bucket: int) -> int:
        """Sampling rows of a bucket: each row samples after a distinct token (or is a fork)."""
        return min(num_tokens_bucket, self.max_num_rows)

    def shapes(self) -> list[tuple[int, int]]:
        """Every (T, B) pair, smallest first."""
        return [(t, b) for t in self.token_buckets for b in self.block_buckets]

    @staticmethod
    def pick(buckets: tuple[int, ...], n: int) -> int:
        i = bisect.bisect_left(buckets, n)
        if i == len(buckets):
            raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
        return buckets[i]


def build_batch(
    sched: SchedulerOutput,
    buckets: Buckets,
    block_size: int,
    rng: np.random.Generator,
    vocab_size: int,
    shape: tuple[int, int] | None = None,
    prev_rows: dict[str, int] | None = None,
    mask_slots: dict[str, int] | None = None,
    lora_slots: dict[int, int] | None = None,
    logits_specs: tuple = (),
    embeds_dtype: np.dtype = np.float32,
) -> StepBatch:
    """Pad and flatten ``sched`` into numpy arrays; unseeded rows draw a seed from ``rng``.

    ``shape`` forces the (T, B) bucket (warm-up); by default the smallest that fits is used.
    ``prev_rows`` maps sample ids of the previous step to their sampling rows: a negative token id
    (a placeholder) is read on the device from that step's output instead. ``mask_slots`` maps
    sample ids to the mask-table row that limits them (structured outputs). ``lora_slots`` maps
    the step's LoRA adapters (lora_int_id) to their device slots. ``logits_specs``: (state_shape,
    dtype) of each of the engine's custom logits processors. Sequences with ``prompt_embeds``
    give their prompt positions' inputs as ``input_embeds`` (of ``embeds_dtype``).
    """
    seqs = sched.sequences
    rows = sample_rows(sched)
    kv_lens = [s.start_pos + len(s.token_ids) for s in seqs]
    if shape is None:
        T = buckets.pick(buckets.token_buckets, max(sched.num_tokens, len(rows)))
        B = buckets.pick(buckets.block_buckets, max(-(-n // block_size) for n in kv_lens))
    else:
        T, B = shape
    S, R = buckets.num_seqs(T), buckets.num_rows(T)
    token_ids, positions, slots, seq_ids = (np.zeros(T, np.int32) for _ in range(4))
    tables = np.zeros((S, B), np.int32)
    cu = np.zeros(S + 1, np.int32)
    lens = np.zeros(S, np.int32)
    last_index = {}
    next_ids = np.full(T, -1, np.int32)
    feed_rows = np.full(T, -1, np.int32)
    token_lora = np.full(T, -1, np.int32)
    start = 0
    for i, (s, kv_len) in enumerate(zip(seqs, kv_lens, strict=True)):
        n = len(s.token_ids)
        pos = np.arange(s.start_pos, kv_len, dtype=np.int32)
        table = np.asarray(s.block_ids[: -(-kv_len // block_size)], np.int32)
        token_ids[start : start + n] = s.token_ids
        if s.token_ids[-1] < 0:  # only ever the last token, sampled by the step still running
            if prev_rows is None or s.request_id not in prev_rows:
                raise ValueError(f"request {s.request_id!r}: a placeholder token without a previous step to read it from")
            feed_rows[start + n - 1] = prev_rows[s.request_id]
            token_ids[start + n - 1] = 0
        positions[start : start + n] = pos
        slots[start : start + n] = table[pos // block_size] * block_size + pos % block_size
        seq_ids[start : start + n] = i
        if s.lora_request is not None:
            token_lora[start : start + n] = lora_slots[s.lora_request.lora_int_id]
        tables[i, : len(table)] = table
        lens[i] = kv_len
        last_index[s.request_id] = start + n - 1
        if s.prompt_logprobs is not None:
            next_ids[start : start + n - 1] = s.token_ids[1:]
            next_ids[start + n - 1] = -1 if s.following_token_id is None else s.following_token_id
        start += n
        cu[i + 1] = start
    cu[len(seqs) + 1 :] = start
    md = AttentionMetadata(positions, slots, seq_ids, tables, cu, lens)
    logits_indices = np.zeros(R, np.int32)
    logits_indices[: len(rows)] = [last_index[r.sequence.request_id] - r.token_offset for r in rows]
    return StepBatch(
        token_ids, md, logits_indices, _sampling_tensors(rows, R, vocab_size, rng, B * block_size, mask_slots or {},
                                                         logits_specs),
        want_logprobs=np.array(any(r.sequence.logprobs is not None for r in rows)),
        want_prompt_logprobs=np.array(any(s.prompt_logprobs is not None for s in seqs)),
        next_token_ids=next_ids,
        feed_rows=feed_rows,
        num_rows=np.array(len(rows), np.int32),
        want_pooling=np.array(any(s.pooling is not None for s in seqs)),
        lora_slots=token_lora,
        **_input_embeds(seqs, T, embeds_dtype),
    )


def _input_embeds(seqs, T: int, dtype) -> dict:
    """input_embeds / use_embeds of the step's prompt_embeds positions ({} when it has none)."""
    found = [(i, s) for i, s in enumerate(seqs) if s.prompt_embeds is not None and s.start_pos < len(s.prompt_embeds)]
    if not found:
        return {}
    rows = np.zeros((T, found[0][1].prompt_embeds.shape[1]), dtype)
    use = np.zeros(T, bool)
    starts = np.cumsum([0] + [len(s.token_ids) for s in seqs])
    for i, s in found:
        n = min(len(s.token_ids), len(s.prompt_embeds) - s.start_pos)  # prompt positions of this chunk
        rows[starts[i]:starts[i] + n] = s.prompt_embeds[s.start_pos:s.start_pos + n]
        use[starts[i]:starts[i] + n] = True
    return {"input_embeds": rows, "use_embeds": use}


def _custom_tensors(rows: list[SampleRow], S: int, logits_specs: tuple) -> tuple | None:
    """(states, used) per custom logits processor of ``logits_specs`` ((state_shape, dtype) each)."""
    if not logits_specs:
        return None
    out = []
    for k, (shape, dtype) in enumerate(logits_specs):
        states, used = np.zeros((S, *shape), dtype), np.zeros(S, bool)
        for i, row in enumerate(rows):
            state = row.sequence.logits_states[k] if row.sequence.logits_states else None
            if state is not None:
                states[i], used[i] = state, True
        out.append((states, used))
    return tuple(out)


def _sampling_tensors(
    rows: list[SampleRow], S: int, vocab_size: int, rng: np.random.Generator, history_width: int,
    mask_slots: dict[str, int], logits_specs: tuple = (),
) -> SamplingTensors:
    temperature = np.zeros(S, np.float32)
    top_k = np.zeros(S, np.int32)
    top_p = np.ones(S, np.float32)
    min_p = np.zeros(S, np.float32)
    seeds = np.zeros(S, np.uint32)
    steps = np.zeros(S, np.int32)
    banned = np.full((S, MAX_BANNED_IDS), vocab_size, np.int32)  # vocab_size: out of range, dropped
    mask_rows = np.full(S, -1, np.int32)
    for i, row in enumerate(rows):
        mask_rows[i] = mask_slots.get(row.sample_id, -1)
        s, o = row.sequence, row.sequence.sampling
        temperature[i], top_k[i], top_p[i], min_p[i] = o.temperature, max(o.top_k, 0), o.top_p, o.min_p
        seeds[i] = (o.seed + row.fork_index if o.seed is not None else rng.integers(2**32)) % 2**32
        steps[i] = s.num_generated + row.draft_index  # the key of the output index it samples
        if s.num_generated + row.draft_index < o.min_tokens:
            ids = o.min_tokens_masked_ids
            if len(ids) > MAX_BANNED_IDS:
                raise ValueError(f"at most {MAX_BANNED_IDS} eos/stop_token_ids can be held back by min_tokens")
            banned[i, : len(ids)] = ids
    penalties = penalty_tensors([r.sequence for r in rows], S, history_width, vocab_size,
                                [r.draft_index for r in rows])
    return SamplingTensors(temperature, top_k, top_p, min_p, seeds, steps, banned, penalties, mask_rows,
                           _custom_tensors(rows, S, logits_specs))
