"""Host memory slots for the K/V blocks of requests preempted by swapping.

The runner holds the host arrays (one slot = one block of K and V across all layers); this
class only decides which slots are free and which request's saved blocks sit in which slots.
"""

from __future__ import annotations


class SwapSpace:
    """``num_slots`` host slots; a request's blocks are saved all together or not at all."""

    def __init__(self, num_slots: int):
        if not isinstance(num_slots, int) or num_slots < 0:
            raise ValueError(f"num_slots={num_slots!r} must be a non-negative integer")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out the lowest slot first
        self._held: dict[str, tuple[int, ...]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def holds(self, request_id: str) -> bool:
        return request_id in self._held

    def num_held(self, request_id: str) -> int:
        return len(self._held.get(request_id, ()))

    def store(self, request_id: str, num_blocks: int) -> tuple[int, ...] | None:
        """Slots for ``num_blocks`` blocks of ``request_id``; None (nothing taken) when short."""
        if request_id in self._held:
            raise ValueError(f"request {request_id!r} already has blocks in swap space")
        if num_blocks > len(self._free):
            return None
        slots = tuple(self._free.pop() for _ in range(num_blocks))
        self._held[request_id] = slots
        return slots

    def release(self, request_id: str) -> tuple[int, ...]:
        """Free and return the slots of ``request_id`` (none if it holds none)."""
        slots = self._held.pop(request_id, ())
        self._free.extend(reversed(slots))
        return slots
