"""N-gram (prompt lookup) proposals for speculative decoding: host-side, numpy only.

A sequence often repeats itself: code being edited, a document being quoted or summarised, a
list that follows a pattern. The proposal for the next tokens is what followed the sequence's
last n tokens when they occurred before: the longest n in ``min_n .. max_n`` that occurs, and
of those occurrences the latest. The target model verifies the proposal in the next step, so a
wrong guess costs only the compute of the extra positions, never a wrong token.
"""

from __future__ import annotations

import numpy as np


def propose_ngram(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> tuple[int, ...]:
    """Up to ``k`` tokens to follow ``tokens`` (1-D ints, prompt + outputs so far); () if none.

    The continuation is copied from right after the matched occurrence; when it runs into the
    end of the sequence it goes on from the tokens it has just proposed, so a repeating pattern
    (period shorter than ``k``) is continued, as an LZ77 copy would.
    """
    length = len(tokens)
    if k <= 0 or length <= min_n:
        return ()
    # Earlier positions holding the last token: the ends of candidate occurrences.
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])
    if ends.size == 0:
        return ()
    matched = np.ones(ends.size, np.int64)  # tokens matched backwards from each end
    alive = np.ones(ends.size, bool)
    for back in range(1, min(max_n, length - 1)):
        starts = ends - back
        alive &= starts >= 0
        alive &= tokens[np.maximum(starts, 0)] == tokens[length - 1 - back]
        if not alive.any():
            break
        matched += alive
    best = int(matched.max())
    if best < min_n:
        return ()
    source = int(ends[np.flatnonzero(matched == best)[-1]]) + 1  # the token after the occurrence
    out: list[int] = []
    for j in range(k):
        i = source + j
        out.append(int(tokens[i]) if i < length else out[i - length])
    return tuple(out)
