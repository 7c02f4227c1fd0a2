"""Structured outputs' allowed-token bitmasks, kept on the device between steps.

A request constrained by a pattern samples from the tokens its current automaton state allows
(``jaxllm.structured.token_masks``). Sending an [S, V] mask with every step would add V / 8 bytes
per row to each step's host-to-device copy whether or not anyone asks for structured output; the
masks instead live in a device table of ``capacity`` rows, written once per (pattern, state) the
first time a step needs it, and each step passes only a row index per sampling row (-1: none).
Rows are reused least recently used first, never one the step being built refers to.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.engine.messages import SchedulerOutput, draft_sample_id


def _set_row(table: jax.Array, row: jax.Array, words: jax.Array) -> jax.Array:
    return table.at[row].set(words)


class DeviceMaskTable:
    def __init__(self, vocab_size: int, capacity: int):
        self.num_words = -(-vocab_size // 32)
        self.capacity = capacity
        self.table = jnp.zeros((capacity, self.num_words), jnp.uint32)
        self._rows: collections.OrderedDict[Hashable, int] = collections.OrderedDict()
        self._set = jax.jit(_set_row, donate_argnums=0)
        self.num_writes = 0  # masks copied to the device (once per pattern state while it stays)

    def warmup(self) -> None:
        """Compile the one row write (its shapes are fixed)."""
        self.table = self._set(self.table, np.int32(0), np.zeros(self.num_words, np.uint32))

    def rows_for(self, sched: SchedulerOutput) -> dict[str, int]:
        """The table row of each sample id of ``sched`` that a mask limits (writing the masks not
        on the device yet): a sequence's own samples and its forks', and the samples after its
        speculative drafts (each with the state after the drafts before it)."""
        out: dict[str, int] = {}
        used: set[int] = set()
        for seq in sched.sequences:
            if seq.token_mask_key is None:  # set on sampling sequences only
                continue
            row = self._row(seq.token_mask_key, used)
            out.update(dict.fromkeys(seq.sample_ids, row))
            for j, key in enumerate(seq.draft_mask_keys, 1):
                out[draft_sample_id(seq.request_id, j)] = self._row(key, used)
        return out

    def _row(self, key, used: set[int]) -> int:
        row = self._rows.get(key)
        if row is None:
            row = self._free_row(used)
            token_dfa, state = key
            words = token_dfa.mask_words(state)
            if words.shape != (self.num_words,):
                raise ValueError(f"a structured-output mask has {words.shape[0]} words; the model's "
                                 f"vocabulary needs {self.num_words}")
            self.table = self._set(self.table, np.int32(row), words)
            self.num_writes += 1
            self._rows[key] = row
        self._rows.move_to_end(key)
        used.add(row)
        return row

    def _free_row(self, used: set[int]) -> int:
        if len(self._rows) < self.capacity:  # rows are handed out in order and only reused when full
            return len(self._rows)
        for key, row in self._rows.items():  # least recently used first
            if row not in used:
                del self._rows[key]
                return row
        raise RuntimeError(f"a step refers to more than {self.capacity} structured-output masks")
