"""Each penalised request's prompt + output ids in one numpy buffer that grows by appending.

The device needs a request's whole token history for repetition, frequency and presence
penalties and multi-token bad words. Converting the Python lists every step would cost
O(length) per request per step; tokens are only ever appended, so each step copies just the
new ones into the buffer and hands out a read-only view.
"""

from __future__ import annotations

import numpy as np

from jaxllm.engine.request import Request

_MIN_CAPACITY = 256


class TokenHistories:
    """Buffers keyed by request id; ``drop`` one when its request ends."""

    def __init__(self):
        self._buffers: dict[str, np.ndarray] = {}
        self._lengths: dict[str, int] = {}

    def view(self, request: Request) -> np.ndarray:
        """[num_tokens] int32, read-only: prompt + output ids of ``request`` so far."""
        rid, n = request.request_id, request.num_tokens
        have = min(self._lengths.get(rid, 0), n)
        buffer = self._buffers.get(rid)
        if buffer is None or len(buffer) < n:
            grown = np.empty(max(n, 2 * (0 if buffer is None else len(buffer)), _MIN_CAPACITY), np.int32)
            if buffer is not None:
                grown[:have] = buffer[:have]
            buffer = self._buffers[rid] = grown
        buffer[have:n] = request.token_ids_in(have, n)
        self._lengths[rid] = n
        out = buffer[:n]
        out.flags.writeable = False
        return out

    def drop(self, request_id: str) -> None:
        self._buffers.pop(request_id, None)
        self._lengths.pop(request_id, None)
