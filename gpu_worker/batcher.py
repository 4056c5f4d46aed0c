"""A batch queue in the manner of Ray Serve's: a batch is released when it holds `max_size` items or
when its oldest item has waited `max_delay_s`, whichever comes first."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class BatchQueue(Generic[T]):
    def __init__(self, max_size: int, max_delay_s: float, clock: Callable[[], float] = time.monotonic):
        if max_size < 1 or max_delay_s < 0:
            raise ValueError("max_size must be ≥ 1 and max_delay_s ≥ 0")
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self._clock = clock
        self._items: list[T] = []
        self._deadline = 0.0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T) -> None:
        if not self._items:
            self._deadline = self._clock() + self.max_delay_s  # the clock starts with the oldest item
        self._items.append(item)

    @property
    def room(self) -> int:
        return max(0, self.max_size - len(self._items))

    def time_left(self) -> float | None:
        """Seconds until the deadline (0 when passed); None when empty (no deadline running)."""
        if not self._items:
            return None
        return max(0.0, self._deadline - self._clock())

    def ready(self) -> bool:
        return len(self._items) >= self.max_size or (bool(self._items) and self._clock() >= self._deadline)

    def take(self) -> list[T]:
        """At most max_size items, oldest first; the rest (if any) start a new deadline now."""
        batch, self._items = self._items[: self.max_size], self._items[self.max_size :]
        if self._items:
            self._deadline = self._clock() + self.max_delay_s
        return batch
