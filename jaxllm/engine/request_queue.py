"""The scheduler's queue of waiting requests, in the order they are admitted.

``"fcfs"`` (vLLM's default): arrival order; a preempted request goes back to the front.
``"priority"``: by ``(priority, arrival order)``, lower values first (vLLM's convention); a
preempted request goes back to its place by the same key, so an earlier request of equal
priority still comes before it.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Iterator

from jaxllm.engine.request import Request


class RequestQueue:
    """Waiting requests; with ``by_priority``, ``key(request)`` orders them."""

    def __init__(self, by_priority: bool, key: Callable[[Request], tuple]):
        self.by_priority = by_priority
        self._key = key
        self._items: deque[Request] | list[Request] = [] if self.by_priority else deque()

    def push(self, request: Request) -> None:
        """A new arrival (or a beam fork): at the back, or at its place by priority."""
        if self.by_priority:
            bisect.insort(self._items, request, key=self._key)
        else:
            self._items.append(request)

    def push_front(self, request: Request) -> None:
        """A preempted request: at the front, or back at its place by priority."""
        if self.by_priority:
            bisect.insort(self._items, request, key=self._key)
        else:
            self._items.appendleft(request)

    def peek(self) -> Request:
        return self._items[0]

    def pop(self) -> Request:
        return self._items.pop(0) if self.by_priority else self._items.popleft()

    def remove(self, request: Request) -> None:
        self._items.remove(request)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._items)

    def __reversed__(self) -> Iterator[Request]:
        return reversed(self._items)

    def __contains__(self, request: Request) -> bool:
        return request in self._items
